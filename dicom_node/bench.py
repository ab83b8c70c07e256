"""`osteoscreen bench`: ingest, study latency, memory and scaling, measured against references in the same run.

Everything runs on loopback with real peers: DCMTK storescu sends; DCMTK
storescp (writing to disk, never fsyncing) and Orthanc (which fsyncs) are the
references; osteoscreen runs as its own `osteoscreen serve` process, as in
production. The CT series come from :func:`dicom_node.sample.resampled_sample_slices`
(the shipped real CT resampled to N x 512 x 512). Every figure is the median
of ``runs`` runs, and each run starts every receiver on an empty store.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import platform
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pydicom.uid import JPEG2000Lossless, JPEGLSLossless

from dicom_node.pacs import OrthancPACS, free_port, orthanc_binary, stop_process, wait_port
from dicom_node.sample import SampleSeries, write_resampled_series

MAX_PDU = 131072
PROPOSE = {"raw": "-xe", "jpeg-ls": "-xt", "j2k": "-xv"}  # storescu: propose the files' transfer syntax
NODE_AET = "OSTEOSCREEN"
FORKING_STORESCP = "storescp --fork"
STORE_ALONE = "osteoscreen store alone (no network)"
DURABLE_WRITES = "durable file writes alone (no DICOM, no index)"


class BenchError(Exception):
    """A peer is missing or a run failed; the message says which and what to do."""


def _nodelay_env(on: bool = True) -> dict[str, str]:
    env = dict(os.environ)
    if on:
        env["TCP_NODELAY"] = "1"
    else:
        env.pop("TCP_NODELAY", None)
    return env


def _need(tool: str) -> str:
    path = orthanc_binary() if tool == "Orthanc" else shutil.which(tool)
    if not path:
        raise BenchError(f"{tool} is not installed: run `make system-peers` (apt-get install dcmtk orthanc)")
    return path


def _listening(port: int) -> None:
    try:
        wait_port(port, 60.0)
    except TimeoutError as exc:
        raise BenchError(f"{exc}: the receiver did not start") from None


def send(files: list[Path], port: int, *, called: str, syntax: str = "raw", nodelay: bool = True) -> float:
    """One storescu association (128 KiB PDUs); seconds from start to exit (last response + release)."""
    cmd = [_need("storescu"), "-aet", "CT1", "-aec", called, PROPOSE[syntax], "--max-pdu", str(MAX_PDU),
           "127.0.0.1", str(port), *map(str, files)]
    os.sync()  # start with no dirty pages from earlier runs or the generator being written back meanwhile
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=_nodelay_env(nodelay), capture_output=True, text=True, timeout=900)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise BenchError(f"storescu to port {port} exited {proc.returncode}: {proc.stderr.strip()[-400:]}")
    return elapsed


def send_concurrently(series: list[SampleSeries], port: int, *, called: str) -> float:
    """One storescu process per series, all at once; seconds until the last one exits."""
    cmd = [_need("storescu"), "-aet", "CT1", "-aec", called, PROPOSE["raw"], "--max-pdu", str(MAX_PDU),
           "127.0.0.1", str(port)]
    os.sync()
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd + list(map(str, s.files)), env=_nodelay_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for s in series]
    errors = [p.communicate(timeout=900)[1] for p in procs]
    elapsed = time.perf_counter() - t0
    for p, err in zip(procs, errors):
        if p.returncode != 0:
            raise BenchError(f"concurrent storescu exited {p.returncode}: {err.strip()[-400:]}")
    return elapsed


def _store_from_memory(files: list[Path], store_root: str, db_path: str, ready, start) -> None:  # pragma: no cover
    """Child of ``store_alone``: read the files into memory, then store each through ``InstanceStore.store``."""
    import pydicom

    from config.schema import NodeSettings
    from dicom_node.db import NodeDB
    from dicom_node.store import InstanceStore
    from pipeline.demographics import identity_of

    items = []
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        items.append((path.read_bytes(), ds))
    db = NodeDB(db_path)
    store = InstanceStore(store_root, db, NodeSettings().min_free_mb * 2**20, sweep_stale=False,
                          index_synced=False)  # as the node
    ready.release()
    start.wait()
    for data, ds in items:
        store.store(data, sop_class=str(ds.SOPClassUID), sop_uid=str(ds.SOPInstanceUID),
                    study_uid=str(ds.StudyInstanceUID), series_uid=str(ds.SeriesInstanceUID),
                    transfer_syntax=str(ds.file_meta.TransferSyntaxUID), calling_aet="CT1",
                    patient_id=str(ds.get("PatientID", "")), issuer=str(ds.get("IssuerOfPatientID", "")),
                    modality=str(ds.get("Modality", "")), identity=identity_of(ds))
    db.close()


def _durable_writes_from_memory(files: list[Path], root: str, _unused: str, ready, start) -> None:  # pragma: no cover
    """Child process of ``durable_writes_alone``: the durability system calls alone, on the same bytes."""
    blobs = [path.read_bytes() for path in files]
    os.makedirs(root, exist_ok=True)
    folder = tempfile.mkdtemp(prefix="series-", dir=root)
    ready.release()
    start.wait()
    for i, data in enumerate(blobs):
        tmp, final = os.path.join(folder, f".incoming.{i}"), os.path.join(folder, f"{i}.dcm")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.close(fd)
        os.replace(tmp, final)
        dir_fd = os.open(folder, os.O_RDONLY)
        os.fsync(dir_fd)
        os.close(dir_fd)


def _writers_alone(target: Callable, series: list[SampleSeries], work: Path, what: str) -> float:
    """One spawned process per series runs ``target(files, root, db_path, ready, start)``, all at once; seconds
    from the start signal until the last process is done."""
    import multiprocessing

    from dicom_node.db import NodeDB

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    db_path = work / "osteoscreen.sqlite"
    NodeDB(db_path).close()  # schema created before the writers start
    ctx = multiprocessing.get_context("spawn")
    ready, start = ctx.Semaphore(0), ctx.Event()
    procs = [ctx.Process(target=target, args=(s.files, str(work / "instances"), str(db_path), ready, start))
             for s in series]
    for p in procs:
        p.start()
    try:
        deadline, waiting = time.monotonic() + 300, len(procs)
        while waiting:
            if ready.acquire(timeout=0.5):
                waiting -= 1
            elif any(p.exitcode is not None for p in procs) or time.monotonic() > deadline:
                raise BenchError(f"a {what} writer process died or was not ready within 300 s")
        os.sync()
        t0 = time.perf_counter()
        start.set()
        for p in procs:
            p.join(900)
        elapsed = time.perf_counter() - t0
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
    failed = [p.exitcode for p in procs if p.exitcode != 0]
    if failed:
        raise BenchError(f"{what} writer process(es) exited with {failed}")
    return elapsed


def store_alone(series: list[SampleSeries], work: Path) -> float:
    """osteoscreen's durable store without the network: one process per series stores its instances from
    memory through ``InstanceStore.store`` (temp file, fsync, rename, directory fsync, index commit), all at
    once; seconds from the start signal until the last process is done.

    A reference for the concurrent-sender figure, not a ceiling: the receivers do this and the DICOM network
    work on top of it, but in 2 processes, where this runs one per series (4)."""
    elapsed = _writers_alone(_store_from_memory, series, work, "store-alone")
    with sqlite3.connect(work / "osteoscreen.sqlite") as db:
        stored = int(db.execute("SELECT COUNT(*) FROM instances").fetchone()[0])
    expected = sum(len(s.files) for s in series)
    if stored != expected:
        raise BenchError(f"store alone indexed {stored} of {expected} instances")
    return elapsed


def durable_writes_alone(series: list[SampleSeries], work: Path) -> float:
    """What making the same files durable costs the machine with nothing else running: one process per series
    writes its instances from memory with only the system calls the store makes per instance (new temporary
    file, write, fsync, rename, directory fsync): no network, no DICOM, no index, no checks. The floor under
    any receiver that answers only after the instance is durable, and the machine's capacity for it."""
    elapsed = _writers_alone(_durable_writes_from_memory, series, work, "durable-writes")
    written = sum(1 for p in (work / "instances").rglob("*.dcm"))
    expected = sum(len(s.files) for s in series)
    if written != expected:
        raise BenchError(f"durable writes alone wrote {written} of {expected} files")
    return elapsed


