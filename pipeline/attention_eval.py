"""``osteoscreen eval attention CASES_DIR``: where a full-slice student looks, on real labelled CT.

For every case (the ``eval imaging`` format) with L1 in view: the slice the service would measure
(localiser + mid-body ROI), the student's attention on it, and the share of that attention inside
the L1 vertebral body from the labels (the anterior half of the label's antero-posterior extent,
as the reference HU defines it). A uniform map would put ``uniform`` inside. Cases the training
anatomy came from are in-sample for the attention: say so when quoting them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

import engines
from pipeline.bone import MeasurementError, measure_mid_body
from pipeline.full_slice import full_slice_input
from pipeline.selection import SelectionError, select_level_slices
from pipeline.training.cropkd import inside_body
from pipeline.validation import L1, eval_cases, vertebral_body


def run_attention_eval(cases_dir: str | Path, bundle: str = "cropkd_v1", with_variants: bool = False,
                       out=print) -> list[tuple[str, float, float]]:
    student = engines.load(engines.load_bundle(bundle).path, "onnxruntime-cpu", graph="image_student")
    rows: list[tuple[str, float, float]] = []
    out(f"{'case':32} {'slice':>5} {'inside_body':>11} {'uniform':>8}  note")
    for name, vol, labels, _ in eval_cases(cases_dir, with_variants, out):
        if not (labels == L1).any():
            out(f"{name:32} {'-':>5} {'-':>11} {'-':>8}  L1 not in view: skipped")
            continue
        try:
            sel, loc = select_level_slices(vol, "L1")
            k = measure_mid_body(vol, loc, sel.z_range).slice_index
        except (SelectionError, MeasurementError) as exc:
            out(f"{name:32} {'-':>5} {'-':>11} {'-':>8}  no slice measured: {exc.reason}")
            continue
        body = vertebral_body(labels[k] == L1)
        if not body.any():
            out(f"{name:32} {k:5d} {'-':>11} {'-':>8}  the measured slice is not in L1 by the labels: skipped")
            continue
        image, grid = full_slice_input(vol.hu, vol.spacing, float(k))
        mask = grid.sample_mask(body)
        att = student(image=image[None])["attention"]
        share, uniform = float(inside_body(att, mask[None])[0]), float(mask.mean())
        rows.append((name, share, uniform))
        out(f"{name:32} {k:5d} {share:11.3f} {uniform:8.4f}")
    inside = np.mean([r[1] for r in rows]) if rows else float("nan")
    uni = np.mean([r[2] for r in rows]) if rows else float("nan")
    out(f"attention eval: cases={len(rows)} inside_body={inside:.3f} uniform={uni:.4f}")
    return rows
