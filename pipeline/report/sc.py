"""Secondary Capture of the selected slice with the ROI and a summary panel."""
from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from pipeline.report.source import copy_patient_study_extras
from pipeline.report.sr import NodeIdentity, set_equipment


def build_sc(
    *,
    source_header: Dataset,
    source_sop_instance_uid: str,
    source_frame_number: int | None = None,
    rgb: np.ndarray,
    node: NodeIdentity,
    series_uid: str,
    sop_uid: str,
    series_number: int = 9902,
    description: str = "osteoscreen L1 key image (research use)",
    derivation: str = "Selected L1 slice, bone window, trabecular ROI outline and screening summary",
    patient_orientation: tuple[str, str] = ("L", "P"),
    instance_number: int = 1,
) -> hd.sc.SCImage:
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source_header,
        pixel_array=rgb,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=node.manufacturer,
        patient_orientation=patient_orientation,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    copy_patient_study_extras(sc, source_header)
    sc.SeriesDescription = description
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    if "Laterality" not in sc and "ImageLaterality" not in sc:
        sc.ImageLaterality = "U"  # the spine is unpaired
    set_equipment(sc, node)
    sc.ConversionType = "WSD"
    ref = Dataset()
    ref.ReferencedSOPClassUID = str(source_header.SOPClassUID)
    ref.ReferencedSOPInstanceUID = source_sop_instance_uid
    if source_frame_number:
        ref.ReferencedFrameNumber = source_frame_number
    sc.SourceImageSequence = [ref]
    sc.DerivationDescription = derivation
    return sc
