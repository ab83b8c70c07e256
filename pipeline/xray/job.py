"""One EXPERIMENTAL chest radiograph job: radiograph + demographics + labs -> SR + SC back to the PACS.

Called by pipeline.job.run_screening for requests with ``pipeline == "xray"``. Outputs go to
the same outbox, with the same result record, as the CT path's; every output says EXPERIMENTAL,
and results of this path are kept off the follow-up messages and the clinical worklist.
"""
from __future__ import annotations

import dataclasses
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.sr.codedict import codes

from engines.bundle import load_bundle
from pipeline.demographics import demographics_from_header
from pipeline.durable import write_durably
from pipeline.features import DEMOGRAPHIC_IDX, FEATURES, LAB_IDX
from pipeline.fused import FusedOutput, tabular_input
from pipeline.report.notice import SHORT_DISCLAIMER
from pipeline.report.render import render_key_image
from pipeline.report.sc import build_sc
from pipeline.report.sr import build_sr
from pipeline.timing import StageClock, peak_rss_mb
from pipeline.xray.image import (GRID, RadiographError, is_screenable_view, load_radiograph, model_inputs,
                                 square_image)
from pipeline.xray.model import XrayModel, XrayOutput

EXPERIMENTAL_NOTE = ("EXPERIMENTAL: chest radiograph path. Its image model was trained only on semi-synthetic "
                     "radiographs derived from one real image; no accuracy is claimed for it. Research and pipeline "
                     "validation only.")


@lru_cache(maxsize=4)
def xray_model(bundle: str, backend: str) -> XrayModel:
    """One XrayModel (ONNX session) per bundle and backend per worker process."""
    return XrayModel(load_bundle(bundle), backend)


