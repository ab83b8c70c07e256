"""``osteoscreen eval selector``: the learned selector and the anatomical localiser, side by side.

Same cases and robustness variants as ``eval imaging``. The localiser's answer is the
imaging eval's own (its measured slice); the agent's is its consensus slice. "Correct"
follows the imaging eval: inside L1 when L1 is in view, "L1 not found" when it is not.
The selected slices are the answer and its neighbours within +-3 mm (what the measurement
pools).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.bone import POOL_MM
from pipeline.drlis.selector import DrlisSelector
from pipeline.drlis.views import build_views
from pipeline.localiser import localise
from pipeline.validation import L1, dash_or, eval_cases, inside_l1
from pipeline.validation import evaluate as evaluate_localiser
from pipeline.volume import Volume


@dataclass(frozen=True)
class SideBySide:
    case: str
    l1_in_view: bool
    agent_status: str  # correct / wrong / not_found / wrong_found
    agent_level: str | None
    agent_mm: float | None
    agent_fraction: float | None
    agent_confidence: float
    agent_steps: int
    agent_ms: float
    localiser_status: str
    localiser_level: str | None
    localiser_mm: float | None
    localiser_fraction: float | None
    localiser_ms: float
    service_uses: str
    n_slices: int
    agent_body_mm: float | None = None  # from the mid-height of L1's body (the label without its posterior arch)
    localiser_body_mm: float | None = None


def _slab_fraction(labels: np.ndarray, k: int, dz: float) -> float:
    r = int(POOL_MM // dz)  # the neighbours the measurement pools (pipeline.bone._pooled)
    ks = [j for j in range(k - r, k + r + 1) if 0 <= j < labels.shape[0]]
    return float(np.mean([inside_l1(labels, j)[0] for j in ks]))


def _distance(labels: np.ndarray, k: int, dz: float) -> float | None:
    zs = np.nonzero((labels == L1).any(axis=(1, 2)))[0]
    return abs(k - (zs.min() + zs.max()) / 2.0) * dz if zs.size else None


def _body_distance(labels: np.ndarray, k: int | None, dz: float) -> float | None:
    """Distance from the mid-height of L1's body: the whole label's z-centre lies below it, because the arch
    slopes down past the body (example_ct: label slices 86-103, body 91-103), and the agents were trained on
    that centre. The measurement wants the body's middle."""
    if k is None:
        return None
    z, r, _ = np.nonzero(labels == L1)
    if z.size == 0:
        return None
    body = z[r <= (r.min() + r.max()) / 2]  # the anterior half of the whole label, as reference_hu takes it
    return abs(k - (body.min() + body.max()) / 2.0) * dz


def compare(name: str, vol: Volume, labels: np.ndarray, selector: DrlisSelector, ref: float | None) -> SideBySide:
    l1_in_view = bool((labels == L1).any())
    t0 = time.perf_counter()
    loc = localise(vol)
    t_loc = time.perf_counter() - t0
    lr = evaluate_localiser(name, vol, labels, ref, localisation=loc)
    t1 = time.perf_counter()
    vote = selector.vote(build_views(vol, loc))
    t_agent = time.perf_counter() - t1
    dz = vol.spacing[0]
    if vote.found:
        ok, level = inside_l1(labels, vote.native_index)
        a_status = "correct" if ok else "wrong" if l1_in_view else "wrong_found"
        a_mm, a_frac = _distance(labels, vote.native_index, dz), _slab_fraction(labels, vote.native_index, dz)
    else:
        level, a_mm, a_frac = None, None, None
        a_status = "not_found" if l1_in_view else "correct"
    l_status = "correct" if lr.status == "correct" else lr.status
    l_frac = _slab_fraction(labels, lr.slice_index, dz) if lr.slice_index is not None else None
    uses = "-"
    if lr.claimed:
        seg = loc.find("L1")
        decision = selector.decide(vote, (seg.z_lower, seg.z_upper) if seg else None)
        uses = "agent" if decision.use_agent else "localiser"
    return SideBySide(name, l1_in_view, a_status, level, a_mm, a_frac, vote.confidence, vote.steps,
                      1000 * t_agent, l_status, lr.slice_level, lr.distance_mm if lr.claimed else None, l_frac,
                      1000 * t_loc, uses, vol.shape[0],
                      agent_body_mm=_body_distance(labels, vote.native_index if vote.found else None, dz),
                      localiser_body_mm=_body_distance(labels, lr.slice_index if lr.claimed else None, dz))


def run_selector_eval(cases_dir: str | Path, with_variants: bool = False, bundle: str = "drlis_v1",
                      backend: str = "onnxruntime-cpu", out=print) -> list[SideBySide]:
    selector = DrlisSelector(bundle, backend)
    out(f"selector: {selector.name} on {selector.backend}; localiser: anatomical (no learned weights)")
    out(f"{'case':36s} {'slices':>6s} | {'agent':11s} {'level':5s} {'mm':>5s} {'in L1':>5s} {'agree':>5s} "
        f"{'steps':>5s} {'ms':>6s} | {'localiser':15s} {'level':5s} {'mm':>5s} {'in L1':>5s} {'ms':>6s} | service")
    rows: list[SideBySide] = []
    for name, v, lab, ref in eval_cases(cases_dir, with_variants, out):
        r = compare(name, v, lab, selector, ref)
        rows.append(r)
        f = dash_or
        out(f"{name:36s} {r.n_slices:6d} | {r.agent_status:11s} {r.agent_level or '-':5s} {f(r.agent_mm):>5s} "
            f"{f(r.agent_fraction, '{:.2f}'):>5s} {r.agent_confidence:5.2f} {r.agent_steps:5d} "
            f"{r.agent_ms:6.0f} | {r.localiser_status:15s} {r.localiser_level or '-':5s} "
            f"{f(r.localiser_mm):>5s} {f(r.localiser_fraction, '{:.2f}'):>5s} {r.localiser_ms:6.0f} | "
            f"{r.service_uses}")
    n = len(rows)

    def med(xs):
        xs = [x for x in xs if x is not None]
        return float(np.median(xs)) if xs else float("nan")
    a_ok = sum(r.agent_status == "correct" for r in rows) / n if n else 0.0
    l_ok = sum(r.localiser_status == "correct" for r in rows) / n if n else 0.0
    worst = max((r.agent_ms for r in rows), default=0.0)
    out(f"latency: agent median {med([r.agent_ms for r in rows]):.0f} ms, max {worst:.0f} ms (views + all agents' "
        f"steps, {selector.backend}); localiser median {med([r.localiser_ms for r in rows]):.0f} ms")
    out(f"selector eval: cases={n} agent_in_L1={a_ok:.2f} localiser_in_L1={l_ok:.2f} "
        f"agent_mm={med([r.agent_mm for r in rows]):.1f} localiser_mm={med([r.localiser_mm for r in rows]):.1f} "
        f"agent_body_mm={med([r.agent_body_mm for r in rows]):.1f} "
        f"localiser_body_mm={med([r.localiser_body_mm for r in rows]):.1f}")
    return rows
