"""Anatomical vertebra localiser for axial CT (no learned weights).

The steps, each chosen to survive low bone density (the patients we look for):

1. Track the vertebral body along z, canal first. The spinal canal is a dark
   (<45 HU) hole in a closed bone ring (>200 HU, max-projected over +-4 mm)
   near the midline with bone in front and behind: vessels bright with
   contrast are filled, not holes, and the marrow of an osteoporotic body is
   not dark enough. The body lies in front of the canal: in a +-15 mm bone
   projection (which always holds an endplate) it is the bone region touching
   the canal, cut at its waist where a contrast-filled aorta is fused to it.
2. Find intervertebral discs. The median HU in the body core is high at
   endplates and low in discs; in osteoporotic bone the body interior can be
   as dark as a disc, but discs are short (5-14 mm) and interiors long, so a
   15 mm black top-hat responds to discs only. Peaks >= 20 mm apart are discs;
   gaps far from the median spacing are filled or pruned.
3. Name the levels from an anchor: ribs. Bone components outside a 35 mm
   cylinder around the canal that reach >= 65 mm laterally and come within
   42 mm of it are ribs; the lowest rib-bearing segment is T12. Without a
   rib anchor no level is named (the caller refuses rather than guesses).
   Transitional anatomy: where the lowest rib-bearing vertebra's ribs are all
   short (< 75 mm lateral reach; 12th ribs in the real cases here reach 87-90 mm
   on 2.5-3 mm slices, 72-73 mm when resampled to 5 mm) they may be a 13th
   (lumbar) rib or hypoplastic 12th ribs, and counting from them could put "L1"
   one level off: the confidence is halved and a note says why (never silent).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi
from scipy.signal import find_peaks

from pipeline.volume import Volume

BONE_HU = 200
TRACK_WINDOW_MM = 15.0
SLAB_MM = 3.0  # thinner slices are averaged into slabs of about this thickness
CANAL_WINDOW_MM = 4.0
CANAL_MAX_HU = 45.0
DISC_TOPHAT_MM = 15.0
MIN_DISC_GAP_MM = 20.0
MIN_DISC_SCORE_HU = 20.0
RIB_EXCLUSION_RADIUS_MM = 35.0
CANAL_CENTRE_OFFSET_MM = 8.0  # canal centre lies about this far behind the body's posterior wall
WAIST_FRACTION = 0.7
MAX_SEGMENT_RATIO = 1.5
MAX_NEIGHBOUR_RATIO = 1.45  # T12 / L1 taller than this times their complete neighbours: a merged (missed) disc
RIB_MIN_LATERAL_MM = 65.0
SHORT_LOWEST_RIB_MM = 75.0  # lowest ribs all shorter than this: 13th (lumbar) rib or hypoplastic 12th ribs
TRANSITIONAL_CONFIDENCE_FACTOR = 0.5
TRANSITIONAL_NOTE = "possible transitional anatomy"
RIB_MAX_MEDIAL_MM = 42.0

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
    z_medial: float  # slice index of the rib's point nearest the spine
    lateral_reach_mm: float


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
        total = slab.sum(axis=0, dtype=np.int32).reshape(y2 // f, f, x2 // f, f).sum(axis=(1, 3))
        out[k] = total / (slab.shape[0] * f * f)
    return out, (spacing[0] * fz, spacing[1] * f, spacing[2] * f), f, fz


def _body_midline(hu: np.ndarray) -> float:
    xs = []
    for k in range(0, hu.shape[0], max(1, hu.shape[0] // 20)):
        lbl, n = ndi.label(hu[k] > -400)
        if n == 0:
            continue
        sizes = ndi.sum_labels(np.ones_like(lbl), lbl, index=np.arange(1, n + 1))
        body = lbl == (int(np.argmax(sizes)) + 1)
        xs.append(np.nonzero(body)[1].mean())
    return float(np.median(xs)) if xs else hu.shape[2] / 2.0


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
    holes, n = ndi.label(ndi.binary_fill_holes(m) & ~m)
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
    mip = ndi.maximum_filter1d(bone.view(np.uint8), size=2 * w + 1, axis=0).astype(bool)
    # The canal needs a thin slab: a thick one projects laminae across it.
    wc = max(0, int(round(CANAL_WINDOW_MM / sp[0])))
    canal_mip = ndi.maximum_filter1d(bone.view(np.uint8), size=2 * wc + 1, axis=0).astype(bool)
    ring_close = _disk(3.0, sp[1])  # bridges partial-volume gaps in thin laminae
    ya = np.full(z_n, np.nan)
    yp = np.full(z_n, np.nan)
    cx = np.full(z_n, np.nan)
    hw = np.full(z_n, np.nan)
    for k in range(z_n):
        m = mip[k]
        canal = _find_canal(ndi.binary_closing(canal_mip[k], ring_close), hu[k], sp, xmid)
        if canal is None:
            continue
        top, _, ccol = canal
        col = int(round(ccol))
        filled = ndi.binary_fill_holes(m)
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


def _core_profile(hu: np.ndarray, sp, track: np.ndarray) -> np.ndarray:
    shrink_r = max(1, int(round(3.0 / sp[1])))
    half_c = max(2, int(round(12.0 / sp[2])))
    prof = np.empty(hu.shape[0])
    for k in range(hu.shape[0]):
        ya, yp, cx, _ = track[k]
        r0, r1 = int(round(ya)) + shrink_r, int(round(yp)) - shrink_r
        c0, c1 = int(round(cx)) - half_c, int(round(cx)) + half_c + 1
        if r1 <= r0:
            r0, r1 = int(round(ya)), int(round(yp)) + 1
        box = hu[k, max(r0, 0) : max(r1, 1), max(c0, 0) : max(c1, 1)]
        prof[k] = np.median(box) if box.size else np.nan
    return _fill_nan(prof)


def _find_discs(profile: np.ndarray, dz: float) -> tuple[list[float], set[float], list[str]]:
    """Disc centres (slice indices), the subset inferred from spacing rather than seen, and notes."""
    notes: list[str] = []
    inferred: set[float] = set()
    if dz < 2.0:
        profile = ndi.gaussian_filter1d(profile, sigma=1.5 / dz)
    size = max(3, int(round(DISC_TOPHAT_MM / dz)) | 1)
    score = ndi.grey_closing(profile, size=size) - profile
    distance = max(1, int(round(MIN_DISC_GAP_MM / dz)))
    peaks, _ = find_peaks(np.pad(score, 1, constant_values=0), height=MIN_DISC_SCORE_HU, distance=distance)
    peaks = [float(p - 1) for p in peaks]
    # Refine each peak to the centre of its plateau (top-hats of flat-bottomed discs are flat).
    refined = []
    for p in peaks:
        p_i = int(p)
        thr = 0.8 * score[p_i]
        lo = p_i
        while lo > 0 and score[lo - 1] >= thr:
            lo -= 1
        hi = p_i
        while hi < len(score) - 1 and score[hi + 1] >= thr:
            hi += 1
        refined.append(0.5 * (lo + hi))
    discs = sorted(refined)
    if len(discs) >= 3:
        gaps = np.diff(discs)
        g = float(np.median(gaps))
        out = [discs[0]]
        for d in discs[1:]:
            gap = d - out[-1]
            if gap < 0.55 * g:
                # keep the stronger of two crowded candidates
                if score[int(round(d))] > score[int(round(out[-1]))]:
                    out[-1] = d
                notes.append(f"pruned a disc candidate {gap * dz:.0f} mm from its neighbour")
                continue
            n_missing = int(round(gap / g)) - 1
            if gap > 1.6 * g and 1 <= n_missing <= 2:
                prev = out[-1]
                new = [prev + gap * j / (n_missing + 1) for j in range(1, n_missing + 1)]
                out.extend(new)
                inferred.update(new)
                notes.append(f"inferred {n_missing} disc(s) in a {gap * dz:.0f} mm gap")
            elif gap > 1.6 * g:
                notes.append(f"no disc found in a {gap * dz:.0f} mm stretch")
            out.append(d)
        discs = sorted(out)
    return discs, inferred, notes


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
        ribs.append(Rib(side=side, z_medial=float(kz[j]), lateral_reach_mm=lateral))
    return ribs


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
    profile = _core_profile(hu, sp, track)
    discs, inferred, notes = _find_discs(profile, sp[0])
    ribs = _find_ribs(hu, sp, track)
    segs = _segments(discs, z_n)
    box = np.stack([track[:, 0] * f, track[:, 1] * f, (track[:, 2] - track[:, 3]) * f, (track[:, 2] + track[:, 3]) * f], axis=1)

    labels: list[str | None] = [None] * len(segs)
    anchor, confidence, reason = None, 0.0, None
    if ribs and segs:
        lowest_by_side = {s: min(r.z_medial for r in ribs if r.side == s) for s in {r.side for r in ribs}}
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
        lowest = [r for r in ribs if seg_of(r.z_medial) == t12]
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
    l1 = next((s for s in segments if s.label == "L1"), None)
    if l1 is not None and reason is None:
        height_mm = (l1.z_upper - l1.z_lower) * sp[0]
        if not l1.complete:
            reason = "L1 is cut by the edge of the field of view"
            confidence = 0.0
        elif not 18.0 <= height_mm <= 50.0:
            confidence *= 0.5
            notes.append(f"L1 disc-to-disc height {height_mm:.0f} mm is atypical")
        if l1.z_lower in inferred or l1.z_upper in inferred:
            confidence *= 0.8
            notes.append("a disc bounding L1 was inferred from the spacing of its neighbours")
        # A missed disc between the rib anchor and L1 would shift every level: refuse instead.
        heights = [(x.z_upper - x.z_lower) * sp[0] for x in segments if x.complete]
        typical = float(np.median(heights)) if heights else 35.0
        for seg in segments:
            h = (seg.z_upper - seg.z_lower) * sp[0]
            if seg.label in ("T12", "L1") and h > MAX_SEGMENT_RATIO * typical:
                reason = (f"{seg.label} would span {h:.0f} mm (typical here {typical:.0f} mm): a disc was probably "
                          "missed, so the level is uncertain")
                confidence = 0.0
        # The same against the immediate neighbours: where discs were missed elsewhere too (thin or noisy
        # slices), the median is inflated, but a merged L1 is still about twice its neighbours.
        by_label = {x.label: x for x in segments}
        for name, neighbours in (("L1", ("T12", "L2")), ("T12", ("T11", "L1"))):
            seg = by_label.get(name)
            near = [(n, (by_label[n].z_upper - by_label[n].z_lower) * sp[0]) for n in neighbours
                    if n in by_label and by_label[n].complete]
            if reason is not None or seg is None or not near:
                continue
            h = (seg.z_upper - seg.z_lower) * sp[0]
            mean_near = float(np.mean([x for _, x in near]))
            if h > MAX_NEIGHBOUR_RATIO * mean_near:
                reason = (f"{name} would span {h:.0f} mm, {h / mean_near:.1f}x its neighbours ("
                          + ", ".join(f"{n} {x:.0f} mm" for n, x in near)
                          + "): a disc was probably missed, so the level is uncertain")
                confidence = 0.0
    if fz > 1:
        segments, discs, ribs, box = _to_native_slices(segments, discs, ribs, box, fz, n_native)
    return Localisation(segments, tuple(discs), tuple(ribs), box, anchor, round(confidence, 3), reason, tuple(notes))


def _to_native_slices(segments, discs, ribs, box, fz: int, n_native: int):
    """Slab coordinates -> slice indices of the volume: slab k is the centre of slices k*fz .. k*fz+fz-1."""
    def z(v: float) -> float:
        return min((v + 0.5) * fz - 0.5, n_native - 0.5)

    segments = tuple(VertebraSegment(s.label, z(s.z_lower), z(s.z_upper), s.complete) for s in segments)
    ribs = [Rib(r.side, z(r.z_medial), r.lateral_reach_mm) for r in ribs]
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
