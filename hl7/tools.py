"""IT tools: send a file, show a patient's labs, list parse errors, benchmark the listener."""
from __future__ import annotations

import datetime as dt
import socket
import tempfile
import time
from pathlib import Path

import numpy as np

from config.schema import LabSettings, Settings, TLSSettings
from hl7.ack import is_enhanced
from hl7.client import MLLPClient, ack_code
from hl7.lookup import lookup_labs
from hl7.mapping import load_mapping
from hl7.mllp import CR, FS, MLLPServer, frame
from hl7.precheck import PrecheckError, parse_header, split_segments
from hl7.query import LabQueryClient
from hl7.receiver import LabReceiver
from hl7.store import LabStore
from hl7.tls import client_context


def send_file(path: Path, host: str, port: int, out=print, optional_wait_s: float = 5.0, *,
              tls_ca: Path | None = None, tls_cert: Path | None = None, tls_key: Path | None = None) -> int:
    """Send one message; show every ACK the listener returns (enhanced mode: accept and/or application)."""
    text = Path(path).read_bytes().decode("latin-1")
    raw = "\r".join(split_segments(text)).encode("latin-1") + b"\r"
    try:
        header = parse_header(raw.decode("latin-1"))
    except PrecheckError:
        header = None
    enhanced = is_enhanced(header)
    accept = (header.accept_ack_type or "AL").upper() if enhanced and header else "AL"
    app = (header.application_ack_type or "NE").upper() if enhanced and header else "NE"
    acks: list[bytes] = []
    ctx = client_context(TLSSettings(enabled=True, ca_file=tls_ca, cert_file=tls_cert, key_file=tls_key)) \
        if tls_ca or tls_cert else None
    with MLLPClient(host, port, ssl_context=ctx) as c:
        c.send_raw(frame(raw))
        for expected, optional in ((accept != "NE", accept != "AL"), (app != "NE", app != "AL")):
            if not expected:
                continue
            try:
                acks.append(c.read_frame(timeout_s=optional_wait_s if optional else None))
            except TimeoutError:
                pass  # an ER/SU condition that did not apply
    for ack in acks:
        out(ack.decode("latin-1").replace("\r", "\n").strip())
    codes = []
    for ack in acks:
        try:
            codes.append(ack_code(ack))
        except ValueError as exc:  # the peer's answer is not an ACK: say so, not a traceback
            codes.append(f"unreadable ACK ({exc})")
    out(f"hl7 send: {path} -> {host}:{port} {' '.join(codes) or 'no ACK (as MSH-15/16 asked)'}")
    return 0 if all(code in ("AA", "CA") for code in codes) else 1


def show_labs(store_path: Path, patient_id: str, issuer: str | None, window_days: int, out=print,
              labs: LabSettings | None = None) -> int:
    s = labs or LabSettings()
    store = LabStore(store_path)
    try:
        panel = lookup_labs(store, patient_id, issuer, dt.date.today(), window_days=window_days,
                            match_without_issuer=s.match_without_issuer, mapping=load_mapping(s.mapping_file),
                            accept_preliminary=s.accept_preliminary, issuer_aliases=s.issuer_aliases)
    finally:
        store.close()
    for v in panel.values:
        when = v.observed_at.isoformat(sep=" ") if v.observed_at else "undated"
        flag = f" flag {v.flags}" if v.flags else ""
        out(f"{v.loinc:8s} {v.name:30s} {v.value:10.4g} {v.unit:16s} {when}  ({v.original}{flag}; {v.status}; "
            f"{v.source})")
    for e in panel.excluded:
        out(f"{e.code:8s} {e.name:30s} not used: {e.reason}")
    out(f"hl7 labs: patient {patient_id}: {len(panel.values)} usable, {len(panel.excluded)} excluded "
        f"(window {window_days} days before today)")
    return 0


