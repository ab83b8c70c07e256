"""Semi-synthetic chest radiographs: one real radiograph, bone contrast set from each subject's real L1 DXA.

SEMI-SYNTHETIC and EXPERIMENTAL. There is no labelled chest radiograph cohort here, only one
real adult chest PA radiograph (RG1, pydicom-data, shipped in dicom_node/sample_data). So:

- Anatomy: that radiograph's working image (pipeline.xray.image.square_image). Its bone layer is
  estimated as the white top-hat with a 15-pixel disk (about 19 mm at this scale: ribs,
  clavicles and the spine's edges are narrower than that; lungs and mediastinum are wider),
  lightly smoothed; the rest is the soft-tissue layer.
- Bone density: each subject's target L1 trabecular attenuation (pipeline.training.synth_ct,
  from their real L1 DXA BMD, never the femoral-neck BMD that defines the label) sets the bone
  layer's weight, s = target HU / 236 (236 HU = the young-adult mean), clipped to 0.15-1.8:
  an ASSUMPTION that radiographic bone contrast scales with bone density; with lower s the bone
  layer is also blurred a little (thinner, less distinct cortices), another assumption.
- Acquisition variation: exposure (gamma 0.8-1.25, gain 0.9-1.1, offset +-0.05), pose
  (rotation +-5 deg, zoom 0.92-1.08, shift +-8 px), detector blur 0-1 px, noise SD 0.005-0.03.

Nothing about real radiographic screening accuracy can be learned from this; it exercises the
whole path (preprocessing, models, fusion, reports) on data with a known, plausible signal.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage as ndi

from pipeline.xray.image import WORK_PX, load_radiograph, model_inputs, square_image

YOUNG_HU = 236.0


@dataclass(frozen=True)
class XrayGeneratorParams:
    tophat_radius_px: int = 7
    density_range: tuple[float, float] = (0.15, 1.8)
    low_density_blur_px: float = 1.0
    gamma: tuple[float, float] = (0.8, 1.25)
    gain: tuple[float, float] = (0.9, 1.1)
    offset: float = 0.05
    rotation_deg: float = 5.0
    zoom: tuple[float, float] = (0.92, 1.08)
    shift_px: float = 8.0
    blur_px: tuple[float, float] = (0.0, 1.0)
    noise_sd: tuple[float, float] = (0.005, 0.03)


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return (yy * yy + xx * xx) <= radius * radius


class SyntheticRadiographs:
    def __init__(self, params: XrayGeneratorParams = XrayGeneratorParams()) -> None:
        from dicom_node.sample import sample_data_dir

        self.params = params
        work = square_image(load_radiograph(sample_data_dir() / "RG1_J2KR.dcm").display)
        bone = ndi.white_tophat(work, footprint=_disk(params.tophat_radius_px))
        self.bone = ndi.gaussian_filter(bone, 0.7).astype(np.float32)
        self.soft = (work - self.bone).astype(np.float32)

    def image(self, target_hu: float, rng: np.random.Generator) -> np.ndarray:
        """A WORK_PX square working image for one subject."""
        p = self.params
        s = float(np.clip(target_hu / YOUNG_HU, *p.density_range))
        bone = self.bone
        if s < 1.0:
            bone = ndi.gaussian_filter(bone, p.low_density_blur_px * (1.0 - s))
        img = np.clip(self.soft + s * bone, 0.0, 1.0)
        img = np.clip(rng.uniform(*p.gain) * img ** rng.uniform(*p.gamma) + rng.uniform(-p.offset, p.offset), 0, 1)
        th = np.deg2rad(rng.uniform(-p.rotation_deg, p.rotation_deg))
        zoom = rng.uniform(*p.zoom)
        c = (WORK_PX - 1) / 2.0
        rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]]) / zoom
        shift = rng.uniform(-p.shift_px, p.shift_px, 2)
        offset = np.array([c, c]) - rot @ (np.array([c, c]) + shift)
        img = ndi.affine_transform(img, rot, offset=offset, order=1, mode="nearest")
        img = ndi.gaussian_filter(img, rng.uniform(*p.blur_px))
        img = img + rng.normal(0.0, rng.uniform(*p.noise_sd), img.shape)
        return np.clip(img, 0.0, 1.0).astype(np.float32)

    def samples(self, targets: np.ndarray, seed: int, progress=None) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        first = model_inputs(self.soft)
        out = {k: np.empty((len(targets), *v.shape), np.float32) for k, v in first.items()}
        for i, t in enumerate(progress(targets) if progress else targets):
            feeds = model_inputs(self.image(float(t), rng))
            for k, v in feeds.items():
                out[k][i] = v
        return out

    def describe(self) -> dict:
        return {**asdict(self.params), "anatomy": "one real chest PA radiograph (RG1, pydicom-data 1.0.0, MIT)",
                "density": "s = target L1 trabecular HU / 236 (from the subject's real L1 DXA): an assumption"}
