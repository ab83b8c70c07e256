"""The image input of the fused model: a 2.5D patch centred on the L1 body.

Three axial slices (centre and +-3 mm), each 32 x 32 pixels of 3 mm (96 mm field),
centred on the vertebral body, HU scaled by (HU - 100) / 200 and clipped to [-3, 5].
Training (semi-synthetic) and service (real CT) both go through ``extract_patch``,
so the preprocessing cannot drift apart.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

PATCH_PX = 32
PATCH_MM = 3.0
SLICE_OFFSETS_MM = (-3.0, 0.0, 3.0)


def normalise_hu(hu: np.ndarray) -> np.ndarray:
    return np.clip((hu.astype(np.float32) - 100.0) / 200.0, -3.0, 5.0)


def sample_planes(hu: np.ndarray, spacing: tuple[float, float, float], centre_zrc: tuple[float, float, float], *,
                  px: int, mm: float, rotation_deg: float = 0.0, offsets_mm=SLICE_OFFSETS_MM,
                  cval: float | None = None) -> np.ndarray:
    """(len(offsets), px, px) float32 HU planes of ``px`` pixels of ``mm`` around ``centre_zrc`` (voxel coordinates).

    Grid pixel (i, j) lies at centre + R(rotation) ((i - (px-1)/2) mm, (j - (px-1)/2) mm) in the slice plane;
    outside the volume: the nearest voxel, or ``cval`` where given.
    """
    dz, dr, dc = spacing
    half = (px - 1) / 2.0
    g = (np.arange(px) - half) * mm
    rr, cc = np.meshgrid(g, g, indexing="ij")
    th = np.deg2rad(rotation_deg)
    r_mm = np.cos(th) * rr - np.sin(th) * cc
    c_mm = np.sin(th) * rr + np.cos(th) * cc
    out = np.empty((len(offsets_mm), px, px), dtype=np.float32)
    mode, fill = ("nearest", 0.0) if cval is None else ("constant", float(cval))
    for i, off in enumerate(offsets_mm):
        z = np.full(rr.shape, centre_zrc[0] + off / dz)
        coords = np.stack([z, centre_zrc[1] + r_mm / dr, centre_zrc[2] + c_mm / dc])
        # interpolate the int16 volume directly: a float copy of it would cost 4 bytes per voxel per offset
        out[i] = ndi.map_coordinates(hu, coords, order=1, mode=mode, cval=fill, output=np.float32)
    return out


def extract_patch(hu: np.ndarray, spacing: tuple[float, float, float], centre_zrc: tuple[float, float, float],
                  *, rotation_deg: float = 0.0, offsets_mm=SLICE_OFFSETS_MM) -> np.ndarray:
    """(3, 32, 32) float32 patch from volume ``hu[z, row, col]`` around ``centre_zrc`` (voxel coordinates)."""
    return normalise_hu(sample_planes(hu, spacing, centre_zrc, px=PATCH_PX, mm=PATCH_MM, rotation_deg=rotation_deg,
                                      offsets_mm=offsets_mm))
