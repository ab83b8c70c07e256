"""The DRLIS Q-network: small, dueling, three inputs (2.5D profile window, axial slices, context)."""
from __future__ import annotations

import torch
from torch import nn

from pipeline.drlis.env import N_ACTIONS
from pipeline.drlis.views import CONTEXT_SIZE

INPUT_NAMES = ("profile", "axial", "context")
OUTPUT_NAMES = ("q",)


def _stem(channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
    )


class QNet(nn.Module):
    """Q(s, a) = V(s) + A(s, a) - mean_a A(s, a) (dueling)."""

    def __init__(self) -> None:
        super().__init__()
        self.profile = _stem(2)
        self.axial = _stem(3)
        self.context = nn.Sequential(nn.Linear(CONTEXT_SIZE, 64), nn.ReLU())
        self.trunk = nn.Sequential(nn.Linear(192, 128), nn.ReLU())
        self.value = nn.Linear(128, 1)
        self.advantage = nn.Linear(128, N_ACTIONS)

    def forward(self, profile: torch.Tensor, axial: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.trunk(torch.cat([self.profile(profile), self.axial(axial), self.context(context)], dim=1))
        a = self.advantage(h)
        return self.value(h) + a - a.mean(dim=1, keepdim=True)