def query_lis(settings: Settings, patient_id: str, issuer: str | None, window_days: int, out=print) -> int:
    """Ask the configured LIS for one patient's labs now, store the answer and show what the lookup makes of it."""
    q = settings.lis_query
    if not q.enabled:
        out("note: lis_query.enabled is false; querying anyway with the [lis_query] settings")
    store_path = Path(settings.node.state_dir) / "labs.sqlite"
    store = LabStore(store_path)
    try:
        client = LabQueryClient(q.model_copy(update={"requery_after_s": 0.0}), store, client_context(q.tls),
                                issuer_aliases=settings.labs.issuer_aliases)
        today = dt.date.today()
        outcome = client.fetch(patient_id, issuer, today - dt.timedelta(days=window_days), today)
    finally:
        store.close()
    out(f"hl7 query: {q.protocol} to {q.host}:{q.port}: {outcome.note}")
    if outcome.status == "found":
        show_labs(store_path, patient_id, issuer, window_days, out, labs=settings.labs)
    return 0 if outcome.status in ("found", "no data") else 1


def show_errors(store_path: Path, out=print) -> int:
    store = LabStore(store_path)
    try:
        rows = store.parse_errors()
        states = store.parse_states()
    finally:
        store.close()
    for mid, at, who, err in rows:
        out(f"message {mid} received {at} from {who}: {err}")
    out(f"hl7 errors: {len(rows)} unparsed message(s); states {states}")
    return 1 if rows else 0


def _commit_rate(directory: Path, n: int = 1000) -> float:
    """The reference: bare SQLite commits/s (WAL, synchronous=FULL, one ~1.5 KB row each) on the same disk.

    Every acknowledged message costs at least one such commit, so this bounds the
    listener; the disk's fsync latency varies a lot on shared machines.
    """
    import sqlite3

    db = sqlite3.connect(directory / "reference.sqlite", isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE t (x BLOB)")
        row = b"x" * 1500
        t0 = time.perf_counter()
        for _ in range(n):
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO t VALUES (?)", (row,))
            db.execute("COMMIT")
        return n / (time.perf_counter() - t0)
    finally:
        db.close()


def bench(n: int = 2000, out=print) -> dict:
    """Own listener on a free loopback port, fresh store; one connection, one message in flight.

    Also measures the bare commit rate of the same disk just before, as the reference
    (the listener's figure is a ratio of it: one commit per message is the floor).
    """
    from hl7.samples import demo_oru_message

    with tempfile.TemporaryDirectory() as tmp:
        reference = _commit_rate(Path(tmp))
        store = LabStore(Path(tmp) / "labs.sqlite")
        receiver = LabReceiver(store)
        server = MLLPServer("127.0.0.1", 0, receiver.handle, receiver.refuse, offload=receiver.needs_parse)
        server.start()
        try:
            msgs = [frame(demo_oru_message(dt.datetime(2026, 1, 5, 9), f"BENCH{i:06d}")) for i in range(n)]
            s = socket.create_connection(("127.0.0.1", server.bound_port))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            lat, buf, acks = [], b"", 0
            t0 = time.perf_counter()
            for m in msgs:
                t = time.perf_counter()
                s.sendall(m)
                while FS + CR not in buf:
                    buf += s.recv(65536)
                end = buf.index(FS + CR)
                acks += b"MSA|AA" in buf[:end]
                buf = buf[end + 2 :]
                lat.append(time.perf_counter() - t)
            elapsed = time.perf_counter() - t0
            s.close()
            stored = store.message_count()
        finally:
            server.stop()
            store.close()
    res = {"n": n, "msgs_s": n / elapsed, "p50_ms": float(np.median(lat) * 1000),
           "p99_ms": float(np.percentile(lat, 99) * 1000), "acked": acks, "stored": stored,
           "commit_s": reference, "ratio_commit": n / elapsed / reference}
    out(f"{n} ORU^R01 messages on one connection, ACK awaited for each; {acks} AA, {stored} stored")
    out(f"reference: bare SQLite FULL commits on this disk {reference:.0f}/s; listener at "
        f"{res['ratio_commit']:.2f} of it")
    out(f"hl7 bench: msgs_s={res['msgs_s']:.0f} p50_ms={res['p50_ms']:.2f} p99_ms={res['p99_ms']:.2f}")
    return res