def region_overlay(display_shape: tuple[int, int], attention: np.ndarray) -> np.ndarray:
    """The model's region attention on the radiograph's pixels: the share above an even split, per region.

    Regions are cells of the padded square the model saw (pipeline.xray.image.square_image)."""
    h, w = display_shape
    n = max(h, w)
    excess = np.clip(attention - 1.0 / attention.size, 0.0, None)
    rr = (np.arange(h) + (n - h) // 2) * GRID // n
    cc = (np.arange(w) + (n - w) // 2) * GRID // n
    return excess[np.clip(rr, 0, GRID - 1)][:, np.clip(cc, 0, GRID - 1)].astype(np.float32)


def _as_fused_output(x: XrayOutput, tab: FusedOutput | None, modalities: tuple[str, ...],
                     model: tuple[str, str]) -> FusedOutput:
    """The SR/SC carry the fused result like the CT path's; the tabular SHAP values are scaled by (1 - w), their
    share of the fused probability, so base + contributions + w * p_image = the probability shown."""
    expl = None
    if tab is not None and tab.explanation is not None:
        share = 1.0 - x.weight_image
        e = tab.explanation
        expl = dataclasses.replace(e, base_value=e.base_value * share, output=e.output * share,
                                   contributions=tuple(float(v) * share for v in e.contributions))
    return FusedOutput(x.probability, float("nan"), x.category_id, x.category_label, x.category_code, x.threshold,
                       "xray_fused" if tab is not None else "xray_image_only", modalities, expl, model=model,
                       input_notes=tab.input_notes if tab is not None else ())


def run_xray_screening(req):
    from pipeline.job import (SC_SOP_CLASS, SR_SOP_CLASS, OutputObject, ScreeningResult,
                              _not_screened, _uid, _write_result, fused_model, result_fields, result_key)
    from pipeline.report.source import report_source

    started_at = time.time()
    clock = StageClock()
    out = Path(req.output_dir)
    headers = [(p, pydicom.dcmread(p, stop_before_pixels=True)) for p in req.instance_paths]
    # the first chest PA/AP image of the series (a lateral or another view beside it is left out)
    path, header = next(((p, h) for p, h in headers if is_screenable_view(h, req.xray_body_parts, req.xray_views)),
                        (None, headers[0][1]))
    if path is None:
        reason = (f"no For Presentation chest {'/'.join(req.xray_views)} image in the series (body part "
                  f"{'/'.join(req.xray_body_parts)}, view position {'/'.join(req.xray_views)} on one image)")
        return _not_screened(req, out, header, reason, {"reason": reason, "path": "xray", "experimental": True},
                             procedure=codes.LN.XRUnspecifiedBodyRegion, title_note=EXPERIMENTAL_NOTE)
    try:
        with clock.stage("load_decode"):
            rad = load_radiograph(path)
            work = square_image(rad.display)
            feeds = model_inputs(work)
    except RadiographError as exc:
        return _not_screened(req, out, header, exc.reason, {"reason": exc.reason, "path": "xray",
                                                             "experimental": True},
                             procedure=codes.LN.XRUnspecifiedBodyRegion, title_note=EXPERIMENTAL_NOTE)
    demo = demographics_from_header(header)
    tab = tabular_input(req.labs, demo)
    mask = ~np.isnan(tab.values)
    has_labs, has_demo = bool(mask[list(LAB_IDX)].any()), bool(mask[list(DEMOGRAPHIC_IDX)].any())
    tabular_bundle = load_bundle(req.model)  # the fused model, for its demographics + labs path
    with clock.stage("model"):
        tab_out = None
        if has_labs or has_demo:
            tab_out = fused_model(tabular_bundle, req.backend).predict(None, tab, clock=clock)
        xm = xray_model(req.xray_model, req.backend)
        x = xm.predict(feeds, tab_out.probability if tab_out is not None else None)
    modalities = ("radiograph",) + tuple(m for m, ok in (("demographics", has_demo), ("labs", has_labs)) if ok)
    fused = _as_fused_output(x, tab_out, modalities, xm.name)

    versions = f"{xm.name[1]}/{tabular_bundle.card.version}/xray"
    sr_series, sc_series = _uid(req.series_uid, "sr-series", versions), _uid(req.series_uid, "sc-series", versions)
    if req.predecessor_sr:
        versions += f"/after:{req.predecessor_sr[2]}"
    sr_uid, sc_uid = _uid(req.series_uid, "sr", versions), _uid(req.series_uid, "sc", versions)
    src = report_source(header)
    fusion_text = (f"Fusion: probability {x.probability:.3f} = {x.weight_image:.2f} x image {x.image_probability:.3f}"
                   + (f" + {1 - x.weight_image:.2f} x tabular {x.tabular_probability:.3f} (demographics + labs path "
                      "of the fused screening model; its SHAP values below are scaled by its share)"
                      if x.tabular_probability is not None else " (no demographics or labs: image alone)") + ".")
    with clock.stage("report"):
        sr = build_sr(source_header=src, source_sop_instance_uid=str(header.SOPInstanceUID), demographics=demo,
                      labs=req.labs, node=req.node, series_uid=sr_series, sop_uid=sr_uid, fused=fused,
                      fused_model=xm.name, quality_notes=[fusion_text, *rad.notes], predecessor=req.predecessor_sr,
                      procedure=codes.LN.XRUnspecifiedBodyRegion, title_note=EXPERIMENTAL_NOTE,
                      instance_number=req.report_version)
        write_durably(out / "sr.dcm", lambda fh: sr.save_as(fh, enforce_file_format=True))
        outputs = [OutputObject("sr", str(out / "sr.dcm"), SR_SOP_CLASS, sr_uid)]
        labels = {f.name: f.short_label for f in FEATURES}
        expl = fused.explanation
        top = sorted(zip(expl.features, expl.contributions), key=lambda t: -abs(t[1]))[:6] if expl else []
        lines = [
            "EXPERIMENTAL - semi-synthetic training, no accuracy claim",
            f"Screening: {fused.category_label}",
            f"Probability {x.probability:.3g} (operating point {x.threshold:.3g}); modalities: {', '.join(modalities)}",
            f"Image {x.image_probability:.2f}" + (f", tabular {x.tabular_probability:.2f}, image weight "
                                                   f"{x.weight_image:.2f}" if x.tabular_probability is not None
                                                   else " (image alone)"),
            "Labs: " + ("; ".join(f"{v.name} {v.value:.3g} {v.unit}" for v in req.labs.values)
                        if req.labs.values else "none found"),
            "Model: " + " ".join(xm.name),
            "Overlay: regions the image model weighted above an even share; not a finding",
        ]
        if req.predecessor_sr:  # the earlier key image stays in the PACS, in the same series
            lines.append(f"Version {req.report_version}: replaces an earlier osteoscreen result for this study")
        rgb = render_key_image(rad.display, rad.pixel_mm or (1.0, 1.0), None,
                               title="osteoscreen - chest radiograph (EXPERIMENTAL)", lines=lines,
                               footer="EXPERIMENTAL. " + SHORT_DISCLAIMER,
                               bars=[(labels[n], v) for n, v in top],
                               bars_title="Top factors (SHAP, probability units)",
                               overlay=region_overlay(rad.display.shape, x.region_attention), window=(0.5, 1.0))
        sc = build_sc(source_header=src, source_sop_instance_uid=str(header.SOPInstanceUID), rgb=rgb, node=req.node,
                      series_uid=sc_series, sop_uid=sc_uid,
                      description="osteoscreen chest radiograph key image (EXPERIMENTAL)",
                      derivation="Chest radiograph, the image model's region attention and the screening summary "
                                 "(EXPERIMENTAL)", patient_orientation=rad.orientation,
                      instance_number=req.report_version)
        write_durably(out / "sc.dcm", lambda fh: sc.save_as(fh, enforce_file_format=True))
        write_durably(out / "sc.png", lambda fh: Image.fromarray(rgb).save(fh, format="PNG"))
        outputs.append(OutputObject("sc", str(out / "sc.dcm"), SC_SOP_CLASS, sc_uid))

    summary = {
        "path": "xray",
        "experimental": True,
        **result_fields(req, header, fused, xm.name, xm.engine.backend, sr_series, sr_uid),
        "image_probability": round(x.image_probability, 4),
        "tabular_probability": None if x.tabular_probability is None else round(x.tabular_probability, 4),
        "weight_image": x.weight_image,
        "image_notes": list(rad.notes),
        "images_in_series": len(req.instance_paths),
        "source_sop_instance_uid": str(header.SOPInstanceUID),
    }
    summary["result_key"] = result_key(summary)
    summary["performance"] = {"started_at": round(started_at, 3), "stage_s": clock.as_dict(),
                              "worker_peak_rss_mb": peak_rss_mb()}
    return _write_result(out, ScreeningResult("screened", None, req.series_uid, summary, tuple(outputs)))
