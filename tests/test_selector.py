"""DRLIS slice selector: level prior, views, environment, training, export parity, the service rule, eval."""
import shutil
import subprocess
import sys

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from dicom_node.sample import load_lps_volume, sample_data_dir, sample_labels_lps
from pipeline.drlis.agent import AgentVote
from pipeline.drlis.env import STOP, SliceSelectEnv, reward, target_from_labels
from pipeline.drlis.selector import DrlisSelector
from pipeline.drlis.views import build_views
from pipeline.localiser import PRIOR_COLUMNS, Localisation, level_probabilities, localise
from pipeline.selection import select_level_slices
from pipeline.validation import volume_from_array

L1 = 31


@pytest.fixture(scope="module")
def case():
    hu, _, spacing = load_lps_volume(sample_data_dir() / "example_ct.nii.gz")
    vol = volume_from_array(hu.astype(np.int16), spacing)
    labels = sample_labels_lps()
    loc = localise(vol)
    return vol, labels, loc, build_views(vol, loc)


@pytest.fixture(scope="module")
def cases_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cases") / "example_ct"
    d.mkdir()
    shutil.copy(sample_data_dir() / "example_ct.nii.gz", d / "ct.nii.gz")
    shutil.copy(sample_data_dir() / "totalseg_v2_labels.nii.gz", d / "labels.nii.gz")
    return d.parent


def test_level_probabilities_peak_inside_l1_and_sum_to_one(case):
    vol, labels, loc, _ = case
    p = level_probabilities(loc, vol.shape[0], vol.spacing[0])
    assert p.shape == (vol.shape[0], len(PRIOR_COLUMNS))
    assert np.allclose(p.sum(axis=1), 1.0)
    zs = np.nonzero((labels == L1).any(axis=(1, 2)))[0]
    k = int(np.argmax(p[:, PRIOR_COLUMNS.index("L1")]))
    assert zs.min() <= k <= zs.max()
    assert p[k, PRIOR_COLUMNS.index("L1")] == pytest.approx(loc.confidence + (1 - loc.confidence) / 4, abs=0.02)


def test_level_probabilities_say_nothing_without_an_anchor():
    loc = Localisation((), (), (), np.full((10, 4), np.nan), None, 0.0, reason="no anchor")
    p = level_probabilities(loc, 10, 3.0)
    assert np.all(p[:, -1] == 1.0) and np.all(p[:, :-1] == 0.0)


