"""The one place that wires the node together: SCP, completion, routing, labs, jobs, export."""
from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import signal
import threading
from pathlib import Path

from pydicom.uid import generate_uid

from config import ConfigError
from config.schema import Settings
from dicom_node import __version__
from dicom_node.completion import SeriesCompletion, SeriesReady
from dicom_node.db import JobRow, NodeDB, ReportRow, SeriesChanged
from dicom_node.engines_cli import check_configured_bundles
from dicom_node.export import HL7_PREFIX, HL7_SOP_CLASS, Exporter
from dicom_node.jobs import JobRunner
from dicom_node.logfmt import current_target, job_context
from dicom_node.metrics import (
    INFERENCE_SECONDS,
    JOB_STAGE_SECONDS,
    JOBS_FINISHED,
    SERIES_COMPLETED,
    SERIES_ROUTED,
    NodeStateCollector,
)
from dicom_node.metrics import serve as serve_metrics
from dicom_node.metrics import unregister as unregister_metrics
from dicom_node.retention import RetentionScheduler
from dicom_node.routing import Decision, UnreadableSeries, decide, series_facts
from dicom_node.index_recovery import boot_id, check_store_at_start, clear_store_check, requested_store_check
from dicom_node.receiver_pool import ReceiverPool, ReceiverSetup
from dicom_node.scp import StorageSCP, count_outcome
from dicom_node.store import InstanceRef, InstanceStore
from dicom_node.worklist import WorklistScheduler
import engines
from engines.bundle import BundleError, resolve_bundle_path
from engines.runtime import load_graph
from hl7.lookup import lookup_labs
from hl7.mapping import load_mapping
from hl7.mllp import MLLPServer
from hl7.panel import LabPanel
from hl7.privacy import configure as configure_patient_key
from hl7.privacy import patient_key
from hl7.parse_worker import BackgroundParser
from hl7.query import LabQueryClient
from hl7.receiver import LabReceiver, low_space_check
from hl7.result_message import ScreeningReport, build_result_message
from hl7.store import LabStore
from hl7.tls import client_context, server_context
from pipeline.demographics import study_date
from pipeline.durable import sweep_temporaries, write_durably
from pipeline.fused import lab_unit_problems
from pipeline.features import FEATURES
from pipeline.job import JobRequest, ScreeningResult
from pipeline.report.notice import SHORT_DISCLAIMER
from pipeline.report.sr import NodeIdentity

log = logging.getLogger("osteoscreen.service")
MODEL_LAB_CODES = tuple(f.loinc for f in FEATURES if f.group == "labs")  # the labs the fused model uses


def engine_options(s: Settings) -> engines.EngineOptions:
    """``[engines]`` as the engines package takes it (the cache defaults to the state directory)."""
    e = s.engines
    return engines.EngineOptions(
        threads=e.threads, precision=e.precision,
        cache_dir=Path(e.cache_dir) if e.cache_dir else Path(s.node.state_dir) / "engine-cache",
        graph_optimization=e.graph_optimization, opt_batch=e.opt_batch, max_batch=e.max_batch,
        triton_url=e.triton_url, triton_protocol=e.triton_protocol, triton_timeout_s=e.triton_timeout_s)


