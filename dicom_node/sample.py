"""The shipped real CT as a DICOM series (for the demo and the tests).

The NIfTI volume keeps its exact geometry and HU values; patient, study and
equipment attributes are invented for a fictitious patient. UIDs are derived
deterministically so repeated runs describe the same study.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

from hl7.samples import demo_oru_message  # noqa: F401 - the demo and the tests use it from here
from pipeline.demographics import calendar_age
from pipeline.volume import CT_IMAGE_STORAGE

SAMPLE_PATIENT_ID = "OS-DEMO-0001"
SAMPLE_ISSUER = "OSTEOSCREEN-DEMO"
SAMPLE_STUDY_DATE = dt.date(2026, 1, 5)
_INTERCEPT = -1024


def sample_data_dir() -> Path:
    return Path(__file__).resolve().parent / "sample_data"


def _uid(*parts: str) -> str:
    return generate_uid(entropy_srcs=["osteoscreen-sample", *parts])


@dataclass(frozen=True)
class SampleSeries:
    directory: Path
    files: list[Path]
    study_uid: str
    series_uid: str
    patient_id: str
    issuer: str


def load_lps_volume(nifti: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """NIfTI -> (array[z, row, col] with rows A->P and columns R->L, LPS position of voxel (0,0,0), spacing).

    Slices ascend inferior -> superior.
    """
    img = nib.as_closest_canonical(nib.load(str(nifti)))  # RAS+: i->R, j->A, k->S
    data = np.asanyarray(img.dataobj)
    ni, nj, _ = data.shape
    arr = np.ascontiguousarray(data[::-1, ::-1, :].transpose(2, 1, 0))
    ras0 = img.affine @ np.array([ni - 1, nj - 1, 0, 1.0])
    origin_lps = np.array([-ras0[0], -ras0[1], ras0[2]])
    zooms = img.header.get_zooms()
    return arr, origin_lps, (float(zooms[2]), float(zooms[1]), float(zooms[0]))


def _base_dataset(study_uid: str, series_uid: str, for_uid: str, study_date: dt.date) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study_date.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = "091500"
    ds.AccessionNumber = "ACC-DEMO-0001"
    ds.Modality = "CT"
    ds.Manufacturer = "Sample (TotalSegmentator example_ct, resampled source)"
    ds.InstitutionName = "osteoscreen demo hospital"
    ds.ReferringPhysicianName = "REFERRER^DEMO"
    ds.StudyDescription = "CT ABDOMEN PELVIS WITHOUT CONTRAST"
    ds.SeriesDescription = "ABD/PELVIS 3.0 mm"
    ds.ManufacturerModelName = "example_ct"
    ds.PatientName = "DEMO^OSTEOSCREEN"
    ds.PatientID = SAMPLE_PATIENT_ID
    ds.IssuerOfPatientID = SAMPLE_ISSUER
    ds.PatientBirthDate = "19580312"
    ds.PatientSex = "F"
    ds.PatientAge = f"{int(calendar_age(dt.date(1958, 3, 12), study_date)):03d}Y"  # as the birth date gives it
    ds.BodyPartExamined = "ABDOMEN"
    ds.SliceThickness = "3.0"
    ds.KVP = "120"
    ds.ConvolutionKernel = "STANDARD"
    ds.PatientPosition = "FFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 3
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = str(_INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    return ds


def write_sample_series(
    out_dir: str | Path,
    *,
    tag: str = "demo",
    study_date: dt.date = SAMPLE_STUDY_DATE,
    nifti: Path | None = None,
) -> SampleSeries:
    """Write the sample CT as one DICOM file per slice into ``out_dir``.

    ``tag`` seeds the UIDs: the same tag gives the same study/series/SOP UIDs.
    """
    arr, origin, spacing = load_lps_volume(nifti or sample_data_dir() / "example_ct.nii.gz")
    return write_array_series(out_dir, arr, origin, spacing, tag=tag, study_date=study_date)


def write_array_series(out_dir: str | Path, hu: np.ndarray, origin_lps: np.ndarray,
                       spacing: tuple[float, float, float], *, tag: str = "demo",
                       study_date: dt.date = SAMPLE_STUDY_DATE) -> SampleSeries:
    """Write an HU array (z, row, col; rows A->P, columns R->L, slices inferior -> superior) as the sample
    patient's CT series, one file per slice (tests: modified copies of the sample CT)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dz, dy, dx = spacing
    study_uid, series_uid, for_uid = _uid(tag, "study"), _uid(tag, "series"), _uid(tag, "for")
    base = _base_dataset(study_uid, series_uid, for_uid, study_date)
    files = _write_slices(out, tag, base, iter(hu), np.asarray(origin_lps, float), dz, (dy, dx))
    return SampleSeries(out, files, study_uid, series_uid, SAMPLE_PATIENT_ID, SAMPLE_ISSUER)


