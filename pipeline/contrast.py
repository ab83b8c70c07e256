"""Contrast phase: from the header (ContrastBolusAgent) and from the aorta's enhancement at L1.

Iodinated contrast raises trabecular attenuation (by roughly 10-20 HU in the
portal venous phase), so a contrast study's L1 HU is not comparable with the
unenhanced thresholds. The result is recorded with every screening, and the
configuration decides whether contrast studies are screened (and flagged) or
skipped.

The image check looks for the abdominal aorta where it lies at L1: a round,
bright lumen anterior (and usually left) of the vertebral body. Unenhanced
blood is 30-60 HU; arterial phase is typically above 250 HU and portal venous
130-250 HU. A calcified wall is a ring and a plaque is small: neither holds
a disc 10 mm wide, which the lumen test asks for.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from pydicom.dataset import Dataset
from scipy import ndimage as ndi

from pipeline.bone import BoneMeasurement
from pipeline.volume import Volume

ENHANCED_HU = 130.0  # blood above this is enhanced
ARTERIAL_HU = 250.0
AORTA_RADIUS_MM = (5.0, 25.0)  # inscribed radius of the enhanced lumen


@dataclass(frozen=True)
class ContrastAssessment:
    contrast: bool | None  # None: cannot tell (no header agent, aorta not assessable)
    phase: str  # "arterial" | "portal venous" | "contrast, phase unknown" | "no enhancement detected" | "unknown"
    source: str  # how it was decided, for the report
    aorta_hu: float | None = None
    header_agent: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def text(self) -> str:
        return f"{self.phase} ({self.source})"


def _header_agent(header: Dataset | None) -> str | None:
    agent = str(header.get("ContrastBolusAgent", "") or "").strip() if header is not None else ""
    if agent.upper() in ("", "NONE", "NO", "N", "0"):
        return None
    return agent


def _aorta_hu(volume: Volume, measurement: BoneMeasurement) -> float | None:
    """Median HU at the centre of the widest bright disc anterior to the vertebral body, or None.

    The widest inscribed disc (distance transform maximum) finds a vessel lumen even when it
    touches the vertebral cortex or a branch in the thresholded mask; a calcified ring or plaque
    is thin and never holds a wide disc.
    """
    slice_index, roi_centre_rc = measurement.slice_index, measurement.roi_centre_rc
    roi_top_row = float(measurement.roi_polygon_rc[:, 0].min())  # the ROI's anterior edge
    _, dy, dx = volume.spacing
    r0 = int(max(0, roi_top_row - 75.0 / dy))
    r1 = int(max(0, roi_top_row - 5.0 / dy))
    c0 = int(max(0, roi_centre_rc[1] - 45.0 / dx))
    c1 = int(min(volume.shape[2], roi_centre_rc[1] + 50.0 / dx))
    if r1 - r0 < 3 or c1 - c0 < 3:
        return None
    lo, hi = max(0, slice_index - 1), min(volume.shape[0], slice_index + 2)
    window = volume.hu[lo:hi, r0:r1, c0:c1].astype(np.float32).mean(axis=0)  # 3-slice mean: less noise
    window = ndi.median_filter(window, size=3)
    bright = (window >= ENHANCED_HU) & (window <= 700.0)
    if not bright.any():
        return None
    depth = ndi.distance_transform_edt(bright, sampling=(dy, dx))
    radius = float(depth.max())
    if not AORTA_RADIUS_MM[0] <= radius <= AORTA_RADIUS_MM[1]:
        return None
    r, c = np.unravel_index(int(np.argmax(depth)), depth.shape)
    rr, cc = np.mgrid[: window.shape[0], : window.shape[1]]
    core = ((rr - r) * dy) ** 2 + ((cc - c) * dx) ** 2 <= (0.7 * radius) ** 2
    return float(np.median(window[core]))


def assess_contrast(header: Dataset | None, volume: Volume | None = None,
                    measurement: BoneMeasurement | None = None) -> ContrastAssessment:
    """Header first (an agent named there is contrast), then the aorta beside the measured L1 slice."""
    agent = _header_agent(header)
    aorta = _aorta_hu(volume, measurement) if volume is not None and measurement is not None else None
    if aorta is not None:
        phase = "arterial" if aorta >= ARTERIAL_HU else "portal venous"
        src = f"aorta {aorta:.0f} HU at L1" + (f"; header agent '{agent}'" if agent else "")
        return ContrastAssessment(True, phase, src, aorta, agent)
    if agent:
        return ContrastAssessment(True, "contrast, phase unknown", f"header agent '{agent}'", None, agent)
    if volume is None or measurement is None:
        return ContrastAssessment(None, "unknown", "no header agent; aorta not assessed (no L1 measurement)")
    return ContrastAssessment(False, "no enhancement detected",
                              f"no header agent; no enhanced aorta (>= {ENHANCED_HU:.0f} HU) anterior to L1")
