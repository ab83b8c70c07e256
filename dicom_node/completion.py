"""Series completion: a quiet-period timer per series, restarted by every new instance."""
from __future__ import annotations

import datetime as dt
import logging
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

    def start(self) -> None:
        self._scheduler.start()

    def stop(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)

    def touch(self, series_uid: str) -> None:
        """(Re)start the quiet period of ``series_uid``."""
        when = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=self.quiet_s)
        self._scheduler.add_job(self._fire, "date", run_date=when, args=[series_uid], id=series_uid,
                                replace_existing=True)

    def _fire(self, series_uid: str) -> None:
        try:
            self.on_ready(SeriesReady(series_uid, self.quiet_s, dt.datetime.now(dt.timezone.utc)))
        except Exception:  # noqa: BLE001 - logged; the series stays 'receiving' and is re-armed at restart
            log.exception("handling completed series %s failed", series_uid)
