"""Trabecular bone measurement in a vertebral body on one axial slice.

The body outline is the convex hull of the bone (>200 HU) seen anywhere in
the vertebra's disc-to-disc slab, in front of the spinal canal: endplates and
cortex outline the body even when its trabecular interior is osteoporotic.
Eroding the outline by 4 mm excludes the cortex and partial-volume rim. The ROI is an ellipse in the anterior two
thirds of that core (away from the basivertebral vein), as in the
opportunistic-screening literature (Pickhardt et al. 2013).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull, QhullError

from pipeline.localiser import Localisation, body_front
from pipeline.morphology import component_sizes, fill_holes
from pipeline.refusal import Refusal
from pipeline.volume import Volume

OUTLINE_HU = 200
CORTEX_MARGIN_MM = 4.0
MIN_ROI_AREA_MM2 = 80.0


class MeasurementError(Refusal):
    """The trabecular ROI cannot be measured on the chosen slices."""


class MetalInBody(MeasurementError):
    """Metal or cement in the vertebral body: its streaks spoil the neighbouring slices too."""


class LesionInBody(MeasurementError):
    """A focal dense lesion fills too much of the trabecular ROI for what is left to stand for the body."""


class FracturedBody(MeasurementError):
    """A suspected compression fracture: the collapsed body's attenuation is compacted bone, not its density."""


@dataclass(frozen=True, eq=False)
class BoneMeasurement:
    level: str
    slice_index: int
    sop_instance_uid: str
    mean_hu: float
    sd_hu: float
    area_mm2: float
    n_pixels: int
    roi_polygon_rc: np.ndarray  # closed polygon (row, col) in pixel coordinates of the slice
    roi_centre_rc: tuple[float, float]
    median_hu: float = float("nan")
    dense_fraction: float = 0.0  # share of ROI pixels above 400 HU (endplate/cortex contamination)
    frame_number: int | None = None  # 1-based frame of a multi-frame source instance
    n_slices: int = 1  # slices whose ROI voxels were pooled into mean/SD/median/n_pixels
    lesion_pixels: int = 0  # ROI pixels left out as a focal dense lesion (bone island, sclerotic lesion)
    pooled_slices: tuple[int, ...] = ()  # their indices (the ROI outline is the one on ``slice_index``)
    method: str = ("trabecular ellipse, cortex hull eroded 4 mm, anterior 2/3, mid-body slice with least dense bone, "
                   "voxels pooled with clean neighbours within 3 mm")


def _hull_mask(shape: tuple[int, int], points_rc: np.ndarray) -> np.ndarray:
    hull = ConvexHull(points_rc)
    rr, cc = np.mgrid[0 : shape[0], 0 : shape[1]]
    grid = np.stack([rr.ravel(), cc.ravel()], axis=1).astype(float)
    eq = hull.equations  # a*r + b*c + d <= 0 inside
    inside = np.all(grid @ eq[:, :2].T + eq[:, 2] <= 1e-9, axis=1)
    return inside.reshape(shape)


def _disk_px(r: int) -> np.ndarray:
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (yy**2 + xx**2) <= r * r


