"""Anatomical vertebra localiser for axial CT (no learned weights).

The steps, each chosen to survive low bone density (the patients we look for):

1. Track the vertebral body along z, canal first. The spinal canal is a dark
   (<45 HU) hole in a closed bone ring (>200 HU, max-projected over +-4 mm)
   near the midline with bone in front and behind: vessels bright with
   contrast are filled, not holes, and the marrow of an osteoporotic body is
   not dark enough. The body lies in front of the canal: in a +-15 mm bone
   projection (which always holds an endplate) it is the bone region touching
   the canal, cut at its waist where a contrast-filled aorta is fused to it.
2. Find intervertebral discs on the column straightened along its own axis
   (``spine_axis``): a 7 mm black top-hat along the axis, averaged over the
   body's depth, responds to discs whatever their tilt, and not to the dark
   interior of an osteoporotic body (longer than 7 mm, its texture not lined
   up across the depth). Peaks >= 12 mm apart are discs; gaps far from the
   median spacing are filled or pruned, except that two clear discs close
   together are kept: a compressed vertebra lies between them.
3. Name the levels from an anchor: ribs. Bone components outside a 35 mm
   cylinder around the canal that reach >= 65 mm laterally and come within
   42 mm of it are ribs, followed back to their heads beside the body; the
   segment holding the lowest rib head is T12. Without a
   rib anchor no level is named (the caller refuses rather than guesses).
   Transitional anatomy: where the lowest rib-bearing vertebra's ribs are all
   short (< 75 mm lateral reach; 12th ribs in the real cases here reach 87-90 mm
   on 2.5-3 mm slices, 72-73 mm when resampled to 5 mm) they may be a 13th
   (lumbar) rib or hypoplastic 12th ribs, and counting from them could put "L1"
   one level off: the confidence is halved and a note says why (never silent).
   A scan that ends less than 20 mm below L1's lower disc may have cut off the
   real 12th ribs (they descend 40-50 mm from their heads), so the count from
   the ribs seen could be one high: level uncertain. So is a "L1" with lungs
   on both sides of it: a scan ending mid-chest cuts off the descending ribs of
   its lowest vertebrae, and a thoracic vertebra was counted as lumbar.
4. Compare each body's disc-to-disc height with its neighbours': a T12, L1 or
   L2 much lower than them is a suspected compression fracture (a finding of
   its own, and a reason not to measure it); a segment much taller than them
   is two bodies merged by a missed disc, and the level is then uncertain.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi
from scipy.signal import find_peaks

from pipeline.calibration import check_calibration, linear_correction
from pipeline.morphology import close_planes, component_sizes, fill_holes, slab_any
from pipeline.spine_axis import STEP_MM, spine_axis
from pipeline.volume import Volume

BONE_HU = 200
TRACK_WINDOW_MM = 15.0
SLAB_MM = 3.0  # thinner slices are averaged into slabs of about this thickness
CANAL_WINDOW_MM = 4.0
CANAL_MAX_HU = 45.0
MIN_DISC_GAP_MM = 12.0
CROWDED_GAP_FRACTION = 0.55  # of the median disc spacing: closer candidates are crowded
KEEP_CROWDED_GAP_FRACTION = 0.35  # ...but both are kept when at least this far apart
KEEP_CROWDED_STRENGTH = 0.6  # ...and the weaker scores at least this share of the stronger
FRACTURE_RATIO = 0.8  # disc-to-disc height under this times its neighbours': suspected compression fracture
FRACTURE_LEVELS = ("T12", "L1", "L2")  # L1 and the levels measured in its place
MAX_DISC_TO_DISC_MM = 50.0  # taller than any adult T10-L5 vertebra with its disc: merged segments
MIN_DISC_SCORE_HU = 20.0
DISC_EDGE_MARGIN_MM = 6.0
WEAK_DISC_SCORE_HU = 10.0  # accepted only where the spacing says a disc is missing
WEAK_DISC_REACH = 0.25  # of the median spacing, around where the missing disc should be
EDGE_STRETCH_FRACTION = 1.4  # a stretch to the scan's edge longer than this x the spacing holds a disc
RIB_EXCLUSION_RADIUS_MM = 35.0
CANAL_CENTRE_OFFSET_MM = 8.0  # canal centre lies about this far behind the body's posterior wall
WAIST_FRACTION = 0.7
MAX_SEGMENT_RATIO = 1.5
MAX_NEIGHBOUR_RATIO = 1.45  # T12 / L1 taller than this times their complete neighbours: a merged (missed) disc
RIB_MIN_LATERAL_MM = 65.0
LUNG_AIR_CM2 = 50.0  # air beside "L1" on both sides above this: lungs (here 80-135 cm2 a side from T10 up; <= 21 at L1)
MIN_SCAN_BELOW_L1_MM = 20.0  # less below L1's lower disc, and lower ribs may lie cut off below the scan's edge
SHORT_LOWEST_RIB_MM = 75.0  # lowest ribs all shorter than this: 13th (lumbar) rib or hypoplastic 12th ribs
TRANSITIONAL_CONFIDENCE_FACTOR = 0.5
TRANSITIONAL_NOTE = "possible transitional anatomy"
RIB_MAX_MEDIAL_MM = 42.0
RIB_HEAD_MM = 22.0  # costovertebral joint: beside the body's posterolateral corner
RIB_HEAD_MAX_LIFT_MM = 15.0

LEVEL_NAMES = ["C7"] + [f"T{i}" for i in range(1, 13)] + [f"L{i}" for i in range(1, 6)] + ["S1"]


@dataclass(frozen=True)
class VertebraSegment:
    """A vertebral body between two disc centres (slice indices, fractional)."""

    label: str | None
    z_lower: float  # disc centre below (or volume edge)
    z_upper: float  # disc centre above (or volume edge)
    complete: bool  # both bounding discs seen

    @property
    def centre(self) -> float:
        return 0.5 * (self.z_lower + self.z_upper)


@dataclass(frozen=True)
class Rib:
    side: str  # "L" or "R" (patient side)
    z_medial: float  # slice index of the rib's point nearest the spine (outside the exclusion cylinder)
    lateral_reach_mm: float
    z_head: float | None = None  # that point extrapolated along the rib to its head beside the body

    @property
    def z_anchor(self) -> float:
        """Where the rib meets its vertebra: its head, else its most medial point seen."""
        return self.z_medial if self.z_head is None else self.z_head


@dataclass(frozen=True)
class SuspectedFracture:
    """A vertebral body much lower than its neighbours: height loss, as in a compression fracture."""

    level: str
    height_mm: float  # its disc-to-disc height along the spine's axis
    reference_mm: float  # the mean of its neighbours' (or the typical) disc-to-disc height
    reference: str  # which heights that mean is of

    @property
    def ratio(self) -> float:
        return self.height_mm / self.reference_mm

    @property
    def text(self) -> str:
        return (f"suspected compression fracture of {self.level}: disc-to-disc height {self.height_mm:.0f} mm, "
                f"{self.ratio:.2f} x {self.reference} ({self.reference_mm:.0f} mm)")


@dataclass(frozen=True, eq=False)
class Localisation:
    segments: tuple[VertebraSegment, ...]  # inferior -> superior
    discs: tuple[float, ...]
    ribs: tuple[Rib, ...]
    body_box_rc: np.ndarray  # (Z, 4) row_min, row_max, col_min, col_max of the body per slice
    anchor: str | None
    confidence: float
    reason: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    fractures: tuple[SuspectedFracture, ...] = ()

    def fracture_of(self, level: str) -> SuspectedFracture | None:
        return next((f for f in self.fractures if f.level == level), None)

    def find(self, label: str) -> VertebraSegment | None:
        return next((s for s in self.segments if s.label == label), None)


def _disk(radius_mm: float, pixel_mm: float) -> np.ndarray:
    r = max(1, int(round(radius_mm / pixel_mm)))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (yy**2 + xx**2) <= r * r


def _downsample(hu: np.ndarray, spacing: tuple[float, float, float], target_mm: float = 1.5,
                slab_mm: float = SLAB_MM):
    """Average to ~``target_mm`` pixels in-plane and, for thin slices, to slabs of ~``slab_mm``.

    Thin reconstructions (0.5-1.25 mm) are averaged into slabs so that the
    localiser sees what it was built and validated on (about 3 mm), with less
    noise, and its cost stops growing with the slice count. Returns the
    array, its spacing, the in-plane factor and the slab factor (slices per slab).
    """
    f = max(1, int(round(target_mm / min(spacing[1], spacing[2]))))
    fz = max(1, int(round(slab_mm / spacing[0])))
    if f == 1 and fz == 1:
        return hu, spacing, 1, 1
    z, y, x = hu.shape
    y2, x2 = y // f * f, x // f * f
    nz = -(-z // fz)
    out = np.empty((nz, y2 // f, x2 // f), dtype=np.int16)
    for k in range(nz):  # slab by slab: bounded memory; an exact integer sum, then one division
        slab = hu[k * fz : (k + 1) * fz, :y2, :x2]
        # strided in-place adds: the same integers as a reshape-and-sum, at about a quarter of its time
        total = slab[0].astype(np.int32)
        for plane in slab[1:]:
            total += plane
        cols = total[:, 0::f].copy()
        for j in range(1, f):
            cols += total[:, j::f]
        total = cols[0::f].copy()
        for j in range(1, f):
            total += cols[j::f]
        out[k] = total / (slab.shape[0] * f * f)
    return out, (spacing[0] * fz, spacing[1] * f, spacing[2] * f), f, fz


def _body_midline(hu: np.ndarray) -> float:
    xs = []
    for k in range(0, hu.shape[0], max(1, hu.shape[0] // 20)):
        lbl, n = ndi.label(hu[k] > -400)
        if n == 0:
            continue
        sizes = component_sizes(lbl, n)
        body = lbl == (int(np.argmax(sizes)) + 1)
        xs.append(np.nonzero(body)[1].mean())
    return float(np.median(xs)) if xs else hu.shape[2] / 2.0


def _air_beside(hu_slice: np.ndarray, xmid: float, sp) -> tuple[float, float]:
    """Air (< -500 HU) inside the body on one axial slice, right and left of ``xmid`` (cm2): lungs, bowel gas."""
    lbl, n = ndi.label(fill_holes(hu_slice > -400))
    if n == 0:
        return 0.0, 0.0
    sizes = component_sizes(lbl, n)
    air = (lbl == int(np.argmax(sizes)) + 1) & (hu_slice < -500)
    cm2 = sp[1] * sp[2] / 100.0
    split = int(round(xmid))
    return float(air[:, :split].sum() * cm2), float(air[:, split:].sum() * cm2)


def _fill_nan(a: np.ndarray) -> np.ndarray:
    a = a.astype(float)
    ok = ~np.isnan(a)
    if not ok.any():
        return a
    idx = np.arange(len(a))
    return np.interp(idx, idx[ok], a[ok])


def _find_canal(m: np.ndarray, hu_slice: np.ndarray, sp, xmid: float) -> tuple[float, float, float] | None:
    """The spinal canal on one slice of the bone MIP: (top row, centre row, centre column).

    The canal is a dark (<45 HU) hole in the bone ring of the vertebra, near the
    midline, with bone in front (the body) and behind (the arch). Vessels bright with contrast
    are filled, not holes; a calcified aortic ring has no bone in front of it.
    """
    holes, n = ndi.label(fill_holes(m) & ~m)
    if n == 0:
        return None
    px = sp[1] * sp[2]
    front = int(round(10.0 / sp[1]))
    back = int(round(25.0 / sp[1]))
    best = None
    for i, sl in enumerate(ndi.find_objects(holes), start=1):
        hy, hx = np.nonzero(holes[sl] == i)
        area = hy.size * px
        if not 40.0 <= area <= 1000.0:
            continue
        cy, cx = hy.mean() + sl[0].start, hx.mean() + sl[1].start
        if abs(cx - xmid) * sp[2] > 35.0:
            continue
        # CSF and epidural fat, not the marrow of an osteoporotic body (also a hole in the cortex)
        if hu_slice[sl][holes[sl] == i].mean() > CANAL_MAX_HU:
            continue
        top, bottom = hy.min() + sl[0].start, hy.max() + sl[0].start
        c0, c1 = int(cx) - 2, int(cx) + 3
        if not m[max(0, top - front) : top, c0:c1].any() or not m[bottom + 1 : bottom + 1 + back, c0:c1].any():
            continue
        if best is None or area > best[0]:
            best = (area, float(top), float(cy), float(cx))
    return None if best is None else best[1:]


def body_front(filled: np.ndarray, yp: int, col: int, row_mm: float, col_mm: float) -> int:
    """Anterior edge (row) of the vertebral body whose posterior wall is at row ``yp``.

    Takes the bone region touching the canal's front within 45 mm and +-25 mm
    of the canal, and walks forward through it. A contrast-filled aorta lying
    against the body continues the region; the first row narrower than 70% of
    the body's width, after at least 15 mm of body, is the waist where the
    body's rounded front meets the vessel.
    """
    r0 = max(0, yp - int(round(45.0 / row_mm)))
    half = int(round(25.0 / col_mm))  # a body is at most ~50 mm wide; wider is processes and ribs
    c0 = max(0, col - half)
    window = filled[r0:yp, c0 : col + half + 1]
    lbl, _ = ndi.label(window)
    seeds = lbl[-max(1, int(round(3.0 / row_mm))) :, max(0, col - c0 - 1) : col - c0 + 2]
    seeds = seeds[seeds > 0]
    if seeds.size == 0:
        return yp
    region = lbl == np.bincount(seeds).argmax()
    rows = np.nonzero(region.any(axis=1))[0]
    front = int(rows.min())
    widths = region.sum(axis=1) * col_mm
    last = region.shape[0]
    ref = widths[max(front, last - int(round(30.0 / row_mm))) : last - int(round(5.0 / row_mm))].max(initial=0.0)
    for y in range(last - int(round(15.0 / row_mm)), front - 1, -1):
        if widths[y] < WAIST_FRACTION * ref:
            return r0 + y + 1
    return r0 + front


def _track_body(hu: np.ndarray, sp: tuple[float, float, float], xmid: float):
    """Per slice: anterior body edge row, canal anterior edge row, canal column, body half width (ds pixels).

    The canal is found first (it is unmistakable: a hole in bone near the
    midline), then the body in front of it. Slices without a canal are
    interpolated, and outliers against the running median are dropped.
    """
    z_n = hu.shape[0]
    w = max(1, int(round(TRACK_WINDOW_MM / sp[0])))
    bone = hu > BONE_HU
    mip = slab_any(bone, w)
    # The canal needs a thin slab: a thick one projects laminae across it.
    wc = max(0, int(round(CANAL_WINDOW_MM / sp[0])))
    canal_mip = slab_any(bone, wc)
    canal_closed = close_planes(canal_mip, _disk(3.0, sp[1]))  # bridges partial-volume gaps in thin laminae
    ya = np.full(z_n, np.nan)
    yp = np.full(z_n, np.nan)
    cx = np.full(z_n, np.nan)
    hw = np.full(z_n, np.nan)
    for k in range(z_n):
        m = mip[k]
        canal = _find_canal(canal_closed[k], hu[k], sp, xmid)
        if canal is None:
            continue
        top, _, ccol = canal
        col = int(round(ccol))
        filled = fill_holes(m)
        front = body_front(filled, int(top), col, sp[1], sp[2])
        if (top - front) * sp[1] < 12.0:
            continue
        ya[k], yp[k], cx[k] = front, top, ccol
        rows = filled[front : int(top)]
        half = int(round(30.0 / sp[2]))
        lo = max(0, col - half)
        cols = np.nonzero(rows[:, lo : col + half + 1].any(axis=0))[0] + lo
        if cols.size:
            hw[k] = max(ccol - cols.min(), cols.max() - ccol)
    found = ~np.isnan(yp)
    if found.sum() < 3:
        return None
    size = max(3, int(round(15.0 / sp[0])) | 1)
    for a, tol_mm in ((yp, 15.0), (cx, 15.0)):
        med = ndi.median_filter(_fill_nan(a), size=2 * size + 1, mode="nearest")
        bad = np.abs(a - med) * sp[1] > tol_mm
        for arr in (ya, yp, cx, hw):
            arr[bad] = np.nan
    found = ~np.isnan(yp)
    if found.sum() < 3:
        return None
    hw = np.where(np.isnan(hw), 20.0 / sp[2], np.clip(hw, 12.0 / sp[2], 30.0 / sp[2]))
    track = [ndi.median_filter(_fill_nan(a), size=size, mode="nearest") for a in (ya, yp, cx, hw)]
    return np.stack(track, axis=1), found


def _disc_peaks(score: np.ndarray, height: float, step_mm: float) -> list[float]:
    """Peaks of the disc score at least ``height`` high and MIN_DISC_GAP_MM apart, each moved to the centre
    of its plateau (top-hats of flat-bottomed discs are flat); none within DISC_EDGE_MARGIN_MM of an end.

    The ends are silenced before the peaks are found, not after: a dark stretch cut by the scan's edge
    next to an endplate answers the top-hat like a disc, and within MIN_DISC_GAP_MM it suppressed a real
    disc just inside the margin (found by the crop sweep: the chest CT cut 7 mm above its T12/L1 disc).
    """
    distance = max(1, int(round(MIN_DISC_GAP_MM / step_mm)))
    edge = int(np.ceil(DISC_EDGE_MARGIN_MM / step_mm))
    inner = np.array(score, dtype=float)
    inner[:edge] = 0.0
    inner[max(edge, len(inner) - edge) :] = 0.0
    peaks, _ = find_peaks(np.pad(inner, 1, constant_values=0), height=height, distance=distance)
    refined = []
    for p in peaks - 1:
        thr = 0.8 * score[p]
        lo = hi = int(p)
        while lo > 0 and score[lo - 1] >= thr:
            lo -= 1
        while hi < len(score) - 1 and score[hi + 1] >= thr:
            hi += 1
        refined.append(0.5 * (lo + hi))
    margin = DISC_EDGE_MARGIN_MM / step_mm  # a band cut by the scan's edge is not a disc seen
    return sorted(d for d in refined if margin <= d <= len(score) - 1 - margin)


def _find_discs(score: np.ndarray, step_mm: float) -> tuple[list[float], set[float], list[str]]:
    """Disc centres (positions along the spine axis, mm), the subset inferred from spacing rather than
    seen, and notes. ``score``: ``SpineAxis.disc_score`` at ``step_mm`` steps.

    Where the spacing says a disc is missing (a gap, or a long stretch to the edge of the scan), a
    weaker peak (>= WEAK_DISC_SCORE_HU) close to where it should be is taken as that disc; only
    without one is the disc inferred from the spacing.
    """
    notes: list[str] = []
    inferred: set[float] = set()
    discs = _disc_peaks(score, MIN_DISC_SCORE_HU, step_mm)
    weak = [d for d in _disc_peaks(score, WEAK_DISC_SCORE_HU, step_mm) if d not in discs]
    strength = {d: float(score[int(round(d))]) for d in discs + weak}

    def weak_near(expected: float, reach: float) -> float | None:
        near = [w for w in weak if abs(w - expected) <= reach]
        return max(near, key=lambda w: strength[w]) if near else None

    if len(discs) >= 3:
        # the spacing, robust to missed discs: each gap counted as the whole number of spacings it spans
        gaps = np.diff(discs)
        unit = max(MIN_DISC_GAP_MM / step_mm, float(np.percentile(gaps, 25)))
        g = float(np.median(gaps / np.maximum(1.0, np.round(gaps / unit))))
        out = [discs[0]]
        for d in discs[1:]:
            gap = d - out[-1]
            weaker = min(strength[d], strength[out[-1]]) / max(strength[d], strength[out[-1]])
            crowded = gap < CROWDED_GAP_FRACTION * g
            if crowded and gap >= KEEP_CROWDED_GAP_FRACTION * g and weaker >= KEEP_CROWDED_STRENGTH:
                # Two discs as clear as each other, close together: a compressed vertebra between them
                # (reported as a suspected fracture), never silently merged into a neighbour.
                notes.append(f"two clear discs only {gap * step_mm:.0f} mm apart")
            elif crowded:
                # keep the stronger of two crowded candidates
                if strength[d] > strength[out[-1]]:
                    out[-1] = d
                notes.append(f"pruned a disc candidate {gap * step_mm:.0f} mm from its neighbour")
                continue
            n_missing = int(round(gap / g)) - 1
            if gap > 1.6 * g and 1 <= n_missing <= 2:
                prev = out[-1]
                for j in range(1, n_missing + 1):
                    expected = prev + gap * j / (n_missing + 1)
                    seen = weak_near(expected, WEAK_DISC_REACH * g)
                    if seen is not None:
                        out.append(seen)
                        notes.append(f"a weak disc accepted in a {gap * step_mm:.0f} mm gap")
                    else:
                        out.append(expected)
                        inferred.add(expected)
                        notes.append(f"inferred a disc in a {gap * step_mm:.0f} mm gap")
            elif gap > 1.6 * g:
                notes.append(f"no disc found in a {gap * step_mm:.0f} mm stretch")
            out.append(d)
        # long stretches to the edges of the scan: a weak disc about one spacing on
        for direction, edge in ((1, len(score) - 1), (-1, 0)):
            while abs(edge - (out[-1] if direction > 0 else out[0])) > EDGE_STRETCH_FRACTION * g:
                last = out[-1] if direction > 0 else out[0]
                seen = weak_near(last + direction * g, WEAK_DISC_REACH * g)
                if seen is None or abs(edge - seen) < MIN_DISC_GAP_MM / step_mm:
                    break
                out = out + [seen] if direction > 0 else [seen] + out
                notes.append("a weak disc accepted towards the edge of the scan")
        discs = sorted(out)
    return [d * step_mm for d in discs], {d * step_mm for d in inferred}, notes


def _find_ribs(hu: np.ndarray, sp, track: np.ndarray) -> list[Rib]:
    z_n, y_n, x_n = hu.shape
    yy, xx = np.mgrid[0:y_n, 0:x_n]
    bone = hu > BONE_HU
    canal_row = track[:, 1] + CANAL_CENTRE_OFFSET_MM / sp[1]
    for k in range(z_n):
        cx = track[k, 2]
        inside = ((yy - canal_row[k]) * sp[1]) ** 2 + ((xx - cx) * sp[2]) ** 2 < RIB_EXCLUSION_RADIUS_MM**2
        bone[k][inside] = False
    lbl, n = ndi.label(bone)
    ribs: list[Rib] = []
    voxel = sp[0] * sp[1] * sp[2]
    for i, sl in enumerate(ndi.find_objects(lbl), start=1):
        comp = lbl[sl] == i
        vol = comp.sum() * voxel
        if vol < 300 or vol > 40000:
            continue
        kz, ky, kx = np.nonzero(comp)
        kz, ky, kx = kz + sl[0].start, ky + sl[1].start, kx + sl[2].start
        dx = (kx - track[kz, 2]) * sp[2]
        dy = (ky - canal_row[kz]) * sp[1]
        lateral = float(np.abs(dx).max())
        dist = np.hypot(dx, dy)
        j = int(np.argmin(dist))
        if lateral < RIB_MIN_LATERAL_MM or dist[j] > RIB_MAX_MEDIAL_MM:
            continue
        # Ribs descend laterally: the medial end lies in the upper half of the component.
        if kz[j] < kz.min() + 0.4 * (kz.max() - kz.min()):
            continue
        side = "L" if dx[j] > 0 else "R"  # +x (columns) points to the patient's left
        ribs.append(Rib(side=side, z_medial=float(kz[j]), lateral_reach_mm=lateral,
                        z_head=_rib_head_z(kz, dist, j, sp[0])))
    return ribs


def _rib_head_z(kz: np.ndarray, dist_mm: np.ndarray, j: int, dz: float) -> float:
    """The rib's z extrapolated from its medial 20 mm to its head, RIB_HEAD_MM from the canal centre.

    Ribs descend laterally, so the most medial point outside the exclusion cylinder lies below the
    costovertebral joint: on the chest CT here 2.5-5 mm below the T12/L1 disc, inside L1, while the
    extrapolated heads lie inside T12. The lift is capped at RIB_HEAD_MAX_LIFT_MM.
    """
    near = dist_mm <= dist_mm[j] + 20.0
    if near.sum() < 3 or np.ptp(dist_mm[near]) < 3.0:
        return float(kz[j])
    slope, _ = np.polyfit(dist_mm[near], kz[near].astype(float), 1)  # slices per mm outwards
    lift = float(np.clip(-slope * (dist_mm[j] - RIB_HEAD_MM), 0.0, RIB_HEAD_MAX_LIFT_MM / dz))
    return float(kz[j]) + lift


def _segments(discs: list[float], z_n: int) -> list[tuple[float, float, bool]]:
    bounds = [(-0.5, False)] + [(d, True) for d in discs] + [(z_n - 0.5, False)]
    segs = []
    for (lo, lo_ok), (hi, hi_ok) in zip(bounds[:-1], bounds[1:]):
        if hi - lo >= 2:
            segs.append((lo, hi, lo_ok and hi_ok))
    return segs


def localise(volume: Volume) -> Localisation:
    """Find the vertebral bodies of an axial CT and name them where an anchor allows."""
    hu, sp, f, fz = _downsample(volume.hu, volume.spacing)
    calibration_notes: list[str] = []
    correction = linear_correction(check_calibration(volume))
    if correction is not None:
        # Every threshold below is in HU: on a scanner whose air and fat are off, find the anatomy on HU mapped
        # back onto nominal air and fat (a -60 HU offset named T12 L1 on the chest CT). Only the localiser sees it.
        slope, intercept = correction
        hu = np.clip(np.round(slope * hu.astype(np.float32) + intercept), -32768, 32767).astype(np.int16)
        calibration_notes.append(f"HU calibration implausible: levels found on HU x {slope:.3f} {intercept:+.0f}")
    z_n = hu.shape[0]
    n_native = volume.hu.shape[0]
    if z_n * sp[0] < 40.0:
        return Localisation((), (), (), np.full((n_native, 4), np.nan), None, 0.0,
                            reason=f"z coverage {z_n * sp[0]:.0f} mm is too short to find vertebral levels")
    xmid = _body_midline(hu)
    tracked = _track_body(hu, sp, xmid)
    if tracked is None:
        return Localisation((), (), (), np.full((n_native, 4), np.nan), None, 0.0,
                            reason="no spinal column found")
    track, _ = tracked
    axis = spine_axis(hu, sp, track)
    discs_s, inferred_s, notes = _find_discs(axis.disc_score(), STEP_MM)
    discs = [axis.z_at(s) for s in discs_s]
    inferred = {axis.z_at(s) for s in inferred_s}
    ribs = _find_ribs(hu, sp, track)
    segs = _segments(discs, z_n)
    box = np.stack([track[:, 0] * f, track[:, 1] * f, (track[:, 2] - track[:, 3]) * f, (track[:, 2] + track[:, 3]) * f], axis=1)

    labels: list[str | None] = [None] * len(segs)
    anchor, confidence, reason = None, 0.0, None
    if ribs and segs:
        lowest_by_side = {s: min(r.z_anchor for r in ribs if r.side == s) for s in {r.side for r in ribs}}
        z_rib = min(lowest_by_side.values())

        def seg_of(z: float) -> int:
            return int(np.argmin([abs(z - 0.5 * (lo + hi)) if lo <= z <= hi else 1e9 + abs(z - 0.5 * (lo + hi)) for lo, hi, _ in segs]))

        t12 = seg_of(z_rib)
        sides_agree = len(lowest_by_side) == 2 and seg_of(max(lowest_by_side.values())) == t12
        t12_index = LEVEL_NAMES.index("T12")
        for i in range(len(segs)):
            j = t12_index + (t12 - i)
            labels[i] = LEVEL_NAMES[j] if 0 <= j < len(LEVEL_NAMES) else None
        anchor = "ribs"
        confidence = 0.9 if sides_agree else 0.7
        if not sides_agree:
            notes.append("lowest ribs seen on one side only, or left/right disagree")
        if t12 == 0:
            reason = "L1 is below the field of view (the lowest vertebra in view bears ribs)"
            confidence = 0.0
        lowest = [r for r in ribs if seg_of(r.z_anchor) == t12]
        reach = max(r.lateral_reach_mm for r in lowest)
        if reason is None and reach < SHORT_LOWEST_RIB_MM:
            # Transitional anatomy must not silently shift the level: say so and halve the confidence.
            confidence *= TRANSITIONAL_CONFIDENCE_FACTOR
            notes.append(f"{TRANSITIONAL_NOTE}: the lowest ribs are short (lateral reach {reach:.0f} mm, under "
                         f"{SHORT_LOWEST_RIB_MM:.0f} mm): a 13th (lumbar) rib or hypoplastic 12th ribs; the level "
                         "count from them may be one off")
    elif not ribs:
        reason = "no rib-bearing vertebra in view to anchor the level count"
    else:
        reason = "no vertebral segments found"
    segments = tuple(VertebraSegment(lab, lo, hi, ok) for (lo, hi, ok), lab in zip(segs, labels))
    fractures, split = _compressed_bodies(segments, axis, inferred) if anchor else ((), None)
    if split is not None and reason is None:
        reason, confidence = split, 0.0
    notes += [f.text for f in fractures]
    l1 = next((s for s in segments if s.label == "L1"), None)
    if l1 is not None and reason is None:
        height_mm = axis.height_mm(l1.z_lower, l1.z_upper)
        if not l1.complete:
            reason = "L1 is cut by the edge of the field of view"
            confidence = 0.0
        elif (l1.z_lower + 0.5) * sp[0] < MIN_SCAN_BELOW_L1_MM:
            # A 12th rib descends 40-50 mm from its head: with the scan's edge this close below "L1", the real
            # 12th ribs may be cut off, the lowest ribs seen the 11th, and "L1" then really T12.
            reason = (f"the scan ends {(l1.z_lower + 0.5) * sp[0]:.0f} mm below L1: a lower pair of ribs could be "
                      "cut off by its edge, so the level count from the ribs may be one high")
            confidence = 0.0
        elif height_mm > MAX_DISC_TO_DISC_MM:
            reason = (f"L1 would span {height_mm:.0f} mm, taller than any single vertebra with its disc: a disc was "
                      "probably missed, so the level is uncertain")
            confidence = 0.0
        elif height_mm < 18.0 and not any(f.level == "L1" for f in fractures):
            confidence *= 0.5
            notes.append(f"L1 disc-to-disc height {height_mm:.0f} mm is atypical")
        if l1.z_lower in inferred or l1.z_upper in inferred:
            confidence *= 0.8
            notes.append("a disc bounding L1 was inferred from the spacing of its neighbours")
        # A missed disc between the rib anchor and L1 would shift every level: refuse instead.
        heights = [axis.height_mm(x.z_lower, x.z_upper) for x in segments if x.complete]
        typical = float(np.median(heights)) if heights else 35.0
        for seg in segments:
            h = axis.height_mm(seg.z_lower, seg.z_upper)
            if seg.label in ("T12", "L1") and h > MAX_SEGMENT_RATIO * typical:
                reason = (f"{seg.label} would span {h:.0f} mm (typical here {typical:.0f} mm): a disc was probably "
                          "missed, so the level is uncertain")
                confidence = 0.0
        # The same against the immediate neighbours: where discs were missed elsewhere too (thin or noisy
        # slices), the median is inflated, but a merged L1 is still about twice its neighbours.
        by_label = {x.label: x for x in segments}
        for name, neighbours in (("L1", ("T12", "L2")), ("T12", ("T11", "L1"))):
            seg = by_label.get(name)
            near = [(n, axis.height_mm(by_label[n].z_lower, by_label[n].z_upper)) for n in neighbours
                    if n in by_label and by_label[n].complete and not any(f.level == n for f in fractures)]
            if reason is not None or seg is None or not near:
                continue
            h = axis.height_mm(seg.z_lower, seg.z_upper)
            mean_near = float(np.mean([x for _, x in near]))
            if h > MAX_NEIGHBOUR_RATIO * mean_near:
                reason = (f"{name} would span {h:.0f} mm, {h / mean_near:.1f}x its neighbours ("
                          + ", ".join(f"{n} {x:.0f} mm" for n, x in near)
                          + "): a disc was probably missed, so the level is uncertain")
                confidence = 0.0
    if l1 is not None and reason is None:
        air = _air_beside(hu[int(round(np.clip(l1.centre, 0, z_n - 1)))], xmid, sp)
        if min(air) > LUNG_AIR_CM2:
            # Both lungs fill the slice: this is the mid-thorax, whatever the ribs seen said (a scan ending there
            # cuts off the lower vertebrae's descending ribs, so a rib-bearing vertebra was taken for L1).
            reason = (f"the vertebra named L1 lies between both lungs (air {air[0]:.0f} and {air[1]:.0f} cm2 on "
                      "either side): it is thoracic, so the level count from the ribs is wrong")
            confidence = 0.0
    if fz > 1:
        segments, discs, ribs, box = _to_native_slices(segments, discs, ribs, box, fz, n_native)
    return Localisation(segments, tuple(discs), tuple(ribs), box, anchor, round(confidence, 3), reason,
                        tuple(calibration_notes + notes), tuple(fractures))


def _compressed_bodies(segments: tuple[VertebraSegment, ...], axis, inferred: set[float]
                       ) -> tuple[list[SuspectedFracture], str | None]:
    """Named bodies between two seen discs that are lower than FRACTURE_RATIO x their taller neighbour.

    Heights are disc-to-disc along the spine's axis, compared only with complete adjacent segments that
    are not themselves "tall" (more than MAX_NEIGHBOUR_RATIO x every neighbour of theirs: two bodies
    merged by a missed disc, no reference for anything; so is one over MAX_DISC_TO_DISC_MM). Two adjacent low segments that together make one
    vertebra of their neighbours' height look like one body split by a false disc: around T12 and L1 that
    would shift the count, so it is returned as the reason for "level uncertain"; elsewhere neither is
    reported. A 0.8 disc-to-disc ratio is about 25 % loss of the body's own height (the disc is included),
    so Genant grade 1 (20-25 %) is not reliably seen; grades 2 and 3 are.
    """
    heights = {x.label: axis.height_mm(x.z_lower, x.z_upper) for x in segments if x.complete and x.label}
    seen = {x.label for x in segments if x.complete and x.label and x.z_lower not in inferred
            and x.z_upper not in inferred}

    def neighbours(name: str) -> list[str]:
        i = LEVEL_NAMES.index(name)
        return [LEVEL_NAMES[j] for j in (i - 1, i + 1) if 0 <= j < len(LEVEL_NAMES) and LEVEL_NAMES[j] in heights]

    tall = {x for x in heights if heights[x] > MAX_DISC_TO_DISC_MM or neighbours(x) and all(
        heights[x] > MAX_NEIGHBOUR_RATIO * heights[n] for n in neighbours(x))}
    usable = {x: [n for n in neighbours(x) if n not in tall] for x in heights}
    short = {x for x in heights if usable[x] and heights[x] < FRACTURE_RATIO * max(heights[n] for n in usable[x])}
    for x in sorted(short, key=LEVEL_NAMES.index):
        y = LEVEL_NAMES[LEVEL_NAMES.index(x) - 1]  # the level above
        if y not in short:
            continue
        outer = [n for n in usable[x] + usable[y] if n not in (x, y) and n not in short]
        ref = float(np.mean([heights[n] for n in outer])) if outer else None
        if ref is not None and 0.75 * ref <= heights[x] + heights[y] <= 1.35 * ref:
            if {x, y} & {"T12", "L1"}:
                return [], (f"{y} and {x} ({heights[y]:.0f} and {heights[x]:.0f} mm) together make one vertebra "
                            f"of their neighbours' height ({ref:.0f} mm): a false disc may split one body, so "
                            "the level is uncertain")
            short -= {x, y}
    found = []
    for name in FRACTURE_LEVELS:
        if name not in short or name not in seen:
            continue
        ref_levels = [n for n in usable[name] if n not in short]
        if not ref_levels:
            continue
        ref = float(np.mean([heights[n] for n in ref_levels]))
        if heights[name] < FRACTURE_RATIO * ref:
            found.append(SuspectedFracture(name, heights[name], ref, "/".join(ref_levels)))
    return found, None


def _to_native_slices(segments, discs, ribs, box, fz: int, n_native: int):
    """Slab coordinates -> slice indices of the volume: slab k is the centre of slices k*fz .. k*fz+fz-1."""
    def z(v: float) -> float:
        return min((v + 0.5) * fz - 0.5, n_native - 0.5)

    segments = tuple(VertebraSegment(s.label, z(s.z_lower), z(s.z_upper), s.complete) for s in segments)
    ribs = [Rib(r.side, z(r.z_medial), r.lateral_reach_mm, None if r.z_head is None else z(r.z_head)) for r in ribs]
    return segments, [z(d) for d in discs], ribs, np.repeat(box, fz, axis=0)[:n_native]


PRIOR_LEVELS = ("T11", "T12", "L1", "L2", "L3")
PRIOR_COLUMNS = PRIOR_LEVELS + ("other",)
BOUNDARY_SOFTNESS_MM = 2.0


def level_probabilities(loc: Localisation, n_slices: int, dz_mm: float) -> np.ndarray:
    """Per-slice level probabilities, (n_slices, 6): columns ``PRIOR_COLUMNS`` (T11..L3, then "other").

    Derived from the localisation, not learned or calibrated on outcomes: a slice
    inside a named segment gets that level with the localiser's confidence; the
    rest of the mass goes equally to the level itself, the levels above and below
    (an off-by-one count is the typical failure) and "other". Near a disc the
    mass blends into the neighbouring segment over ``BOUNDARY_SOFTNESS_MM``.
    Without a named level (no anchor, or nothing found) every slice is "other":
    the prior says nothing, and a learned selector must not lean on it.
    """
    out = np.zeros((n_slices, len(PRIOR_COLUMNS)))
    out[:, -1] = 1.0
    named = [s for s in loc.segments if s.label is not None]
    if not named or loc.anchor is None:
        return out
    c = float(np.clip(loc.confidence, 0.0, 1.0))
    order = LEVEL_NAMES

    def spread(label: str) -> np.ndarray:
        p = np.zeros(len(PRIOR_COLUMNS))
        i = order.index(label)
        share = {label: c + (1 - c) / 4}
        for j in (i - 1, i + 1):
            if 0 <= j < len(order):
                share[order[j]] = share.get(order[j], 0.0) + (1 - c) / 4
        for name, v in share.items():
            p[PRIOR_COLUMNS.index(name) if name in PRIOR_LEVELS else -1] += v
        p[-1] += 1.0 - p.sum()
        return p

    z = np.arange(n_slices, dtype=float)
    weights = []
    for s in named:
        # soft membership: logistic in the distance (mm) inside the segment's disc-to-disc range
        w_lo = 1.0 / (1.0 + np.exp(-(z - s.z_lower) * dz_mm / BOUNDARY_SOFTNESS_MM))
        w_hi = 1.0 / (1.0 + np.exp(-(s.z_upper - z) * dz_mm / BOUNDARY_SOFTNESS_MM))
        weights.append(w_lo * w_hi)
    w = np.stack(weights, axis=1)  # (Z, segments)
    covered = np.clip(w.sum(axis=1), 0.0, 1.0)
    w = w / np.maximum(w.sum(axis=1, keepdims=True), 1e-9) * covered[:, None]
    probs = w @ np.stack([spread(s.label) for s in named])  # type: ignore[arg-type]
    probs[:, -1] += 1.0 - covered
    return probs
