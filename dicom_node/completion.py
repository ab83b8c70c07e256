"""Series completion: a quiet-period timer per series, restarted by every new instance."""
from __future__ import annotations

import datetime as dt
import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

log = logging.getLogger("osteoscreen.completion")


@dataclass(frozen=True)
class SeriesReady:
    """A series that has been quiet for the configured period."""

    series_uid: str
    quiet_s: float
    ready_at: dt.datetime


class SeriesCompletion:
    def __init__(self, quiet_s: float, on_ready: Callable[[SeriesReady], None]) -> None:
        self.quiet_s = quiet_s
        self.on_ready = on_ready
        self._scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(2)},
            job_defaults={"misfire_grace_time": None, "coalesce": True, "max_instances": 1},
        )
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}  # series -> monotonic time of its latest instance
        self._armed: set[str] = set()  # series with a timer in the scheduler
        self._timer_ids = itertools.count()

    def start(self) -> None:
        self._scheduler.start()

    def stop(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)

    def touch(self, series_uid: str) -> None:
        """(Re)start the quiet period of ``series_uid``.

        Called for every instance, so it only records the time; the scheduler
        holds one timer per series, which re-arms itself for the remainder when
        it fires early (rescheduling an APScheduler job per instance cost more
        than the C-STORE it followed).
        """
        with self._lock:
            self._last[series_uid] = time.monotonic()
            if series_uid in self._armed:
                return
            self._armed.add(series_uid)
        self._arm(series_uid, self.quiet_s)

    def _arm(self, series_uid: str, delay_s: float) -> None:
        when = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=delay_s)
        # A new id for every timer: re-using the series UID let a timer armed while the previous one still ran
        # (an instance during on_ready) be skipped by APScheduler (max_instances) and dropped, the series still
        # marked armed, so it was never decided. ``_armed`` keeps it to one timer per series.
        self._scheduler.add_job(self._fire, "date", run_date=when, args=[series_uid],
                                id=f"{series_uid}#{next(self._timer_ids)}")

    def _fire(self, series_uid: str) -> None:
        with self._lock:
            remaining = self._last.get(series_uid, 0.0) + self.quiet_s - time.monotonic()
            if remaining > 0.005:
                rearm = True
            else:
                rearm = False
                self._armed.discard(series_uid)
                self._last.pop(series_uid, None)
        if rearm:
            self._arm(series_uid, remaining)
            return
        try:
            self.on_ready(SeriesReady(series_uid, self.quiet_s, dt.datetime.now(dt.timezone.utc)))
        except Exception:  # noqa: BLE001 - a locked database during a backup, say: tried again, not left undecided
            log.exception("handling completed series %s failed; trying again after the quiet period", series_uid)
            self.touch(series_uid)
