"""Persistent screening jobs run in a worker process pool, so model work never stalls ingest."""
from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable

from dicom_node.db import JobRow, NodeDB
from dicom_node.logfmt import configure, current_target, job_context
from dicom_node.metrics import JOBS_FINISHED
from hl7.parse_worker import exit_when_orphaned, ignore_sigterm
from hl7.privacy import redact_values
from pipeline.job import JobRequest, ScreeningResult, run_screening

log = logging.getLogger("osteoscreen.jobs")


def _worker_init(level: int, logfile: str | None, fmt: str = "text", warm_model: tuple[str, ...] | None = None,
                 parent: int | None = None, engine_options=None) -> None:
    ignore_sigterm()  # the service stops its workers itself (KillMode=mixed): a job is requeued, not failed
    if parent is not None:
        exit_when_orphaned(parent)
    configure(level, fmt, filename=logfile, role="worker")
    if engine_options is not None:
        import engines

        engines.configure(engine_options)
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    if warm_model:  # load the model sessions now, not during the first study's latency
        from engines.bundle import load_bundle
        from pipeline.job import fused_model, slice_selector

        try:
            fused_model(load_bundle(warm_model[0]), warm_model[1], *warm_model[3:4])
            slice_selector(warm_model[2], warm_model[1])
        except Exception:  # noqa: BLE001 - the job itself reports a broken bundle with its reason
            logging.getLogger("osteoscreen.jobs").exception("worker warm-up failed")
    logging.getLogger("osteoscreen.jobs").info("worker ready (pid %d)", os.getpid())


def _worker_ready() -> int:
    return 0


def _screen_in_context(req):
    """Run one job in a worker with its job ID and patient key on every log line."""
    with job_context(req.job_id, req.patient_key):
        t0 = time.monotonic()
        log.info("worker %d: screening series %s (%d instances)", os.getpid(), req.series_uid, len(req.instance_paths))
        result = run_screening(req)
        log.info("worker %d: %s in %.1f s%s", os.getpid(), result.status, time.monotonic() - t0,
                 f" ({result.reason})" if result.reason else "")
        return result


