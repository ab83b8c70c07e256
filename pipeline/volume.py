"""Series -> int16 HU volume with geometry.

Headers are read without pixel data, checked (orientation, tilt, duplicates,
gaps, spacing) and sorted; highdicom's volume-position check confirms the
stack is a regular 3D volume. Pixels are then decoded one slice at a time
straight into a preallocated int16 array: highdicom's own volume builder
would stack float64 frames, 4x the memory for a 1,000-slice series.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"

# Keep header-only copies of these for reports (patient/study module etc.).
_HEADER_SKIP = {"PixelData", "FloatPixelData", "DoubleFloatPixelData"}


class VolumeError(Exception):
    """The series cannot be trusted as a volume; ``reason`` is recorded with the job."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class SliceRef:
    sop_class_uid: str
    sop_instance_uid: str
    path: str


@dataclass(frozen=True, eq=False)
class Volume:
    """An axial CT stack in Hounsfield units.

    ``hu[k, r, c]``: slice k (ascending along the slice normal), row r, column c.
    ``positions[k]`` is ImagePositionPatient of slice k (LPS, mm).
    """

    hu: np.ndarray
    spacing: tuple[float, float, float]  # (slice step, row spacing, column spacing) in mm
    positions: np.ndarray
    row_direction: np.ndarray  # direction of increasing column index (ImageOrientationPatient[:3])
    column_direction: np.ndarray  # direction of increasing row index (ImageOrientationPatient[3:])
    slice_refs: tuple[SliceRef, ...]
    header: Dataset  # a source header without pixel data (patient/study/equipment)
    slice_thickness_mm: float | None
    notes: tuple[str, ...] = field(default_factory=tuple)
    source_flips: tuple[bool, bool] = (False, False)  # rows, columns mirrored from the source images

    def to_source_rc(self, rc: np.ndarray) -> np.ndarray:
        """Pixel coordinates (row, col) in this volume -> in the source image's pixel grid."""
        rc = np.array(rc, dtype=float, copy=True)
        if self.source_flips[0]:
            rc[..., 0] = self.hu.shape[1] - 1 - rc[..., 0]
        if self.source_flips[1]:
            rc[..., 1] = self.hu.shape[2] - 1 - rc[..., 1]
        return rc

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_direction, self.column_direction)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]


def _header(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a refusal with a reason
        raise VolumeError(f"cannot read {path.name}: {exc}") from None


def _sop_class(ds: Dataset) -> str:
    """SOP Class UID, from the file meta when the dataset's own is blank."""
    uid = str(ds.get("SOPClassUID", "") or "").strip()
    if not uid and getattr(ds, "file_meta", None) is not None:
        uid = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "").strip()
    return uid


def _is_axial_image(ds: Dataset) -> bool:
    image_type = [str(v).upper() for v in ds.get("ImageType", [])]
    return "LOCALIZER" not in image_type and "ImageOrientationPatient" in ds and "ImagePositionPatient" in ds


def _select_stack(headers: list[tuple[Path, Dataset]]) -> tuple[list[tuple[Path, Dataset]], list[str]]:
    """Keep the largest group of parallel image slices; say what was left out."""
    notes: list[str] = []
    images = [(p, ds) for p, ds in headers if _sop_class(ds) == CT_IMAGE_STORAGE]
    if len(images) < len(headers):
        notes.append(f"{len(headers) - len(images)} non-CT-image instances ignored")
    usable = [(p, ds) for p, ds in images if _is_axial_image(ds)]
    if len(usable) < len(images):
        notes.append(f"{len(images) - len(usable)} localizer/unpositioned images ignored")
    if not usable:
        raise VolumeError("no positioned CT image slices in the series")
    groups: dict[tuple, list[tuple[Path, Dataset]]] = {}
    for p, ds in usable:
        iop = tuple(np.round(np.asarray(ds.ImageOrientationPatient, dtype=float), 3))
        key = (iop, int(ds.Rows), int(ds.Columns), tuple(np.round(np.asarray(ds.PixelSpacing, float), 4)))
        groups.setdefault(key, []).append((p, ds))
    best = max(groups.values(), key=len)
    if len(groups) > 1:
        notes.append(f"{len(usable) - len(best)} slices with another orientation/size ignored")
    return best, notes


