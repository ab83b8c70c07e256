"""Pull a patient's labs from the LIS: QBP^Q11 -> RSP^K11 (v2.5) or QRY^R02 -> ORF^R04 (legacy).

Only used when the local store lacks a lab the model uses for a job, and only
within a time budget: a slow or absent LIS delays a job by at most
``budget_s`` and the job then goes on with those labs marked missing. Answers
are checked (our control ID in MSA-2, our query tag in QAK-1, only the asked-for
patient in every PID) and then stored verbatim like any received message, so
the lookup, the audit trail and `osteoscreen hl7 labs` see them the same way.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import socket
import ssl
import threading
import time
import uuid
from dataclasses import dataclass

from config.schema import LISQuerySettings
from hl7.client import MLLPClient
from hl7.er7 import escape
from hl7.precheck import PATIENT_ID_TYPES, PrecheckError, issuer_canon, parse_header, split_segments
from hl7.privacy import patient_key
from hl7.store import DuplicateConflict, LabStore

log = logging.getLogger("osteoscreen.hl7.query")

RESPONSES = {"qbp_q11": (("RSP", "K11"),), "qry_r02": (("ORF", "R04"),)}
DEFAULT_VERSION = {"qbp_q11": "2.5.1", "qry_r02": "2.3"}


@dataclass(frozen=True)
class QueryOutcome:
    status: str  # "found", "no data", "failed", "skipped"
    detail: str
    attempts: int = 0
    elapsed_s: float = 0.0
    observations: int = 0  # OBX segments in the stored answer

    @property
    def note(self) -> str:
        """One line for the job's lab notes and the SR."""
        return f"LIS query ({self.attempts} attempt(s), {self.elapsed_s:.1f} s): {self.status}: {self.detail}"


class QueryError(Exception):
    """The LIS answered, but not with something we can use (refused, wrong patient, malformed)."""


@dataclass(frozen=True)
class Query:
    protocol: str
    control_id: str
    tag: str
    message: bytes


def build_query(s: LISQuerySettings, patient_id: str, issuer: str | None, start: dt.date, end: dt.date,
                now: dt.datetime | None = None) -> Query:
    """The query message for ``s.protocol``, asking for one patient's results between two dates."""
    now = now or dt.datetime.now()
    control = "Q" + uuid.uuid4().hex[:15].upper()
    tag = "T" + control[1:]
    version = s.version or DEFAULT_VERSION[s.protocol]
    pid = escape(patient_id)
    auth = escape(issuer or "")
    head = "|".join(["MSH", "^~\\&", s.sending_application, s.sending_facility, s.receiving_application,
                     s.receiving_facility, now.strftime("%Y%m%d%H%M%S"), ""])
    if s.protocol == "qbp_q11":
        segments = [
            head + f"|QBP^Q11^QBP_Q11|{control}|P|{version}",
            f"QPD|{s.query_name}|{tag}|{pid}^^^{auth}^MR|{start:%Y%m%d}|{end:%Y%m%d}",
            f"RCP|I|{s.max_results}^RD",
        ]
    else:
        who = f"{pid}" + (f"^^^^^^^^{auth}" if auth else "")  # XCN-9: assigning authority
        segments = [
            head + f"|QRY^R02^QRY_R02|{control}|P|{version}",
            f"QRD|{now:%Y%m%d%H%M%S}|R|I|{tag}|||{s.max_results}^RD|{who}|RES|",
            f"QRF|{s.receiving_application}|{start:%Y%m%d}|{end:%Y%m%d}",
        ]
    return Query(s.protocol, control, tag, ("\r".join(segments) + "\r").encode("latin-1"))


def _fields(segment: str, fs: str = "|") -> list[str]:
    return segment.split(fs)


def check_answer(query: Query, answer: bytes, patient_id: str, issuer: str | None,
                 issuer_aliases: dict[str, str] | None = None) -> tuple[str, int]:
    """("found"|"no data", OBX count) for a usable answer; QueryError with the reason otherwise.

    ``issuer_aliases`` (labs.issuer_aliases) joins the names of one assigning authority.
    """
    canon = issuer_canon(issuer_aliases)
    text = answer.decode("latin-1")
    segments = split_segments(text)
    try:
        header = parse_header(text, supported=RESPONSES[query.protocol]) if any(
            s.startswith("PID") for s in segments) else None
    except PrecheckError as exc:
        raise QueryError(f"unusable answer: {exc.text}") from None
    if not segments or not segments[0].startswith("MSH"):
        raise QueryError("the answer does not start with MSH")
    fs = segments[0][3]
    cs = segments[0][4] if len(segments[0]) > 4 else "^"
    msh9 = _fields(segments[0], fs)[8] if len(_fields(segments[0], fs)) > 8 else ""
    expected = RESPONSES[query.protocol][0]
    mtype = tuple(msh9.split(cs)[:2])
    if mtype != expected and not (mtype[:1] == ("ACK",)):
        raise QueryError(f"answer is {'^'.join(mtype)}, expected {'^'.join(expected)}")
    by_name: dict[str, list[list[str]]] = {}
    for seg in segments[1:]:
        by_name.setdefault(seg[:3], []).append(_fields(seg, fs))
    msa = (by_name.get("MSA") or [[]])[0]
    if len(msa) < 3:
        raise QueryError("no MSA segment in the answer")
    if msa[2] != query.control_id:
        raise QueryError(f"MSA-2 {msa[2]!r} does not acknowledge our query {query.control_id}")
    if msa[1] not in ("AA", "CA"):
        why = msa[3] if len(msa) > 3 and msa[3] else "no reason given"
        raise QueryError(f"LIS refused the query ({msa[1]}): {why}")
    if mtype[:1] == ("ACK",):
        raise QueryError("LIS acknowledged the query without answering it")
    if query.protocol == "qbp_q11":
        qak = (by_name.get("QAK") or [[]])[0]
        if len(qak) < 3:
            raise QueryError("no QAK segment in the RSP^K11")
        if qak[1] != query.tag:
            raise QueryError(f"QAK-1 {qak[1]!r} is not our query tag {query.tag}")
        status = qak[2].upper()
        if status == "NF":
            return "no data", 0
        if status != "OK":
            raise QueryError(f"QAK-2 query status {status or '(empty)'}")
    n_obx = len(by_name.get("OBX", []))
    if header is None:
        if n_obx:
            raise QueryError("results without a PID segment")
        return "no data", 0
    want = canon(issuer)
    for pid in by_name.get("PID", []):
        ids = []
        for rep in (pid[3] if len(pid) > 3 else "").split(segments[0][5] if len(segments[0]) > 5 else "~"):
            parts = rep.split(cs)
            if len(parts) > 4 and parts[4].strip().upper() not in PATIENT_ID_TYPES:
                continue  # an account or visit number is not the patient's identity
            auth = parts[3].split(segments[0][7] if len(segments[0]) > 7 else "&") if len(parts) > 3 else [""]
            ids.append((parts[0].strip(), canon(auth[0] or (auth[1] if len(auth) > 1 else ""))))
        if not any(i == patient_id and (not want or not a or a == want) for i, a in ids):
            raise QueryError("the answer holds results for another patient: not stored")
    return ("found" if n_obx else "no data"), n_obx