class JobRunner:
    def __init__(self, db: NodeDB, *, workers: int, max_attempts: int, retry_delay_s: float,
                 build_request: Callable[[JobRow], JobRequest],
                 on_result: Callable[[JobRow, ScreeningResult], None],
                 warm_model: tuple[str, ...] | None = None, timeout_s: float = 600.0,
                 engine_options=None) -> None:
        self.db = db
        self.engine_options = engine_options  # engines.EngineOptions for every worker ([engines])
        self.timeout_s = timeout_s
        self.warm_model = warm_model
        self.workers = workers
        self.max_attempts = max_attempts
        self.retry_delay_s = retry_delay_s
        self.build_request = build_request
        self.on_result = on_result
        self._pool: ProcessPoolExecutor | None = None
        self._running: dict[int, Future] = {}
        self._started: dict[int, float] = {}  # job id -> monotonic start, for the time limit
        self._pool_of: dict[int, ProcessPoolExecutor] = {}  # job id -> the pool it runs on
        self._timed_out: set[int] = set()
        self._collateral: dict[int, str] = {}  # job id -> why its pool was stopped under it (another job overran)
        # a pool whose worker died: the jobs it was running then (id(pool) -> job ids), and how often each job was
        # in such a shared death (the one that killed it cannot be told from the others)
        self._broken_with: dict[int, set[int]] = {}
        self._shared_deaths: dict[int, int] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="job-dispatcher", daemon=True)
        self._lock = threading.Lock()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_worker_init, initargs=(*current_target(), self.warm_model, os.getpid(),
                                             self.engine_options))

    def start(self) -> None:
        self._pool = self._new_pool()
        for _ in range(self.workers):  # start (and warm) the worker processes now, not at the first study
            self._pool.submit(_worker_ready)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():  # never started when the node's start failed before it
            self._thread.join(timeout=10)
        if self._pool:
            # Jobs still running are queued again without counting the attempt (a stop is not their fault) and
            # resumed at the next start. Their workers are killed, not waited for: a job can run for up to
            # timeout_s, past systemd's stop timeout.
            with self._lock:
                running = list(self._running)
            for job_id in running:
                try:
                    self.db.return_job(job_id, "the node was stopped while it ran")
                except Exception:  # noqa: BLE001 - stays 'running': resumed (and counted) at the next start
                    log.exception("job %d could not be queued again at the stop", job_id)
            self._kill_workers(self._pool)  # before shutdown(), which forgets the processes
            self._pool.shutdown(wait=False, cancel_futures=True)

    @staticmethod
    def _kill_workers(pool: ProcessPoolExecutor) -> None:
        for proc in list((getattr(pool, "_processes", None) or {}).values()):  # no public API to kill a task
            try:
                proc.kill()
            except (OSError, ValueError):  # already gone, or already closed by the pool
                pass

    def alive(self) -> bool:
        return self._thread.is_alive()

    def busy(self) -> int:
        with self._lock:
            return len(self._running)

    def _enforce_time_limit(self) -> None:
        """A job past ``timeout_s`` (a decoder or model that hangs) is stopped by killing its worker pool.

        A process pool cannot cancel one running task, so the pool's processes are
        killed and a new pool is started; the overdue job fails with the reason
        (retried as configured); the others that shared the pool go back to the queue
        with no attempt counted, since they did nothing wrong.
        """
        now = time.monotonic()
        with self._lock:
            overdue = [j for j, t in self._started.items() if now - t > self.timeout_s and j not in self._timed_out]
            if not overdue:
                return
            pool = self._pool_of.get(overdue[0])
            culprits = [j for j in overdue if self._pool_of.get(j) is pool]
            self._timed_out.update(culprits)
            for j, p in self._pool_of.items():
                if p is pool and j not in culprits:
                    self._collateral[j] = (f"its worker pool was stopped because job(s) "
                                           f"{', '.join(map(str, culprits))} overran the time limit")
        log.error("job(s) %s exceeded the %g s time limit: stopping their worker process(es)",
                  ", ".join(map(str, overdue)), self.timeout_s)
        if pool is not None:
            self._kill_workers(pool)
            if pool is self._pool and not self._stop.is_set():
                self._pool = self._new_pool()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                timeout = self._dispatch_due()
            except Exception:  # noqa: BLE001 - the dispatcher must outlive any one failure, or screening stops
                log.exception("job dispatch failed; trying again in 1 s")
                timeout = 1.0
            self._wake.wait(timeout)
            self._wake.clear()

    def _dispatch_due(self) -> float:
        """Start due jobs while workers are free; seconds until the dispatcher should look again."""
        self._enforce_time_limit()
        while self.busy() < self.workers and not self._stop.is_set():
            job = self.db.claim_job()
            if job is None:
                break
            self._submit(job)
        due = self.db.next_job_due()
        timeout = 1.0 if due is None else max(0.05, min(1.0, due - time.time()))
        if self.busy():  # check the time limit of running jobs often
            timeout = min(timeout, 0.25)
        return timeout

    def _submit(self, job: JobRow) -> None:
        try:
            req = self.build_request(job)
        except Exception as exc:  # noqa: BLE001
            log.exception("job %d: cannot prepare", job.id)
            self._failed(job, f"cannot prepare job: {exc}")
            return
        with job_context(job.id, req.patient_key):
            log.info("job %d (series %s) started, attempt %d", job.id, job.series_uid, job.attempts)
        assert self._pool is not None
        try:
            fut = self._pool.submit(_screen_in_context, req)
        except BrokenProcessPool:
            self._pool = self._new_pool()
            fut = self._pool.submit(_screen_in_context, req)
        with self._lock:
            self._running[job.id] = fut
            self._started[job.id] = time.monotonic()
            self._pool_of[job.id] = self._pool
        fut.add_done_callback(lambda f, job=job: self._done(job, f))

    def _done(self, job: JobRow, fut: Future) -> None:
        with self._lock:
            self._running.pop(job.id, None)
            self._started.pop(job.id, None)
            pool = self._pool_of.pop(job.id, None)
            peers = {j for j, p in self._pool_of.items() if p is pool and pool is not None}
            timed_out = job.id in self._timed_out
            self._timed_out.discard(job.id)
            collateral = self._collateral.pop(job.id, None)
        if fut.cancelled():
            return
        try:
            result = fut.result()
        except BrokenProcessPool:
            if self._stop.is_set():
                log.info("job %d interrupted by the shutdown; it is resumed at the next start", job.id)
                return
            if collateral is not None and not timed_out:
                log.warning("job %d: %s; queued again, no attempt counted", job.id, collateral)
                try:
                    self.db.return_job(job.id, collateral)
                except Exception:  # noqa: BLE001 - stays 'running': resumed at the next start
                    log.exception("job %d could not be queued again; it is resumed at the next start", job.id)
                self._wake.set()
                return
            if timed_out:
                self._failed(job, f"stopped after the {self.timeout_s:g} s time limit ([jobs] timeout_s)")
            else:
                log.error("job %d: worker process died", job.id)
                if pool is self._pool and not self._stop.is_set():
                    self._pool = self._new_pool()
                if self._bystander(job, pool, peers):
                    self._wake.set()
                    return
                self._failed(job, "worker process died")
        except Exception as exc:  # noqa: BLE001
            log.error("job %d failed: %s: %s", job.id, type(exc).__name__, redact_values(str(exc)))
            self._failed(job, f"{type(exc).__name__}: {exc}")
        else:
            try:
                self.on_result(job, result)
            except Exception as exc:  # noqa: BLE001
                log.exception("job %d: recording the result failed", job.id)
                self._failed(job, f"recording result failed: {exc}")
        self._wake.set()

    def _bystander(self, job: JobRow, pool, peers: set[int]) -> bool:
        """A worker died while several jobs shared the pool: which one killed it (the OOM killer's choice, say)
        cannot be told, so each is queued again without counting the attempt, once; a job in a second such death
        is charged as usual (a study that keeps killing its worker still runs out of attempts)."""
        with self._lock:
            group = self._broken_with.setdefault(id(pool), set())
            group.update(peers | {job.id})
            if len(group) < 2 or self._shared_deaths.get(job.id, 0) >= 1:
                return False
            self._shared_deaths[job.id] = self._shared_deaths.get(job.id, 0) + 1
        reason = (f"a worker process died while {len(group)} jobs shared the pool (jobs {sorted(group)}); which one "
                  "caused it is unknown")
        log.warning("job %d: %s: queued again, no attempt counted", job.id, reason)
        try:
            return self.db.return_job(job.id, reason)
        except Exception:  # noqa: BLE001 - stays 'running': resumed at the next start
            log.exception("job %d could not be queued again; it is resumed at the next start", job.id)
            return True

    def _failed(self, job: JobRow, error: str) -> None:
        try:
            self._record_failure(job, error)
        except Exception:  # noqa: BLE001 - e.g. the database is unavailable: the job stays 'running'
            log.exception("job %d: its failure could not be recorded; it is resumed at the next start", job.id)

    def _record_failure(self, job: JobRow, error: str) -> None:
        retry_at = time.time() + self.retry_delay_s if job.attempts < self.max_attempts else None
        if not self.db.fail_job(job.id, error, retry_at):
            log.error("job %d is no longer running (its result was recorded, or it was cancelled); its state stays: %s",
                      job.id, error)
            return
        if retry_at is not None:
            log.warning("job %d will be retried in %.0f s (attempt %d of %d): %s", job.id, self.retry_delay_s,
                        job.attempts, self.max_attempts, error)
        else:
            log.error("job %d failed after %d attempts: %s", job.id, job.attempts, error)
        JOBS_FINISHED.labels("retry" if retry_at is not None else "failed").inc()