def _check_and_sort(stack: list[tuple[Path, Dataset]], max_tilt_deg: float) -> tuple[list[tuple[Path, Dataset]], float]:
    iop = np.asarray(stack[0][1].ImageOrientationPatient, dtype=float)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    pos = np.array([np.asarray(ds.ImagePositionPatient, dtype=float) for _, ds in stack])
    proj = pos @ normal
    order = np.argsort(proj, kind="stable")
    proj, pos = proj[order], pos[order]
    stack = [stack[i] for i in order]
    if len(stack) < 2:
        raise VolumeError("a single slice is not a volume")
    steps = np.diff(proj)
    if np.any(steps < 1e-3):
        raise VolumeError(f"duplicate slice positions ({int(np.sum(steps < 1e-3))} duplicates)")
    # Gantry tilt: consecutive positions move off the slice normal.
    d = np.diff(pos, axis=0)
    cosang = np.abs(d @ normal) / np.linalg.norm(d, axis=1)
    tilt = float(np.degrees(np.arccos(np.clip(cosang.min(), -1, 1))))
    if tilt > max_tilt_deg:
        raise VolumeError(f"gantry tilt {tilt:.1f} deg exceeds {max_tilt_deg:.1f} deg")
    step = float(np.median(steps))
    if np.any(np.abs(steps - step) > max(0.05, 0.01 * step)):
        gaps = int(np.sum(steps > 1.5 * step))
        if gaps:
            raise VolumeError(f"missing slices: {gaps} gap(s) in a {step:.2f} mm stack")
        raise VolumeError(
            f"inconsistent slice spacing ({steps.min():.2f}-{steps.max():.2f} mm); resampling is not supported"
        )
    if tilt <= 1e-3:
        datasets = [ds for _, ds in stack]
        try:
            spacing, _ = hd.spatial.get_series_volume_positions(datasets, rtol=0.01, sort=True)
        except Exception as exc:  # noqa: BLE001 - highdicom needs complete image metadata
            raise VolumeError(f"geometry check failed (incomplete image metadata?): {exc}") from None
        if spacing is None:
            raise VolumeError("slices do not form a regular 3D volume (highdicom geometry check)")
    return stack, step


def _header_copy(ds: Dataset) -> Dataset:
    out = Dataset()
    for elem in ds:
        if elem.keyword not in _HEADER_SKIP:
            out.add(elem)
    out.file_meta = getattr(ds, "file_meta", Dataset())
    return out


def canonical_axial(volume: Volume) -> Volume:
    """Reorient an axial stack so rows run anterior->posterior, columns right->left (patient
    left = +x) and slices inferior->superior, as the localiser expects; remember the flips."""
    hu, pos = volume.hu, volume.positions.copy()
    row_dir, col_dir = volume.row_direction.copy(), volume.column_direction.copy()
    flip_r = bool(col_dir[1] < 0)  # rows should run towards posterior (+y)
    flip_c = bool(row_dir[0] < 0)  # columns should run towards the patient's left (+x)
    notes = list(volume.notes)
    if flip_r:
        pos = pos + (hu.shape[1] - 1) * volume.spacing[1] * col_dir
        col_dir = -col_dir
        hu = hu[:, ::-1, :]
    if flip_c:
        pos = pos + (hu.shape[2] - 1) * volume.spacing[2] * row_dir
        row_dir = -row_dir
        hu = hu[:, :, ::-1]
    refs = volume.slice_refs
    if len(pos) > 1 and pos[-1][2] < pos[0][2]:
        hu, pos, refs = hu[::-1], pos[::-1], tuple(reversed(refs))
        notes.append("slice order reversed to run inferior to superior")
    if flip_r or flip_c:
        notes.append(f"image mirrored for analysis (rows: {flip_r}, columns: {flip_c})")
    if not (flip_r or flip_c) and hu is volume.hu:
        return volume
    return Volume(hu=np.ascontiguousarray(hu), spacing=volume.spacing, positions=pos, row_direction=row_dir,
                  column_direction=col_dir, slice_refs=refs, header=volume.header,
                  slice_thickness_mm=volume.slice_thickness_mm, notes=tuple(notes),
                  source_flips=(flip_r != volume.source_flips[0], flip_c != volume.source_flips[1]))


def load_volume(paths: Sequence[str | Path], *, max_tilt_deg: float = 10.0) -> Volume:
    """Read a series from files into a checked int16 HU volume."""
    headers = [(Path(p), _header(Path(p))) for p in paths]
    if not headers:
        raise VolumeError("empty series")
    series = Counter(str(ds.get("SeriesInstanceUID", "")) for _, ds in headers)
    if len(series) > 1:
        raise VolumeError(f"instances from {len(series)} series were given as one")
    stack, notes = _select_stack(headers)
    stack, step = _check_and_sort(stack, max_tilt_deg)
    first = stack[0][1]
    rows, cols = int(first.Rows), int(first.Columns)
    hu = np.empty((len(stack), rows, cols), dtype=np.int16)
    for k, (path, _) in enumerate(stack):
        ds = pydicom.dcmread(path)
        try:
            arr = ds.pixel_array
        except Exception as exc:  # noqa: BLE001
            raise VolumeError(f"cannot decode pixel data of {path.name}: {exc}") from None
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        if slope == 1.0 and intercept.is_integer():
            hu[k] = np.clip(arr.astype(np.int32, copy=False) + int(intercept), -32768, 32767)
        else:
            hu[k] = np.clip(np.rint(arr.astype(np.float32) * slope + intercept), -32768, 32767)
    iop = np.asarray(first.ImageOrientationPatient, dtype=float)
    ps = np.asarray(first.PixelSpacing, dtype=float)  # (row spacing, column spacing)
    thickness = first.get("SliceThickness")
    return canonical_axial(Volume(
        hu=hu,
        spacing=(step, float(ps[0]), float(ps[1])),
        positions=np.array([np.asarray(ds.ImagePositionPatient, float) for _, ds in stack]),
        row_direction=iop[:3],
        column_direction=iop[3:],
        slice_refs=tuple(SliceRef(_sop_class(ds), str(ds.get("SOPInstanceUID", "")), str(p)) for p, ds in stack),
        header=_header_copy(first),
        slice_thickness_mm=float(thickness) if thickness not in (None, "") else None,
        notes=tuple(notes),
    ))
