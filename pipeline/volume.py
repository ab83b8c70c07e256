"""Series -> int16 HU volume with geometry.

Single-frame CT and multi-frame (Enhanced / Legacy Converted Enhanced) CT are
both read as a list of frames: headers without pixel data give each frame's
position, orientation, spacing and rescale (from the functional groups for
multi-frame objects). The frames are checked (orientation, tilt, duplicates,
gaps, spacing) and sorted; highdicom's volume-position check confirms the
stack is a regular 3D volume. Pixels are then decoded one frame at a time
straight into a preallocated int16 array: highdicom's own volume builder
would stack float64 frames, 4x the memory for a 1,000-slice series.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import highdicom as hd
import numpy as np
import pydicom
import pydicom.encaps
import pydicom.pixels
from pydicom.dataset import Dataset

from pipeline.refusal import Refusal
from pipeline.timing import StageClock

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_ENHANCED_CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"
CT_STORAGE_CLASSES = (CT_IMAGE_STORAGE, ENHANCED_CT_STORAGE, LEGACY_ENHANCED_CT_STORAGE)

# Keep header-only copies of these for reports (patient/study module etc.).
_HEADER_SKIP = {"PixelData", "FloatPixelData", "DoubleFloatPixelData"}


MAX_MATRIX = 4096  # rows or columns of one CT image (scanners reconstruct 512-1024)
MAX_VOXELS = 1_100_000_000  # about 2.2 GB of int16: 1,000 slices of 1024 x 1024 fit


class VolumeError(Refusal):
    """The series cannot be trusted as a volume; ``reason`` is recorded with the job."""


@dataclass(frozen=True)
class SliceRef:
    sop_class_uid: str
    sop_instance_uid: str
    path: str
    frame_number: int | None = None  # 1-based, for multi-frame objects


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


def storage_fault(exc: BaseException) -> bool:
    """An operating-system error reading the node's own stored file (missing, permission, I/O): not a property
    of the series, so not a refusal; the job fails and is retried, and the operator sees why. (A decoder's
    OSError about the data itself, such as Pillow's "image file is truncated", carries no errno.)"""
    return isinstance(exc, OSError) and exc.errno is not None


def _header(path: Path) -> tuple[Dataset, int]:
    """The instance's header without pixel data, and the file offset where reading stopped (the Pixel
    Data element, when there is one: ``_native_frame`` reads it from there)."""
    try:
        with open(path, "rb") as fh:
            return pydicom.dcmread(fh, stop_before_pixels=True), fh.tell()
    except Exception as exc:  # noqa: BLE001 - any parse failure is a refusal with a reason
        if storage_fault(exc):
            raise
        raise VolumeError(f"cannot read {path.name}: {exc}") from None


_NATIVE_LITTLE_ENDIAN = {"1.2.840.10008.1.2": False, "1.2.840.10008.1.2.1": True}  # implicit, explicit VR


def _native_frame(path: Path, offset: int, header: Dataset) -> np.ndarray | None:
    """The stored values of a single-frame, uncompressed, little-endian 16-bit greyscale image, read
    straight from its Pixel Data element at ``offset``; None for anything else (pydicom decodes those).

    This is nearly every CT slice, and pydicom's general decoder costs about ten times the file read
    for one. The values are pydicom's: bits above Bits Stored are masked off (unsigned) or the sign bit
    extended (signed); ``tests/test_volume_decode.py`` compares the two.
    """
    explicit = _NATIVE_LITTLE_ENDIAN.get(str(getattr(header, "file_meta", Dataset()).get("TransferSyntaxUID", "")))
    try:
        rows, cols = int(header.Rows), int(header.Columns)
        bits_stored, signed = int(header.BitsStored), int(header.PixelRepresentation)
        simple = (int(header.get("SamplesPerPixel", 1)) == 1 and int(header.BitsAllocated) == 16
                  and 1 <= bits_stored <= 16 and signed in (0, 1) and int(header.get("NumberOfFrames", 1) or 1) == 1)
    except (AttributeError, TypeError, ValueError):
        return None
    if explicit is None or not simple:
        return None
    expected = rows * cols * 2
    with open(path, "rb") as fh:
        fh.seek(offset)
        head = fh.read(12 if explicit else 8)
        if len(head) < (12 if explicit else 8) or head[:4] != b"\xe0\x7f\x10\x00":
            return None
        if explicit and head[4:6] not in (b"OW", b"OB"):
            return None
        if int.from_bytes(head[-4:], "little") != expected:
            return None  # undefined length, padding or a short element: pydicom's rules apply
        data = fh.read(expected)
    if len(data) != expected:
        return None
    values = np.frombuffer(data, dtype="<i2" if signed else "<u2").reshape(rows, cols)
    if bits_stored < 16:
        if signed:
            shift = 16 - bits_stored
            values = (values << shift) >> shift
        else:
            values = values & np.uint16((1 << bits_stored) - 1)
    return values


def _sop_class(ds: Dataset) -> str:
    """SOP Class UID, from the file meta when the dataset's own is blank."""
    uid = str(ds.get("SOPClassUID", "") or "").strip()
    if not uid and getattr(ds, "file_meta", None) is not None:
        uid = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "").strip()
    return uid


