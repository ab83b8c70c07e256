"""Semi-synthetic full axial slices through L1, and the matching tight crops of the vertebral body.

SEMI-SYNTHETIC, like pipeline.training.synth_ct and with its attenuation model: real CT anatomy
(the shipped example_ct and its L1 label), trabecular and cortical attenuation rescaled to each
subject's target HU (from their real L1 DXA BMD), kernel blur, slice thickness and noise as there.
Added here, because the student sees the whole slice and must find the vertebra itself:

- pose: the field of view re-centred +-30 mm, rotated +-10 deg, zoomed 0.85-1.15 (body habitus);
- the full slice through ``pipeline.full_slice.full_slice_input`` (the service's preprocessing);
- a tight crop of the vertebral body for the crop teacher: 32 x 32 pixels of 1.5 mm (48 mm)
  centred on the body (the segmentation is known here, in training only), in the same pose, so
  that a crop pixel maps to the full-slice grid by a scale and a shift;
- the vertebral body mask on the full-slice grid (the L1 label in the anterior half of its
  antero-posterior extent), to measure where the student's attention goes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage as ndi

from pipeline.full_slice import FULL_PX, full_slice_input
from pipeline.image_input import normalise_hu, sample_planes
from pipeline.training.synth_ct import L1_LABEL, SyntheticL1
from pipeline.validation import vertebral_body

CROP_PX = 32
CROP_MM = 1.5


@dataclass(frozen=True)
class PoseParams:
    shift_mm: float = 30.0
    rotation_deg: float = 10.0
    zoom: tuple[float, float] = (0.85, 1.15)
    crop_jitter_mm: float = 2.0


@dataclass
class SliceSample:
    full: np.ndarray  # (3, 96, 96) float32, the student's input
    crop: np.ndarray  # (3, 32, 32) float32, the teacher's input
    body: np.ndarray  # (96, 96) bool, vertebral body on the full-slice grid
    crop_centre_ij: np.ndarray  # (2,) the crop's centre in full-slice grid pixels


class SyntheticSlices(SyntheticL1):
    def __init__(self, pose: PoseParams = PoseParams()) -> None:
        super().__init__()
        from dicom_node.sample import load_lps_volume, sample_data_dir

        labels, _, _ = load_lps_volume(sample_data_dir() / "totalseg_v2_labels.nii.gz")
        l1 = labels == L1_LABEL
        body = np.stack([vertebral_body(m) for m in l1])
        self.body = body
        self.pose = pose
        # Slices where the body is whole: the label's central third also holds endplate slices where its
        # anterior half is pedicle and arch, which would make the body mask (and the crop) wrong there.
        area = body.sum(axis=(1, 2))
        whole = np.nonzero(area >= 0.75 * area.max())[0]
        self.z_range = (max(self.z_range[0], whole.min() - 0.5), min(self.z_range[1], whole.max() + 0.5))

    def sample(self, target_hu: float, rng: np.random.Generator) -> SliceSample:
        q = self.pose
        z, k0, vol = self.slab(target_hu, rng, margin=3)  # wider: the slice's anti-aliasing reads one more
        dz, dr, dc = self.spacing
        rot = float(rng.uniform(-q.rotation_deg, q.rotation_deg))
        zoom = float(rng.uniform(*q.zoom))
        shift = rng.uniform(-q.shift_mm, q.shift_mm, 2)
        centre = ((self.hu.shape[1] - 1) / 2.0 + shift[0] / dr, (self.hu.shape[2] - 1) / 2.0 + shift[1] / dc)
        full, grid = full_slice_input(vol, self.spacing, z - k0, centre_rc=centre, rotation_deg=rot, zoom=zoom)
        jitter = rng.uniform(-q.crop_jitter_mm, q.crop_jitter_mm, 2)
        k = int(round(z))
        body_centre = np.argwhere(self.body[k]).mean(axis=0)
        body_rc = (body_centre[0] + jitter[0] / dr, body_centre[1] + jitter[1] / dc)
        crop = normalise_hu(sample_planes(vol, self.spacing, (z - k0, *body_rc), px=CROP_PX, mm=CROP_MM / zoom,
                                          rotation_deg=rot))
        return SliceSample(full, crop, grid.sample_mask(self.body[k]), grid.to_grid_ij(np.array(body_rc)))

    def samples(self, targets: np.ndarray, seed: int, progress=None) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        n = len(targets)
        out = {"full": np.empty((n, 3, FULL_PX, FULL_PX), np.float16),
               "crop": np.empty((n, 3, CROP_PX, CROP_PX), np.float32),
               "body": np.empty((n, FULL_PX, FULL_PX), bool), "crop_centre_ij": np.empty((n, 2), np.float32)}
        for i, t in enumerate(progress(targets) if progress else targets):
            s = self.sample(float(t), rng)
            out["full"][i], out["crop"][i], out["body"][i], out["crop_centre_ij"][i] = (s.full, s.crop, s.body,
                                                                                       s.crop_centre_ij)
        return out

    def describe(self) -> dict:
        return {**super().describe(), **{f"pose_{k}": v for k, v in asdict(self.pose).items()},
                "full_slice": "96 x 96 px of 4 mm, FOV-centred (pipeline.full_slice)",
                "crop": f"{CROP_PX} x {CROP_PX} px of {CROP_MM} mm centred on the L1 body (teacher only)"}


def crop_map_to_grid(crop_map: np.ndarray, crop_centre_ij: np.ndarray, cells: int) -> np.ndarray:
    """A map over the crop (any h x w, cells of CROP_PX/h pixels) -> mass on the full-slice grid's cells x cells.

    Crop and full slice share pose and zoom, so crop pixel a lies at full-slice pixel
    centre + (a - (CROP_PX-1)/2) * CROP_MM / FULL_MM. Each crop cell's mass is spread evenly
    over its pixels, resampled, and summed into the coarser cells; the total is kept.
    """
    h, w = crop_map.shape
    dense = np.kron(crop_map, np.ones((CROP_PX // h, CROP_PX // w), np.float32)) / ((CROP_PX // h) * (CROP_PX // w))
    from pipeline.full_slice import FULL_MM

    ratio = FULL_MM / CROP_MM  # crop pixels per full-slice pixel
    ii, jj = np.meshgrid(np.arange(FULL_PX), np.arange(FULL_PX), indexing="ij")
    a = (CROP_PX - 1) / 2.0 + (ii - crop_centre_ij[0]) * ratio
    b = (CROP_PX - 1) / 2.0 + (jj - crop_centre_ij[1]) * ratio
    on_full = ndi.map_coordinates(dense, [a, b], order=1, mode="constant", cval=0.0) * ratio * ratio
    f = FULL_PX // cells
    return on_full.reshape(cells, f, cells, f).sum(axis=(1, 3))