def _write_slices(out: Path, tag: str, base: Dataset, slices_hu, origin: np.ndarray, dz: float,
                  pixel_spacing: tuple[float, float], transfer_syntax: str = ExplicitVRLittleEndian) -> list[Path]:
    """One CT file per HU slice (inferior -> superior), ``dz`` mm apart, optionally compressed."""
    files = []
    for k, hu in enumerate(slices_hu):
        ds = Dataset()
        ds.update(base)
        sop_uid = _uid(tag, "sop", str(k))
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = k + 1
        pos = origin + np.array([0.0, 0.0, k * dz])
        ds.ImagePositionPatient = [f"{v:.4f}" for v in pos]
        ds.SliceLocation = f"{pos[2]:.4f}"
        ds.PixelSpacing = [f"{pixel_spacing[0]:.4f}", f"{pixel_spacing[1]:.4f}"]
        ds.Rows, ds.Columns = hu.shape
        stored = (hu.astype(np.int32) - _INTERCEPT).astype(np.int16)
        ds.PixelData = stored.tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
        if transfer_syntax != ExplicitVRLittleEndian:
            ds.compress(transfer_syntax, generate_instance_uid=False)
        path = out / f"CT{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def resampled_sample_slices(n_slices: int, matrix: int = 512, *, noise_hu: float = 8.0, seed: int = 0):
    """The shipped real CT resampled to ``n_slices`` x ``matrix`` x ``matrix``, one slice at a time.

    The benchmark series generator. The in-plane field of view is padded with
    air to a square (the source is 101 x 122 voxels of 3 mm, so 366 mm) and
    resampled bilinearly to ``matrix`` pixels; along z the same 333 mm of
    anatomy is interpolated linearly onto ``n_slices`` positions. Seeded
    Gaussian noise (``noise_hu``) stands in for the quantum noise of thin
    slices, so that compressed transfer syntaxes see realistic entropy rather
    than the smoothness of interpolation. Returns (slice iterator, origin LPS,
    slice spacing mm, pixel spacing mm); memory stays at a few slices.
    """
    from scipy import ndimage

    if n_slices < 2 or matrix < 16:
        raise ValueError("the generator needs at least 2 slices and a 16-pixel matrix")
    arr, origin, (dz, dy, dx) = load_lps_volume(sample_data_dir() / "example_ct.nii.gz")
    nz, nr, nc = arr.shape
    side = max(nr * dy, nc * dx)
    out_spacing = side / matrix
    pad_r, pad_c = round((side / dy - nr) / 2), round((side / dx - nc) / 2)
    new_origin = origin - np.array([pad_c * dx, pad_r * dy, 0.0]) + np.array([
        (out_spacing - dx) / 2, (out_spacing - dy) / 2, 0.0])
    new_dz = (nz - 1) * dz / (n_slices - 1)
    rng = np.random.default_rng(seed)

    def slices():
        for k in range(n_slices):
            z = k * (nz - 1) / (n_slices - 1)
            z0 = min(int(z), nz - 2)
            w = z - z0
            plane = (1 - w) * arr[z0] + w * arr[z0 + 1]
            square = np.full((round(side / dy), round(side / dx)), -1024.0, dtype=np.float32)
            square[pad_r:pad_r + nr, pad_c:pad_c + nc] = plane
            big = ndimage.zoom(square, (matrix / square.shape[0], matrix / square.shape[1]), order=1)
            if noise_hu > 0:
                big += rng.normal(0.0, noise_hu, big.shape).astype(np.float32)
            yield np.clip(np.rint(big), -1024, 3071).astype(np.int16)

    return slices(), new_origin, new_dz, (out_spacing, out_spacing)


def write_resampled_series(out_dir: str | Path, n_slices: int, *, matrix: int = 512, tag: str = "bench",
                           transfer_syntax: str = ExplicitVRLittleEndian, noise_hu: float = 8.0) -> SampleSeries:
    """Write :func:`resampled_sample_slices` as a CT series (benchmarks: 300 or 1,000 slices of 512 x 512)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slices, origin, dz, spacing = resampled_sample_slices(n_slices, matrix, noise_hu=noise_hu)
    study_uid, series_uid, for_uid = _uid(tag, "study"), _uid(tag, "series"), _uid(tag, "for")
    base = _base_dataset(study_uid, series_uid, for_uid, SAMPLE_STUDY_DATE)
    # thin reconstructions overlap: the nominal thickness is never below 0.625 mm
    base.SliceThickness = f"{max(dz, 0.625):.3f}"
    base.SeriesDescription = f"ABD/PELVIS {n_slices} x {matrix} (resampled sample CT)"
    files = _write_slices(out, tag, base, slices, origin, dz, spacing, transfer_syntax)
    return SampleSeries(out, files, study_uid, series_uid, SAMPLE_PATIENT_ID, SAMPLE_ISSUER)


def sample_labels_lps() -> np.ndarray:
    """The TotalSegmentator labels on the same [z, row, col] grid as the sample series."""
    arr, _, _ = load_lps_volume(sample_data_dir() / "totalseg_v2_labels.nii.gz")
    return arr.astype(np.int16)


def write_multiframe_series(series: SampleSeries, out_dir: str | Path, *, tag: str = "demo-mf") -> SampleSeries:
    """The sample series as one Legacy Converted Enhanced CT object (all slices as frames of one instance).

    highdicom's converter builds the functional groups (plane position and
    orientation, pixel measures, rescale) from the single-frame headers, as a
    PACS or a modality-side converter would.
    """
    import highdicom as hd
    import pydicom

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    legacy = [pydicom.dcmread(p) for p in series.files]
    series_uid = _uid(tag, "series")
    mf = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy, series_instance_uid=series_uid, series_number=3, sop_instance_uid=_uid(tag, "sop"),
        instance_number=1,
    )
    path = out / "CT_multiframe.dcm"
    mf.save_as(path, enforce_file_format=True)
    return SampleSeries(out, [path], series.study_uid, series_uid, series.patient_id, series.issuer)
