"""Optional companions of the SR for viewers that do not draw TID 1500 (built with highdicom).

- A Key Object Selection document flagging the measured slice (and the key image)
  as "Of Interest", so the PACS shows the key image in the study's key-image list.
- A Grayscale Softcopy Presentation State on the measured slice: bone window, the
  ROI outline as a closed polyline and a text label, for viewers that draw GSPS.
"""
from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from pipeline.report.render import BONE_WINDOW
from pipeline.report.source import copy_patient_study_extras
from pipeline.report.sr import NodeIdentity, set_equipment

OF_INTEREST = CodedConcept("113000", "DCM", "Of Interest")


def build_kos(*, key_images: Sequence[Dataset], node: NodeIdentity, series_uid: str, sop_uid: str,
              description: str, series_number: int = 9903, frame_numbers: Sequence[int | None] = (),
              instance_number: int = 1) -> hd.ko.KeyObjectSelectionDocument:
    """Key Object Selection of ``key_images`` (headers of the measured slice and the key image).

    ``frame_numbers``: per key image, the frame flagged in a multi-frame image (None: the whole image);
    highdicom takes no frames, so they are set on the content's IMAGE items afterwards."""
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=node.device_uid, name="osteoscreen", manufacturer_name=node.manufacturer,
            model_name=node.model_name, serial_number=node.serial_number))
    content = hd.ko.KeyObjectSelection(document_title=OF_INTEREST, referenced_objects=list(key_images),
                                       observer_device_context=observer, description=description[:1024])
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=list(key_images), content=content, series_instance_uid=series_uid, series_number=series_number,
        sop_instance_uid=sop_uid, instance_number=instance_number, manufacturer=node.manufacturer,
        institution_name=node.institution_name or None)
    copy_patient_study_extras(kos, key_images[0])
    kos.SeriesDescription = "osteoscreen key images (research use)"
    set_equipment(kos, node)
    frames = {str(img.SOPInstanceUID): f for img, f in zip(key_images, frame_numbers) if f}
    for item in kos.ContentSequence:
        if item.ValueType == "IMAGE":
            ref = item.ReferencedSOPSequence[0]
            frame = frames.get(str(ref.ReferencedSOPInstanceUID))
            if frame:
                ref.ReferencedFrameNumber = frame
    return kos


def build_gsps(*, image: Dataset, frame_number: int | None, roi_rc: np.ndarray, label: str, node: NodeIdentity,
               series_uid: str, sop_uid: str, series_number: int = 9904, instance_number: int = 1
               ) -> hd.pr.GrayscaleSoftcopyPresentationState:
    """The ROI (row, col pixel coordinates on ``image``) as a closed polyline with a label, in bone window."""
    layer = hd.pr.GraphicLayer(layer_name="OSTEOSCREEN", order=1, description="osteoscreen trabecular ROI")
    xy = np.asarray(roi_rc, dtype=float)[:, ::-1] + 0.5  # (column, row), pixel centres, as in the SR
    if not np.allclose(xy[0], xy[-1]):
        xy = np.vstack([xy, xy[:1]])
    top = xy[np.argmin(xy[:, 1])]
    rows, cols = int(image.Rows), int(image.Columns)
    anchor = (float(np.clip(top[0], 1, cols - 1)), float(np.clip(top[1] - 12, 1, rows - 1)))
    annotation = hd.pr.GraphicAnnotation(
        referenced_images=[image], graphic_layer=layer, referenced_frame_number=frame_number,
        graphic_objects=[hd.pr.GraphicObject(graphic_type=hd.pr.GraphicTypeValues.POLYLINE, graphic_data=xy,
                                             units=hd.pr.AnnotationUnitsValues.PIXEL)],
        text_objects=[hd.pr.TextObject(text_value=label[:64], units=hd.pr.AnnotationUnitsValues.PIXEL,
                                       anchor_point=anchor, anchor_point_visible=False)])
    centre, width = BONE_WINDOW
    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[image], series_instance_uid=series_uid, series_number=series_number,
        sop_instance_uid=sop_uid, instance_number=instance_number, manufacturer=node.manufacturer,
        manufacturer_model_name=node.model_name, software_versions=node.software_version,
        device_serial_number=node.serial_number, content_label="OSTEOSCREEN_ROI",
        content_description="osteoscreen trabecular ROI (research use)", graphic_annotations=[annotation],
        graphic_layers=[layer], institution_name=node.institution_name or None,
        voi_lut_transformations=[hd.pr.SoftcopyVOILUTTransformation(
            # lists: highdicom splits a bare string into one explanation per character ("b\\o\\n\\e")
            window_center=[centre], window_width=[width], window_explanation=["bone"])])
    gsps.SeriesDescription = "osteoscreen ROI presentation state (research use)"
    if "BodyPartExamined" in image and image.BodyPartExamined:
        # General Series: Laterality is 2C, needed only for a paired body part; with the image's (unpaired) body
        # part named, it is left out (present and empty draws a dciodvfy warning)
        gsps.BodyPartExamined = image.BodyPartExamined
    elif "Laterality" not in gsps:  # no body part: dciodvfy wants the attribute, empty when unknown
        gsps.Laterality = ""
    return gsps