class LabQueryClient:
    """Asks the LIS within a time budget; stores usable answers; never raises into the job."""

    def __init__(self, settings: LISQuerySettings, store: LabStore, ssl_context: ssl.SSLContext | None = None,
                 clock=time.monotonic, issuer_aliases: dict[str, str] | None = None) -> None:
        self.s = settings
        self.issuer_aliases = issuer_aliases or {}
        self.store = store
        self.ssl_context = ssl_context
        self._clock = clock
        self._recent: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def _exchange(self, message: bytes, deadline: float) -> bytes:
        remaining = deadline - self._clock()
        if remaining <= 0:
            raise TimeoutError("time budget spent")
        with MLLPClient(self.s.host, self.s.port, timeout_s=min(self.s.read_timeout_s, remaining),
                        connect_timeout_s=min(self.s.connect_timeout_s, remaining),
                        ssl_context=self.ssl_context) as client:
            return client.send(message, timeout_s=max(0.0, deadline - self._clock()))  # a dripping LIS too

    def fetch(self, patient_id: str, issuer: str | None, start: dt.date, end: dt.date) -> QueryOutcome:
        """Query, check and store; the outcome says what happened (it is also logged, with a hashed key)."""
        key = (patient_id, issuer or "")
        started = self._clock()
        pk = patient_key(patient_id, issuer)
        with self._lock:
            last = self._recent.get(key)
            if last is not None and started - last < self.s.requery_after_s:
                return QueryOutcome("skipped", f"asked {started - last:.0f} s ago (requery_after_s "
                                               f"{self.s.requery_after_s:g})")
            self._recent[key] = started
        deadline = started + self.s.budget_s
        attempts, last_error = 0, ""
        query = build_query(self.s, patient_id, issuer, start, end)
        while attempts <= self.s.retries and self._clock() < deadline:
            attempts += 1
            try:
                answer = self._exchange(query.message, deadline)
            except (OSError, ConnectionError, TimeoutError, socket.timeout, ssl.SSLError) as exc:
                last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                log.warning("LIS query %s for %s, attempt %d failed: %s", query.control_id, pk, attempts, last_error)
                pause = min(0.5 * attempts, deadline - self._clock())
                if attempts <= self.s.retries and pause > 0:
                    time.sleep(pause)
                continue
            return self._finish(query, answer, patient_id, issuer, attempts, started, pk)
        outcome = QueryOutcome("failed", f"LIS unreachable at {self.s.host}:{self.s.port} ({last_error or 'budget'})"
                                         f"; labs missing", attempts, self._clock() - started)
        log.warning("LIS query for %s: %s", pk, outcome.note)
        return outcome

    def _finish(self, query: Query, answer: bytes, patient_id: str, issuer: str | None, attempts: int,
                started: float, pk: str) -> QueryOutcome:
        elapsed = self._clock() - started
        try:
            status, n_obx = check_answer(query, answer, patient_id, issuer, self.issuer_aliases)
        except QueryError as exc:
            log.warning("LIS query %s for %s: %s", query.control_id, pk, exc)
            return QueryOutcome("failed", str(exc), attempts, elapsed)
        if status == "found":
            header = parse_header(answer.decode("latin-1"), supported=RESPONSES[query.protocol])
            # Keyed by our query's control ID too: a LIS may reuse its own control IDs across answers.
            header = dataclasses.replace(header, control_id=f"{query.control_id}:{header.control_id}")
            try:
                self.store.store_message(answer, header)
            except DuplicateConflict as exc:  # cannot happen with our unique IDs; say so if it does
                return QueryOutcome("failed", f"answer not stored: {exc}", attempts, elapsed)
        log.info("LIS query %s for %s: %s, %d observation(s) in %.2f s", query.control_id, pk, status, n_obx, elapsed)
        detail = f"{n_obx} observation(s) received and stored" if status == "found" else "the LIS has no results"
        return QueryOutcome(status, detail, attempts, elapsed, n_obx)