def fsync_costs(work: Path, n: int = 50, size: int = 512 * 1024) -> dict[str, float]:
    """Median ms of an fsync after writing a new ``size``-byte file (what the store pays per instance) and of an
    fdatasync after overwriting 4 KiB of an existing file (about the device flush alone), in ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    data, new, flush = os.urandom(size), [], []
    path = work / "fsync-probe"
    for i in range(n):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            t0 = time.perf_counter()
            os.fsync(fd)
            new.append(time.perf_counter() - t0)
            os.pwrite(fd, data[:4096], 0)
            t0 = time.perf_counter()
            os.fdatasync(fd)
            flush.append(time.perf_counter() - t0)
        finally:
            os.close(fd)
            path.unlink()
    return {"new_file_ms": _median(new) * 1e3, "overwrite_4k_ms": _median(flush) * 1e3}


class Storescp:
    """DCMTK storescp writing every instance to disk (the speed reference; it never fsyncs).

    Without ``fork`` storescp serves one association at a time, so concurrent senders queue behind each
    other; with it (``--fork``) every association gets its own process, as osteoscreen's receivers do.
    """

    def __init__(self, workdir: Path, *, fork: bool = False) -> None:
        self.workdir, self.port, self.fork = workdir, free_port(), fork
        self.out = workdir / "storescp"
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> "Storescp":
        shutil.rmtree(self.out, ignore_errors=True)
        self.out.mkdir(parents=True)
        fork = ["--fork"] if self.fork else []
        self._proc = subprocess.Popen([_need("storescp"), *fork, "+xa", "--max-pdu", str(MAX_PDU), "-od",
                                       str(self.out), str(self.port)], env=_nodelay_env(), stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
        _listening(self.port)
        return self

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def stored(self) -> int:
        return sum(1 for p in self.out.rglob("*") if p.is_file())

    def __exit__(self, *exc) -> None:
        stop_process(self._proc, 20)


class Node:
    """`osteoscreen serve` as a child process on a fresh state directory."""

    def __init__(self, workdir: Path, *, quiet_s: float = 3600.0, destination: OrthancPACS | None = None,
                 workers: int = 1) -> None:
        self.workdir = workdir
        self.port, self.hl7_port = free_port(), free_port()
        self.state = workdir / "state"
        self.log_path = workdir / "node.log"
        dest = (f'\n[[destinations]]\nname = "pacs"\nae_title = "{destination.aet}"\nhost = "127.0.0.1"\n'
                f"port = {destination.dicom_port}\n") if destination else ""
        self.config = workdir / "osteoscreen.toml"
        self.config_text = (f'[node]\nport = {self.port}\nstate_dir = "{self.state}"\nseries_quiet_s = {quiet_s}\n'
                            f'allowed_calling_aets = ["CT1"]\n[hl7]\nport = {self.hl7_port}\n'
                            f"[jobs]\nworkers = {workers}\n" + dest)
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Node":
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir.mkdir(parents=True)
        self.config.write_text(self.config_text)
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(self.config)],
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        _listening(self.port)
        deadline = time.monotonic() + 120
        while "worker ready" not in self.log_path.read_text(errors="replace"):  # warm-up off the clock
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"osteoscreen did not start; see {self.log_path}")
            time.sleep(0.1)
        return self

    def __exit__(self, *exc) -> None:
        stop_process(self.proc)

    def peak_rss_mb(self) -> float:
        assert self.proc is not None
        return _peak_rss_mb(self.proc.pid)

    def total_peak_rss_mb(self) -> float:
        """The sum of every node process's peak (VmHWM): service, receivers, job worker, HL7 parser, ... An upper
        bound of their simultaneous total, which is what the machine must hold."""
        assert self.proc is not None
        peaks = [_peak_rss_mb(p) for p in _process_tree(self.proc.pid)]
        return round(sum(x for x in peaks if x == x), 1)

    def receivers_peak_rss_mb(self) -> float:
        """The largest peak RSS among the node's receiver processes (their pids are in its log)."""
        log = self.log_path.read_text(errors="replace")
        pids = dict(re.findall(r"receiver process (\d+) ready \(pid (\d+)\)", log))
        return max((_peak_rss_mb(int(p)) for p in pids.values()), default=float("nan"))

    def query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with sqlite3.connect(self.state / "osteoscreen.sqlite", timeout=10) as db:
            return db.execute(sql, args).fetchall()

    def stored(self) -> int:
        return int(self.query("SELECT COUNT(*) FROM instances")[0][0])


