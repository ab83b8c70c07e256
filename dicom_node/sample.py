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
    ds.PatientAge = "067Y"
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
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arr, origin, (dz, dy, dx) = load_lps_volume(nifti or sample_data_dir() / "example_ct.nii.gz")
    study_uid, series_uid, for_uid = _uid(tag, "study"), _uid(tag, "series"), _uid(tag, "for")
    base = _base_dataset(study_uid, series_uid, for_uid, study_date)
    rows, cols = arr.shape[1:]
    files = []
    for k in range(arr.shape[0]):
        ds = Dataset()
        ds.update(base)
        sop_uid = _uid(tag, "sop", str(k))
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = k + 1
        pos = origin + np.array([0.0, 0.0, k * dz])
        ds.ImagePositionPatient = [f"{v:.4f}" for v in pos]
        ds.SliceLocation = f"{pos[2]:.4f}"
        ds.PixelSpacing = [f"{dy:.4f}", f"{dx:.4f}"]
        ds.Rows, ds.Columns = rows, cols
        stored = (arr[k].astype(np.int32) - _INTERCEPT).astype(np.int16)
        ds.PixelData = stored.tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
        path = out / f"CT{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return SampleSeries(out, files, study_uid, series_uid, SAMPLE_PATIENT_ID, SAMPLE_ISSUER)


def sample_labels_lps() -> np.ndarray:
    """The TotalSegmentator labels on the same [z, row, col] grid as the sample series."""
    arr, _, _ = load_lps_volume(sample_data_dir() / "totalseg_v2_labels.nii.gz")
    return arr.astype(np.int16)


def demo_oru_message(when: dt.datetime, control_id: str = "DEMO0001") -> bytes:
    """The demo ORU^R01 with CR segment separators, observed the day before ``when``."""
    template = (sample_data_dir() / "demo_oru.hl7").read_text(encoding="ascii")
    obs = (when - dt.timedelta(days=1)).strftime("%Y%m%d%H%M")
    text = template.format(msg_time=when.strftime("%Y%m%d%H%M%S"), control_id=control_id, obs_time=obs)
    return "\r".join(line for line in text.splitlines() if line).encode("ascii") + b"\r"


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
