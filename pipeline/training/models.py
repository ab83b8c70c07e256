"""PyTorch networks: tabular and image teachers, and the multimodal student (KDAMM-style).

The student is exported as two ONNX graphs so SHAP can re-run the cheap part:
- image_encoder: patch (N,3,32,32) -> embedding (N,64)
- head: embedding, image_present (N,1), tab_values (N,F), tab_mask (N,F) -> logit (N,1)
"""
from __future__ import annotations

import torch
from torch import nn

EMBED = 64


class TabularEncoder(nn.Module):
    """Values and their missing-value mask in, embedding out (missing values are 0 after scaling)."""

    def __init__(self, n_features: int, width: int = EMBED) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * n_features, width), nn.GELU(), nn.Linear(width, width), nn.GELU())

    def forward(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([values * mask, mask], dim=1))


class ImageEncoder(nn.Module):
    def __init__(self, width: int = EMBED) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image)


class TabularTeacher(nn.Module):
    def __init__(self, n_features: int) -> None:
        super().__init__()
        self.enc = TabularEncoder(n_features)
        self.out = nn.Linear(EMBED, 1)

    def forward(self, values, mask):
        return self.out(self.enc(values, mask))


class ImageTeacher(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = ImageEncoder()
        self.out = nn.Linear(EMBED, 1)

    def forward(self, image):
        return self.out(self.enc(image))


class StudentHead(nn.Module):
    """Attention fusion over the modalities present, then a small classifier.

    Absent modalities get a score of -1e4 before the softmax, so they carry no
    weight; the tabular modality is present when any tabular feature is.
    """

    def __init__(self, n_features: int) -> None:
        super().__init__()
        self.tab = TabularEncoder(n_features)
        self.img_proj = nn.Sequential(nn.Linear(EMBED, EMBED), nn.GELU())
        self.score = nn.Sequential(nn.Linear(EMBED, 32), nn.Tanh(), nn.Linear(32, 1))
        self.modality = nn.Parameter(torch.zeros(2, EMBED))
        self.out = nn.Sequential(nn.Linear(EMBED, EMBED), nn.GELU(), nn.Linear(EMBED, 1))

    def forward(self, embedding, image_present, tab_values, tab_mask):
        h_img = self.img_proj(embedding) + self.modality[0]
        h_tab = self.tab(tab_values, tab_mask) + self.modality[1]
        tab_present = (tab_mask.sum(dim=1, keepdim=True) > 0).to(tab_mask.dtype)
        h = torch.stack([h_img, h_tab], dim=1)  # (N, 2, E)
        present = torch.cat([image_present, tab_present], dim=1)  # (N, 2)
        s = self.score(h).squeeze(-1) + (present - 1.0) * 1e4
        w = torch.softmax(s, dim=1).unsqueeze(-1)
        return self.out((w * h).sum(dim=1))


class Student(nn.Module):
    def __init__(self, n_features: int) -> None:
        super().__init__()
        self.image_encoder = ImageEncoder()
        self.head = StudentHead(n_features)

    def forward(self, image, image_present, tab_values, tab_mask):
        return self.head(self.image_encoder(image), image_present, tab_values, tab_mask)
