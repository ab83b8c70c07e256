"""`osteoscreen eval imaging CASES_DIR`: level and ROI accuracy against reference vertebra labels.

Case format: CASES_DIR/<case>/ holds `ct.nii.gz` (HU) or `dicom/` (one CT series),
plus `labels.nii.gz` on the CT grid in TotalSegmentator v2 numbering (33 T11,
32 T12, 31 L1, 30 L2, 29 L3, 28 L4, 27 L5). Without label 31, L1 is not in view and
the right answer is "L1 not found".

Reference HU (recomputable by anyone): the mean HU of L1 label voxels at least 5 mm
inside the label (Euclidean distance in mm), within the central third of the label's
z-extent and the anterior half of its antero-posterior extent. Robustness variants
keep their parent case's reference: resampling or noise does not change the anatomy.
"""
from __future__ import annotations

import time
from itertools import chain
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from dicom_node.sample import load_lps_volume
from pipeline.bone import FracturedBody, LesionInBody, MeasurementError, measure_mid_body
from pipeline.calibration import check_calibration
from pipeline.contrast import assess_contrast
from pipeline.selection import SelectionError, select_level_slices
from pipeline.volume import Volume, VolumeError, canonical_axial, load_volume

L1 = 31
LEVELS = {33: "T11", 32: "T12", 31: "L1", 30: "L2", 29: "L3", 28: "L4", 27: "L5", 26: "S1", 34: "T10"}
VERTEBRA_LABELS = range(26, 51)


@dataclass
class CaseResult:
    case: str
    l1_in_view: bool
    claimed: bool  # the service would report an L1 result
    status: str  # correct / uncertain / wrong_confident / wrong_uncertain
    slice_level: str | None  # dominant vertebra label on the chosen slice
    inside_l1: bool | None
    distance_mm: float | None
    roi_hu: float | None
    reference_hu: float | None
    hu_error: float | None
    confidence: float
    reason: str | None
    seconds: float
    contrast: str = "-"  # phase as the service records it
    calibration: str = "-"  # air/fat medians, flagged when implausible
    slice_index: int | None = None  # the measured slice
    fracture: str | None = None  # the level reported as a suspected compression fracture


def reference_hu(hu: np.ndarray, labels: np.ndarray, spacing) -> float | None:
    m = labels == L1
    if not m.any():
        return None
    dist = ndi.distance_transform_edt(m, sampling=spacing)
    zs = np.nonzero(m.any(axis=(1, 2)))[0]
    rows = np.nonzero(m.any(axis=(0, 2)))[0]
    third = (zs.max() - zs.min() + 1) / 3.0
    z = np.arange(m.shape[0])[:, None, None]
    r = np.arange(m.shape[1])[None, :, None]
    sel = (dist >= 5.0) & (z >= zs.min() + third) & (z <= zs.max() - third) & (r <= (rows.min() + rows.max()) / 2)
    return float(hu[sel].mean()) if sel.any() else None


def vertebral_body(vertebra: np.ndarray) -> np.ndarray:
    """The body of one vertebra's label on one axial slice: the anterior half of its antero-posterior extent
    (rows grow posteriorly), as the reference HU defines it."""
    body = np.zeros_like(vertebra, dtype=bool)
    rows = np.nonzero(vertebra.any(axis=1))[0]
    if rows.size:
        top = rows.min() + (rows.max() - rows.min() + 1) // 2
        body[rows.min() : top] = vertebra[rows.min() : top]
    return body


def inside_l1(labels: np.ndarray, k: int) -> tuple[bool, str | None]:
    counts = {lab: int(np.sum(labels[k] == lab)) for lab in VERTEBRA_LABELS}
    counts = {k2: v for k2, v in counts.items() if v}
    dominant = max(counts, key=counts.get) if counts else None
    zs = np.nonzero((labels == L1).any(axis=(1, 2)))[0]
    if dominant != L1 or zs.size == 0:
        return False, LEVELS.get(dominant, str(dominant)) if dominant else None
    margin = 0.2 * (zs.max() - zs.min())
    return bool(zs.min() + margin <= k <= zs.max() - margin), "L1"


