"""Contrast phase and HU calibration checks, on the real sample CT and controlled changes of it."""
from __future__ import annotations

import dataclasses

import numpy as np
import pydicom
import pytest

from hl7.panel import LabPanel
from pipeline.bone import measure_mid_body
from pipeline.calibration import check_calibration
from pipeline.contrast import assess_contrast
from pipeline.job import JobRequest, run_screening
from pipeline.report.sr import NodeIdentity
from pipeline.selection import select_level_slices
from pipeline.volume import load_volume

NODE = NodeIdentity("osteoscreen project", "osteoscreen", "0.1.0", "0001", "1.2.826.0.1.3680043.8.498.77")


@pytest.fixture(scope="module")
def measured(sample_series):
    vol = load_volume(sample_series.files)
    sel, loc = select_level_slices(vol, "L1")
    return vol, measure_mid_body(vol, loc, sel.z_range)


def _contrast(vol, m, header=None):
    return assess_contrast(header, vol, m)


def _with_vessel(vol, m, hu: float, ring_mm: float | None = None):
    """Paint a 22 mm vessel 25 mm anterior, 12 mm left of the L1 ROI (solid, or a wall of ``ring_mm``)."""
    out = vol.hu.copy()
    _, dy, dx = vol.spacing
    top = float(m.roi_polygon_rc[:, 0].min())
    rr, cc = np.mgrid[: out.shape[1], : out.shape[2]]
    dist = np.hypot((rr - (top - 25.0 / dy)) * dy, (cc - (m.roi_centre_rc[1] + 12.0 / dx)) * dx)
    disc = dist <= 11.0 if ring_mm is None else (dist <= 11.0) & (dist > 11.0 - ring_mm)
    rng = np.random.default_rng(0)
    for k in range(m.slice_index - 2, m.slice_index + 3):
        out[k][disc] = np.round(hu + rng.normal(0, 15, int(disc.sum())))
    return dataclasses.replace(vol, hu=out)


def test_unenhanced_sample_shows_no_contrast(measured):
    vol, m = measured
    c = _contrast(vol, m, vol.header)
    assert c.contrast is False and c.phase == "no enhancement detected" and c.aorta_hu is None


@pytest.mark.parametrize("hu,phase", [(330.0, "arterial"), (180.0, "portal venous")])
def test_enhanced_aorta_gives_the_phase(measured, hu, phase):
    vol, m = measured
    c = _contrast(_with_vessel(vol, m, hu), m)
    assert c.contrast is True and c.phase == phase
    assert abs(c.aorta_hu - hu) < 25


def test_calcified_aortic_wall_is_not_contrast(measured):
    vol, m = measured
    c = _contrast(_with_vessel(vol, m, 600.0, ring_mm=3.0), m)
    assert c.contrast is False


def test_header_agent_is_contrast_even_without_image(measured):
    vol, m = measured
    header = vol.header.copy()
    header.ContrastBolusAgent = "Iohexol 350"
    c = assess_contrast(header)
    assert c.contrast is True and c.phase == "contrast, phase unknown" and "Iohexol" in c.source
    header.ContrastBolusAgent = "NONE"
    assert assess_contrast(header).contrast is None


def test_calibration_plausible_on_the_real_ct(measured):
    vol, m = measured
    cal = check_calibration(vol, m.slice_index)
    assert cal.plausible is True and cal.flag is None
    assert -1010 < cal.air_hu < -970 and -120 < cal.fat_hu < -80


@pytest.mark.parametrize("offset", [80, -70])
def test_offset_scanner_is_flagged(measured, offset):
    vol, m = measured
    shifted = dataclasses.replace(vol, hu=np.clip(vol.hu.astype(np.int32) + offset, -3024, 3071).astype(np.int16))
    cal = check_calibration(shifted, m.slice_index)
    assert cal.plausible is False and "air" in cal.flag


def _series_with_agent(sample_series, tmp_path, agent: str):
    files = []
    for p in sample_series.files:
        ds = pydicom.dcmread(p)
        ds.ContrastBolusAgent = agent
        out = tmp_path / p.name
        ds.save_as(out)
        files.append(str(out))
    return tuple(files)


@pytest.mark.parametrize("policy", ["flag", "skip"])
def test_contrast_policy(sample_series, tmp_path, policy):
    files = _series_with_agent(sample_series, tmp_path, "Iopamidol")
    req = JobRequest(1, sample_series.series_uid, files, LabPanel("OS-DEMO-0001", None, None, 90),
                     str(tmp_path / "out"), "fused_kdamm_v1", NODE, contrast_policy=policy)
    (tmp_path / "out").mkdir()
    result = run_screening(req)
    if policy == "skip":
        assert result.status == "not_screened" and "contrast" in result.reason and not result.outputs
        return
    assert result.status == "screened" and result.summary["contrast"]["contrast"] is True
    sr = pydicom.dcmread(tmp_path / "out" / "sr.dcm")
    texts = " ".join(str(i.get("TextValue", "")) for i in sr.ContentSequence)
    assert "Contrast: contrast, phase unknown (header agent 'Iopamidol')" in texts
    assert "HU calibration check: air" in texts