def _focal_dense(sub: np.ndarray, core: np.ndarray, roi: np.ndarray, dy: float, dx: float) -> np.ndarray:
    """ROI pixels of focal dense lesions: bone islands and sclerotic foci, which would raise the mean.

    A lesion is a connected group of at least LESION_MIN_AREA_MM2 inside the body's core that is denser
    than LESION_MIN_HU (bone islands measure about 900-1500 HU, adult trabecular bone 50-300; a fixed
    threshold, because a lesion filling the ROI would carry any ROI-relative one with it) and at least LESION_MIN_THICKNESS_MM thick, widened by 1 mm
    for its partial-volume rim. Single noisy pixels and thin cortical bands are not lesions.
    """
    candidate = core & (sub > LESION_MIN_HU)
    if not candidate.any():
        return np.zeros_like(roi)
    lbl, n = ndi.label(candidate)
    sizes = component_sizes(lbl, n) * dy * dx
    rim = max(1, int(round(1.0 / min(dy, dx))))
    # compact foci only: a lesion is still there after eroding LESION_MIN_THICKNESS_MM / 2; a cortex or
    # endplate cut tangentially by a tilted slice is a thin band, and the slice ranking deals with those
    r_px = int(LESION_MIN_THICKNESS_MM / 2.0 // min(dy, dx))  # none on coarse (>= 3 mm) pixels
    solid = ndi.binary_erosion(candidate, structure=_disk_px(r_px)) if r_px else candidate
    thick = np.unique(lbl[solid])
    keep = np.isin(lbl, np.intersect1d(1 + np.nonzero(sizes >= LESION_MIN_AREA_MM2)[0], thick[thick > 0]))
    return ndi.binary_dilation(keep, iterations=rim) & roi


def _ellipse(shape, centre, semi_rc):
    rr, cc = np.mgrid[0 : shape[0], 0 : shape[1]]
    return ((rr - centre[0]) / semi_rc[0]) ** 2 + ((cc - centre[1]) / semi_rc[1]) ** 2 <= 1.0


def measure_trabecular(volume: Volume, loc: Localisation, slice_index: int, slab: tuple[int, int],
                       level: str = "L1") -> BoneMeasurement:
    """Mean/SD HU in a trabecular ellipse on ``slice_index``; ``slab`` is the body's slice range."""
    return _measure_slice(volume, loc, slice_index, slab, level)[0]


def _body_outline(volume: Volume, slab: tuple[int, int], window: tuple[int, int, int, int], yp: int,
                  centre_rc: tuple[float, float], dy: float, dx: float) -> np.ndarray:
    """The vertebral body's section (a convex mask in ``window``) from the bone of slices ``slab``.

    A max projection over the slab: its endplates are solid bone even when the trabecular
    interior is osteoporotic, so the projection gives the body's section.
    """
    R0, R1, C0, C1 = window
    z0, z1 = slab
    slab_bone = (volume.hu[z0 : z1 + 1, R0:R1, C0:C1] > OUTLINE_HU).any(axis=0)
    slab_bone[yp + 1 :] = False  # nothing behind the canal's anterior edge
    filled = fill_holes(slab_bone)
    # cut off a contrast-filled aorta fused to the body's front
    front = body_front(filled, yp, int(round(centre_rc[1])), dy, dx)
    filled[: max(0, front)] = False
    region = ndi.binary_opening(filled, structure=np.ones((3, 3), bool),
                                iterations=max(1, int(round(2.0 / min(dy, dx)))))
    lbl, n = ndi.label(region)
    if n == 0:
        raise MeasurementError("no vertebral body outline found")
    best = None
    for i in range(1, n + 1):
        rr, cc = np.nonzero(lbl == i)
        d = np.hypot(rr.mean() - centre_rc[0], cc.mean() - centre_rc[1]) - 0.02 * rr.size
        if best is None or d < best[0]:
            best = (d, i)
    pts = np.argwhere(lbl == best[1]).astype(float)
    if len(pts) < 10:
        raise MeasurementError("vertebral body outline is too small")
    try:
        return _hull_mask((R1 - R0, C1 - C0), pts)
    except QhullError:
        raise MeasurementError("vertebral body outline is degenerate") from None


def _measure_slice(volume: Volume, loc: Localisation, slice_index: int, slab: tuple[int, int],
                   level: str) -> tuple[BoneMeasurement, np.ndarray]:
    """The measurement on one slice and its ROI voxel values (for pooling over slices)."""
    hu = volume.hu[slice_index]
    _, dy, dx = volume.spacing
    r0, r1, c0, c1 = loc.body_box_rc[slice_index]
    pad_c = int(round(6 / dx))
    R0 = max(0, int(r1) - int(round(50 / dy)))
    R1 = min(hu.shape[0], int(np.ceil(r1)) + 1)
    C0, C1 = max(0, int(c0) - pad_c), min(hu.shape[1], int(np.ceil(c1)) + pad_c + 1)
    sub = hu[R0:R1, C0:C1]
    yp = int(np.ceil(r1)) - R0
    centre_rc = (0.5 * (r0 + r1) - R0, 0.5 * (c0 + c1) - C0)
    window = (R0, R1, C0, C1)
    body = _body_outline(volume, slab, window, yp, centre_rc, dy, dx)
    # In a tilted spine the slab's ends hold the neighbours' endplates, which widen the outline
    # towards them; the central part of the slab gives the body's own section where its cortex is
    # whole (an osteoporotic body's thin cortex may not be: then the whole slab is kept).
    z0, z1 = slab
    margin = int(round(OUTLINE_SLAB_MARGIN * (z1 - z0)))
    if margin > 0 and z1 - z0 - 2 * margin >= 2:
        try:
            inner = _body_outline(volume, (z0 + margin, z1 - margin), window, yp, centre_rc, dy, dx)
            if inner.sum() >= INNER_OUTLINE_MIN_SHARE * body.sum():
                body = inner
        except MeasurementError:
            pass
    metal = int(np.count_nonzero(sub[body] >= METAL_HU))
    if metal >= METAL_MIN_VOXELS:
        # Pedicle screws, vertebroplasty cement or a dense implant: any HU inside is meaningless.
        raise MetalInBody(f"metal or cement in the {level} body ({metal} voxels >= {METAL_HU:.0f} HU on slice "
                          f"{slice_index + 1}): {level} not measurable")
    core = ndi.binary_erosion(body, structure=np.ones((3, 3), bool),
                              iterations=max(1, int(round(CORTEX_MARGIN_MM / min(dy, dx)))))
    rows = np.nonzero(core.any(axis=1))[0]
    if rows.size < 3:
        raise MeasurementError("vertebral body too small after excluding the cortex")
    top, bottom = rows.min(), rows.max()
    anterior = core.copy()
    anterior[top + int(round((bottom - top) * 2 / 3)) + 1 :] = False
    rr, cc = np.nonzero(anterior)
    centre = (rr.mean(), cc.mean())
    semi = np.array([(rr.max() - rr.min() + 1) / 2.0, (cc.max() - cc.min() + 1) / 2.0]) * 0.9
    for _ in range(30):
        ell = _ellipse(sub.shape, centre, semi)
        if ell.sum() and (ell & ~core).sum() <= 0.01 * ell.sum():
            break
        semi *= 0.92
    ell &= core
    area = float(ell.sum() * dy * dx)
    if area < MIN_ROI_AREA_MM2:
        raise MeasurementError(f"trabecular ROI only {area:.0f} mm2 (minimum {MIN_ROI_AREA_MM2:.0f})")
    dense_fraction = float(np.mean(sub[ell] > DENSE_HU))  # before lesions are taken out: ranks endplate slices
    lesion = _focal_dense(sub, core, ell, dy, dx)
    if lesion.sum() > LESION_MAX_SHARE * ell.sum():
        raise LesionInBody(f"a focal dense lesion fills {lesion.sum() / ell.sum():.0%} of the {level} trabecular ROI "
                           f"on slice {slice_index + 1}: {level} not measurable")
    values = sub[ell & ~lesion].astype(float)
    t = np.linspace(0, 2 * np.pi, 33)
    poly = np.stack([centre[0] + semi[0] * np.sin(t) + R0, centre[1] + semi[1] * np.cos(t) + C0], axis=1)
    poly[-1] = poly[0]
    return BoneMeasurement(
        level=level,
        slice_index=slice_index,
        pooled_slices=(slice_index,),
        sop_instance_uid=volume.slice_refs[slice_index].sop_instance_uid if volume.slice_refs else "",
        frame_number=volume.slice_refs[slice_index].frame_number if volume.slice_refs else None,
        mean_hu=float(values.mean()),
        sd_hu=float(values.std(ddof=1)) if values.size > 1 else 0.0,
        area_mm2=area,
        n_pixels=int(values.size),
        roi_polygon_rc=poly,
        roi_centre_rc=(float(centre[0] + R0), float(centre[1] + C0)),
        median_hu=float(np.median(values)),
        dense_fraction=dense_fraction,
        lesion_pixels=int(lesion.sum()),
    ), values


DENSE_HU = 400.0
LESION_MIN_HU = 500.0
LESION_MIN_AREA_MM2 = 10.0
LESION_MIN_THICKNESS_MM = 3.0
LESION_MAX_SHARE = 0.3  # more of the ROI than this: the level is not measurable
METAL_HU = 2500.0  # above cortical bone (<~1800 HU on routine CT): metal, or cement with contrast agent
METAL_MIN_VOXELS = 10
POOL_MM = 3.0  # neighbours of the chosen slice within this distance are pooled (5 mm slices: none)
POOL_DENSE_TOLERANCE = 0.02  # a neighbour may have at most this many more dense voxels (share) than the chosen
MIN_SEARCH_SLICES = 2
OUTLINE_SLAB_MARGIN = 0.1  # of the slab's height, at each end
INNER_OUTLINE_MIN_SHARE = 0.6  # the central slices' outline must keep this share of the whole slab's


def measure_mid_body(volume: Volume, loc: Localisation, z_range: tuple[float, float], level: str = "L1",
                     search_fraction: float = 0.2) -> BoneMeasurement:
    """Measure on the mid-body slice least touched by endplate or cortex.

    Candidates lie within +-20% of the body's disc-to-disc height around its centre (at least
    +-2 slices).
    In a tilted spine one axial slice can cut an endplate in front and mid-body
    behind; the share of ROI pixels above 400 HU (cortical/endplate density) ranks
    the candidates, with a small penalty for distance from the centre.
    """
    fracture = loc.fracture_of(level)
    if fracture is not None:
        raise FracturedBody(f"{fracture.text}; {level} not measured (the attenuation of a compressed body is not "
                            "its bone density)")
    lo, hi = z_range
    centre = 0.5 * (lo + hi)
    # At least +-2 slices: with thick slices (5 mm) 20% of the height is one slice, less than the
    # disc positions' own uncertainty, and the least-dense rule then has no endplate-free slice to choose.
    half = max(MIN_SEARCH_SLICES, int(round(search_fraction * (hi - lo))))
    slab = (int(np.ceil(lo)), int(np.floor(hi)))
    best: tuple[float, int] | None = None
    last_error: MeasurementError | None = None
    measured: dict[int, tuple[BoneMeasurement, np.ndarray]] = {}
    for d in range(-half, half + 1):
        k = int(round(centre)) + d
        if not 0 <= k < volume.shape[0]:
            continue
        try:
            measured[k] = _measure_slice(volume, loc, k, slab, level)
        except MetalInBody:
            raise  # one slice with metal is enough: streak artefacts reach its neighbours
        except MeasurementError as exc:
            last_error = exc
            continue
        score = measured[k][0].dense_fraction + 0.01 * abs(d)
        if best is None or score < best[0]:
            best = (score, k)
    if best is None:
        raise last_error or MeasurementError(f"{level} could not be measured")
    return _pooled(measured, best[1], volume.spacing[0])


def _pooled(measured: dict[int, tuple[BoneMeasurement, np.ndarray]], k_best: int, dz: float) -> BoneMeasurement:
    """Pool the ROI voxels of the chosen slice and of its neighbours within POOL_MM that are as clean.

    Several slices through mid-body give a steadier mean than one (noise, a single
    sclerotic island); a neighbour touching an endplate (more dense voxels than the
    chosen slice) is left out. The ROI outline stays the chosen slice's.
    """
    chosen, _ = measured[k_best]
    reach = int(POOL_MM // dz) if dz > 0 else 0
    keep = [k for k in range(k_best - reach, k_best + reach + 1)
            if k in measured and measured[k][0].dense_fraction <= chosen.dense_fraction + POOL_DENSE_TOLERANCE]
    values = np.concatenate([measured[k][1] for k in keep])
    return replace(chosen, mean_hu=float(values.mean()), sd_hu=float(values.std(ddof=1)) if values.size > 1 else 0.0,
                   median_hu=float(np.median(values)), n_pixels=int(values.size), n_slices=len(keep),
                   pooled_slices=tuple(keep), dense_fraction=float(np.mean(values > DENSE_HU)),
                   lesion_pixels=sum(measured[k][0].lesion_pixels for k in keep))