def volume_from_array(hu: np.ndarray, spacing, origin=(0.0, 0.0, 0.0)) -> Volume:
    origin = np.asarray(origin, float)
    pos = np.array([origin + np.array([0.0, 0.0, k * spacing[0]]) for k in range(hu.shape[0])])
    return Volume(hu=hu.astype(np.int16), spacing=tuple(float(s) for s in spacing), positions=pos,
                  row_direction=np.array([1.0, 0, 0]), column_direction=np.array([0, 1.0, 0]), slice_refs=(),
                  header=None, slice_thickness_mm=float(spacing[0]))  # type: ignore[arg-type]


def load_case(case_dir: Path) -> tuple[Volume, np.ndarray]:
    labels, _, _ = load_lps_volume(case_dir / "labels.nii.gz")
    if (case_dir / "ct.nii.gz").exists():
        hu, origin, spacing = load_lps_volume(case_dir / "ct.nii.gz")
        return volume_from_array(hu, spacing, origin), labels.astype(np.int16)
    files = sorted(p for p in (case_dir / "dicom").rglob("*") if p.is_file())
    vol = load_volume(files)
    if labels.shape != vol.shape:
        raise VolumeError(f"labels grid {labels.shape} differs from the CT grid {vol.shape}")
    return vol, labels.astype(np.int16)


def evaluate(name: str, vol: Volume, labels: np.ndarray, ref: float | None = None, *,
             localisation=None, expect: str | None = None) -> CaseResult:
    """``ref`` overrides the reference HU (variants keep their parent case's: the anatomy did not change).

    ``expect``: what a simulated L1 abnormality calls for. "fracture" (a compressed L1): L1 reported as a
    suspected fracture and not measured; measuring it is wrong, whatever the HU. "lesion" (a large dense
    lesion): L1 not measurable. A small bone island expects the ordinary answer (None): L1 measured,
    the island left out.
    """
    t0 = time.monotonic()
    l1_in_view = bool((labels == L1).any())
    if ref is None:
        ref = reference_hu(vol.hu, labels, vol.spacing)
    try:
        sel, loc = select_level_slices(vol, "L1", localisation=localisation)
        m = measure_mid_body(vol, loc, sel.z_range)
    except (SelectionError, MeasurementError) as exc:
        reported = "L1" if isinstance(exc, FracturedBody) else None
        if (expect == "fracture" and reported) or (expect == "lesion" and isinstance(exc, LesionInBody)):
            status = "correct"  # the collapsed or lesioned L1 was seen and not measured
        else:
            status = "uncertain" if l1_in_view else "correct"
        return CaseResult(name, l1_in_view, False, status, None, None, None, None, ref, None, 0.0, exc.reason,
                          time.monotonic() - t0, fracture=reported)
    k = m.slice_index
    ok, level = inside_l1(labels, k)
    if expect is not None:
        ok = False  # a compressed or lesioned L1 measured as if it were whole
    zs = np.nonzero((labels == L1).any(axis=(1, 2)))[0]
    dist = abs(k - (zs.min() + zs.max()) / 2.0) * vol.spacing[0] if zs.size else None
    err = abs(m.mean_hu - ref) if ref is not None else None
    status = "correct" if ok else "wrong_confident"
    contrast = assess_contrast(vol.header, vol, m)
    cal = check_calibration(vol, k)
    return CaseResult(name, l1_in_view, True, status, level, ok, dist, m.mean_hu, ref, err, sel.confidence, None,
                      time.monotonic() - t0, contrast.phase + (f" {contrast.aorta_hu:.0f} HU" if contrast.aorta_hu
                                                                else ""),
                      cal.text if cal.plausible is not False else "FLAGGED " + cal.text, k)


