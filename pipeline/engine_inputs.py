"""Real inputs for every shipped network, computed from the bundled real CT as the service computes them.

Used to check that the inference backends agree (tests/test_engines.py) and to time them
(``osteoscreen engines bench``) on what they will actually see, not only on random numbers.
"""
from __future__ import annotations

import numpy as np

from dicom_node.sample import load_lps_volume, sample_data_dir
from engines.bench import ROLLOUT_PREFIX
from pipeline.drlis.views import build_views, spine_track
from pipeline.full_slice import full_slice_input
from pipeline.image_input import extract_patch
from pipeline.localiser import localise
from pipeline.validation import volume_from_array

SELECTOR_STATES = 300  # the selector's batch in the bench: one state per slice of a 300-slice volume


def real_inputs(n_states: int = SELECTOR_STATES, n_patches: int = 32) -> dict[str, dict[str, np.ndarray]]:
    """Feeds per network (``"<bundle>/<graph>"``), plus the selector's rollout calls under ``ROLLOUT_PREFIX``."""
    import engines
    from pipeline.fused import shap_background

    hu, origin, spacing = load_lps_volume(sample_data_dir() / "example_ct.nii.gz")
    vol = volume_from_array(hu, spacing, origin)
    loc = localise(vol)
    views = build_views(vol, loc)
    trace = rollout_trace(_resampled(hu, spacing, origin, n_states))
    grid = np.round(np.linspace(0, views.n - 1, n_states)).astype(int)
    qnet = views.states(grid)
    track = spine_track(vol, loc)
    ks = np.round(np.linspace(0, vol.shape[0] - 1, n_patches)).astype(int)
    image = np.stack([extract_patch(vol.hu, vol.spacing, (float(k), track[k, 1], track[k, 2])) for k in ks])
    fused = engines.load_bundle("fused_kdamm_v1")
    encoder = engines.load(fused.path, "onnxruntime-cpu", graph="image_encoder")
    bg = shap_background(fused)
    rows = min(len(bg["tab_values"]), n_patches)
    head = {
        "embedding": encoder(image=image[:rows])["embedding"],
        "image_present": np.ones((rows, 1), np.float32),
        "tab_values": bg["tab_values"][:rows].astype(np.float32),
        "tab_mask": bg["tab_mask"][:rows].astype(np.float32),
    }
    full = np.stack([full_slice_input(vol.hu, vol.spacing, float(k))[0] for k in ks[:: max(1, len(ks) // 8)]])
    out = {"drlis_v1/qnet": qnet, "fused_kdamm_v1/image_encoder": {"image": image.astype(np.float32)},
           "fused_kdamm_v1/head": head, "mmpkd_v1/image_student": {"image": image.astype(np.float32)},
           "cropkd_v1/image_student": {"image": full.astype(np.float32)},
           "cxr_fusion_v1/image_model": _radiograph_inputs()}
    out.update({f"{ROLLOUT_PREFIX}{i:03d}": feeds for i, feeds in enumerate(trace)})
    return out


def _radiograph_inputs(n: int = 6) -> dict[str, np.ndarray]:
    """The shipped real chest radiograph as the service prepares it, plus semi-synthetic variants of it."""
    from pipeline.training.synth_xray import SyntheticRadiographs
    from pipeline.xray.image import load_radiograph, model_inputs, square_image

    gen = SyntheticRadiographs()
    rng = np.random.default_rng(0)
    works = [square_image(load_radiograph(sample_data_dir() / "RG1_J2KR.dcm").display)]
    works += [gen.image(float(hu), rng) for hu in np.linspace(40, 380, n - 1)]
    feeds = [model_inputs(w) for w in works]
    return {k: np.stack([f[k] for f in feeds]).astype(np.float32) for k in feeds[0]}


def _resampled(hu: np.ndarray, spacing, origin, n_slices: int):
    """The bundled CT resampled along z to ``n_slices`` slices (a 300-slice volume by default)."""
    from scipy import ndimage as ndi

    factor = n_slices / hu.shape[0]
    res = ndi.zoom(hu.astype(np.float32), (factor, 1, 1), order=1).astype(np.int16)
    vol = volume_from_array(res, (spacing[0] / factor, spacing[1], spacing[2]), origin)
    return build_views(vol, localise(vol))


def rollout_trace(views) -> list[dict[str, np.ndarray]]:
    """The Q-network calls, in order, of the service's DRLIS rollout (5 agents, until they stop).

    The agents' path depends only on Q; a backend that passes parity takes the same path,
    so replaying these calls times what the selector costs per volume in service.
    """
    import engines
    from pipeline.drlis.agent import rollout

    ref = engines.load(engines.load_bundle("drlis_v1").path, "onnxruntime-cpu", graph="qnet")
    calls: list[dict[str, np.ndarray]] = []

    def q(states: dict[str, np.ndarray]) -> np.ndarray:
        calls.append(states)
        return ref(**states)["q"]

    rollout(views, q)
    return calls
