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


class GradCamNet(nn.Module):
    """Convolutional features -> global average pool -> one linear logit, returning the logit and its Grad-CAM.

    With this head Grad-CAM is exact in the forward pass: d logit / d A_k(i,j) = w_k / (h w) for every
    position, so the Grad-CAM channel weights are w_k / (h w) and the map is sum_k w_k A_k / (h w)
    (tests/test_cropkd.py checks it against autograd). A screening logit moves both ways (dense bone is
    evidence against osteoporosis), so the attention is the map's magnitude, normalised to sum 1 over the
    grid: where the evidence came from, whichever way it pointed.
    """

    def __init__(self, features: nn.Module, width: int) -> None:
        super().__init__()
        self.features = features
        self.out = nn.Linear(width, 1)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.features(image)
        logit = self.out(a.mean(dim=(2, 3)))
        cam = nn.functional.conv2d(a, self.out.weight.view(1, -1, 1, 1)).squeeze(1) / (a.shape[2] * a.shape[3])
        att = cam.abs()
        return logit, att / (att.sum(dim=(1, 2), keepdim=True) + 1e-12)


def crop_teacher() -> GradCamNet:
    """Teacher on a tight 32 x 32 crop of the L1 body; attention on an 8 x 8 grid (6 mm cells at 1.5 mm)."""
    return GradCamNet(nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, EMBED, 3, padding=1), nn.ReLU()), EMBED)


def full_slice_student() -> GradCamNet:
    """Student on the whole 96 x 96 slice (4 mm); attention on a 24 x 24 grid (16 mm cells).

    Narrow early layers: it trains at about 1 ms per slice on two CPU cores."""
    return GradCamNet(nn.Sequential(
        nn.Conv2d(3, 8, 5, stride=2, padding=2), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 48, 3, padding=1), nn.ReLU()), 48)


class WaveletAttention(nn.Module):
    """Attention over image regions described by gradient-wavelet energies: (N, R, F) -> (N, width), weights (N, R)."""

    def __init__(self, n_features: int, width: int = 32) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(n_features, width), nn.GELU(), nn.Linear(width, width), nn.GELU())
        self.score = nn.Linear(width, 1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(features)
        w = torch.softmax(self.score(h).squeeze(-1), dim=1)
        return (w.unsqueeze(-1) * h).sum(dim=1), w


class XrayNet(nn.Module):
    """Chest radiograph image model: the CT image encoder (transfer learning) + gradient-wavelet attention.

    Inputs: image (N, 3, 64, 64), wavelet (N, 16, 10) raw log-energies (standardised here with the training
    split's mean and SD, stored as buffers so the exported graph carries them). Outputs: logit (N, 1) and
    region_attention (N, 16), the weight of each region of the 4 x 4 grid. Training starts from the shipped
    CT image encoder's weights, keeps its first two convolution blocks (``STEM`` layers) frozen and fine-tunes
    the rest (``head``), so the stem's output can be computed once per image.
    """

    STEM = 6  # ImageEncoder.net[:6]: conv-relu-pool x 2

    def __init__(self, n_features: int = 10) -> None:
        super().__init__()
        self.encoder = ImageEncoder()
        self.register_buffer("wavelet_mean", torch.zeros(n_features))
        self.register_buffer("wavelet_std", torch.ones(n_features))
        self.wavelet = WaveletAttention(n_features)
        self.out = nn.Sequential(nn.Linear(EMBED + 32, 32), nn.GELU(), nn.Linear(32, 1))

    def forward(self, image: torch.Tensor, wavelet: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.encoder.net[: self.STEM](image), wavelet)

    def head(self, stem: torch.Tensor, wavelet: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, weights = self.wavelet((wavelet - self.wavelet_mean) / self.wavelet_std)
        return self.out(torch.cat([self.encoder.net[self.STEM :](stem), pooled], dim=1)), weights