def test_states_mark_positions_outside_the_volume(case):
    _, _, _, views = case
    s = views.states(np.array([0, views.n // 2]))
    assert s["profile"].shape == (2, 2, 32, 32) and s["axial"].shape == (2, 3, 32, 32)
    outside = s["context"][:, :-3].reshape(2, 32, -1)[:, :, -1]
    assert outside[0, :16].all() and not outside[0, 16:].any()  # below index 0: outside
    assert not outside[1].any()


def test_environment_follows_the_gymnasium_api_and_rewards_approach(case):
    _, labels, _, views = case
    target = target_from_labels(labels, views)
    assert target.in_view
    check_env(SliceSelectEnv([(views, target)], seed=0), skip_render_check=True)
    c = int(round(target.centre))
    assert reward(c - 10, c - 6, 4, target) > 0 > reward(c - 6, c - 10, 1, target)
    assert reward(c, c, STOP, target) >= 2.0 > 0 > reward(c - 30, c - 30, STOP, target)


def test_target_is_the_edge_on_l1_side_when_l1_is_cut_away(case):
    vol, labels, _, _ = case
    zs = np.nonzero((labels == L1).any(axis=(1, 2)))[0]
    top = slice(zs.max() + 3, vol.shape[0])  # T12 and above only: L1 lies below (index 0 side)
    v2 = volume_from_array(vol.hu[top], vol.spacing)
    views = build_views(v2, localise(v2))
    t = target_from_labels(labels[top], views)
    assert not t.in_view and t.centre == 0.0


def test_quick_training_writes_a_bundle_whose_onnx_matches_pytorch(tmp_path, cases_dir, case):
    """Training on a small slice (one case, few iterations): the command runs, is seeded, exports faithfully."""
    import torch

    from pipeline.drlis.qnet import QNet
    from pipeline.training.drlis import quick_config, train

    s = train(quick_config(7), cases_dir, tmp_path / "bundle", tmp_path / "report")
    assert s["episodes"] > 0 and (tmp_path / "report" / "drlis_curves.png").stat().st_size > 0
    net = QNet()
    net.load_state_dict(torch.load(tmp_path / "bundle" / "qnet.pt"))
    net.eval()
    states = case[3].states(np.arange(0, case[3].n, 7))
    with torch.no_grad():
        ref = net(*(torch.from_numpy(states[k]) for k in ("profile", "axial", "context"))).numpy()
    sel = DrlisSelector(tmp_path / "bundle", "onnxruntime-cpu")
    assert np.allclose(sel.engine(**states)["q"], ref, atol=1e-4)


def test_selector_training_is_reproducible_with_a_seed(tmp_path, cases_dir):
    import dataclasses

    import torch

    from pipeline.training.drlis import quick_config, train

    cfg = dataclasses.replace(quick_config(11), iterations=40, eval_every=40, variants_per_case=2)
    weights = []
    for run in ("a", "b"):
        train(dataclasses.replace(cfg, cases=[]), cases_dir, tmp_path / run, tmp_path / f"r{run}", log=lambda *_: None)
        weights.append(torch.load(tmp_path / run / "qnet.pt"))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.parametrize("backend", ["onnxruntime-cpu", "pytorch"])
def test_shipped_selector_backends_match_and_find_l1_on_the_sample(case, backend):
    vol, labels, loc, views = case
    onnx = DrlisSelector("drlis_v1", "onnxruntime-cpu")
    other = DrlisSelector("drlis_v1", backend)
    states = views.states(np.arange(views.n))
    assert np.allclose(other.engine(**states)["q"], onnx.engine(**states)["q"], atol=1e-4)
    vote = other.vote(views)
    assert vote.found and vote.confidence >= 0.6
    zs = np.nonzero((labels == L1).any(axis=(1, 2)))[0]
    span = zs.max() - zs.min()
    assert zs.min() + 0.2 * span <= vote.native_index <= zs.max() - 0.2 * span  # in-sample: trained on it


def _vote(native: int, confidence: float = 1.0, edge=None) -> AgentVote:
    return AgentVote(native, native, confidence, edge, 10, (native,) * 5, 0.01)


def test_agent_is_used_only_where_it_agrees_with_the_localiser():
    sel = DrlisSelector("drlis_v1", "onnxruntime-cpu")
    assert sel.decide(_vote(50), (40.0, 60.0)).use_agent
    assert not sel.decide(_vote(50), None).use_agent  # the localiser refused: its refusal stands
    assert not sel.decide(_vote(50, confidence=0.4), (40.0, 60.0)).use_agent
    assert not sel.decide(_vote(41), (40.0, 60.0)).use_agent  # near an endplate of the localiser's L1
    # slice numbers in the report count from 1, as "slice k of N" does elsewhere
    assert "its slice 42 lies outside the middle of the localiser's L1 (slices 41-61)" in sel.decide(
        _vote(41), (40.0, 60.0)).note
    assert "is consistent with the anatomical localiser" in sel.decide(_vote(50), (40.0, 60.0)).note
    d = sel.decide(_vote(0, edge="inferior"), (40.0, 60.0))
    assert not d.use_agent and "edge" in d.note


def test_selection_reports_which_selector_chose(case):
    vol, _, loc, _ = case
    plain, _ = select_level_slices(vol, "L1", localisation=loc)
    assert plain.method.startswith("anatomical-localiser") and plain.note is None
    with_agent, _ = select_level_slices(vol, "L1", localisation=loc, agent=DrlisSelector("drlis_v1", "onnxruntime-cpu"))
    assert with_agent.note and ("consistent with" in with_agent.note or "not used" in with_agent.note)
    # the localiser's range is what is measured, whatever the agent says: the report credits the localiser
    assert with_agent.method == plain.method and with_agent.z_range == plain.z_range
    assert with_agent.centre_index == plain.centre_index


def test_eval_selector_prints_side_by_side_and_summary_line(cases_dir):
    r = subprocess.run([sys.executable, "-m", "dicom_node.cli", "eval", "selector", str(cases_dir)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("selector eval: cases=1 agent_in_L1=1.00 localiser_in_L1=1.00 agent_mm=")
    assert "localiser_mm=" in last


def test_train_selector_check_compares_without_touching_the_shipped_bundle(tmp_path, cases_dir, monkeypatch, capsys):
    """`osteoscreen train selector --check` retrains in a temporary folder and compares; it once ignored --check
    and overwrote the shipped bundle and report."""
    import hashlib

    import engines.bundle
    from dicom_node.cli import main

    shipped = engines.bundle.bundled_models_dir()
    models = tmp_path / "models"
    models.mkdir()
    for d in shipped.iterdir():
        if d.is_dir():
            (models / d.name).symlink_to(d, target_is_directory=True)
    (models / "drlis_v1").unlink()
    shutil.copytree(shipped / "drlis_v1", models / "drlis_v1")
    monkeypatch.setattr(engines.bundle, "bundled_models_dir", lambda: models)
    monkeypatch.chdir(tmp_path)

    def digest() -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((models / "drlis_v1").iterdir())}

    before = digest()
    rc = main(["train", "selector", str(cases_dir), "--check", "--quick"])
    out = capsys.readouterr().out
    assert rc == 1 and "train check: metrics differ from the shipped bundle" in out  # a quick run is not the full one
    assert "validation.median_mm" in out or "episodes" in out
    assert digest() == before and not (tmp_path / "docs").exists()


def test_selector_eval_measures_from_the_vertebral_bodys_mid_height_too():
    """The whole L1 label reaches lower than its body (the arch slopes down); the agents' target was the label's
    centre. The eval also gives the distance from the body's mid-height (its anterior half)."""
    from pipeline.drlis.evaluate import _body_distance, _distance
    from pipeline.validation import L1

    labels = np.zeros((30, 20, 20), np.int16)
    labels[10:25, 2:10, 5:15] = L1  # body: slices 10-24, anterior rows
    labels[4:22, 10:18, 8:12] = L1  # arch: posterior rows, reaching down to slice 4
    assert _distance(labels, 17, 1.0) == pytest.approx(17 - 14.0)  # label centre (4 + 24) / 2
    assert _body_distance(labels, 17, 1.0) == pytest.approx(0.0)  # body centre (10 + 24) / 2
    assert _body_distance(labels, None, 1.0) is None