@dataclass(frozen=True, eq=False)
class _Frame:
    """One image plane: a single-frame instance, or one frame of a multi-frame instance."""

    path: Path
    header: Dataset
    frame_number: int | None  # 1-based; None for single-frame instances
    orientation: tuple[float, ...] | None
    position: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    thickness: float | None
    slope: float | None  # None: no trustworthy rescale to HU (see _rescale)
    intercept: float | None
    localizer: bool


def first_item(seq_parent: Dataset | None, keyword: str) -> Dataset | None:
    """The first item of sequence ``keyword`` in ``seq_parent``, or None."""
    if seq_parent is None or keyword not in seq_parent or not len(seq_parent[keyword].value):
        return None
    return seq_parent[keyword].value[0]


def functional_group(shared: Dataset | None, per_frame: Dataset | None, keyword: str) -> Dataset | None:
    """A functional group macro item: per-frame wins over shared."""
    return first_item(per_frame, keyword) or first_item(shared, keyword)


def _floats(value, n: int) -> tuple[float, ...] | None:
    """``n`` finite numbers, or None (NaN or infinity in a geometry attribute defeats every later check)."""
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(math.isfinite(v) for v in out) else None


def _spacing(value) -> tuple[float, float] | None:
    out = _floats(value, 2)
    return out if out is not None and min(out) > 0 else None  # type: ignore[return-value]


def _rescale(item: Dataset | None) -> tuple[float | None, float | None]:
    """(slope, intercept) to Hounsfield units, None where it cannot be trusted: absent (RescaleIntercept and
    RescaleSlope are Type 1 in CT images: never guessed), not finite, a slope <= 0, or a RescaleType that
    says the values are not HU."""
    if item is None:
        return None, None
    slope, intercept = _opt_float(item.get("RescaleSlope"), None), _opt_float(item.get("RescaleIntercept"), None)
    if str(item.get("RescaleType", "") or "").strip().upper() not in ("", "HU"):
        return None, None
    if slope is None or not math.isfinite(slope) or slope <= 0:
        slope = None
    if intercept is not None and not math.isfinite(intercept):
        intercept = None
    return slope, intercept


def _opt_float(value, default: float | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def _frames(path: Path, ds: Dataset) -> list[_Frame]:
    """The image planes of one instance, with their geometry and rescale."""
    image_type = [str(v).upper() for v in ds.get("ImageType", [])]
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if n_frames < 1 or n_frames * int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) > MAX_VOXELS:
        # checked before one object per frame is made: NumberOfFrames alone could claim 2^31 frames
        raise VolumeError(f"{path.name} claims {n_frames} frames of {ds.get('Rows')} x {ds.get('Columns')}, over "
                          f"the {MAX_VOXELS / 1e9:.1f} G voxel limit of a CT series here")
    if "PerFrameFunctionalGroupsSequence" not in ds and "SharedFunctionalGroupsSequence" not in ds:
        if n_frames > 1:  # multi-frame without functional groups: no per-frame geometry to trust
            return [_Frame(path, ds, i + 1, None, None, None, None, None, None, False) for i in range(n_frames)]
        return [_Frame(
            path, ds, None,
            _floats(ds.get("ImageOrientationPatient"), 6), _floats(ds.get("ImagePositionPatient"), 3),
            _spacing(ds.get("PixelSpacing")), _opt_float(ds.get("SliceThickness"), None),
            *_rescale(ds), "LOCALIZER" in image_type,
        )]
    shared = first_item(ds, "SharedFunctionalGroupsSequence")
    per_frame_seq = ds.get("PerFrameFunctionalGroupsSequence") or []
    if per_frame_seq and len(per_frame_seq) != n_frames:
        raise VolumeError(f"{path.name}: NumberOfFrames {n_frames} but {len(per_frame_seq)} per-frame functional "
                          "group items")
    frames: list[_Frame] = []
    for i in range(n_frames):
        pf = per_frame_seq[i] if i < len(per_frame_seq) else None
        orient = functional_group(shared, pf, "PlaneOrientationSequence")
        pos = functional_group(shared, pf, "PlanePositionSequence")
        meas = functional_group(shared, pf, "PixelMeasuresSequence")
        rescale = functional_group(shared, pf, "PixelValueTransformationSequence")
        ftype = functional_group(shared, pf, "CTImageFrameTypeSequence")
        frame_type = [str(v).upper() for v in (ftype.get("FrameType", []) if ftype is not None else [])]
        frames.append(_Frame(
            path, ds, i + 1,
            _floats(orient.get("ImageOrientationPatient"), 6) if orient is not None else None,
            _floats(pos.get("ImagePositionPatient"), 3) if pos is not None else None,
            _spacing(meas.get("PixelSpacing")) if meas is not None else None,
            _opt_float(meas.get("SliceThickness"), None) if meas is not None else None,
            *_rescale(rescale), "LOCALIZER" in image_type or "LOCALIZER" in frame_type,
        ))
    return frames


