"""Chest radiograph input: decode, display orientation, a square working image, the model's two inputs.

EXPERIMENTAL path (see pipeline/xray/__init__.py). Training (semi-synthetic radiographs) and
service (real CR/DX) both go through ``square_image`` and ``model_inputs``, so the
preprocessing cannot drift apart.

- Display orientation: bone bright. MONOCHROME1 (bright = low signal) is inverted.
- Robust window: the 0.5th-99.5th percentiles of the central 80 % of the image map to 0..1,
  so collimator edges, markers and a raw "for processing" range do not set the contrast.
- Working image: padded to a square (with the darkest value) and resampled to 256 x 256
  with anti-aliasing. Pixel spacing is not needed (and is sometimes invalid: "0\\0").
- CNN input: 3 x 64 x 64 (the working image, replicated for the CT encoder's 3 channels),
  scaled as (x - 0.5) / 0.25.
- Gradient-based wavelet features: the Sobel gradient magnitude of the working image, cut
  into 4 x 4 regions; per region a 3-level db2 wavelet decomposition (PyWavelets) and the
  log mean energy of the approximation and of each of the 9 detail sub-bands (10 numbers).
  The model attends over the 16 regions.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from scipy import ndimage as ndi

from pipeline.refusal import Refusal

WORK_PX = 256
CNN_PX = 64
GRID = 4
WAVELET = "db2"
LEVELS = 3
N_WAVELET_FEATURES = 1 + 3 * LEVELS
# Screened: CR and DX "For Presentation". DX "For Processing" is raw detector data, not meant for display or reading.
XRAY_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "CR Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
}


def is_screenable_view(ds, body_parts, views) -> bool:
    """A chest image in one of the screened views (header only)."""
    return (str(ds.get("SOPClassUID", "")) in XRAY_SOP_CLASSES
            and str(ds.get("BodyPartExamined", "") or "").upper() in {b.upper() for b in body_parts}
            and str(ds.get("ViewPosition", "") or "").upper() in {v.upper() for v in views})


class RadiographError(Refusal):
    """The radiograph cannot be screened."""


@dataclass(frozen=True)
class Radiograph:
    display: np.ndarray  # float32 0..1, bone bright
    pixel_mm: tuple[float, float] | None  # None when the header has no valid spacing
    notes: tuple[str, ...]
    header: pydicom.Dataset
    orientation: tuple[str, str] = ("L", "F")  # PatientOrientation of ``display`` (rows, columns), upright


def _spacing(ds: pydicom.Dataset) -> tuple[tuple[float, float] | None, str | None]:
    """PixelSpacing, else ImagerPixelSpacing (detector plane: not corrected for magnification), and a note."""
    invalid = []
    for kw in ("PixelSpacing", "ImagerPixelSpacing"):
        v = ds.get(kw)
        if v is None:
            continue
        try:
            r, c = (float(v[0]), float(v[1])) if len(v) == 2 else (0.0, 0.0)
        except (TypeError, ValueError):
            r = c = 0.0
        if r > 0 and c > 0:
            note = "ImagerPixelSpacing used: detector-plane spacing, not corrected for magnification" \
                if kw == "ImagerPixelSpacing" else None
            return (r, c), "; ".join([*invalid, note] if note else invalid) or None
        invalid.append(f"{kw} {'/'.join(str(x) for x in v)} is not a valid spacing")
    if invalid:
        return None, "; ".join(invalid) + ": geometry not used"
    return None, "no pixel spacing in the header: geometry not used"


def load_radiograph(path: str | Path) -> Radiograph:
    """One single-frame CR/DX image in display orientation, or RadiographError with the reason."""
    try:
        ds = pydicom.dcmread(path)
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise RadiographError("multi-frame radiograph: one image per instance expected")
        from pydicom.pixels import apply_modality_lut

        arr = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    except RadiographError:
        raise
    except Exception as exc:  # noqa: BLE001 - a sender's malformed image: a recorded refusal, not a crash
        raise RadiographError(f"radiograph cannot be decoded ({type(exc).__name__}: {exc})"[:300]) from None
    if arr.ndim != 2 or min(arr.shape) < 64:
        raise RadiographError(f"radiograph of shape {arr.shape}: a 2-D image of at least 64 x 64 pixels expected")
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        arr = arr.max() - arr
    h, w = arr.shape
    centre = arr[h // 10 : h - h // 10, w // 10 : w - w // 10]
    lo, hi = np.percentile(centre, [0.5, 99.5])
    if not hi > lo:
        raise RadiographError("radiograph has no contrast (constant pixel values)")
    display = np.clip((arr - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    spacing, note = _spacing(ds)
    display, spacing, turned, orientation = upright(display, spacing, ds.get("PatientOrientation"))
    return Radiograph(display, spacing, tuple(n for n in (note, turned) if n), ds, orientation)


_OPPOSITE = {"L": "R", "R": "L", "H": "F", "F": "H", "A": "P", "P": "A"}


def upright(display: np.ndarray, spacing: tuple[float, float] | None, orientation
            ) -> tuple[np.ndarray, tuple[float, float] | None, str | None, tuple[str, str]]:
    """``display`` turned so that its rows run towards the patient's left and its columns towards the feet (a
    frontal chest as read, PatientOrientation L\\F), from the image's PatientOrientation; the model was trained
    on such images (a chest stored rotated by 90 degrees scored 16 times lower). Without a usable
    PatientOrientation the image is taken as stored (and said to be L\\F, as a chest is displayed).
    RadiographError for a view that is not frontal (A/P along the rows or columns). Returns the image, its
    spacing, a note when it was turned, and its orientation."""
    upright_po = ("L", "F")
    if orientation is None or len(orientation) != 2 or not all(str(v).strip() for v in orientation):
        return display, spacing, None, upright_po
    rows, cols = (str(v).strip().upper()[:1] for v in orientation)  # oblique values (LF): the main direction
    if {rows, cols} - set(_OPPOSITE) or rows == cols or _OPPOSITE[rows] == cols:
        return display, spacing, None, (str(orientation[0]), str(orientation[1]))  # not a valid pair: as stored
    if "A" in (rows, cols) or "P" in (rows, cols):
        raise RadiographError(f"PatientOrientation {rows}\\{cols}: not a frontal view (a lateral?)")
    if rows in ("H", "F"):  # rotated by 90 degrees: transpose, rows and columns swap
        display = np.ascontiguousarray(display.T)
        spacing = (spacing[1], spacing[0]) if spacing else None
        rows, cols = cols, rows
    steps = []
    if cols == "H":
        display = display[::-1]
        steps.append("flipped upside down")
    if rows == "R":
        display = display[:, ::-1]
        steps.append("mirrored left-right")
    if orientation[0] and str(orientation[0]).strip().upper()[:1] in ("H", "F"):
        steps.insert(0, "turned by 90 degrees")
    if not steps:
        return display, spacing, None, upright_po
    text = "\\".join(str(v) for v in orientation)
    return (np.ascontiguousarray(display), spacing,
            f"stored with PatientOrientation {text}: {', '.join(steps)} to L\\F for the model and the key image",
            upright_po)


def square_image(display: np.ndarray, px: int = WORK_PX) -> np.ndarray:
    """Pad to a square with the darkest value, then resample to ``px`` x ``px`` with anti-aliasing."""
    h, w = display.shape
    n = max(h, w)
    sq = np.full((n, n), float(display.min()), np.float32)
    sq[(n - h) // 2 : (n - h) // 2 + h, (n - w) // 2 : (n - w) // 2 + w] = display
    factor = px / n
    if factor < 1:
        sq = ndi.gaussian_filter(sq, sigma=0.45 / factor)
    out = ndi.zoom(sq, factor, order=1)
    return np.ascontiguousarray(out[:px, :px], dtype=np.float32)


def wavelet_features(work: np.ndarray) -> np.ndarray:
    """(16, 10) log mean energies of the gradient magnitude's wavelet sub-bands, per region of a 4 x 4 grid."""
    import pywt

    grad = np.hypot(ndi.sobel(work, axis=0), ndi.sobel(work, axis=1)).astype(np.float32)
    step = work.shape[0] // GRID
    regions = grad[: GRID * step, : GRID * step].reshape(GRID, step, GRID, step).transpose(0, 2, 1, 3)
    regions = regions.reshape(GRID * GRID, step, step)  # row-major: region i * GRID + j
    coeffs = pywt.wavedec2(regions, WAVELET, level=LEVELS, mode="periodization", axes=(-2, -1))
    bands = [coeffs[0]] + [b for level in coeffs[1:] for b in level]
    return np.stack([np.log(np.mean(np.square(b), axis=(-2, -1)) + 1e-6) for b in bands], axis=1).astype(np.float32)


def model_inputs(work: np.ndarray) -> dict[str, np.ndarray]:
    """The network's feeds (no batch axis) from a WORK_PX square working image."""
    small = ndi.zoom(ndi.gaussian_filter(work, sigma=0.45 * WORK_PX / CNN_PX), CNN_PX / WORK_PX, order=1)
    small = ((small[:CNN_PX, :CNN_PX] - 0.5) / 0.25).astype(np.float32)
    return {"image": np.repeat(small[None], 3, axis=0), "wavelet": wavelet_features(work)}
