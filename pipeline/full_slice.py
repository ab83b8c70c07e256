"""The crop-free image input: the selected axial slice and its +-3 mm neighbours, whole, on a fixed grid.

96 x 96 pixels of 4 mm (a 384 mm field) centred on the image's field of view. No crop and no
segmentation: the full-slice student (bundle cropkd_v1) has to find the vertebral body itself.
Each plane is smoothed in-plane before sampling so that a 0.7 mm reconstruction does not alias
on the 4 mm grid; outside the field of view is air. Training (semi-synthetic slices) and service
(real CT) both go through ``full_slice_input``, so the preprocessing cannot drift apart.

``SliceGrid`` records where the grid lies on the source slice, so that an attention map the
model computes on its grid can be drawn on, and outlined in, the source image.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from pipeline.image_input import SLICE_OFFSETS_MM, normalise_hu, sample_planes

FULL_PX = 96
FULL_MM = 4.0
AIR_HU = -1024.0


@dataclass(frozen=True)
class SliceGrid:
    """Grid pixel (i, j) of the model input -> source slice pixel (row, col).

    (row, col) = centre_rc + R(rotation) ((i - c) * step_mm, (j - c) * step_mm) / (dr, dc), c = (FULL_PX - 1) / 2.
    """
    centre_rc: tuple[float, float]
    step_mm: float
    pixel_mm: tuple[float, float]  # (dr, dc) of the source slice
    rotation_deg: float = 0.0

    def to_slice_rc(self, ij: np.ndarray) -> np.ndarray:
        ij = np.asarray(ij, dtype=float)
        c = (FULL_PX - 1) / 2.0
        u, v = (ij[..., 0] - c) * self.step_mm, (ij[..., 1] - c) * self.step_mm
        th = np.deg2rad(self.rotation_deg)
        r_mm, c_mm = np.cos(th) * u - np.sin(th) * v, np.sin(th) * u + np.cos(th) * v
        return np.stack([self.centre_rc[0] + r_mm / self.pixel_mm[0], self.centre_rc[1] + c_mm / self.pixel_mm[1]],
                        axis=-1)

    def to_grid_ij(self, rc: np.ndarray) -> np.ndarray:
        rc = np.asarray(rc, dtype=float)
        r_mm = (rc[..., 0] - self.centre_rc[0]) * self.pixel_mm[0]
        c_mm = (rc[..., 1] - self.centre_rc[1]) * self.pixel_mm[1]
        th = np.deg2rad(self.rotation_deg)
        u, v = np.cos(th) * r_mm + np.sin(th) * c_mm, -np.sin(th) * r_mm + np.cos(th) * c_mm
        c = (FULL_PX - 1) / 2.0
        return np.stack([c + u / self.step_mm, c + v / self.step_mm], axis=-1)

    def sample_mask(self, mask: np.ndarray) -> np.ndarray:
        """A boolean mask on the source slice, on the input grid (nearest neighbour)."""
        ii, jj = np.meshgrid(np.arange(FULL_PX), np.arange(FULL_PX), indexing="ij")
        rc = self.to_slice_rc(np.stack([ii, jj], axis=-1))
        return ndi.map_coordinates(mask.astype(np.float32), [rc[..., 0], rc[..., 1]], order=0, mode="constant",
                                   cval=0.0) > 0.5

    def map_on_slice(self, attention: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """An (h, w) map over the input grid (cells of FULL_PX/h pixels) resampled to the slice's pixels, 0 outside."""
        h, w = attention.shape
        rr, cc = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
        ij = self.to_grid_ij(np.stack([rr, cc], axis=-1))
        cell = np.stack([(ij[..., 0] + 0.5) * h / FULL_PX - 0.5, (ij[..., 1] + 0.5) * w / FULL_PX - 0.5])
        return ndi.map_coordinates(attention.astype(np.float32), cell, order=1, mode="constant", cval=0.0)


def full_slice_input(hu: np.ndarray, spacing: tuple[float, float, float], z_index: float, *,
                     centre_rc: tuple[float, float] | None = None, rotation_deg: float = 0.0,
                     zoom: float = 1.0) -> tuple[np.ndarray, SliceGrid]:
    """(3, 96, 96) float32 input (HU normalised as for the L1 patch) and where it lies on slice ``z_index``.

    ``centre_rc`` defaults to the centre of the field of view; ``rotation_deg`` and ``zoom`` (> 1: the patient
    looks bigger) are training's pose variation and stay at their defaults in service.
    """
    dz, dr, dc = spacing
    reach = max(abs(o) for o in SLICE_OFFSETS_MM) / dz
    z0 = max(0, int(np.floor(z_index - reach)) - 1)
    z1 = min(hu.shape[0], int(np.ceil(z_index + reach)) + 2)
    slab = hu[z0:z1].astype(np.float32)  # a few slices only: the volume stays int16
    step = FULL_MM / zoom
    sigma = (0.4 * step / dr, 0.4 * step / dc)  # anti-aliasing for the coarser grid
    if max(sigma) > 0.35:
        slab = ndi.gaussian_filter(slab, sigma=(0.0, *sigma), mode="nearest")
    if centre_rc is None:
        centre_rc = ((hu.shape[1] - 1) / 2.0, (hu.shape[2] - 1) / 2.0)
    planes = sample_planes(slab, spacing, (z_index - z0, *centre_rc), px=FULL_PX, mm=step,
                           rotation_deg=rotation_deg, cval=AIR_HU)
    return normalise_hu(planes), SliceGrid((float(centre_rc[0]), float(centre_rc[1])), step, (dr, dc),
                                           rotation_deg)
