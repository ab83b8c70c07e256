"""DRLIS inference: several agents, spread along z, stepped together, then a vote.

Every step batches all active agents' states into one engine call. An agent stops on its
stop action, after ``MAX_STEPS``, or when it revisits a position (an oscillation). The
answer is the median of the largest group of final positions within ``VOTE_MM`` of each
other; its confidence is the group's share of the agents. A consensus within
``EDGE_MM`` of a volume edge means "L1 is beyond this edge" (not found).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from pipeline.drlis.env import MAX_STEPS, STOP, step_position
from pipeline.drlis.views import GRID_MM, SelectorViews

N_AGENTS = 5
VOTE_MM = 8.0
EDGE_MM = 6.0

QFunction = Callable[[dict[str, np.ndarray]], np.ndarray]


@dataclass(frozen=True)
class AgentVote:
    grid_index: float  # consensus on the 2 mm grid
    native_index: int  # the same, as a slice index of the volume
    confidence: float  # share of agents in the winning group
    at_edge: str | None  # "inferior"/"superior" when the consensus lies at that edge: L1 not in view
    steps: int  # engine calls (all agents together)
    finals: tuple[int, ...]
    seconds: float

    @property
    def found(self) -> bool:
        return self.at_edge is None


def start_positions(n: int, n_agents: int = N_AGENTS) -> np.ndarray:
    return np.round((np.arange(n_agents) + 0.5) / n_agents * (n - 1)).astype(int)


def rollout(views: SelectorViews, q_fn: QFunction, n_agents: int = N_AGENTS,
            max_steps: int = MAX_STEPS) -> AgentVote:
    t0 = time.perf_counter()
    g = start_positions(views.n, n_agents)
    active = np.ones(n_agents, dtype=bool)
    seen = [{int(x)} for x in g]
    steps = 0
    while active.any() and steps < max_steps:
        idx = np.nonzero(active)[0]
        # Every agent's state, stopped ones too: one batch shape for the whole rollout, so GPU backends
        # reuse their kernels and buffers (ONNX Runtime CUDA re-plans on every new shape: 5x slower, measured).
        q = q_fn(views.states(g))[idx]
        actions = np.argmax(q, axis=1)
        steps += 1
        for j, a in zip(idx, actions):
            if a == STOP:
                active[j] = False
                continue
            g_new = int(step_position(g[j : j + 1], np.array([a]), views.n)[0])
            if g_new in seen[j]:  # oscillating between positions: settle where it is
                active[j] = False
            g[j] = g_new
            seen[j].add(g_new)
    return _vote(views, g, steps, time.perf_counter() - t0)


def _vote(views: SelectorViews, finals: np.ndarray, steps: int, seconds: float) -> AgentVote:
    radius = VOTE_MM / GRID_MM
    counts = [(np.abs(finals - f) <= radius).sum() for f in finals]
    best = int(np.argmax(counts))
    members = finals[np.abs(finals - finals[best]) <= radius]
    consensus = float(np.median(members))
    edge = EDGE_MM / GRID_MM
    at_edge = "inferior" if consensus <= edge else "superior" if consensus >= views.n - 1 - edge else None
    native = int(round(min(views.to_native(consensus), views.n_native - 1)))
    return AgentVote(consensus, native, len(members) / len(finals), at_edge, steps,
                     tuple(int(x) for x in finals), seconds)
