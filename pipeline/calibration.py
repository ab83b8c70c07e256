"""HU calibration sanity check: air outside the patient and subcutaneous fat.

A scanner whose water calibration has drifted shifts every HU, the L1 ROI
included; the screening thresholds then mean nothing. Air (about -1000 HU)
and subcutaneous fat (about -100 HU) are in every body CT and vary little
between patients, so their medians expose an offset. The check flags; it does
not correct.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage as ndi

from pipeline.morphology import component_sizes, fill_holes
from pipeline.volume import Volume

AIR_RANGE = (-1050.0, -950.0)
FAT_RANGE = (-140.0, -60.0)
FAT_WINDOW = (-250.0, 0.0)  # candidate fat pixels; wide so an offset scanner still shows its fat
RING_MM = 20.0  # subcutaneous: within this depth of the skin
PADDING_BELOW = -1500.0  # out-of-field padding (-2048, -3024) is not air
MIN_PIXELS = 200


@dataclass(frozen=True)
class CalibrationCheck:
    air_hu: float | None
    fat_hu: float | None
    plausible: bool | None  # None: neither could be measured
    flag: str | None  # the reason, when implausible

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def text(self) -> str:
        air = f"air {self.air_hu:.0f} HU" if self.air_hu is not None else "air not measurable"
        fat = f"fat {self.fat_hu:.0f} HU" if self.fat_hu is not None else "fat not measurable"
        return f"{air}, {fat}" + (f" - {self.flag}" if self.flag else "")


def _depth_in(body: np.ndarray, spacing_rc: tuple[float, float], above_mm: float, upto_mm: float) -> np.ndarray:
    """Pixels whose distance from outside ``body`` is in (``above_mm``, ``upto_mm``].

    The Euclidean distance transform is taken over the body's bounding box and the background row or
    column just beyond each side of it (where the slice has one): the same distances as over the whole
    slice, since that background is at least as near as anything further out, at about a third of the
    cost for a typical abdomen in a 512 x 512 field.
    """
    out = np.zeros(body.shape, dtype=bool)
    rows, cols = np.nonzero(body.any(axis=1))[0], np.nonzero(body.any(axis=0))[0]
    if rows.size == 0:
        return out
    # the box grown by the one background row/column beyond it on each side, where the slice has one
    r0, r1 = max(0, rows[0] - 1), min(body.shape[0], rows[-1] + 2)
    c0, c1 = max(0, cols[0] - 1), min(body.shape[1], cols[-1] + 2)
    depth = ndi.distance_transform_edt(body[r0:r1, c0:c1], sampling=spacing_rc)
    out[r0:r1, c0:c1] = (depth > above_mm) & (depth <= upto_mm)
    return out


def _slice_samples(sl: np.ndarray, spacing_rc: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Air pixels outside the body and fat-window pixels in the subcutaneous ring, for one slice."""
    body = sl > -500
    labels, n = ndi.label(body)
    if n == 0:
        return np.empty(0), np.empty(0)
    body = fill_holes(labels == (int(np.argmax(component_sizes(labels, n))) + 1))
    # keep a margin from the body so partial-volume skin does not count as air
    margin = max(1, int(round(5.0 / min(spacing_rc))))
    outside = ~ndi.binary_dilation(body, iterations=margin)
    air = sl[outside & (sl > PADDING_BELOW) & (sl < -500)]
    ring = body & _depth_in(body, spacing_rc, 2.0, RING_MM)
    fat = sl[ring & (sl >= FAT_WINDOW[0]) & (sl <= FAT_WINDOW[1])]
    return air.astype(np.float32), fat.astype(np.float32)


def check_calibration(volume: Volume, centre_slice: int | None = None, n_slices: int = 5) -> CalibrationCheck:
    """Medians of air and subcutaneous fat over a few slices (around ``centre_slice`` when given)."""
    nz = volume.shape[0]
    if centre_slice is None:
        ks = np.unique(np.linspace(0, nz - 1, num=min(n_slices, nz)).astype(int))
    else:
        step = max(1, int(round(10.0 / max(volume.spacing[0], 0.1))))
        ks = np.unique(np.clip(centre_slice + step * np.arange(-(n_slices // 2), n_slices // 2 + 1), 0, nz - 1))
    airs, fats = [], []
    for k in ks:
        a, f = _slice_samples(volume.hu[k], (volume.spacing[1], volume.spacing[2]))
        airs.append(a)
        fats.append(f)
    air_all, fat_all = np.concatenate(airs), np.concatenate(fats)
    air = float(np.median(air_all)) if air_all.size >= MIN_PIXELS else None
    fat = float(np.median(fat_all)) if fat_all.size >= MIN_PIXELS else None
    problems = []
    if air is not None and not AIR_RANGE[0] <= air <= AIR_RANGE[1]:
        problems.append(f"air {air:.0f} HU outside {AIR_RANGE[0]:.0f}..{AIR_RANGE[1]:.0f}")
    if fat is not None and not FAT_RANGE[0] <= fat <= FAT_RANGE[1]:
        problems.append(f"subcutaneous fat {fat:.0f} HU outside {FAT_RANGE[0]:.0f}..{FAT_RANGE[1]:.0f}")
    if air is None and fat is None:
        return CalibrationCheck(None, None, None, None)
    flag = ("HU calibration implausible (" + "; ".join(problems) + "): every HU in this study may be offset"
            if problems else None)
    return CalibrationCheck(air, fat, not problems, flag)


AIR_NOMINAL_HU, FAT_NOMINAL_HU = -1000.0, -100.0


def linear_correction(check: CalibrationCheck) -> tuple[float, float] | None:
    """(slope, intercept) mapping this study's HU onto nominal air and fat, for an implausible check.

    With both measured, the line through (air, -1000) and (fat, -100); with one, an offset. None when the
    check is plausible or nothing was measured. Used only to find anatomy (the localiser's thresholds); the
    reported HU stay as stored, flagged.
    """
    if check.plausible is not False:
        return None
    if check.air_hu is not None and check.fat_hu is not None and check.fat_hu - check.air_hu > 300.0:
        slope = (FAT_NOMINAL_HU - AIR_NOMINAL_HU) / (check.fat_hu - check.air_hu)
        return slope, FAT_NOMINAL_HU - slope * check.fat_hu
    if check.fat_hu is not None:
        return 1.0, FAT_NOMINAL_HU - check.fat_hu
    if check.air_hu is not None:
        return 1.0, AIR_NOMINAL_HU - check.air_hu
    return None
