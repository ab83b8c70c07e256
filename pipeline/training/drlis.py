"""Train the DRLIS slice selector: double + dueling DQN with experience replay, seeded.

Training data are real labelled CT cases (the ``eval imaging`` case format), heavily
augmented: crops that start and end anywhere, 1-5 mm slice spacing, in-plane rotation,
left-right mirroring, noise and intensity shifts within calibration limits. Every state of
every augmented volume is materialised once (float16), so the replay buffer holds indices,
and a batch is a gather. Validation uses other augmentations (other seeds) of the same
patients: with two real patients this measures robustness to acquisition, not to anatomy.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi
from torch import nn

from pipeline.drlis.agent import EDGE_MM, N_AGENTS, VOTE_MM, rollout
from pipeline.drlis.env import (
    ACTION_STEPS,
    MAX_STEPS,
    N_ACTIONS,
    STOP,
    Target,
    reward,
    step_position,
    target_from_labels,
)
from pipeline.drlis.qnet import INPUT_NAMES, OUTPUT_NAMES, QNet
from pipeline.drlis.views import GRID_MM, PAD_VALUE, SelectorViews, build_views, spine_track
from pipeline.localiser import localise
from pipeline.validation import L1, load_case, volume_from_array
from pipeline.volume import Volume

BUNDLE_NAME = "osteoscreen-drlis"
BUNDLE_VERSION = "1.0.0"
MIN_CROP_MM = 70.0


@dataclass
class SelectorTrainConfig:
    seed: int = 20261123
    variants_per_case: int = 36
    val_variants_per_case: int = 6
    iterations: int = 5000
    n_envs: int = 32
    batch: int = 128
    gamma: float = 0.95
    lr: float = 5e-4
    target_every: int = 250
    eps_end: float = 0.05
    eps_decay_fraction: float = 0.5
    replay: int = 80000
    eval_every: int = 500
    teacher_bonus: bool = True
    image_dropout: float = 0.3  # share of training volumes whose image views are blanked: the prior must carry them
    threads: int = 2
    cases: list[str] = field(default_factory=list)


def quick_config(seed: int = 20261123) -> SelectorTrainConfig:
    return SelectorTrainConfig(seed=seed, variants_per_case=3, val_variants_per_case=1, iterations=150,
                               n_envs=8, batch=32, eval_every=75, teacher_bonus=False)


# ---------------------------------------------------------------- augmentation

def _resample_z(hu: np.ndarray, labels: np.ndarray, dz: float, step: float) -> tuple[np.ndarray, np.ndarray]:
    n = hu.shape[0]
    zs = np.arange(0, (n - 1) * dz + 1e-6, step) / dz
    out = np.empty((len(zs),) + hu.shape[1:], dtype=np.int16)
    for i, z in enumerate(zs):  # slice by slice: bounded memory for thin resampling of large volumes
        lo = int(np.floor(z))
        hi = min(lo + 1, n - 1)
        w = z - lo
        out[i] = np.round(hu[lo] * (1 - w) + hu[hi] * w)
    return out, labels[np.clip(np.round(zs).astype(int), 0, n - 1)]


def augment(vol: Volume, labels: np.ndarray, rng: np.random.Generator) -> tuple[Volume, np.ndarray, str]:
    hu, lab, (dz, dr, dc) = vol.hu, labels, vol.spacing
    notes = []
    if rng.random() < 0.7:
        step = float(rng.uniform(1.0, 5.0))
        hu, lab = _resample_z(hu, lab, dz, step)
        dz = step
        notes.append(f"dz{step:.1f}")
    n = hu.shape[0]
    if rng.random() < 0.85:
        min_n = min(n, int(np.ceil(MIN_CROP_MM / dz)))
        length = int(rng.integers(min_n, n + 1))
        start = int(rng.integers(0, n - length + 1))
        hu, lab = hu[start : start + length], lab[start : start + length]
        notes.append(f"crop{start}+{length}")
    if rng.random() < 0.3:
        angle = float(rng.uniform(-8, 8))
        hu = ndi.rotate(hu, angle, axes=(1, 2), reshape=False, order=1, cval=-1000).astype(np.int16)
        lab = ndi.rotate(lab, angle, axes=(1, 2), reshape=False, order=0, cval=0)
        notes.append(f"rot{angle:.0f}")
    if rng.random() < 0.3:
        hu, lab = hu[:, :, ::-1], lab[:, :, ::-1]
        notes.append("mirror")
    shift = float(rng.uniform(-20, 20))
    sd = float(rng.uniform(0, 40)) if rng.random() < 0.6 else 0.0
    if sd or abs(shift) > 0.5:
        noisy = hu.astype(np.float32) + shift
        if sd:
            noisy += rng.normal(0, sd, hu.shape).astype(np.float32)
        hu = np.clip(noisy, -1024, 3071).astype(np.int16)
        notes.append(f"shift{shift:.0f}/noise{sd:.0f}")
    return volume_from_array(np.ascontiguousarray(hu), (dz, dr, dc)), np.ascontiguousarray(lab), " ".join(notes)


# ---------------------------------------------------------------- teacher bonus

class ImageTeacher:
    """The shipped fused model, image only: p(osteoporosis) from the 2.5D L1 patch."""

    def __init__(self) -> None:
        from engines import load_bundle
        from pipeline.features import FEATURES
        from pipeline.fused import FusedModel, TabularInput

        self.model = FusedModel(load_bundle("fused_kdamm_v1"), "onnxruntime-cpu")
        self.empty = TabularInput(np.full(len(FEATURES), np.nan), {})
        self.threshold = float(self.model.card["thresholds"]["operating_point_image_only"])

    def prob(self, vol: Volume, k: int, row: float, col: float) -> float:
        from pipeline.image_input import extract_patch

        patch = extract_patch(vol.hu, vol.spacing, (float(k), row, col))
        return self.model.predict(patch, self.empty, explain=False).probability


def teacher_bonus(vol: Volume, views: SelectorViews, target: Target, track: np.ndarray,
                  teacher: ImageTeacher) -> np.ndarray:
    """Per grid slice in the target zone: how confidently the teacher gives its mid-body answer there (0..1)."""
    bonus = np.zeros(views.n, dtype=np.float32)
    if not target.in_view:
        return bonus

    def p_at(g: float) -> float:
        k = int(np.clip(round(views.to_native(g)), 0, vol.shape[0] - 1))
        return teacher.prob(vol, k, track[k, 1], track[k, 2])

    thr = teacher.threshold
    p_ref = p_at(target.centre)
    margin_ref = max(abs(p_ref - thr), 1e-3)
    for g in range(int(np.ceil(target.zone[0])), int(np.floor(target.zone[1])) + 1):
        p = p_at(g)
        if (p >= thr) == (p_ref >= thr):
            bonus[g] = min(1.0, abs(p - thr) / margin_ref)
    return bonus


# ---------------------------------------------------------------- data

@dataclass
class CaseSet:
    """Every state of every volume, materialised; a position is (case, grid index) -> row ``offset[case] + g``."""

    views: list[SelectorViews]
    targets: list[Target]
    names: list[str]
    profile: np.ndarray
    axial: np.ndarray
    context: np.ndarray
    offsets: np.ndarray

    @classmethod
    def build(cls, cases: list[tuple[str, SelectorViews, Target]]) -> "CaseSet":
        states = [v.states(np.arange(v.n)) for _, v, _ in cases]
        offsets = np.cumsum([0] + [v.n for _, v, _ in cases])
        cat = {k: np.concatenate([s[k] for s in states]).astype(np.float16) for k in INPUT_NAMES}
        return cls([v for _, v, _ in cases], [t for _, _, t in cases], [n for n, _, _ in cases],
                   cat["profile"], cat["axial"], cat["context"], offsets)

    def batch(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(getattr(self, k)[rows].astype(np.float32)) for k in INPUT_NAMES}


def make_cases(base: list[tuple[str, Volume, np.ndarray]], per_case: int, rng: np.random.Generator,
               teacher: ImageTeacher | None, log=print) -> list[tuple[str, SelectorViews, Target]]:
    out = []
    for name, vol, labels in base:
        for i in range(per_case):
            v, lab, how = augment(vol, labels, rng) if i else (vol, labels, "original")
            loc = localise(v)
            views = build_views(v, loc)
            target = target_from_labels(lab, views, L1)
            if teacher is not None and target.in_view:
                target = Target(target.centre, target.zone, True,
                                teacher_bonus(v, views, target, spine_track(v, loc), teacher))
            out.append((f"{name}[{how}]", views, target))
        log(f"  {name}: {per_case} volumes")
    return out


# ---------------------------------------------------------------- training

def _q_numpy(net: QNet):
    def f(states: dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            return net(*(torch.from_numpy(states[k]) for k in INPUT_NAMES)).numpy()
    return f


def validate(net: QNet, cs: CaseSet) -> dict[str, float]:
    net.eval()
    errs, inside, found_ok, cut_ok, steps = [], [], [], [], []
    edge = EDGE_MM / GRID_MM
    for views, target in zip(cs.views, cs.targets):
        vote = rollout(views, _q_numpy(net))
        steps.append(vote.steps)
        in_zone = vote.found and target.zone[0] <= vote.grid_index <= target.zone[1]
        if target.in_view and target.zone[0] > edge and target.zone[1] < views.n - 1 - edge:
            errs.append(abs(vote.grid_index - target.centre) * GRID_MM)
            inside.append(in_zone)
        elif target.in_view:  # L1 cut by the edge of the crop: "not found" and a slice in its middle both count
            cut_ok.append(in_zone or not vote.found)
        else:
            found_ok.append(not vote.found)
    net.train()

    def mean(xs: list) -> float:
        return float(np.mean(xs)) if xs else float("nan")
    return {"median_mm": float(np.median(errs)) if errs else float("nan"), "in_zone": mean(inside),
            "whole_l1": len(inside), "l1_cut_ok": mean(cut_ok), "l1_cut": len(cut_ok),
            "not_in_view_ok": mean(found_ok), "not_in_view": len(found_ok),
            "cases": len(cs.views), "mean_steps": float(np.mean(steps))}


def train(cfg: SelectorTrainConfig, cases_dir: Path, out_dir: Path, report_dir: Path, log=print) -> dict:
    t_start = time.monotonic()
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    base = []
    for case in sorted(p for p in Path(cases_dir).iterdir() if p.is_dir()):
        vol, labels = load_case(case)
        base.append((case.name, vol, labels))
        cfg.cases.append(case.name)
    if not base:
        raise ValueError(f"no cases in {cases_dir}: expected CASES_DIR/<case>/{{ct.nii.gz|dicom/}} + labels.nii.gz")
    teacher = ImageTeacher() if cfg.teacher_bonus else None
    log(f"building training volumes ({cfg.variants_per_case} per case)")
    train_cs = CaseSet.build(make_cases(base, cfg.variants_per_case, rng, teacher, log))
    blank = rng.random(len(train_cs.views)) < cfg.image_dropout
    for i in np.nonzero(blank)[0]:
        rows = slice(train_cs.offsets[i], train_cs.offsets[i + 1])
        train_cs.profile[rows] = PAD_VALUE
        train_cs.axial[rows] = PAD_VALUE
    log(f"building validation volumes ({cfg.val_variants_per_case} per case, other augmentations)")
    val_rng = np.random.default_rng(cfg.seed + 1)
    val_cs = CaseSet.build([c for c in make_cases(base, cfg.val_variants_per_case + 1, val_rng, None, log)
                            if not c[0].endswith("[original]")])
    t_data = time.monotonic() - t_start

    net, tgt = QNet(), QNet()
    tgt.load_state_dict(net.state_dict())
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    n_cases = len(train_cs.views)
    buf_s = np.zeros(cfg.replay, np.int64)
    buf_a = np.zeros(cfg.replay, np.int64)
    buf_r = np.zeros(cfg.replay, np.float32)
    buf_s2 = np.zeros(cfg.replay, np.int64)
    buf_d = np.zeros(cfg.replay, np.float32)
    n_buf = ptr = 0
    case = rng.integers(n_cases, size=cfg.n_envs)
    g = np.array([rng.integers(train_cs.views[c].n) for c in case])
    steps = np.zeros(cfg.n_envs, int)
    ret = np.zeros(cfg.n_envs)
    returns: list[tuple[int, float]] = []
    curve: list[dict] = []
    losses = []
    decay = max(1, int(cfg.eps_decay_fraction * cfg.iterations))
    for it in range(1, cfg.iterations + 1):
        eps = max(cfg.eps_end, 1.0 - (1.0 - cfg.eps_end) * it / decay)
        rows = train_cs.offsets[case] + g
        with torch.no_grad():
            q = net(**train_cs.batch(rows)).numpy()
        a = np.where(rng.random(cfg.n_envs) < eps, rng.integers(N_ACTIONS, size=cfg.n_envs), q.argmax(1))
        for j in range(cfg.n_envs):
            views, target = train_cs.views[case[j]], train_cs.targets[case[j]]
            g_new = int(step_position(g[j : j + 1], a[j : j + 1], views.n)[0])
            r = reward(int(g[j]), g_new, int(a[j]), target)
            steps[j] += 1
            done = a[j] == STOP
            truncated = not done and steps[j] >= MAX_STEPS
            if truncated:
                r -= 1.0
            buf_s[ptr], buf_a[ptr], buf_r[ptr] = rows[j], a[j], r
            buf_s2[ptr], buf_d[ptr] = train_cs.offsets[case[j]] + g_new, float(done)
            ptr = (ptr + 1) % cfg.replay
            n_buf = min(n_buf + 1, cfg.replay)
            ret[j] += r
            g[j] = g_new
            if done or truncated:
                returns.append((it, ret[j]))
                case[j] = rng.integers(n_cases)
                g[j] = rng.integers(train_cs.views[case[j]].n)
                steps[j], ret[j] = 0, 0.0
        if n_buf >= cfg.batch * 4:
            idx = rng.integers(n_buf, size=cfg.batch)
            s, s2 = train_cs.batch(buf_s[idx]), train_cs.batch(buf_s2[idx])
            with torch.no_grad():  # double DQN: the online net picks, the target net values
                a2 = net(**s2).argmax(1, keepdim=True)
                y = torch.from_numpy(buf_r[idx]) + cfg.gamma * (1 - torch.from_numpy(buf_d[idx])) * \
                    tgt(**s2).gather(1, a2).squeeze(1)
            qsa = net(**s).gather(1, torch.from_numpy(buf_a[idx])[:, None]).squeeze(1)
            loss = nn.functional.smooth_l1_loss(qsa, y)
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), 10.0)
            opt.step()
            losses.append(float(loss.detach()))
        if it % cfg.target_every == 0:
            tgt.load_state_dict(net.state_dict())
        if it % cfg.eval_every == 0 or it == cfg.iterations:
            v = validate(net, val_cs)
            recent = [r for i, r in returns if i > it - cfg.eval_every]
            point = {"iteration": it, "episodes": len(returns), "epsilon": round(eps, 3),
                     "mean_return": float(np.mean(recent)) if recent else float("nan"),
                     "loss": float(np.mean(losses[-cfg.eval_every:])) if losses else float("nan"), **v}
            curve.append(point)
            log(f"  it {it}: episodes {len(returns)} eps {eps:.2f} return {point['mean_return']:.2f} "
                f"val (whole L1, n={v['whole_l1']}) median {v['median_mm']:.1f} mm in L1 {v['in_zone']:.2f}; "
                f"L1 cut ok {v['l1_cut_ok']:.2f} (n={v['l1_cut']}); not in view ok {v['not_in_view_ok']:.2f} "
                f"(n={v['not_in_view']})")
    net.eval()
    summary = {"config": asdict(cfg), "episodes": len(returns), "curve": curve,
               "train_volumes": len(train_cs.views), "val_volumes": len(val_cs.views),
               "seconds": {"data": round(t_data, 1), "total": round(time.monotonic() - t_start, 1)},
               "final_validation": curve[-1] if curve else {}}
    write_bundle(out_dir, net, summary)
    write_report(report_dir, summary)
    return summary


# ---------------------------------------------------------------- export

def example_inputs(batch: int = 2) -> tuple[torch.Tensor, ...]:
    from pipeline.drlis.views import AX_PX, CONTEXT_SIZE, WINDOW

    return (torch.zeros(batch, 2, WINDOW, WINDOW), torch.zeros(batch, 3, AX_PX, AX_PX),
            torch.zeros(batch, CONTEXT_SIZE))


def write_bundle(out_dir: Path, net: QNet, summary: dict) -> None:
    from pipeline.training.export import write_graph

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = write_graph(net, example_inputs(), list(INPUT_NAMES), list(OUTPUT_NAMES), out_dir, "qnet")
    fv = summary["final_validation"]
    card = {
        "name": BUNDLE_NAME,
        "version": BUNDLE_VERSION,
        "kind": "slice-selector-dqn",
        "description": "DRLIS-style slice selector: double + dueling DQN agents that walk a CT volume's z axis to "
                       "the L1 mid-body and vote. State: a +-64 mm sagittal/coronal window, the current axial "
                       "slice and its +-4 mm neighbours, and the anatomical localiser's per-slice level "
                       "probabilities.",
        "intended_use": "RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE. Trained on augmentations of "
                        f"{len(summary['config']['cases'])} real labelled CT volume(s) "
                        f"({', '.join(summary['config']['cases'])}); every result on those patients is "
                        "in-sample. The service uses it only where it agrees with the anatomical localiser.",
        "inputs": {"grid_mm": GRID_MM, "actions_grid_steps": list(ACTION_STEPS) + ["stop"],
                   "max_steps": MAX_STEPS, "agents": N_AGENTS, "vote_mm": VOTE_MM, "edge_mm": EDGE_MM},
        "thresholds": {"min_agreement": 0.6},
        "categories": [],
        "references": ["DRLIS: deep reinforcement learning slice selection within a knowledge-distillation-"
                       "assisted multimodal osteoporosis model (the published design this follows)"],
        "training": {"seed": summary["config"]["seed"], "episodes": summary["episodes"],
                     "train_volumes": summary["train_volumes"], "val_volumes": summary["val_volumes"],
                     "validation": fv, "seconds": summary["seconds"]},
        "files": files,
        "inference": {"fp16": True, "note": "fp16 allowed on GPU backends: the selector's decision is the argmax "
                                            "of Q, and fp16 kept every action of the reference on random and real "
                                            "states (docs/benchmarks-gpu.md)"},
    }
    (out_dir / "card.json").write_text(json.dumps(card, indent=2) + "\n")


def write_report(report_dir: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    curve = summary["curve"]
    it = [c["iteration"] for c in curve]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].plot(it, [c["mean_return"] for c in curve], marker="o")
    axes[0].set(xlabel="iteration", ylabel="mean episode return", title="DRLIS training reward")
    axes[1].plot(it, [c["median_mm"] for c in curve], marker="o", label="median distance to L1 centre (mm)")
    ax2 = axes[1].twinx()
    ax2.plot(it, [c["in_zone"] for c in curve], color="tab:green", marker="s", label="in L1 zone (fraction)")
    axes[1].set(xlabel="iteration", ylabel="mm", title="validation (other augmentations)")
    ax2.set_ylim(0, 1.05)
    fig.tight_layout()
    fig.savefig(report_dir / "drlis_curves.png", dpi=100)
    plt.close(fig)
    (report_dir / "drlis_metrics.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    cfg = summary["config"]
    lines = [
        "# DRLIS slice selector - training report", "",
        f"Generated by `osteoscreen train selector CASES_DIR` (seed {cfg['seed']}) in {summary['seconds']['total']:.0f} s "
        f"on this machine's CPU ({summary['seconds']['data']:.0f} s building volumes). RESEARCH USE ONLY.", "",
        f"**Data**: {len(cfg['cases'])} real labelled CT case(s): {', '.join(cfg['cases'])}. "
        f"{summary['train_volumes']} training volumes ({cfg['variants_per_case']} per case: the original and "
        "augmentations - crops, 1-5 mm slices, +-8 deg rotation, mirroring, noise, +-20 HU shifts), "
        f"{summary['val_volumes']} validation volumes (other augmentations of the same patients: this measures "
        "robustness to acquisition, not to anatomy; see docs/validation.md for leave-one-patient-out).", "",
        f"**Agent**: double + dueling DQN, replay {cfg['replay']}, batch {cfg['batch']}, gamma {cfg['gamma']}, "
        f"lr {cfg['lr']}, target sync every {cfg['target_every']} iterations, epsilon to {cfg['eps_end']} over "
        f"{cfg['eps_decay_fraction']:.0%} of {cfg['iterations']} iterations x {cfg['n_envs']} environments; "
        f"{summary['episodes']} episodes. Teacher bonus: {'on' if cfg['teacher_bonus'] else 'off'}.", "",
        "![reward and validation curves](drlis_curves.png)", "",
        "| iteration | episodes | mean return | val median mm (whole L1) | in L1 | L1 cut ok | not in view ok | steps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in summary["curve"]:
        lines.append(f"| {c['iteration']} | {c['episodes']} | {c['mean_return']:.2f} | {c['median_mm']:.1f} | "
                     f"{c['in_zone']:.2f} | {c.get('l1_cut_ok', float('nan')):.2f} | {c['not_in_view_ok']:.2f} | "
                     f"{c['mean_steps']:.1f} |")
    (report_dir / "drlis.md").write_text("\n".join(lines) + "\n")