def variants(vol: Volume, labels: np.ndarray, seed: int = 0):
    """Robustness variants of one real case: (name, volume, labels)."""
    n = vol.shape[0]
    cut = int(round(0.3 * n))
    yield "crop_top", volume_from_array(vol.hu[: n - cut], vol.spacing, vol.positions[0]), labels[: n - cut]
    yield "crop_bottom", volume_from_array(vol.hu[cut:], vol.spacing, vol.positions[cut]), labels[cut:]
    rng = np.random.default_rng(seed)
    noisy = np.clip(vol.hu + rng.normal(0, 30, vol.hu.shape), -32768, 32767).astype(np.int16)
    yield "noise_30hu", volume_from_array(noisy, vol.spacing, vol.positions[0]), labels
    for name, step in (("resample_5mm", 5.0), ("resample_1mm", 1.0)):  # thick and thin reconstructions
        zs = np.arange(0, (n - 1) * vol.spacing[0] + 1e-6, step) / vol.spacing[0]
        lo = np.floor(zs).astype(int)
        hi = np.minimum(lo + 1, n - 1)
        w = (zs - lo)[:, None, None]
        resampled = (vol.hu[lo] * (1 - w) + vol.hu[hi] * w).astype(np.int16)
        yield name, volume_from_array(resampled, (step, vol.spacing[1], vol.spacing[2]), vol.positions[0]), \
            labels[np.round(zs).astype(int)]
    # The same patient stored with mirrored rows and columns (another ImageOrientationPatient).
    flipped = Volume(hu=vol.hu[:, ::-1, ::-1].copy(), spacing=vol.spacing,
                     positions=vol.positions + (vol.shape[1] - 1) * vol.spacing[1] * np.array([0, 1.0, 0])
                     + (vol.shape[2] - 1) * vol.spacing[2] * np.array([1.0, 0, 0]),
                     row_direction=np.array([-1.0, 0, 0]), column_direction=np.array([0, -1.0, 0]), slice_refs=(),
                     header=None, slice_thickness_mm=vol.slice_thickness_mm)  # type: ignore[arg-type]
    yield "flipped_orientation", canonical_axial(flipped), labels


def body_height_mm(labels: np.ndarray, spacing, label: int = L1) -> float | None:
    """Height along z of a vertebral body from its label: the label's run through the centre of its anterior
    half (the body), as the reference HU defines the body."""
    m = labels == label
    if not m.any():
        return None
    body = np.zeros_like(m)
    for k in np.nonzero(m.any(axis=(1, 2)))[0]:
        body[k] = vertebral_body(m[k])
    _, rr, cc = np.nonzero(body)
    r, c = int(round(rr.mean())), int(round(cc.mean()))
    return float(body[:, r, c].sum() * spacing[0])


def compress_vertebra(vol: Volume, labels: np.ndarray, loss: float, label: int = L1,
                      margin_mm: float = 8.0) -> tuple[Volume, np.ndarray] | None:
    """A simulated compression fracture: ``loss`` of the body's height removed at its middle.

    Within the spinal column's footprint (every vertebra label, projected along z and widened by
    ``margin_mm``) slices are removed at mid-body, so the column above moves down onto the collapsed body
    and the column below stays; elsewhere the same number of slices is removed at the bottom of the volume,
    so the rest of the trunk (ribs included) moves down with the upper spine instead of being cut. The seam
    lies in the soft tissue around the column below the fracture. None when the level is not in view.
    """
    height = body_height_mm(labels, vol.spacing, label)
    if height is None:
        return None
    n = int(round(loss * height / vol.spacing[0]))
    body_z = [k for k in range(labels.shape[0]) if vertebral_body(labels[k] == label).any()]
    mid = int(round(0.5 * (min(body_z) + max(body_z))))
    start = mid - n // 2
    spine = (labels >= min(VERTEBRA_LABELS)) & (labels <= max(VERTEBRA_LABELS))
    footprint = ndi.binary_dilation(spine.any(axis=0), iterations=max(1, int(round(margin_mm / vol.spacing[1]))))
    keep = np.concatenate([np.arange(start), np.arange(start + n, vol.shape[0])])

    def cut(a: np.ndarray) -> np.ndarray:
        return np.where(footprint[None], a[keep], a[n:])

    return volume_from_array(cut(vol.hu), vol.spacing, vol.positions[0]), cut(labels)


