"""What a DRLIS agent sees: per-volume views on a 2 mm z grid, and the state at a grid position.

All views are computed once per volume, so an agent step is a few array slices:

- ``sag``: a thin (+-3 mm) mid-sagittal reformat through the spinal canal, 32 samples of
  4 mm across (centred on the body's posterior wall: body in front, arch behind);
- ``cor``: a coronal maximum projection of the band from mid-body to 25 mm behind the
  canal (transverse processes, rib heads), 32 samples of 6 mm across;
- ``ax``: the axial slice around the vertebral body, 32 x 32 pixels of 3 mm;
- ``prior``: the anatomical localiser's per-slice level probabilities.

The state at grid index i is a window of +-64 mm (every 4 mm) of ``sag``/``cor``/``prior``
(the 2.5D context and where the agent is in the body), and ``ax`` at i-2, i, i+2 (the
current slice and its neighbours +-4 mm). Samples outside the volume read as air and are
marked in the prior's "outside" column.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from pipeline.localiser import PRIOR_COLUMNS, Localisation, level_probabilities
from pipeline.volume import Volume

GRID_MM = 2.0
WINDOW = 32  # samples in the z window
WINDOW_STEP = 2  # grid steps between window samples (4 mm)
AX_PX = 32
AX_MM = 3.0
SAG_MM = 4.0
COR_MM = 6.0
AX_NEIGHBOUR = 2  # grid steps (4 mm)
PRIOR_WIDTH = len(PRIOR_COLUMNS) + 1  # + "outside the volume"
POSITION_FEATURES = 3
HU_LO, HU_HI, HU_SCALE = -200.0, 1200.0, 500.0
PAD_VALUE = HU_LO / HU_SCALE


def _norm(hu: np.ndarray) -> np.ndarray:
    return (np.clip(hu, HU_LO, HU_HI) / HU_SCALE).astype(np.float32)


def spine_track(vol: Volume, loc: Localisation) -> np.ndarray:
    """Per native slice: (posterior wall row, body centre row, canal column), NaNs filled."""
    box = loc.body_box_rc
    n = vol.shape[0]
    if box.shape[0] == n and np.isfinite(box).any():
        ya, yp, c0, c1 = (box[:, i].astype(float) for i in range(4))
        cx = 0.5 * (c0 + c1)
        mid = 0.5 * (ya + yp)
        out = np.stack([yp, mid, cx], axis=1)
    else:  # no spinal column tracked: the body's centre column, two thirds of the way back
        sl = vol.hu[n // 2] > -400
        rows, cols = np.nonzero(sl) if sl.any() else (np.array([vol.shape[1] / 2]), np.array([vol.shape[2] / 2]))
        r = rows.min() + 0.66 * (rows.max() - rows.min())
        out = np.tile([r + 15.0 / vol.spacing[1], r, np.median(cols)], (n, 1)).astype(float)
    for j in range(3):
        a = out[:, j]
        ok = np.isfinite(a)
        a[~ok] = np.interp(np.nonzero(~ok)[0], np.nonzero(ok)[0], a[ok]) if ok.any() else vol.shape[1 + (j == 2)] / 2
        out[:, j] = ndi.median_filter(a, size=5, mode="nearest")
    return out


@dataclass(frozen=True)
class SelectorViews:
    sag: np.ndarray  # (G, 32)
    cor: np.ndarray  # (G, 32)
    ax: np.ndarray  # (G, 32, 32)
    prior: np.ndarray  # (G, 6)
    native_dz: float
    n_native: int

    @property
    def n(self) -> int:
        return self.sag.shape[0]

    def to_native(self, g: float) -> float:
        """Grid index -> native slice index."""
        return g * GRID_MM / self.native_dz

    def to_grid(self, k: float) -> float:
        return k * self.native_dz / GRID_MM

    def states(self, g: np.ndarray) -> dict[str, np.ndarray]:
        """Batched states at grid indices ``g``: ``profile`` (B,2,32,32), ``axial`` (B,3,32,32), ``context`` (B,...)."""
        g = np.asarray(g, dtype=int)
        offs = (np.arange(WINDOW) - WINDOW // 2) * WINDOW_STEP
        idx = g[:, None] + offs[None, :]
        inside = (idx >= 0) & (idx < self.n)
        ci = np.clip(idx, 0, self.n - 1)
        sag = np.where(inside[..., None], self.sag[ci], PAD_VALUE)
        cor = np.where(inside[..., None], self.cor[ci], PAD_VALUE)
        prior = np.where(inside[..., None], self.prior[ci], 0.0)
        prior = np.concatenate([prior, (~inside)[..., None].astype(np.float32)], axis=2)
        axi = [np.clip(g + d, 0, self.n - 1) for d in (-AX_NEIGHBOUR, 0, AX_NEIGHBOUR)]
        axial = np.stack([self.ax[a] for a in axi], axis=1)
        # No absolute position: with one or two training patients it is a cue to memorise, not to learn from.
        pos = np.zeros((len(g), POSITION_FEATURES))
        context = np.concatenate([prior.reshape(len(g), -1), pos], axis=1)
        return {
            "profile": np.stack([sag, cor], axis=1).astype(np.float32),
            "axial": axial.astype(np.float32),
            "context": context.astype(np.float32),
        }


CONTEXT_SIZE = WINDOW * PRIOR_WIDTH + POSITION_FEATURES


def build_views(vol: Volume, loc: Localisation) -> SelectorViews:
    """Precompute the views of one volume (bounded memory: one native slice at a time)."""
    n, rows, cols = vol.shape
    dz, dr, dc = vol.spacing
    track = spine_track(vol, loc)
    half = (AX_PX - 1) / 2.0
    g_ax = (np.arange(AX_PX) - half) * AX_MM
    g_sag = (np.arange(WINDOW) - half) * SAG_MM
    g_cor = (np.arange(WINDOW) - half) * COR_MM
    sag = np.empty((n, WINDOW), np.float32)
    cor = np.empty((n, WINDOW), np.float32)
    ax = np.empty((n, AX_PX, AX_PX), np.float32)
    sag_half_cols = max(1, int(round(3.0 / dc)))
    for k in range(n):
        yp, mid, cx = track[k]
        sl = vol.hu[k]
        # axial patch: bilinear samples on a 3 mm grid around the body
        rr = mid + g_ax[:, None] / dr + 0 * g_ax[None, :]
        cc = cx + g_ax[None, :] / dc + 0 * g_ax[:, None]
        ax[k] = _norm(ndi.map_coordinates(sl, [rr, cc], order=1, mode="constant", cval=-1000, output=np.float32))
        c0, c1 = int(round(cx)) - sag_half_cols, int(round(cx)) + sag_half_cols + 1
        line = sl[:, max(c0, 0) : max(c1, 1)].mean(axis=1) if c1 > 0 and c0 < cols else np.full(rows, -1000.0)
        sag[k] = _norm(np.interp(yp + g_sag / dr, np.arange(rows), line, left=-1000, right=-1000))
        r0 = int(max(0, round(mid)))
        r1 = int(min(rows, round(yp + 25.0 / dr) + 1))
        band = sl[r0:r1].max(axis=0) if r1 > r0 else np.full(cols, -1000.0)
        cor[k] = _norm(np.interp(cx + g_cor / dc, np.arange(cols), band, left=-1000, right=-1000))
    prior = level_probabilities(loc, n, dz).astype(np.float32)
    # resample every view to the 2 mm grid (linear in z)
    g_n = max(1, int(np.floor((n - 1) * dz / GRID_MM)) + 1)
    zk = np.arange(g_n) * GRID_MM / dz
    lo = np.clip(np.floor(zk).astype(int), 0, n - 1)
    hi = np.minimum(lo + 1, n - 1)
    w = (zk - lo).astype(np.float32)

    def rs(a: np.ndarray) -> np.ndarray:
        ww = w.reshape((-1,) + (1,) * (a.ndim - 1))
        return (a[lo] * (1 - ww) + a[hi] * ww).astype(np.float32)

    return SelectorViews(rs(sag), rs(cor), rs(ax), rs(prior), dz, n)
