"""Semi-synthetic L1 CT patches: real anatomy, attenuation set from each subject's real lumbar DXA.

SEMI-SYNTHETIC. No public CT cohort with DXA labels is available, so the image
modality is generated:

- Anatomy: the real abdominal CT shipped in dicom_node/sample_data (TotalSegmentator
  example_ct, 3 mm) and its L1 label. Trabecular bone = the L1 label eroded by 2 voxels
  (6 mm) in the anterior half of its antero-posterior extent, around the central third
  of L1; cortex = the label rim above 150 HU.
- Attenuation: each subject's target L1 trabecular HU comes from their real L1 DXA
  BMD (DXXSPN, never the femoral-neck BMD that defines the label) by T-score
  matching: HU = 236 + 42 * T_L1, where 236 +- 42 HU is the L1 trabecular
  attenuation of women aged 20-30 (Hendrickson NR, Pickhardt PJ, et al. Iowa Orthop
  J 2018;38:25-31) and T_L1 the subject's L1 DXA T-score against the sex-specific
  NHANES young-adult (20-29) L1 BMD of the training split. DXA and CT agree only
  moderately, so a residual N(0, 30 HU) is added (an assumption, stated in the model
  card). Trabecular and cortical voxels are rescaled proportionally to the target.
- Acquisition variation: noise SD 8-25 HU, Gaussian kernel blur 0.3-1.0 px, slice
  thickness 3 or 6 mm, shift +-4 mm, rotation +-8 deg, slice position within the
  central third of L1.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage as ndi

from dicom_node.sample import load_lps_volume, sample_data_dir
from pipeline.image_input import PATCH_PX, extract_patch

L1_LABEL = 31


@dataclass(frozen=True)
class GeneratorParams:
    young_hu_mean: float = 236.0
    young_hu_sd: float = 42.0
    residual_sd_hu: float = 30.0
    min_hu: float = 15.0
    max_hu: float = 420.0
    noise_sd_hu: tuple[float, float] = (8.0, 25.0)
    blur_px: tuple[float, float] = (0.3, 1.0)
    thick_slice_prob: float = 0.3
    shift_mm: float = 4.0
    rotation_deg: float = 8.0
    citation: str = ("HU = 236 + 42 * T_L1(DXA): Hendrickson NR, Pickhardt PJ, Munoz del Rio A, Rosas HG, "
                     "Anderson PA. Iowa Orthop J 2018;38:25-31 (L1 236 +- 42 HU, women 20-30 y). "
                     "Residual SD 30 HU: assumption.")


class SyntheticL1:
    def __init__(self, params: GeneratorParams = GeneratorParams()) -> None:
        self.params = params
        hu, _, spacing = load_lps_volume(sample_data_dir() / "example_ct.nii.gz")
        labels, _, _ = load_lps_volume(sample_data_dir() / "totalseg_v2_labels.nii.gz")
        self.hu = hu.astype(np.float32)
        self.spacing = spacing
        l1 = labels == L1_LABEL
        zs = np.nonzero(l1.any(axis=(1, 2)))[0]
        z0, z1 = zs.min(), zs.max()
        third = (z1 - z0) / 3.0
        self.z_range = (z0 + third, z1 - third)
        er = max(1, int(round(5.0 / spacing[1])))
        trab = np.zeros_like(l1)
        for k in range(int(np.floor(self.z_range[0])) - 2, int(np.ceil(self.z_range[1])) + 3):
            m = l1[k]
            if not m.any():
                continue
            rows = np.nonzero(m.any(axis=1))[0]
            ant = m.copy()
            ant[rows.min() + (rows.max() - rows.min() + 1) // 2 :] = False  # anterior half (rows grow posteriorly)
            trab[k] = ndi.binary_erosion(m, iterations=er) & ant
        self.trab = trab
        self.cortex = l1 & ~ndi.binary_erosion(l1, iterations=er) & (self.hu > 150)
        core = np.zeros_like(trab)
        core[int(np.ceil(self.z_range[0])) : int(np.floor(self.z_range[1])) + 1] = True
        self.base_trab_hu = float(self.hu[trab & core].mean())
        zz, rr, cc = np.nonzero(trab)
        self.centre_rc = (float(rr.mean()), float(cc.mean()))

    def target_hu(self, l1_t_score: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        p = self.params
        hu = p.young_hu_mean + p.young_hu_sd * l1_t_score + rng.normal(0.0, p.residual_sd_hu, np.shape(l1_t_score))
        return np.clip(hu, p.min_hu, p.max_hu)

    def slab(self, target_hu: float, rng: np.random.Generator, margin: int = 2) -> tuple[float, int, np.ndarray]:
        """One subject's slab around a random mid-L1 position: (z, first slice index, HU volume).

        Trabecular and cortical voxels rescaled to ``target_hu``, kernel blur, optional 6 mm
        reconstruction, noise; ``margin`` slices beyond the position on each side."""
        p = self.params
        scale = target_hu / self.base_trab_hu
        z = rng.uniform(*self.z_range)
        k0, k1 = int(np.floor(z)) - margin, int(np.ceil(z)) + margin + 1
        vol = self.hu[k0:k1].copy()
        t, c = self.trab[k0:k1], self.cortex[k0:k1]
        vol[t] *= scale
        vol[c] *= scale
        sigma = rng.uniform(*p.blur_px)
        vol = ndi.gaussian_filter(vol, sigma=(0, sigma, sigma))
        if rng.random() < p.thick_slice_prob:  # 6 mm reconstruction: average neighbouring slices
            vol = ndi.uniform_filter1d(vol, size=2, axis=0)
        vol += rng.normal(0.0, rng.uniform(*p.noise_sd_hu), vol.shape).astype(np.float32)
        return z, k0, vol

    def patch(self, target_hu: float, rng: np.random.Generator) -> np.ndarray:
        p = self.params
        z, k0, vol = self.slab(target_hu, rng)
        shift = rng.uniform(-p.shift_mm, p.shift_mm, 2)
        centre = (z - k0, self.centre_rc[0] + shift[0] / self.spacing[1],
                  self.centre_rc[1] + shift[1] / self.spacing[2])
        return extract_patch(vol, self.spacing, centre, rotation_deg=rng.uniform(-p.rotation_deg, p.rotation_deg))

    def patches(self, targets: np.ndarray, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        out = np.empty((len(targets), 3, PATCH_PX, PATCH_PX), dtype=np.float32)
        for i, t in enumerate(targets):
            out[i] = self.patch(float(t), rng)
        return out

    def describe(self) -> dict:
        return {**asdict(self.params), "anatomy": "TotalSegmentator example_ct (real CT, 3 mm), L1 label 31",
                "base_trabecular_hu": round(self.base_trab_hu, 1)}