def lock_state_dir(state_dir: Path) -> int:
    """Hold an exclusive lock on ``state_dir`` for the life of this process (released by the kernel when it
    ends, however it ends). A second node on the same state, started by hand to debug say, would requeue the
    running node's jobs and delete its instance files in flight before failing on the port."""
    from dicom_node.state_lock import StateDirBusy, acquire

    try:
        fd = acquire(state_dir)
    except StateDirBusy as exc:
        raise RuntimeError(f"another osteoscreen (pid {exc.holder}) is using the state directory {state_dir}: stop "
                           "it first (systemctl stop osteoscreen), or give this one its own [node] state_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def check_writable(directory: Path, key: str) -> None:
    """Fail at start, naming the setting, when a directory the node writes to later is not writable (a
    read-only mount, or outside systemd's ReadWritePaths=), instead of failing at the first scheduled write."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise RuntimeError(f"{key} = {directory}: not writable ({exc.strerror}); fix the mount or permissions, or "
                           "under systemd add it to ReadWritePaths= in a drop-in") from None


def check_models(s: Settings) -> str:
    """The configured bundles exist and load on the configured backend: checked at start and before a reload
    is applied, not at the first job. A forced backend that cannot run here is an error with the reason (never
    a silent fallback); the workers then load their own sessions (TensorRT plans come from the cache)."""
    problems = check_configured_bundles(s) + lab_unit_problems(load_mapping(s.labs.mapping_file))
    if problems:
        raise BundleError("; ".join(problems))
    from dicom_node.engines_cli import configured_bundles
    from engines.bundle import verify_bundle_files

    # every file the card lists is checked against its SHA-256, and every network of every configured bundle (the
    # fused model's image encoder as well as its head) is loaded on the configured backend
    used: set[str] = set()
    for bundle in configured_bundles(s):
        verify_bundle_files(bundle)
        graphs = sorted(resolve_bundle_path(bundle).glob("*.onnx"))
        if not graphs:
            raise BundleError(f"model bundle {bundle!r} holds no ONNX network: reinstall the bundle or rerun the "
                              "training that wrote it")
        for onnx_path in graphs:
            engine = load_graph(onnx_path, s.screening.backend)
            used.add(engine.backend)
            engine.close()
    return ", ".join(sorted(used))  # what `auto` resolved to here (the workers resolve the same way)


# What a reload applies (SIGHUP): read at each decision or job, or pushed to the running part below. Everything
# else that changed is reported as needing a restart.
RELOADED_SECTIONS = ("routing", "labs", "screening", "results", "xray", "destinations", "shadow")
RELOADED_NODE_KEYS = ("allowed_calling_aets", "allowed_sop_classes")


def _store_check_progress(files: int) -> None:
    """A long store check at start: tell systemd it progresses (TimeoutStartSec would kill it)."""
    from dicom_node.systemd import Notifier

    Notifier().extend_timeout(60, f"checking the instance store: {files} files so far")
    log.info("checking the instance store: %d files so far", files)


class Service:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.started_settings = settings  # what a reload cannot change until a restart (see reload)
        self.state_dir = Path(settings.node.state_dir)
        check_writable(self.state_dir, "[node] state_dir")
        self._state_lock = lock_state_dir(self.state_dir)
        try:
            configure_patient_key(self.state_dir)  # the site's secret for pk-... in log lines (made at first start)
            self._assemble(settings)
        except BaseException:  # the lock goes with a start that failed (a process may construct a node again)
            os.close(self._state_lock)
            raise

    def _assemble(self, s: Settings) -> None:
        """Check the models and build the node's parts (nothing listens or runs until ``start``)."""
        self.engine_options = engine_options(s)
        engines.configure(self.engine_options)
        self.backend_in_use = check_models(s)
        self.db = NodeDB(self.state_dir / "osteoscreen.sqlite")
        # unsynced index rows: Service.start rebuilds those a power loss took (index_recovery)
        self.instances = InstanceStore(self.state_dir / "instances", self.db,
                                       min_free_bytes=s.node.min_free_mb * 2**20, index_synced=False)
        self.results_dir = self.state_dir / "results"
        self.lab_store = LabStore(self.state_dir / "labs.sqlite")
        self.lab_mapping = load_mapping(s.labs.mapping_file)
        self.lab_receiver = LabReceiver(self.lab_store, self.lab_mapping, allowed_senders=s.hl7.allowed_senders,
                                        low_space=low_space_check(self.state_dir, s.node.min_free_mb * 2**20))
        self.lab_parser = BackgroundParser(self.state_dir / "labs.sqlite", mapping_file=s.labs.mapping_file,
                                           log_target=current_target())
        self.mllp = (
            MLLPServer(s.hl7.host, s.hl7.port, self.lab_receiver.handle, self.lab_receiver.refuse,
                       max_message_bytes=s.hl7.max_message_bytes, read_timeout_s=s.hl7.read_timeout_s,
                       ssl_context=server_context(s.hl7.tls), offload=LabReceiver.needs_parse,
                       max_connections=s.hl7.max_connections, allowed_hosts=s.hl7.allowed_hosts)
            if s.hl7.enabled else None
        )
        self.lab_query = (LabQueryClient(s.lis_query, self.lab_store, client_context(s.lis_query.tls),
                                         issuer_aliases=s.labs.issuer_aliases)
                          if s.lis_query.enabled else None)
        self.node_identity = NodeIdentity(
            manufacturer=s.node.manufacturer,
            model_name="osteoscreen",
            software_version=__version__,
            serial_number=s.node.device_serial_number,
            device_uid=generate_uid(entropy_srcs=["osteoscreen-device", s.node.ae_title, s.node.device_serial_number]),
            institution_name=s.node.institution_name or None,
        )
        self.completion = SeriesCompletion(s.node.series_quiet_s, self.on_series_ready)
        self.jobs = JobRunner(self.db, workers=s.jobs.workers, max_attempts=s.jobs.max_attempts,
                              retry_delay_s=s.jobs.retry_delay_s, build_request=self.build_request,
                              on_result=self.on_job_result,
                              warm_model=(s.screening.model, s.screening.backend, s.screening.selector,
                                          s.screening.image_only_model),
                              engine_options=self.engine_options,
                              timeout_s=s.jobs.timeout_s)
        self.exporter = Exporter(self.db, list(s.destinations), calling_aet=s.export.calling_ae_title or s.node.ae_title,
                                 followup=s.followup, followup_ssl=client_context(s.followup.tls),
                                 retry_initial_s=s.export.retry_initial_s, retry_max_s=s.export.retry_max_s,
                                 timeout_s=s.export.timeout_s)
        pool = None
        if s.node.receiver_processes:
            pool = ReceiverPool(
                ReceiverSetup(ae_title=s.node.ae_title, max_pdu=s.node.max_pdu,
                              max_associations=s.node.max_associations,
                              allowed_calling_aets=list(s.node.allowed_calling_aets),
                              allowed_sop_classes=dict(s.node.allowed_sop_classes),
                              tls=s.node.tls if s.node.tls.enabled else None, store_root=str(self.instances.root),
                              db_path=str(self.db.path), min_free_bytes=self.instances.min_free_bytes,
                              index_synced=self.instances.index_synced,
                              log_target=current_target()),
                s.node.receiver_processes, on_stored=self.on_instance_stored, on_outcome=count_outcome,
                # a receiver that died between indexing an instance and telling us leaves its series untimed
                on_lost=lambda: self.rearm_receiving_series("may have lost a receiver's notice"))
        self.scp = StorageSCP(ae_title=s.node.ae_title, host=s.node.host, port=s.node.port, max_pdu=s.node.max_pdu,
                              allowed_calling_aets=list(s.node.allowed_calling_aets), store=self.instances,
                              max_associations=s.node.max_associations, ssl_context=server_context(s.node.tls),
                              allowed_sop_classes=s.node.allowed_sop_classes,
                              on_stored=self.on_instance_stored, pool=pool)
        # Shadow mode (site validation): only the QA destinations named in [shadow] get results.
        self.result_destinations = [d for d in s.destinations
                                    if not s.shadow.enabled or d.name in s.shadow.destinations]
        if s.worklist.enabled and not s.shadow.enabled:
            check_writable(Path(s.worklist.directory or self.state_dir / "worklist"), "[worklist] directory")
        self.worklist = (WorklistScheduler(self.db, s.worklist.directory or self.state_dir / "worklist",
                                           dt.datetime.strptime(s.worklist.at, "%H:%M").time())
                         if s.worklist.enabled and not s.shadow.enabled else None)
        self.retention = (RetentionScheduler(self.db, self.instances.root, s.retention.instances_days,
                                             s.retention.every_h)
                          if s.retention.instances_days > 0 else None)
        self.metrics_collector = NodeStateCollector(
            self.db, (lambda: dict(self.lab_receiver.ack_counts)) if self.mllp else None,
            {"model": s.screening.model, "selector": s.screening.selector or "none",
             "backend": s.screening.backend, "backend_in_use": self.backend_in_use,
             "attenuation_rule": s.screening.attenuation_rule})
        self.metrics_server = None
        self._stopped = threading.Event()
        self._run_id: int | None = None  # set by start (NodeDB.begin_run)

    # --- lifecycle --------------------------------------------------------------
    def start(self) -> None:
        self._run_id, previous = self.db.begin_run(boot_id(), os.getpid())
        check_store_at_start(self.instances, previous, requested=requested_store_check(self.state_dir),
                             progress=_store_check_progress)
        clear_store_check(self.state_dir)  # done: a crash before this line checks again
        requeued = self.db.requeue_running_jobs()
        if requeued:
            log.info("resuming %d job(s) interrupted by the last shutdown", requeued)
        swept = sweep_temporaries(self.results_dir)  # before the workers start: a worker's own is in flight
        if swept:
            log.info("removed %d half-written result file(s) left by an interrupted run in %s", swept,
                     self.results_dir)
        self.lab_parser.start()
        if self.mllp:
            self.mllp.start()
        self.jobs.start()
        self.exporter.start()
        self.completion.start()
        if self.worklist:
            self.worklist.start()
        if self.retention:
            self.retention.start()
        if self.settings.metrics.enabled:
            self.metrics_server = serve_metrics(self.settings.metrics.host, self.settings.metrics.port,
                                                self.metrics_collector)
        self.rearm_receiving_series("was receiving at shutdown")
        if self.settings.shadow.enabled:
            log.warning("SHADOW MODE (site validation): results stay in %s%s; no follow-up messages, no worklist",
                        self.results_dir, "" if not self.result_destinations else
                        " and go only to " + ", ".join(d.name for d in self.result_destinations))
        elif not self.settings.destinations:
            log.warning("no destinations configured: results stay in %s", self.results_dir)
        h = self.settings.hl7
        if h.enabled and h.host not in ("127.0.0.1", "::1", "localhost") and not (
                h.allowed_hosts or h.allowed_senders or (h.tls.enabled and h.tls.ca_file)):
            log.warning("the HL7 listener on %s:%d takes lab results from anyone who reaches it: set [hl7] "
                        "allowed_hosts and/or allowed_senders, or require client certificates ([hl7.tls] ca_file)",
                        h.host, h.port)
        self.scp.start()
        log.info("osteoscreen %s ready: DICOM %s@%s:%d, HL7 %s", __version__, self.settings.node.ae_title,
                 self.settings.node.host, self.scp.port,
                 f"{self.settings.hl7.host}:{self.mllp.bound_port}" if self.mllp else "disabled")

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        log.info("stopping")
        steps = [("DICOM listener", self.scp.stop), ("series completion", self.completion.stop)]
        if self.worklist:
            steps.append(("worklist", self.worklist.stop))
        if self.retention:
            steps.append(("retention", self.retention.stop))
        if self.metrics_server is not None:
            server = self.metrics_server
            steps.append(("metrics", lambda: (server.shutdown(), server.server_close(),
                                              unregister_metrics(self.metrics_collector))))
        steps += [("exporter", self.exporter.stop), ("jobs", self.jobs.stop)]
        if self.mllp:
            steps.append(("HL7 listener", self.mllp.stop))
        steps += [("HL7 parser", self.lab_parser.stop), ("lab store", self.lab_store.close),
                  ("clean-stop mark", self._mark_clean_stop),
                  ("node database", self.db.close), ("state lock", lambda: os.close(self._state_lock))]
        listener_stopped = True
        for name, step in steps:  # every step, even after one fails (a start that failed half-way, say)
            if name == "clean-stop mark" and not listener_stopped:
                continue  # receivers may still be writing: the next start checks the store
            try:
                step()
            except Exception:  # noqa: BLE001
                log.exception("stopping the %s failed", name)
                listener_stopped = listener_stopped and name != "DICOM listener"

    def _mark_clean_stop(self) -> None:
        """No receiver writes any more: mark this run stopped (synced, so every index row before it is durable)."""
        if self._run_id is not None:
            self.db.end_run(self._run_id)

    def reload(self, settings: Settings) -> list[str]:
        """Apply what can change without dropping associations; say what needs a restart.

        What needs a restart keeps the value the node started with (``self.started_settings``) until the restart:
        the running node never half-applies it, and every later reload still lists it until the file matches the
        running value again."""
        old, started = self.settings, self.started_settings
        restart: list[str] = []
        # restart-only parts: compared with what the node started with, and kept at that value until a restart
        node_kept = {k: getattr(started.node, k) for k in type(settings.node).model_fields
                     if k not in RELOADED_NODE_KEYS}
        restart += [f"node.{k}" for k, v in node_kept.items() if getattr(settings.node, k) != v]
        sections_kept = {sec: getattr(started, sec) for sec in type(settings).model_fields
                         if sec not in (*RELOADED_SECTIONS, "node")}
        restart += [sec for sec, v in sections_kept.items() if getattr(settings, sec) != v]
        labs = settings.labs
        if labs.mapping_file != started.labs.mapping_file:
            restart.append("labs.mapping_file")  # the listener and the parser process hold the table
            labs = labs.model_copy(update={"mapping_file": started.labs.mapping_file})
        new = settings.model_copy(update={"node": settings.node.model_copy(update=node_kept), "labs": labs,
                                          **sections_kept})
        if new.shadow.enabled != started.shadow.enabled and started.worklist.enabled:
            restart.append("worklist (shadow mode switched)")
        models = ("model", "selector", "image_only_model", "backend", "attenuation_rule")
        if ([getattr(new.screening, k) for k in models], new.xray.enabled, new.xray.model) != \
                ([getattr(old.screening, k) for k in models], old.xray.enabled, old.xray.model):
            try:
                backend_in_use = check_models(new)
            except Exception as exc:  # noqa: BLE001 - a missing bundle or a backend that cannot run here
                raise ConfigError(f"model check failed: {exc}") from None
            self.backend_in_use = backend_in_use
        applied = []
        if new.node.allowed_calling_aets != old.node.allowed_calling_aets:
            self.scp.set_allowed_calling_aets(list(new.node.allowed_calling_aets))
            applied.append("node.allowed_calling_aets")
        if new.node.allowed_sop_classes != old.node.allowed_sop_classes:
            self.scp.set_allowed_sop_classes(dict(new.node.allowed_sop_classes))
            applied.append("node.allowed_sop_classes")
        if new.destinations != old.destinations:
            self.exporter.set_destinations(list(new.destinations))
            applied.append("destinations")
        for section in ("routing", "labs", "screening", "results", "xray"):
            if getattr(new, section) != getattr(old, section):
                applied.append(section)
        if self.lab_query is not None and new.labs.issuer_aliases != old.labs.issuer_aliases:
            self.lab_query.issuer_aliases = dict(new.labs.issuer_aliases)  # the LIS query checks answers' issuer
        if new.shadow != old.shadow or new.destinations != old.destinations:
            self.result_destinations = [d for d in new.destinations
                                        if not new.shadow.enabled or d.name in new.shadow.destinations]
            if new.shadow != old.shadow:
                applied.append("shadow")
        if new.screening != old.screening:
            self.metrics_collector.engine.update(
                {"model": new.screening.model, "selector": new.screening.selector or "none",
                 "backend": new.screening.backend, "backend_in_use": self.backend_in_use,
                 "attenuation_rule": new.screening.attenuation_rule})
        self.settings = new
        log.info("configuration reloaded: applied %s%s", ", ".join(applied) or "no changes",
                 f"; restart needed for {', '.join(restart)} (still running with the values it started with)"
                 if restart else "")
        return restart

    def serve_forever(self, config_path=None) -> None:
        """Run until SIGTERM or SIGINT; SIGHUP reloads the configuration file."""
        from config import load_settings
        from dicom_node.systemd import Notifier

        notifier = Notifier()
        # one flag per request and one wake-up: a stop is never taken for a reload or lost in clearing one (a
        # shared 'done' event let a SIGHUP at the wrong moment stop the node, and a SIGTERM during a reload vanish)
        wake = threading.Event()
        stop_requested = threading.Event()
        reload_requested = threading.Event()

        def _stop(signum, _frame):
            log.info("received %s", signal.Signals(signum).name)
            stop_requested.set()
            wake.set()

        def _hup(_signum, _frame):
            reload_requested.set()
            wake.set()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        signal.signal(signal.SIGHUP, _hup)
        try:
            self.start()
        except Exception:
            self.stop()  # what did start is stopped, so the process can exit and systemd can restart it
            raise
        listening = f"DICOM {self.settings.node.ae_title}:{self.scp.port} ready"
        notifier.ready(listening)
        tick = min(5.0, notifier.watchdog_s / 2) if notifier.watchdog_s else 5.0
        try:
            while True:
                wake.wait(tick)
                wake.clear()  # before the flags are read: a request after this wakes the next wait at once
                if stop_requested.is_set():
                    break
                if reload_requested.is_set():
                    reload_requested.clear()
                    notifier.reloading()
                    outcome = "configuration reloaded"
                    try:
                        restart = self.reload(load_settings(config_path))
                        if restart:
                            outcome += f"; restart needed for {', '.join(restart)}"
                    except ConfigError as exc:
                        log.error("reload refused, keeping the running configuration: %s", exc)
                        outcome = f"reload REFUSED (see the log): {exc}"[:200]
                    except Exception:  # noqa: BLE001 - a reload must never take the running node down
                        log.exception("reload failed, keeping the running configuration")
                        outcome = "reload FAILED, running configuration kept (see the log)"
                    # `systemctl status` shows it; the unit's ExecReload runs `config check` first, so that
                    # `systemctl reload` itself fails on a bad file
                    notifier.ready(f"{listening}; {outcome}"[:400])
                    continue
                stalled = self.stalled_threads()
                if stalled:  # no watchdog ping: systemd restarts the service ([Service] WatchdogSec)
                    log.error("%s stopped; not answering the systemd watchdog, so the service is restarted",
                              " and ".join(stalled))
                else:
                    notifier.watchdog()
        finally:
            notifier.stopping()
            self.stop()

    def stalled_threads(self) -> list[str]:
        """The service's long-running threads that are no longer running (each guards its own loop)."""
        checks = (("the DICOM listener", self.scp.alive), ("the job dispatcher", self.jobs.alive),
                  ("the result exporter", self.exporter.alive))
        return [name for name, alive in checks if not alive()]

    # --- event handlers -----------------------------------------------------------
    def rearm_receiving_series(self, why: str) -> None:
        """Restart the quiet period of every series still receiving: none may wait for a timer nobody set."""
        for uid in self.db.series_in_state("receiving"):
            log.info("series %s %s: restarting its quiet period", uid, why)
            self.completion.touch(uid)

    def on_instance_stored(self, ref: InstanceRef) -> None:
        self.completion.touch(ref.series_uid)
        if ref.moved_from_series is not None:  # reopened without it: decided again after its own quiet period
            self.completion.touch(ref.moved_from_series)

    def on_series_ready(self, ready: SeriesReady) -> None:
        series_uid = ready.series_uid
        row = self.db.series(series_uid)
        if row is None or row.state != "receiving":
            return
        paths = self.db.instance_paths(series_uid)
        self.db.audit("received", series_uid, f"{len(paths)} instance(s) from {row.calling_aet}")
        try:
            decision = decide(series_facts(paths, row.calling_aet), self.settings.routing, self.settings.xray)
        except UnreadableSeries as exc:
            decision = Decision(False, str(exc))
        try:
            job_id = self.db.decide_series(series_uid, decision.eligible, decision.reason, routed_instances=len(paths))
        except SeriesChanged:
            log.info("series %s received another instance while it was routed: decided after its quiet period",
                     series_uid)
            return
        SERIES_COMPLETED.inc()
        SERIES_ROUTED.labels("screen" if decision.eligible else "skip", decision.rule).inc()
        log.info("series %s complete (%d instances): %s - %s", series_uid, row.n_instances,
                 "screen" if decision.eligible else "skip", decision.reason)
        if job_id is not None:
            self.jobs.wake()

    def labs_for(self, series_uid: str, header_path: str) -> LabPanel:
        import pydicom

        header = pydicom.dcmread(header_path, stop_before_pixels=True)
        row = self.db.series(series_uid)
        assert row is not None
        born = str(header.get("PatientBirthDate", "") or "")
        try:
            birth = dt.datetime.strptime(born[:8], "%Y%m%d").date() if born else None
        except ValueError:
            birth = None
        when = study_date(header)
        panel = self._lookup(row.patient_id, row.issuer or None, when, birth, str(header.get("PatientSex", "") or ""))
        missing = [codes[0] for codes in MODEL_LAB_CODES if not any(panel.get(c) for c in codes)]
        if missing and self.lab_query is not None and row.patient_id:
            ref = when or dt.date.today()
            outcome = self.lab_query.fetch(row.patient_id, row.issuer or None,
                                           ref - dt.timedelta(days=self.settings.labs.window_days),
                                           ref + dt.timedelta(days=self.settings.labs.after_study_days))
            if outcome.status != "skipped":
                self.db.audit("lis_query", series_uid, outcome.note)
            if outcome.status == "found":
                panel = self._lookup(row.patient_id, row.issuer or None, when, birth,
                                     str(header.get("PatientSex", "") or ""))
            if outcome.status != "skipped":
                panel = dataclasses.replace(panel, notes=panel.notes + (outcome.note,))
        for note in panel.notes:
            if "blocked" in note:
                log.warning("series %s: %s", series_uid, note)
                self.db.audit("labs", series_uid, note)
        return panel

    def _lookup(self, patient_id: str, issuer: str | None, when: dt.date | None, birth: dt.date | None,
                sex: str) -> LabPanel:
        s = self.settings.labs
        return lookup_labs(self.lab_store, patient_id, issuer, when, window_days=s.window_days,
                           after_days=s.after_study_days, match_without_issuer=s.match_without_issuer,
                           birth_date=birth, sex=sex, mapping=self.lab_mapping,
                           accept_preliminary=s.accept_preliminary, issuer_aliases=s.issuer_aliases)

    def _path_of(self, path: str) -> str:
        """The screening path of a routed series, by the rule routing applied: CR/DX with [xray] on -> "xray"."""
        import pydicom

        x = self.settings.xray
        if not x.enabled:
            return "ct"
        modality = str(pydicom.dcmread(path, stop_before_pixels=True).get("Modality", "") or "")
        return "xray" if modality in x.modalities else "ct"

    def _run_dir(self, job_id: int) -> Path:
        """A new folder for this run of the job: a job screened again (its series changed) must not overwrite
        the files of an earlier run, which the outbox may still be sending."""
        job_dir = self.results_dir / f"job-{job_id:06d}"
        runs = [int(p.name[4:]) for p in job_dir.glob("run-*") if p.name[4:].isdigit()] if job_dir.is_dir() else []
        return job_dir / f"run-{max(runs, default=0) + 1:03d}"

    def build_request(self, job: JobRow) -> JobRequest:
        paths = self.db.instance_paths(job.series_uid)
        series = self.db.series(job.series_uid)
        if not paths and series is not None and series.state == "purged":
            raise RuntimeError(f"series {job.series_uid}: its received CT was deleted by the retention rule; "
                               "re-send the study from the PACS to screen it again")
        if not paths:
            raise RuntimeError(f"no stored instances for series {job.series_uid}")
        previous = self.db.latest_report(series.study_uid) if series else None
        return JobRequest(
            pipeline=self._path_of(paths[0]),
            xray_model=self.settings.xray.model,
            xray_body_parts=tuple(self.settings.xray.body_parts),
            xray_views=tuple(self.settings.xray.views),
            job_id=job.id,
            series_uid=job.series_uid,
            instance_paths=tuple(paths),
            labs=self.labs_for(job.series_uid, paths[0]),
            output_dir=str(self._run_dir(job.id)),
            model=self.settings.screening.model,
            node=self.node_identity,
            max_tilt_deg=self.settings.routing.max_axial_tilt_deg,
            attenuation_rule=self.settings.screening.attenuation_rule,
            backend=self.settings.screening.backend,
            selector=self.settings.screening.selector,
            image_only_model=self.settings.screening.image_only_model,
            contrast_policy=self.settings.screening.contrast,
            predecessor_sr=(previous.study_uid, previous.sr_series_uid, previous.sr_sop_uid) if previous else None,
            report_version=self.db.report_count(series.study_uid) + 1 if series else 1,
            key_object_selection=self.settings.results.key_object_selection,
            presentation_state=self.settings.results.presentation_state,
            report_not_screened=self.settings.results.report_not_screened,
            patient_key=patient_key(series.patient_id, series.issuer) if series and series.patient_id else "",
        )

    def _followup_message(self, job: JobRow, summary: dict) -> list[tuple[str, str, str, str]]:
        """The ORU^R01 for the RIS/EHR, written durably next to the job's results; its outbox row."""
        f = self.settings.followup
        if not f.enabled or summary.get("experimental"):
            return []
        destination = HL7_PREFIX + f.name
        # A result message already queued for this study (and not refused by the receiver) is replaced by a
        # corrected one (result status C), sent whatever the new category: a positive screen withdrawn by a
        # re-run must not stay in the chart.
        queued = self.db.result_messages(summary.get("study_uid", ""), destination)
        earlier = [c for c, state in queued if state != "failed"]
        if not earlier and f.send_for == "positive" and summary.get("category_id") != "screen_positive":
            return []
        import pydicom

        paths = self.db.instance_paths(job.series_uid)
        header = pydicom.dcmread(paths[0], stop_before_pixels=True)
        control_id = f"OSR{job.id:06d}"  # unique per message (MSH-10): a job's later results get a suffix
        same_job = sum(1 for c, _ in queued if c == control_id or c.startswith(control_id + "-"))
        if same_job:
            control_id += f"-{same_job + 1}"
        report = ScreeningReport(
            control_id=control_id, patient_id=str(header.get("PatientID", "")),
            issuer=str(header.get("IssuerOfPatientID", "") or ""), patient_name=str(header.get("PatientName", "")),
            birth_date=str(header.get("PatientBirthDate", "") or ""), sex=str(header.get("PatientSex", "") or ""),
            accession_number=str(header.get("AccessionNumber", "") or ""), study_uid=summary.get("study_uid", ""),
            study_datetime=str(header.get("StudyDate", "") or "") + str(header.get("StudyTime", "") or "")[:6],
            category_id=summary["category_id"], category_label=summary["category"],
            probability=float(summary["probability"]), threshold=float(summary["threshold"]), model=summary["model"],
            level=summary.get("level"), mean_hu=summary.get("mean_hu"),
            sr_sop_instance_uid=summary.get("sr_sop_instance_uid", ""), recommendation=f.recommendation,
            notice=SHORT_DISCLAIMER, corrected=bool(earlier))
        message = build_result_message(report, sending_application=f.sending_application,
                                       sending_facility=f.sending_facility,
                                       receiving_application=f.receiving_application,
                                       receiving_facility=f.receiving_facility, version=f.version)
        path = self.results_dir / f"job-{job.id:06d}" / f"result-{control_id}.hl7"
        write_durably(path, lambda fh: fh.write(message))
        summary["followup_message"] = control_id
        if earlier:
            summary["followup_corrects"] = earlier[-1]
        return [(destination, str(path), HL7_SOP_CLASS, control_id)]

    @staticmethod
    def _observe(status: str, summary: dict) -> None:
        JOBS_FINISHED.labels(status).inc()
        stages = (summary.get("performance") or {}).get("stage_s") or {}
        for stage, seconds in stages.items():
            JOB_STAGE_SECONDS.labels(stage).observe(float(seconds))
        if "model" in stages and summary.get("backend"):
            INFERENCE_SECONDS.labels(summary["backend"]).observe(float(stages["model"]))

    def _patient_key(self, series_uid: str) -> str:
        row = self.db.series(series_uid)
        return patient_key(row.patient_id, row.issuer) if row is not None and row.patient_id else ""

    def on_job_result(self, job: JobRow, result: ScreeningResult) -> None:
        with job_context(job.id, self._patient_key(job.series_uid)):
            self._record_result(job, result)

    def _shadow_report_after_go_live(self, previous: ReportRow) -> bool:
        """A report made in shadow mode (kept off the PACS and the worklist) does not stand for a live one."""
        if self.settings.shadow.enabled:
            return False
        earlier = self.db.job(previous.job_id)
        return bool(earlier and earlier.result and earlier.result.get("shadow"))

    def _record_result(self, job: JobRow, result: ScreeningResult) -> None:
        outputs = [(d.name, o.path, o.sop_class_uid, o.sop_instance_uid)
                   for d in self.result_destinations for o in result.outputs]
        summary = dict(result.summary)
        if self.settings.shadow.enabled:
            summary["shadow"] = True  # a validation-period result: never on a worklist, even after go-live
        report = None
        if result.status == "screened" and summary.get("result_key"):
            study = summary.get("study_uid", "")
            previous = self.db.latest_report(study)
            if previous is not None and previous.job_id != job.id and previous.result_key == summary["result_key"] \
                    and not self._shadow_report_after_go_live(previous):
                # Same study, vertebra, models, categories and labs as the report another job already sent: no
                # second SR. This job's own earlier report (its series reopened, or `jobs retry`) is no duplicate:
                # its result replaces that one.
                summary["duplicate_of"] = previous.sr_sop_uid
                outputs = []
                self.db.audit("report", job.series_uid, f"same result as the SR of job {previous.job_id}: not sent again")
                log.info("job %d: same result as job %d for this study; no second SR", job.id, previous.job_id)
            else:
                report = ReportRow(study, job.id, summary["result_key"], summary["sr_series_uid"],
                                   summary["sr_sop_instance_uid"])
        if result.status == "screened" and "duplicate_of" not in summary and not self.settings.shadow.enabled:
            outputs += self._followup_message(job, summary)
        if not self.db.finish_job(job.id, result.status, summary, outputs, report):
            log.warning("job %d: its series changed while it was screened (a patient identity update, or a late or "
                        "moved instance); that result is discarded and the series is screened again", job.id)
            self.jobs.wake()
            return
        self._observe(result.status, summary)
        if summary.get("labs_used"):  # which results of this patient were read (privacy officer's view)
            self.db.audit("labs", job.series_uid, "used: " + ", ".join(
                f"LOINC {v['loinc']} ({str(v.get('observed_at') or 'no date')[:10]})" for v in summary["labs_used"]))
        if result.status == "screened":
            log.info("job %d screened: p=%.3f %s (modalities %s), L1 %s HU; %d object(s) queued for %d "
                     "destination(s)", job.id, summary["probability"], summary["category"],
                     "+".join(summary["modalities"]), summary.get("mean_hu", "n/a"),
                     0 if "duplicate_of" in summary else len(result.outputs),
                     len(self.result_destinations))
            self.exporter.wake()
        else:
            log.info("job %d not screened: %s%s", job.id, result.reason,
                     "; an SR saying so is queued" if result.outputs else "")
            if result.outputs:
                self.exporter.wake()