def _select_stack(headers: list[tuple[Path, Dataset]]) -> tuple[list[_Frame], list[str]]:
    """Keep the largest group of parallel image planes; say what was left out."""
    notes: list[str] = []
    images = [(p, ds) for p, ds in headers if _sop_class(ds) in CT_STORAGE_CLASSES]
    if len(images) < len(headers):
        notes.append(f"{len(headers) - len(images)} non-CT-image instances ignored")
    frames = [f for p, ds in images for f in _frames(p, ds)]
    usable = [f for f in frames if not f.localizer and f.orientation and f.position and f.pixel_spacing]
    if len(usable) < len(frames):
        notes.append(f"{len(frames) - len(usable)} localizer/unpositioned images ignored")
    if not usable:
        raise VolumeError("no positioned CT image slices in the series")
    groups: dict[tuple, list[_Frame]] = {}
    for f in usable:
        key = (tuple(np.round(f.orientation, 3)), int(f.header.Rows), int(f.header.Columns),
               tuple(np.round(f.pixel_spacing, 4)))
        groups.setdefault(key, []).append(f)
    best = max(groups.values(), key=len)
    if len(groups) > 1:
        notes.append(f"{len(usable) - len(best)} slices with another orientation/size ignored")
    no_hu = [f for f in best if f.slope is None or f.intercept is None]
    if no_hu:
        raise VolumeError(f"no valid rescale to HU on {len(no_hu)} slice(s), e.g. {no_hu[0].path.name} "
                          "(RescaleIntercept/RescaleSlope missing, not finite or slope <= 0, or RescaleType not HU): "
                          "attenuation cannot be measured")
    return best, notes


def _check_and_sort(stack: list[_Frame], max_tilt_deg: float) -> tuple[list[_Frame], float]:
    iop = np.asarray(stack[0].orientation, dtype=float)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    pos = np.array([f.position for f in stack], dtype=float)
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
        try:
            spacing, _ = hd.spatial.get_volume_positions(pos.tolist(), iop.tolist(), rtol=0.01, sort=True)
        except Exception as exc:  # noqa: BLE001 - highdicom refuses inconsistent geometry
            raise VolumeError(f"geometry check failed: {exc}") from None
        if spacing is None:
            raise VolumeError("slices do not form a regular 3D volume (highdicom geometry check)")
    return stack, step