FRACTURE_VARIANTS = (("l1_compressed_30pct", 0.30), ("l1_compressed_45pct", 0.45))  # Genant grades 2 and 3
LESION_VARIANTS = (("l1_bone_island_8mm", 8.0, None), ("l1_sclerotic_lesion_24mm", 24.0, "lesion"))
LESION_HU = 1000


def add_dense_lesion(vol: Volume, labels: np.ndarray, diameter_mm: float, label: int = L1,
                     hu: int = LESION_HU) -> Volume | None:
    """A sphere of ``hu`` at the centre of the vertebral body (a bone island, or a large sclerotic lesion)."""
    body = np.zeros(labels.shape, dtype=bool)
    for k in np.nonzero((labels == label).any(axis=(1, 2)))[0]:
        body[k] = vertebral_body(labels[k] == label)
    if not body.any():
        return None
    centre = np.argwhere(body).mean(axis=0)
    zz, rr, cc = np.ogrid[: labels.shape[0], : labels.shape[1], : labels.shape[2]]
    dist = np.sqrt(((zz - centre[0]) * vol.spacing[0]) ** 2 + ((rr - centre[1]) * vol.spacing[1]) ** 2
                   + ((cc - centre[2]) * vol.spacing[2]) ** 2)
    return volume_from_array(np.where(dist <= diameter_mm / 2.0, hu, vol.hu), vol.spacing, vol.positions[0])


def abnormal_variants(vol: Volume, labels: np.ndarray):
    """Simulated L1 fractures and dense lesions of one real case: (name, volume, labels, expected answer)."""
    for name, loss in FRACTURE_VARIANTS:
        made = compress_vertebra(vol, labels, loss)
        if made is not None:
            yield name, made[0], made[1], "fracture"
    for name, diameter, expect in LESION_VARIANTS:
        lesioned = add_dense_lesion(vol, labels, diameter)
        if lesioned is not None:
            yield name, lesioned, labels, expect


def eval_cases(cases_dir: str | Path, with_variants: bool = False, out=print):
    """(name, volume, labels, reference HU or None) for every case in ``cases_dir`` and, optionally, its variants.

    Variants keep their parent's reference (the anatomy did not change); one without L1 in view has none.
    A case that cannot be loaded is reported through ``out`` and skipped.
    """
    for case in sorted(p for p in Path(cases_dir).iterdir() if p.is_dir()):
        try:
            vol, labels = load_case(case)
        except (VolumeError, FileNotFoundError) as exc:
            out(f"{case.name}: cannot load: {exc}")
            continue
        ref = reference_hu(vol.hu, labels, vol.spacing)
        todo = [(case.name, vol, labels)]
        if with_variants:
            todo += [(f"{case.name}/{v}", vv, ll) for v, vv, ll in variants(vol, labels)]
        for name, v, lab in todo:
            yield name, v, lab, ref if (lab == L1).any() else None


def _abnormal_cases(cases_dir: str | Path):
    for case in sorted(p for p in Path(cases_dir).iterdir() if p.is_dir()):
        try:
            vol, labels = load_case(case)
        except (VolumeError, FileNotFoundError):
            continue  # already reported by eval_cases
        ref = reference_hu(vol.hu, labels, vol.spacing)
        for name, v, lab, expect in abnormal_variants(vol, labels):
            yield f"{case.name}/{name}", v, lab, ref, expect


