"""Wall time per named stage of one screening job (job summary, `osteoscreen bench`)."""
from __future__ import annotations

import resource
import time
from contextlib import contextmanager
from typing import Iterator


class StageClock:
    """Accumulates seconds per stage; a stage entered twice adds up."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.seconds.items()}


def peak_rss_mb() -> float:
    """This process's own peak resident set size so far: VmHWM. (ru_maxrss would do, but Linux carries it over
    from the parent into a spawned child: a worker of a 300 MB service reported 315 MB against its own 15.)"""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)
