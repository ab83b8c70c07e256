"""`osteoscreen train splits`: the tabular teacher against its baselines over repeated participant splits."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from scipy.stats import t as student_t

from dicom_node.cli import main
from pipeline.training.repeated_splits import PairedSummary


def test_paired_summary_is_the_corrected_resampled_t_interval():
    diffs = [0.01, 0.02, 0.03, -0.01]
    s = PairedSummary.of(diffs, test_over_train=0.15 / 0.70)
    sd = float(np.std(diffs, ddof=1))
    half = student_t.ppf(0.975, 3) * np.sqrt((1 / 4 + 0.15 / 0.70) * sd**2)
    assert s.mean == pytest.approx(0.0125) and s.sd == pytest.approx(sd)
    assert s.ci == pytest.approx((0.0125 - half, 0.0125 + half))
    # wider than the naive interval, which ignores that the splits share participants
    assert s.ci[1] - s.ci[0] > 2 * student_t.ppf(0.975, 3) * sd / np.sqrt(4)
    assert (s.wins, s.splits) == (3, 4)
    assert "+0.0125 (corrected 95% CI" in s.text() and "higher in 3 of 4 splits" in s.text()
    with pytest.raises(ValueError, match="at least 2"):
        PairedSummary.of([0.01], 0.2)


def test_train_splits_quick_reports_every_split_and_its_summary_line(tmp_path, capsys):
    assert main(["train", "splits", "--quick", "--report", str(tmp_path)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    m = re.fullmatch(r"train splits: n=3 teacher_minus_logreg=([+-]0\.\d{4}) ci=([+-]0\.\d{4})\.\.([+-]0\.\d{4}) "
                     r"wins=[0-3] teacher_minus_ost=[+-]0\.\d{4} ci=[+-]0\.\d{4}\.\.[+-]0\.\d{4} wins=[0-3] "
                     r"student_minus_teacher=[+-]0\.\d{4} ci=[+-]\d\.\d{4}\.\.[+-]\d\.\d{4} wins=[0-2]/2", last)
    assert m, last
    assert float(m.group(2)) <= float(m.group(1)) <= float(m.group(3))
    summary = json.loads((tmp_path / "repeated_splits.json").read_text())
    assert [s["seed"] for s in summary["splits"]] == [1000, 1001, 1002]
    assert summary["kernels"]["pinned"] is True  # re-ran itself with fixed CPU kernels, as training does
    for k, s in enumerate(summary["splits"]):  # every split: the teacher families and both baselines, on real rows
        assert set(s["auc"]) == {"trees", "mlp", "mlp+linear", "logreg"} | ({"student"} if k < 2 else set())
        assert all(0.5 < a <= 1.0 for a in s["auc"].values()) and s["positives"] > 0
    teacher = [s["auc"]["mlp+linear"] - s["auc"]["logreg"] for s in summary["splits"]]
    assert summary["minus_logreg"]["mlp+linear"]["mean"] == pytest.approx(np.mean(teacher))
    text = (tmp_path / "repeated_splits.md").read_text()
    assert "RESEARCH USE ONLY" in text and "**Real data**" in text and last in text
    assert "**Semi-synthetic data**: the CT patches the student" in text  # the student learns from them
    assert text.count("| 100") == 3  # one row per split
    assert "fused student (demographics + labs path) minus mlp+linear teacher, first 2 splits" in text


def test_train_splits_refuses_a_single_split_or_student(capsys):
    assert main(["train", "splits", "--splits", "1"]) == 2
    assert main(["train", "splits", "--splits", "3", "--students", "1"]) == 2
    assert "--splits 2 or more" in capsys.readouterr().err
    assert main(["train", "splits", "--check"]) == 2
    assert "--check and --out do not apply" in capsys.readouterr().err


def test_train_splits_follows_the_shipped_teacher_family():
    import json

    from engines.bundle import bundled_models_dir
    from pipeline.training.repeated_splits import SplitsConfig

    card = json.loads((bundled_models_dir() / "fused_kdamm_v1" / "card.json").read_text())
    assert SplitsConfig().teacher == card["metrics"]["teachers"]["tabular"]["choice"] == "mlp+linear"


def test_shipped_report_renders_from_its_json():
    """docs/training/repeated_splits.md is exactly what the report writer makes of repeated_splits.json."""
    from pathlib import Path

    from pipeline.training.repeated_splits import report_markdown

    docs = Path(__file__).resolve().parents[1] / "docs" / "training"
    summary = json.loads((docs / "repeated_splits.json").read_text())
    assert report_markdown(summary) == (docs / "repeated_splits.md").read_text()
