"""Calls larger than a backend's largest batch run in chunks of it, then the outputs are joined."""
from __future__ import annotations

from typing import Callable

import numpy as np

RunChunk = Callable[[list[str], dict[str, np.ndarray]], list[np.ndarray]]


def run_in_chunks(run_chunk: RunChunk, names: list[str], feeds: dict[str, np.ndarray],
                  max_batch: int) -> list[np.ndarray]:
    """``run_chunk`` on at most ``max_batch`` rows at a time (``max_batch`` <= 0: no limit)."""
    n = next(iter(feeds.values())).shape[0]
    if max_batch <= 0 or n <= max_batch:
        return run_chunk(names, feeds)
    parts = [run_chunk(names, {k: v[i:i + max_batch] for k, v in feeds.items()}) for i in range(0, n, max_batch)]
    return [np.concatenate([p[j] for p in parts]) for j in range(len(names))]
