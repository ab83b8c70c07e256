"""The attention map of the model that made a result, on the source slice: overlay and outlined region.

Only a model that computes an attention map for its own result provides one (the full-slice
student, bundle cropkd_v1); the Secondary Capture shows it and the SR outlines it. A map is never
borrowed from a model that did not make the result.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.full_slice import SliceGrid

REGION_MASS = 0.5  # the SR outlines the smallest set of pixels holding this share of the attention


@dataclass(frozen=True)
class ModelAttention:
    grid_map: np.ndarray  # (h, w) on the model's input grid, sums to 1
    grid: SliceGrid
    method: str  # e.g. "Grad-CAM (magnitude)"

    def on_slice(self, shape: tuple[int, int]) -> np.ndarray:
        """The map on the source slice's pixels, normalised to sum 1 over the slice."""
        m = self.grid.map_on_slice(self.grid_map, shape)
        total = float(m.sum())
        return m / total if total > 0 else m


@dataclass(frozen=True)
class AttentionRegion:
    polygon_rc: np.ndarray  # closed polygon (first point repeated), source slice pixel coordinates
    area_mm2: float
    mass: float  # share of the attention inside the polygon
    centroid_rc: tuple[float, float]  # attention-weighted centre of the whole map


@dataclass(frozen=True)
class ReportedAttention:
    """What the SR and the key image show of a model's attention on the measured slice."""
    region: AttentionRegion
    source_polygon_rc: np.ndarray  # the region's outline in the source image's pixel grid
    method: str
    roi_distance_mm: float | None  # attention centre to the measured ROI centre
    on_slice: np.ndarray  # the map on the slice (volume orientation), for the overlay


def report_attention(attention: ModelAttention, slice_shape: tuple[int, int], pixel_mm: tuple[float, float],
                     to_source_rc, roi_centre_rc: tuple[float, float] | None) -> ReportedAttention | None:
    on_slice = attention.on_slice(slice_shape)
    region = attention_region(on_slice, pixel_mm)
    if region is None:
        return None
    dist = None
    if roi_centre_rc is not None:
        dist = float(np.hypot((region.centroid_rc[0] - roi_centre_rc[0]) * pixel_mm[0],
                              (region.centroid_rc[1] - roi_centre_rc[1]) * pixel_mm[1]))
    return ReportedAttention(region, np.asarray(to_source_rc(region.polygon_rc)), attention.method, dist, on_slice)


def attention_region(on_slice: np.ndarray, pixel_mm: tuple[float, float],
                     mass: float = REGION_MASS) -> AttentionRegion | None:
    """Convex outline of the highest-attention pixels that together hold ``mass`` of the map."""
    from scipy.spatial import ConvexHull, QhullError

    total = float(on_slice.sum())
    if total <= 0:
        return None
    flat = np.sort(on_slice.ravel())[::-1]
    cutoff = flat[min(int(np.searchsorted(np.cumsum(flat), mass * total)), flat.size - 1)]
    pts = np.argwhere(on_slice >= cutoff).astype(float)
    corners = (pts[:, None, :] + np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]])).reshape(-1, 2)
    try:
        hull = ConvexHull(corners)
    except QhullError:
        return None
    poly = corners[hull.vertices]
    poly = np.vstack([poly, poly[:1]])
    rr, cc = np.indices(on_slice.shape)
    inside = _inside_polygon(rr.ravel(), cc.ravel(), poly).reshape(on_slice.shape)
    centroid = (float((rr * on_slice).sum() / total), float((cc * on_slice).sum() / total))
    return AttentionRegion(poly, float(hull.volume * pixel_mm[0] * pixel_mm[1]),
                           float(on_slice[inside].sum() / total), centroid)


def _inside_polygon(r: np.ndarray, c: np.ndarray, poly: np.ndarray) -> np.ndarray:
    from matplotlib.path import Path

    return Path(poly).contains_points(np.column_stack([r, c]))