# Transfer syntaxes whose every frame ends with FF D9 (JPEG EOI; JPEG 2000 / HTJ2K EOC): a frame cut short
# decodes without an error in some decoders (JPEG-LS: two thirds of a slice wrong, nothing said).
_MARKER_TERMINATED = frozenset({
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"})

def _check_encapsulated(path: Path, ds: Dataset) -> None:
    """Refuse a compressed frame that was cut short (see _MARKER_TERMINATED)."""
    if str(ds.file_meta.get("TransferSyntaxUID", "")) not in _MARKER_TERMINATED or "PixelData" not in ds:
        return
    n = int(ds.get("NumberOfFrames", 1) or 1)
    for k, frame in enumerate(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=n), 1):
        if b"\xff\xd9" not in frame[-10:]:  # as pydicom looks for it: trailing padding bytes are allowed
            raise VolumeError(f"{path.name}: compressed frame {k} is cut short (no end-of-image marker)")


def _decoded(path: Path) -> Dataset:
    """The whole instance, its compressed frames checked. (An RLE segment cut short already fails to decode.)"""
    ds = pydicom.dcmread(path)
    _check_encapsulated(path, ds)
    return ds


def _decode_into(hu: np.ndarray, stack: list[_Frame], offsets: dict[Path, int]) -> None:
    """Decode each plane into its slot of ``hu``; a multi-frame file is read once, frame by frame.
    ``offsets``: where each file's header ended (see ``_header``)."""
    slot: dict[Path, dict[int | None, int]] = {}
    for k, f in enumerate(stack):
        slot.setdefault(f.path, {})[f.frame_number] = k
    for path, wanted in slot.items():
        try:
            if None in wanted:  # single frame
                plane = _native_frame(path, offsets[path], stack[wanted[None]].header) if path in offsets else None
                planes = iter([plane if plane is not None else _decoded(path).pixel_array])
                indices = [None]
            else:
                indices = sorted(wanted)  # type: ignore[type-var]
                syntax = str(stack[next(iter(wanted.values()))].header.file_meta.get("TransferSyntaxUID", ""))
                if syntax in _MARKER_TERMINATED:
                    _check_encapsulated(path, pydicom.dcmread(path))
                planes = pydicom.pixels.iter_pixels(path, indices=[n - 1 for n in indices])  # type: ignore[operator]
            for number, arr in zip(indices, planes):
                k = wanted[number]
                f = stack[k]
                if f.slope == 1.0 and float(f.intercept).is_integer():
                    hu[k] = np.clip(arr.astype(np.int32, copy=False) + int(f.intercept), -32768, 32767)
                else:
                    hu[k] = np.clip(np.rint(arr.astype(np.float32) * f.slope + f.intercept), -32768, 32767)
        except VolumeError:
            raise
        except Exception as exc:  # noqa: BLE001
            if storage_fault(exc):
                raise
            raise VolumeError(f"cannot decode pixel data of {path.name}: {exc}") from None


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


def load_volume(paths: Sequence[str | Path], *, max_tilt_deg: float = 10.0, clock: StageClock | None = None
                ) -> Volume:
    """Read a series from files into a checked int16 HU volume.

    ``clock`` (optional) gets two stages: ``load_decode`` (reading headers and
    decoding pixels) and ``volume`` (stack selection, geometry checks, sorting,
    orientation). Whatever is wrong with the files, the outcome is a volume or a
    VolumeError with a reason (the job records it): malformed values from a sender
    (an unknown VR, a number that is not one) must not crash the job.
    """
    try:
        return _load_volume(paths, max_tilt_deg, clock or StageClock())
    except VolumeError:
        raise
    except Exception as exc:  # noqa: BLE001 - untrusted input; tests/test_fuzz.py
        if storage_fault(exc):
            raise
        raise VolumeError(f"malformed DICOM data ({type(exc).__name__}: {exc})"[:300]) from None


def _load_volume(paths: Sequence[str | Path], max_tilt_deg: float, clock: StageClock) -> Volume:
    with clock.stage("load_decode"):
        read = [(Path(p), *_header(Path(p))) for p in paths]
        headers = [(p, ds) for p, ds, _ in read]
        offsets = {p: offset for p, _, offset in read}
    with clock.stage("volume"):
        if not headers:
            raise VolumeError("empty series")
        series = Counter(str(ds.get("SeriesInstanceUID", "")) for _, ds in headers)
        if len(series) > 1:
            raise VolumeError(f"instances from {len(series)} series were given as one")
        stack, notes = _select_stack(headers)
        stack, step = _check_and_sort(stack, max_tilt_deg)
        first = stack[0]
    rows, cols = int(first.header.Rows), int(first.header.Columns)
    if not (1 <= rows <= MAX_MATRIX and 1 <= cols <= MAX_MATRIX) or len(stack) * rows * cols > MAX_VOXELS:
        # A decompression bomb or a corrupt header: refuse before allocating, not by running out of memory.
        raise VolumeError(f"{len(stack)} x {rows} x {cols} voxels exceeds the limits of a CT series here "
                          f"(matrix <= {MAX_MATRIX}, <= {MAX_VOXELS / 1e9:.1f} G voxels)")
    with clock.stage("load_decode"):
        hu = np.empty((len(stack), rows, cols), dtype=np.int16)
        _decode_into(hu, stack, offsets)
    iop = np.asarray(first.orientation, dtype=float)
    if any(f.frame_number is not None for f in stack):
        notes.append(f"multi-frame CT: {len(stack)} frames from {len({f.path for f in stack})} instance(s)")
    with clock.stage("volume"):
        return canonical_axial(Volume(
            hu=hu,
            spacing=(step, float(first.pixel_spacing[0]), float(first.pixel_spacing[1])),  # (row, column) spacing
            positions=np.array([f.position for f in stack], dtype=float),
            row_direction=iop[:3],
            column_direction=iop[3:],
            slice_refs=tuple(SliceRef(_sop_class(f.header), str(f.header.get("SOPInstanceUID", "")), str(f.path),
                                      f.frame_number) for f in stack),
            header=_header_copy(first.header),
            slice_thickness_mm=first.thickness,
            notes=tuple(notes),
        ))