CROP_STEP_MM = 6.0
CROP_MIN_KEPT_MM = 40.0  # the localiser's own minimum z coverage


def crops(vol: Volume, labels: np.ndarray, step_mm: float = CROP_STEP_MM):
    """The case with its top, then its bottom, cut away every ``step_mm``: a scan may start or end anywhere.

    Yields (name, volume, labels); at least CROP_MIN_KEPT_MM of the scan is kept.
    """
    n, dz = vol.shape[0], vol.spacing[0]
    step = max(1, int(round(step_mm / dz)))
    for side in ("top", "bottom"):
        for cut in range(step, n - int(np.ceil(CROP_MIN_KEPT_MM / dz)) + 1, step):
            keep = slice(0, n - cut) if side == "top" else slice(cut, n)
            yield (f"{side}_{cut * dz:.0f}mm", volume_from_array(vol.hu[keep], vol.spacing, vol.positions[keep][0]),
                   labels[keep])


def _summary(results: list[CaseResult]) -> str:
    return (f"correct={sum(r.status == 'correct' for r in results)} "
            f"uncertain={sum(r.status == 'uncertain' for r in results)} "
            f"wrong_confident={sum(r.status == 'wrong_confident' for r in results)}")


def dash_or(x: float | None, f: str = "{:.0f}") -> str:
    """A table cell: ``x`` formatted, or "-" when there is no value."""
    return "-" if x is None else f.format(x)


def _row(r: CaseResult) -> str:
    fmt = dash_or
    return (f"{r.case:40s} {r.status:16s} L1 in view {str(r.l1_in_view):5s} slice level {r.slice_level or '-':4s} "
            f"dist {fmt(r.distance_mm)} mm  ROI {fmt(r.roi_hu)} HU ref {fmt(r.reference_hu)} HU "
            f"err {fmt(r.hu_error)}  conf {r.confidence:.2f}  {r.seconds:.1f}s  contrast: {r.contrast}  "
            f"calibration: {r.calibration}"
            + (f"  ({r.reason})" if r.reason else ""))


def run_crop_sweep(cases_dir: str | Path, out=print) -> list[CaseResult]:
    """Every case cut from the top and from the bottom (``crops``). Ends with one line:
    ``crop sweep: crops=N correct=K uncertain=U wrong_confident=W``."""
    results = []
    for name, vol, labels, ref in eval_cases(cases_dir, False, out):
        for crop, v, lab in crops(vol, labels):
            r = evaluate(f"{name}/{crop}", v, lab, ref if (lab == L1).any() else None)
            results.append(r)
            out(_row(r))
    out(f"crop sweep: crops={len(results)} {_summary(results)}")
    return results


def run_eval(cases_dir: str | Path, with_variants: bool = False, out=print,
             crop_sweep: bool = False) -> list[CaseResult]:
    """The cases (and, with ``with_variants``, their robustness variants and simulated L1 abnormalities);
    ``crop_sweep`` adds ``run_crop_sweep`` before the last line, which stays
    ``imaging eval: cases=N correct=K uncertain=U wrong_confident=W max_hu_err=E`` over the cases and variants."""
    results: list[CaseResult] = []
    todo = ((name, v, lab, ref, None) for name, v, lab, ref in eval_cases(cases_dir, with_variants, out))
    if with_variants:
        todo = chain(todo, _abnormal_cases(cases_dir))
    for name, v, lab, ref, expect in todo:
        r = evaluate(name, v, lab, ref, expect=expect)
        results.append(r)
        out(_row(r))
    if crop_sweep:
        run_crop_sweep(cases_dir, out)
    claimed = [r for r in results if r.claimed and r.hu_error is not None]
    max_err = max((r.hu_error for r in claimed), default=0.0)
    out(f"imaging eval: cases={len(results)} {_summary(results)} max_hu_err={max_err:.1f}")
    return results
