"""The gymnasium environment a DRLIS agent is trained in: one CT volume, one agent on its z axis.

Actions move the agent by 2, 8 or 24 mm up or down (``ACTION_STEPS`` grid steps of 2 mm),
or stop. Rewards are shaped by the distance to the target, the middle of the L1 body:

- a move earns the reduction of the distance (per 10 mm), minus a small step cost;
- stopping inside the target zone (the middle 60% of L1's label extent, the imaging eval's
  definition of "inside L1") earns 2, plus up to 1 for a slice that the image teacher
  classifies as it does at mid-body, with high confidence ("representative for the
  downstream model");
- stopping elsewhere costs 1 plus up to 1 with the distance; running out of steps costs 1.

When L1 is not in view the target is the volume edge on L1's side: an agent that stops
there says "L1 is beyond this edge".
"""
from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from pipeline.drlis.views import AX_PX, CONTEXT_SIZE, GRID_MM, WINDOW, SelectorViews

ACTION_STEPS = (-12, -4, -1, 1, 4, 12)
STOP = len(ACTION_STEPS)
N_ACTIONS = STOP + 1
MAX_STEPS = 40
STEP_COST = 0.05


@dataclass(frozen=True)
class Target:
    """Where L1 lies on a volume's grid (from its labels)."""

    centre: float  # grid index of L1's label centre, or of the edge on L1's side when out of view
    zone: tuple[float, float]  # grid range that counts as success
    in_view: bool
    teacher_bonus: np.ndarray | None = None  # (G,) 0..1 per grid slice, inside the zone


def target_from_labels(labels: np.ndarray, views: SelectorViews, l1_label: int = 31,
                       edge_zone_mm: float = 6.0) -> Target:
    zs = np.nonzero((labels == l1_label).any(axis=(1, 2)))[0]
    if zs.size:
        lo, hi = views.to_grid(zs.min()), views.to_grid(zs.max())
        span = hi - lo
        return Target(0.5 * (lo + hi), (lo + 0.2 * span, hi - 0.2 * span), True)
    # L1 out of view: which side? The labels of the levels above L1 (T-spine) are higher numbers.
    present = [v for v in range(26, 34) if (labels == v).any()]
    above = bool(present) and min(present) > l1_label  # only thoracic levels in view: L1 is below (z index 0)
    edge_g = 0.0 if above else float(views.n - 1)
    w = edge_zone_mm / GRID_MM
    return Target(edge_g, (0.0, w) if above else (views.n - 1 - w, float(views.n - 1)), False)


def observation_space() -> spaces.Dict:
    return spaces.Dict({
        "profile": spaces.Box(-1.0, 3.0, (2, WINDOW, WINDOW), np.float32),
        "axial": spaces.Box(-1.0, 3.0, (3, AX_PX, AX_PX), np.float32),
        "context": spaces.Box(-1.0, 2.0, (CONTEXT_SIZE,), np.float32),
    })


def step_position(g: np.ndarray, action: np.ndarray, n: int) -> np.ndarray:
    move = np.asarray([ACTION_STEPS[a] if a != STOP else 0 for a in np.atleast_1d(action)])
    return np.clip(np.atleast_1d(g) + move, 0, n - 1)


def reward(g: int, g_new: int, action: int, target: Target) -> float:
    if action == STOP:
        if target.zone[0] <= g <= target.zone[1]:
            bonus = float(target.teacher_bonus[g]) if target.teacher_bonus is not None else 0.0
            return 2.0 + bonus
        return -1.0 - min(abs(g - target.centre) * GRID_MM, 60.0) / 60.0
    d0, d1 = abs(g - target.centre), abs(g_new - target.centre)
    return (d0 - d1) * GRID_MM / 10.0 - STEP_COST - (0.1 if g_new == g else 0.0)


class SliceSelectEnv(gym.Env):
    """One volume per episode, chosen from ``cases``; the agent starts at a random z."""

    metadata = {"render_modes": []}

    def __init__(self, cases: list[tuple[SelectorViews, Target]], seed: int | None = None) -> None:
        self.cases = cases
        self.observation_space = observation_space()
        self.action_space = spaces.Discrete(N_ACTIONS)
        self._rng = np.random.default_rng(seed)
        self.case_index = 0
        self.g = 0
        self.steps = 0

    def _obs(self) -> dict[str, np.ndarray]:
        views = self.cases[self.case_index][0]
        return {k: v[0] for k, v in views.states(np.array([self.g])).items()}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        self.case_index = int(self._rng.integers(len(self.cases)))
        self.g = int(self._rng.integers(self.cases[self.case_index][0].n))
        self.steps = 0
        return self._obs(), {"case": self.case_index}

    def step(self, action: int):
        views, target = self.cases[self.case_index]
        g_new = int(step_position(np.array([self.g]), np.array([action]), views.n)[0])
        r = reward(self.g, g_new, int(action), target)
        self.steps += 1
        terminated = action == STOP
        truncated = not terminated and self.steps >= MAX_STEPS
        if truncated:
            r -= 1.0
        self.g = g_new
        return self._obs(), r, terminated, truncated, {"g": self.g}