def _peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        pass
    return float("nan")


COMPRESSED_SERIES = ("jpeg-ls", "j2k")


def reference_of(label: str) -> str:
    """The storescp figure a receiver's rate is compared with: storescp on the same series (a compressed series'
    rows against storescp on that series), one association; the 4-sender rows against its single-sender rate,
    as issue 11 defines the bar."""
    syntax = label.rsplit(", ", 1)[-1]
    if syntax in COMPRESSED_SERIES and not label.startswith("storescp,"):
        return f"storescp, {syntax}"
    return "storescp"


def _check_stored(receiver: str, stored: int, expected: int) -> None:
    """A receiver that dropped instances must not be timed as if it had taken them all."""
    if stored != expected:
        raise BenchError(f"{receiver} stored {stored} of {expected} instances: its time would not be comparable")


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


@dataclass
class Ingest:
    rates: dict[str, float] = field(default_factory=dict)  # label -> median instances/s
    mb_s: dict[str, float] = field(default_factory=dict)
    fsyncs_per_instance: dict[str, float | None] = field(default_factory=dict)
    fsync_ms: dict[str, float] = field(default_factory=dict)
    round_ratios: dict[str, list[float]] = field(default_factory=dict)  # label -> its rate / storescp's, per round


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (the service and its receiver and job processes)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            todo += [int(c) for c in task.read_text().split()]
    return found


def _fsyncs(pid: int, action: Callable[[], object], n: int) -> float | None:
    """fsync + fdatasync calls per instance made by ``pid``, its threads and its child processes during ``action``;
    None without strace."""
    strace = shutil.which("strace")
    if not strace:
        return None
    out = Path(tempfile.mkstemp(suffix=".strace")[1])
    attach = [a for p in _process_tree(pid) for a in ("-p", str(p))]
    tracer = subprocess.Popen([strace, "-f", "-c", "-e", "trace=fsync,fdatasync", "-o", str(out), *attach],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    try:
        action()
    finally:
        tracer.terminate()
        _, err = tracer.communicate(timeout=20)
    text = out.read_text()
    out.unlink(missing_ok=True)
    if "attach" in err and ("not permitted" in err or "denied" in err):
        return None  # no ptrace permission here: no figure rather than a false zero
    calls = 0
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[-1] in ("fsync", "fdatasync"):
            calls += int(parts[3])
    return round(calls / n, 2)


def bench_ingest(work: Path, raw: SampleSeries, concurrent: list[SampleSeries], compressed: dict[str, SampleSeries],
                 runs: int, log: Callable[[str], None]) -> Ingest:
    """Every ingest figure, measured in rounds: each round runs every receiver once, back to back.

    Interleaved rounds rather than one block of runs per receiver: this VM's speed drifts within minutes
    (storescp alone ranged from 850 to 2,100 instances/s on one day here), and a block design turns that
    drift into a bias in the ratios. Each round also gives a paired ratio against the same round's storescp.
    """
    res = Ingest()
    n = len(raw.files)
    mb = sum(f.stat().st_size for f in raw.files) / 1e6
    total = sum(len(s.files) for s in concurrent)
    total_mb = sum(f.stat().st_size for s in concurrent for f in s.files) / 1e6
    four = len(concurrent)
    times: dict[str, list[float]] = {}
    sizes: dict[str, tuple[int, float]] = {}

    def note(label: str, seconds: float, count: int = n, megabytes: float = mb) -> None:
        times.setdefault(label, []).append(seconds)
        sizes[label] = (count, megabytes)

    def node_send(files: list[Path], expected: int, **kw) -> float:
        with Node(work / "node") as node:
            t = send(files, node.port, called=NODE_AET, **kw)
            if node.stored() != expected:
                raise BenchError(f"osteoscreen indexed {node.stored()} of {expected} instances")
        return t

    for round_no in range(runs):
        # one association: DCMTK storescp (without and with a sync afterwards), Orthanc with TCP_NODELAY=1
        # (the durable peer), osteoscreen
        with Storescp(work) as scp:
            t = send(raw.files, scp.port, called="STORESCP")
            t0 = time.perf_counter()
            os.sync()
            note("storescp", t)
            note("storescp + sync", t + time.perf_counter() - t0)
            _check_stored("storescp", scp.stored(), n)
        pacs = OrthancPACS(work / "orthanc", tcp_nodelay=True)
        shutil.rmtree(pacs.workdir, ignore_errors=True)
        pacs.start()
        try:
            note("orthanc (TCP_NODELAY=1)", send(raw.files, pacs.dicom_port, called=pacs.aet))
            _check_stored("Orthanc", len(pacs.get("/instances")), n)  # type: ignore[arg-type]
        finally:
            pacs.stop()
        note("osteoscreen", node_send(raw.files, n))
        # 4 concurrent senders, and the node's store alone (no network) for the same instances
        for label in ("storescp", FORKING_STORESCP):
            with Storescp(work, fork=label == FORKING_STORESCP) as scp:
                note(f"{label}, {four} concurrent senders", send_concurrently(concurrent, scp.port,
                                                                                called="STORESCP"), total, total_mb)
        with Node(work / "node") as node:
            note(f"osteoscreen, {four} concurrent senders", send_concurrently(concurrent, node.port,
                                                                                called=NODE_AET), total, total_mb)
            if node.stored() != total:
                raise BenchError(f"osteoscreen indexed {node.stored()} of {total} instances")
        note(f"{STORE_ALONE}, {four} processes", store_alone(concurrent, work / "store-alone"), total, total_mb)
        note(f"{DURABLE_WRITES}, {four} processes", durable_writes_alone(concurrent, work / "durable-writes"), total,
             total_mb)
        # compressed series
        for syntax, series in compressed.items():
            c_mb = sum(f.stat().st_size for f in series.files) / 1e6
            with Storescp(work) as scp:
                note(f"storescp, {syntax}", send(series.files, scp.port, called="STORESCP", syntax=syntax),
                     len(series.files), c_mb)
                _check_stored(f"storescp ({syntax})", scp.stored(), len(series.files))
            note(f"osteoscreen, {syntax}", node_send(series.files, len(series.files), syntax=syntax),
                 len(series.files), c_mb)
        base = times["storescp"][-1]
        log(f"  round {round_no + 1}/{runs}: storescp {n / base:.0f} inst/s, osteoscreen "
            f"{n / times['osteoscreen'][-1]:.0f} inst/s")
    # Orthanc as packaged (Nagle on) crawls: a few runs, after the rounds
    nagle = []
    for _ in range(min(runs, 3)):
        pacs = OrthancPACS(work / "orthanc", tcp_nodelay=False)
        shutil.rmtree(pacs.workdir, ignore_errors=True)
        pacs.start()
        try:
            nagle.append(send(raw.files, pacs.dicom_port, called=pacs.aet, nodelay=False))
        finally:
            pacs.stop()
    times["orthanc (as packaged)"], sizes["orthanc (as packaged)"] = nagle, (n, mb)
    order = ["storescp", "storescp + sync", "orthanc (TCP_NODELAY=1)", "orthanc (as packaged)", "osteoscreen",
             f"storescp, {four} concurrent senders", f"{FORKING_STORESCP}, {four} concurrent senders",
             f"osteoscreen, {four} concurrent senders", f"{STORE_ALONE}, {four} processes",
             f"{DURABLE_WRITES}, {four} processes",
             *[f"{label}, {syntax}" for syntax in compressed for label in ("storescp", "osteoscreen")]]
    for label in order:
        count, megabytes = sizes[label]
        s = _median(times[label])
        res.rates[label] = count / s
        res.mb_s[label] = megabytes / s
        if label not in ("storescp", "orthanc (as packaged)"):  # measured in the rounds, beside that storescp
            ref = reference_of(label)
            ref_count = sizes[ref][0]
            res.round_ratios[label] = [(count / t) / (ref_count / b) for t, b in zip(times[label], times[ref])]
        log(f"  {label:<38} {count / s:7.1f} inst/s {megabytes / s:7.1f} MB/s (median of {len(times[label])})")
    with Storescp(work) as scp:
        res.fsyncs_per_instance["storescp"] = _fsyncs(scp.pid, lambda: send(raw.files, scp.port, called="STORESCP"), n)
    with Node(work / "node") as node:
        assert node.proc is not None
        res.fsyncs_per_instance["osteoscreen"] = _fsyncs(node.proc.pid, lambda: send(raw.files, node.port,
                                                                                    called=NODE_AET), n)
    res.fsync_ms = fsync_costs(work / "fsync-probe")
    return res


@dataclass
class Latency:
    slices: int
    seconds: float  # last instance acknowledged -> SR and SC stored in the PACS, quiet period excluded
    quiet_s: float
    stages: dict[str, float]
    service_rss_mb: float
    worker_rss_mb: float
    receiver_rss_mb: float
    level: str | None
    mean_hu: float | None
    total_rss_mb: float = float("nan")  # every node process's peak, summed
    runs: int = 1


def bench_latency(work: Path, series: SampleSeries, runs: int, quiet_s: float = 2.0) -> Latency:
    """Send a series to a node that exports to Orthanc; time from storescu's exit to SR + SC in Orthanc."""
    results: list[Latency] = []
    for _ in range(runs):
        pacs = OrthancPACS(work / "pacs")
        shutil.rmtree(pacs.workdir, ignore_errors=True)
        pacs.start()
        try:
            with Node(work / "node", quiet_s=quiet_s, destination=pacs) as node:
                send(series.files, node.port, called=NODE_AET)
                acked = time.time()
                deadline = time.monotonic() + 600
                while not _all_results_in_pacs(node, pacs):
                    if time.monotonic() > deadline:
                        raise BenchError(f"results not in Orthanc after 600 s; see {node.log_path}")
                    time.sleep(0.05)
                in_pacs = time.time()
                results.append(_latency_record(node, len(series.files), acked, in_pacs, quiet_s))
        finally:
            pacs.stop()
    mid = sorted(results, key=lambda r: r.seconds)[len(results) // 2]
    return dataclasses.replace(mid, runs=len(results))


def _all_results_in_pacs(node: Node, pacs: OrthancPACS) -> bool:
    skipped = node.query("SELECT reason FROM series WHERE eligible=0")
    failed = node.query("SELECT last_error FROM jobs WHERE state='failed'")
    if skipped or failed:
        raise BenchError(f"the series was not screened: {(skipped or failed)[0][0]}")
    if not node.query("SELECT 1 FROM jobs WHERE state='done'"):
        return False
    expected = int(node.query("SELECT COUNT(*) FROM outbox")[0][0])
    return len(pacs.get("/instances")) >= expected  # type: ignore[arg-type]


def _latency_record(node: Node, slices: int, acked: float, in_pacs: float, quiet_s: float) -> Latency:
    last_received = float(node.query("SELECT MAX(received_at) FROM instances")[0][0])
    decided = float(node.query("SELECT decided_at FROM series")[0][0])
    created, finished, result = node.query("SELECT created_at, updated_at, result_json FROM jobs")[0]
    summary = json.loads(result)
    perf = summary.get("performance", {})
    stages = {"routing (after the quiet period)": decided - (last_received + quiet_s),
              "job dispatch + lab lookup": perf.get("started_at", decided) - decided}
    stages.update({"load/decode" if k == "load_decode" else k: v for k, v in perf.get("stage_s", {}).items()})
    worker_total = sum(perf.get("stage_s", {}).values())
    stages["result recording"] = max(0.0, finished - perf.get("started_at", created) - worker_total)
    stages["export (C-STORE to the PACS)"] = in_pacs - finished
    # The quiet period began at the last instance received (before storescu's exit at ``acked``): the latency
    # runs from there, less that period.
    start = min(acked, last_received)
    return Latency(slices=slices, seconds=in_pacs - start - quiet_s, quiet_s=quiet_s, stages=stages,
                   service_rss_mb=node.peak_rss_mb(), worker_rss_mb=float(perf.get("worker_peak_rss_mb", "nan")),
                   receiver_rss_mb=node.receivers_peak_rss_mb(), total_rss_mb=node.total_peak_rss_mb(),
                   level=summary.get("level"), mean_hu=summary.get("mean_hu"))


def bench_inference(n: int = 200) -> dict[str, float]:
    """Fused model on this machine's backend: median ms per study for the prediction and for SHAP."""
    import numpy as np

    from engines.bundle import load_bundle
    from hl7.panel import LabPanel
    from pipeline.demographics import Demographics
    from pipeline.fused import tabular_input
    from pipeline.image_input import PATCH_PX, SLICE_OFFSETS_MM
    from pipeline.job import fused_model
    from pipeline.timing import StageClock

    model = fused_model(load_bundle("fused_kdamm_v1"), "auto")
    patch = np.zeros((len(SLICE_OFFSETS_MM), PATCH_PX, PATCH_PX), dtype=np.float32)
    tab = tabular_input(LabPanel("BENCH", None, None, 90), Demographics(67.0, "F", None, None))
    model.predict(patch, tab)
    pred, shap = [], []
    for _ in range(n):
        clock = StageClock()
        model.predict(patch, tab, clock=clock)
        pred.append(clock.seconds["model"] * 1000)
        shap.append(clock.seconds["shap"] * 1000)
    return {"backend": model.backend, "predict_ms": _median(pred), "shap_ms": _median(shap)}  # type: ignore[dict-item]


def cpu_ticks() -> tuple[int, int]:
    """(steal, total) CPU ticks since boot from /proc/stat; (0, 0) where it cannot be read."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), sum(fields)


def steal_share(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    """The share of CPU time the hypervisor gave to other guests between two ``cpu_ticks`` readings (a
    virtual machine's figures drop with it); None where /proc/stat has no such counter."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else None


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    dcmtk = subprocess.run([_need("storescu"), "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    import pynetdicom

    return (f"{cpu}, {os.cpu_count()} cores, {mem_gb:.0f} GiB RAM; Linux {platform.release()}; "
            f"Python {platform.python_version()}, pynetdicom {pynetdicom.__version__}; {dcmtk.strip()}")


def _engine_figures(runs: int = 30) -> dict:
    """`osteoscreen engines bench` in the same run: every available backend, parity and timings."""
    from engines import available_backends
    from engines.bench import report, run, summary
    from engines.options import current
    from pipeline.engine_inputs import real_inputs

    backends = [b for b in available_backends() if b != "triton"]
    parity, timings, notes = run(backends, real_inputs(), runs, current(), seed=20261125)
    table = report(parity, timings, notes, runs)
    return {"table": table[table.index("| backend"):table.index("\n\nParity")], "line": summary(parity, timings)}


def _hl7_figures(n: int = 2000) -> dict:
    from hl7.tools import bench as hl7_bench

    figures = hl7_bench(n, out=lambda _line: None)
    if figures["acked"] != n or figures["stored"] != n:
        raise BenchError(f"HL7 listener: {figures['acked']} AA and {figures['stored']} stored of {n} messages")
    return figures


def work_filesystem(path: Path) -> str:
    """The filesystem the bench writes to, from /proc/self/mounts; a RAM-backed one (tmpfs) is refused, since
    fsync costs nothing there and the durability comparison would be void."""
    path = path.resolve()
    best, fstype = "", "unknown"
    try:
        for line in Path("/proc/self/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and (str(path) == parts[1] or str(path).startswith(parts[1].rstrip("/") + "/")) \
                    and len(parts[1]) >= len(best):
                best, fstype = parts[1], parts[2]
    except OSError:
        pass
    if fstype in ("tmpfs", "ramfs"):
        raise BenchError(f"the work directory {path} is on {fstype} (RAM): fsync costs nothing there; give "
                         "--workdir on a disk")
    return f"{fstype} at {best or '?'}"


def run_bench(*, runs: int = 5, slices: int = 300, scaling: tuple[int, ...] = (100, 300, 600, 1000),
              workdir: Path | None = None, output: Path | None = Path("docs/benchmarks.md"),
              out: Callable[[str], None] = print) -> dict:
    """Run every part, print the table and the two summary lines, and write ``output``."""
    for tool in ("storescu", "storescp", "Orthanc"):
        _need(tool)
    started, ticks = time.time(), cpu_ticks()
    tmp = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="osteoscreen-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    filesystem = work_filesystem(tmp)
    data, work = tmp / "series", tmp / "run"
    out(f"osteoscreen bench: {runs} run(s) per figure, {slices}-slice 512 x 512 series, work dir {tmp} "
        f"({filesystem})")
    out("generating series (the shipped real CT resampled; see dicom_node/sample.py) ...")
    raw = write_resampled_series(data / "raw", slices, tag="bench-raw")
    concurrent = [write_resampled_series(data / f"c{i}", slices, tag=f"bench-c{i}") for i in range(4)]
    compressed = {"jpeg-ls": write_resampled_series(data / "jls", slices, tag="bench-jls",
                                                    transfer_syntax=JPEGLSLossless),
                  "j2k": write_resampled_series(data / "j2k", slices, tag="bench-j2k",
                                                transfer_syntax=JPEG2000Lossless)}
    out("ingest (storescu -> receiver, one association unless stated) ...")
    ingest = bench_ingest(work, raw, concurrent, compressed, runs, out)
    r = ingest.rates
    summary = {
        "inst_s": r["osteoscreen"],
        "ratio_storescp": r["osteoscreen"] / r["storescp"],
        "ratio_storescp_sync": r["osteoscreen"] / r["storescp + sync"],
        "ratio_orthanc": r["osteoscreen"] / r["orthanc (TCP_NODELAY=1)"],
        "concurrent4_ratio": r["osteoscreen, 4 concurrent senders"] / r["storescp"],
    }
    ingest_line = (f"ingest: inst_s={summary['inst_s']:.0f} ratio_storescp={summary['ratio_storescp']:.2f} "
                   f"ratio_storescp_sync={summary['ratio_storescp_sync']:.2f} "
                   f"ratio_orthanc={summary['ratio_orthanc']:.2f} concurrent4_ratio={summary['concurrent4_ratio']:.2f}")
    out(ingest_line)
    out("study latency (storescu exit -> SR + SC stored in Orthanc) ...")
    latency = bench_latency(work, raw, runs)
    out(f"  {slices} slices: {latency.seconds:.1f} s (+ {latency.quiet_s:g} s quiet period), service "
        f"{latency.service_rss_mb:.0f} MB, worker {latency.worker_rss_mb:.0f} MB, receiver "
        f"{latency.receiver_rss_mb:.0f} MB, all processes {latency.total_rss_mb:.0f} MB peak RSS")
    scale: list[Latency] = []
    for n in scaling:
        if n == slices:
            scale.append(latency)
            continue
        series = write_resampled_series(data / f"s{n}", n, tag=f"bench-s{n}")
        scale.append(bench_latency(work, series, max(1, min(runs, 3))))
        out(f"  {n} slices: {scale[-1].seconds:.1f} s, service {scale[-1].service_rss_mb:.0f} MB, worker "
            f"{scale[-1].worker_rss_mb:.0f} MB, receiver {scale[-1].receiver_rss_mb:.0f} MB, all processes "
            f"{scale[-1].total_rss_mb:.0f} MB")
        shutil.rmtree(data / f"s{n}", ignore_errors=True)
    peak = latency.total_rss_mb  # every process of the node, summed: what the machine must hold
    latency_line = f"latency: slices={slices} seconds={latency.seconds:.1f} peak_rss_mb={peak:.0f}"
    out(latency_line)
    out("HL7 listener and inference ...")
    hl7 = _hl7_figures()
    inference = bench_inference()
    inference["engines"] = _engine_figures()
    out(inference["engines"]["line"])
    report = {"ingest": ingest, "summary": summary, "latency": latency, "scaling": scale, "hl7": hl7,
              "inference": inference, "runs": runs, "slices": slices, "ingest_line": ingest_line,
              "latency_line": latency_line, "minutes": (time.time() - started) / 60, "filesystem": filesystem,
              "steal": steal_share(ticks, cpu_ticks())}
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(render_markdown(report))
        out(f"wrote {output}")
    if not workdir:
        shutil.rmtree(tmp, ignore_errors=True)
    out(ingest_line)
    out(latency_line)
    return report


def render_markdown(rep: dict) -> str:
    ing: Ingest = rep["ingest"]
    lat: Latency = rep["latency"]
    s = rep["summary"]
    lines = [
        "# Benchmarks",
        "",
        f"Regenerated by `osteoscreen bench` on {dt.date.today().isoformat()} "
        f"({rep['minutes']:.0f} min). Do not edit by hand.",
        "",
        f"Machine: {machine()}; work directory on {rep.get('filesystem', 'unknown')}."
        + (f" CPU steal during the run: {rep['steal']:.0%} of the CPU time went to other guests of the host "
           "(/proc/stat), so absolute rates vary between runs; compare the ratios, which come from the same run."
           if rep.get("steal") is not None else ""),
        "",
        f"Series: the shipped real CT (`dicom_node/sample_data/example_ct.nii.gz`) resampled to "
        f"{rep['slices']} x 512 x 512 with seeded 8 HU noise (`dicom_node/sample.py`, "
        "`resampled_sample_slices`); about 0.5 MB per instance uncompressed. Every ingest figure is the median of "
        f"{rep['runs']} runs (Orthanc as packaged: up to 3, after the others; the scaling table gives its own run "
        "counts); every run starts the receiver on an "
        "empty store. The runs are interleaved rounds: each round runs every receiver once, back to back, so a "
        "change in the host's speed during the bench moves the receivers alike rather than biasing the ratios; "
        "the last column gives each receiver's rate over the same round's storescp rate. "
        "Senders are DCMTK storescu with `TCP_NODELAY=1` and 128 KiB PDUs on loopback.",
        "",
        "## Ingest",
        "",
        "| receiver | instances/s | MB/s | vs storescp | per round vs storescp (min-max) |",
        "|---|---:|---:|---:|---:|",
    ]
    fork4 = ing.rates.get(f"{FORKING_STORESCP}, 4 concurrent senders", float("nan"))
    store_alone4 = next((r for k, r in ing.rates.items() if k.startswith(STORE_ALONE)), float("nan"))
    durable4 = next((r for k, r in ing.rates.items() if k.startswith(DURABLE_WRITES)), float("nan"))
    for label, rate in ing.rates.items():
        paired = ing.round_ratios.get(label)
        spread = f"{min(paired):.2f}-{max(paired):.2f}" if paired else "-"
        ref = reference_of(label)
        against = "" if ref == "storescp" else f" (vs {ref})"
        lines.append(f"| {label} | {rate:.0f} | {ing.mb_s[label]:.0f} | {rate / ing.rates[ref]:.2f}{against} | "
                     f"{spread} |")
    lines += [
        "",
        "Each row is compared with storescp on the same series: a compressed series' osteoscreen row with "
        "storescp on that compressed series (named in the row), the storescp rows of the compressed series with "
        "storescp on the uncompressed one. The 4-sender rows are compared with storescp's single-sender rate, "
        "as the bar of issue 11 is written.",
        "",
        "Durability is not equal: fsync/fdatasync calls per instance, counted with `strace -c` during one run: "
        + ", ".join(f"{k} {'n/a' if v is None else f'{v:g}'}" for k, v in ing.fsyncs_per_instance.items())
        + ". storescp never syncs, so `storescp + sync` adds one `sync` after the run. osteoscreen answers "
        "Success only after the instance file and its directory entry are fsynced and the index row is committed "
        "(the fsync count includes its receiver processes). The index row itself is committed without a sync of its "
        "own (it is rebuilt from the durable file after a power loss; see docs/conformance.md).",
        "",
        "osteoscreen runs with its defaults: its own DICOM upper layer (blocking reads; each data set streamed to "
        "its file as it arrives, the header read from the first fragment) in 2 receiver processes "
        "(`[node] receiver_processes`), each association handed to the less busy one. The machine has 2 cores, "
        "which the 4 storescu senders share with the receivers. With 4 senders, plain storescp serves one "
        "association at a time (the others wait for it); `storescp --fork` gives each association its own "
        "process, which is the fair comparison for osteoscreen's receivers.",
        "",
        "Bars (issue 11), measured above: one association >= 1.3 x Orthanc with TCP_NODELAY=1 "
        f"(here {s['ratio_orthanc']:.2f}); >= 0.35 x storescp (here {s['ratio_storescp']:.2f}); 4 concurrent senders "
        f">= 1.0 x storescp's single-sender rate (here {s['concurrent4_ratio']:.2f}; the same 4 senders into "
        f"`storescp --fork`, which never fsyncs, reach {fork4 / ing.rates['storescp']:.2f} x it).",
        "",
        f"`{STORE_ALONE}` shows what durable storing alone costs on this machine (a reference, not a ceiling: "
        "it runs 4 writer processes where the node runs 2 receivers): the same instances, read "
        "into memory first, stored by one process per series through the node's own `InstanceStore.store` (temp "
        "file, fsync, rename, directory fsync, unsynced index commit), with no network and no DICOM. It reached "
        f"{store_alone4 / ing.rates['storescp']:.2f} x storescp's single-sender rate, against "
        f"{s['concurrent4_ratio']:.2f} for the 4 senders through the network. Measured in the same run: an fsync "
        f"after writing a new 0.5 MB file took {ing.fsync_ms.get('new_file_ms', float('nan')):.2f} ms (median of "
        f"50), an fdatasync after overwriting 4 KiB {ing.fsync_ms.get('overwrite_4k_ms', float('nan')):.2f} ms: "
        "making a new file durable costs the writeback and block allocation of the whole file, which storescp "
        "leaves for after its run, and the kernel does that work on the cores the senders and receivers share.",
        "",
        f"`{DURABLE_WRITES}` is the floor under any receiver that answers only after an instance is durable: the "
        "same instances written from memory by 4 processes with only the system calls the store makes per "
        "instance (new temporary file, write, fsync, rename, directory fsync), with no network, no senders, no "
        f"DICOM and no index on the machine. It reached {durable4 / ing.rates['storescp']:.2f} x storescp's "
        "single-sender rate. The 4-sender bar (1.0 x) thus asks a durable receiver for "
        f"{ing.rates['storescp'] / durable4:.0%} of what bare durable writes reach here, while it also receives "
        "every byte over the network from 4 storescu processes that run on the same cores.",
        "",
        "```",
        rep["ingest_line"],
        "```",
        "",
        "## Study latency",
        "",
        f"From the last instance received (the node's index time; storescu exits just after) to the SR and the "
        f"SC stored in Orthanc, with the {lat.quiet_s:g} s series quiet period, which starts there, excluded; one "
        "worker process, CPU inference. "
        f"Median run of {rep['runs']}: **{lat.seconds:.1f} s**. The chosen level was {lat.level} "
        f"({lat.mean_hu} HU).",
        "",
        "| stage | seconds |",
        "|---|---:|",
    ]
    for name, sec in lat.stages.items():
        lines.append(f"| {name} | {sec:.2f} |")
    lines += [
        "",
        "```",
        rep["latency_line"],
        "```",
        "",
        "## Scaling and memory",
        "",
        "Peak RSS (VmHWM) of the service process, of the job worker process (its own, read in the worker) and of "
        "the largest receiver process, and the sum of the peaks of every process of the node (service, "
        "receivers, job worker, HL7 parser, multiprocessing's resource tracker): an upper bound of what they "
        "hold together, and the `peak_rss_mb` of the summary line. Each node started fresh; latency is the "
        "median of the runs given.",
        "",
        "| slices | runs | latency s | service MB | worker MB | receiver MB | all processes MB | level | L1 HU |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for x in rep["scaling"]:
        lines.append(f"| {x.slices} | {x.runs} | {x.seconds:.1f} | {x.service_rss_mb:.0f} | {x.worker_rss_mb:.0f} | "
                     f"{x.receiver_rss_mb:.0f} | {x.total_rss_mb:.0f} | "
                     f"{x.level or '-'} | {x.mean_hu if x.mean_hu is not None else '-'} |")
    h, inf = rep["hl7"], rep["inference"]
    lines += [
        "",
        "## HL7 and inference",
        "",
        f"- HL7 ORU listener (MLLP, one connection, ACK after the message is durable): "
        f"{h['msgs_s']:.0f} messages/s, p50 {h['p50_ms']:.2f} ms, p99 {h['p99_ms']:.2f} ms.",
        f"- Fused model on {inf['backend']}: {inf['predict_ms']:.2f} ms per prediction, exact SHAP "
        f"{inf['shap_ms']:.2f} ms (median of 200).",
        "- Inference engines (`osteoscreen engines bench`, 30 timed runs; selector = the DRLIS Q-network over a "
        "300-slice volume, its real rollout and one 300-state batch; ratios to PyTorch eager in the same run; "
        "GPU figures in docs/benchmarks-gpu.md):",
        "",
        inf["engines"]["table"],
        "",
        inf["engines"]["line"],
        "",
        "Reference for context: a published MONAI Deploy deployment takes about 14 s to ingest a 324-slice CT "
        "and about 2.5 min end to end.",
        "",
        "Command: `osteoscreen bench` (options: `--runs`, `--slices`, `--scaling`, `--workdir`, `--output`).",
        "",
    ]
    return "\n".join(lines)
