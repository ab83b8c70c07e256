"""Durable lab message store (SQLite): raw messages verbatim, then parsed observations.

A message is committed (one transaction, synchronous=FULL) before it is
acknowledged. Parsing happens afterwards; its state is kept per message so a
failure is visible and a crash between ACK and parse is resumed at start-up.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from hl7.precheck import MessageHeader, issuer_canon

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    received_at TEXT NOT NULL,
    sender TEXT NOT NULL,
    control_id TEXT NOT NULL,
    message_type TEXT NOT NULL,
    version TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    raw BLOB NOT NULL,
    parse_state TEXT NOT NULL DEFAULT 'pending',
    parse_error TEXT,
    UNIQUE (sender, control_id)
);
CREATE TABLE IF NOT EXISTS message_patients (
    message_id INTEGER NOT NULL REFERENCES messages(id),
    patient_id TEXT NOT NULL,
    issuer TEXT NOT NULL,
    birth_date TEXT NOT NULL DEFAULT '',
    sex TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS message_patients_pid ON message_patients(patient_id);
CREATE TABLE IF NOT EXISTS observations (
    id INTEGER PRIMARY KEY,
    message_id INTEGER NOT NULL REFERENCES messages(id),
    seq INTEGER NOT NULL,
    code TEXT NOT NULL,
    code_system TEXT NOT NULL,
    alt_code TEXT NOT NULL DEFAULT '',
    alt_system TEXT NOT NULL DEFAULT '',
    name TEXT NOT NULL,
    loinc TEXT,
    value_text TEXT NOT NULL,
    unit_text TEXT NOT NULL,
    value REAL,
    unit TEXT,
    value_type TEXT NOT NULL DEFAULT '',
    abnormal_flags TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL,
    observed_at TEXT,
    problem TEXT
);
CREATE INDEX IF NOT EXISTS observations_msg ON observations(message_id);
"""


@dataclass(frozen=True)
class StoredObservation:
    message_id: int
    source: str
    code: str
    code_system: str
    alt_code: str
    alt_system: str
    value_type: str
    abnormal_flags: str
    name: str
    loinc: str | None
    value_text: str
    unit_text: str
    value: float | None
    unit: str | None
    status: str
    observed_at: dt.datetime | None
    problem: str | None
    birth_date: str = ""
    sex: str = ""


_OBSERVATION_DEFAULTS = {"alt_code": "", "alt_system": "", "value_type": "", "abnormal_flags": ""}


@dataclass(frozen=True)
class StoreOutcome:
    message_id: int
    duplicate: bool


class DuplicateConflict(Exception):
    """Same sender and control ID as a stored message, but different content."""


class LabStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
            self._migrate()
        except sqlite3.Error as exc:
            reason = ("another process holds it" if "locked" in str(exc) or "busy" in str(exc)
                      else "a full or read-only disk, or a damaged file: restore the latest `osteoscreen backup`")
            raise sqlite3.DatabaseError(f"lab store {self.path}: {exc} ({reason})") from None

    def _migrate(self) -> None:
        """Bring a store written by an older release up to this schema (columns are only ever added)."""
        for table, added in (("message_patients", ("birth_date", "sex")),
                             ("observations", ("alt_code", "alt_system", "value_type", "abnormal_flags"))):
            cols = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
            for col in added:
                if col not in cols:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {col} TEXT NOT NULL DEFAULT ''")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def store_message(self, raw: bytes, header: MessageHeader) -> StoreOutcome:
        """Commit a message verbatim; an identical resend is recognised, a conflicting one refused."""
        digest = hashlib.sha256(raw).hexdigest()
        now = dt.datetime.now(dt.timezone.utc).isoformat()
        with self._lock:
            row = self._db.execute(
                "SELECT id, sha256 FROM messages WHERE sender=? AND control_id=?", (header.sender, header.control_id)
            ).fetchone()
            if row:
                if row[1] == digest:
                    return StoreOutcome(row[0], True)
                raise DuplicateConflict(
                    f"control ID {header.control_id} from {header.sender} was already received with different content"
                )
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cur = self._db.execute(
                    "INSERT INTO messages (received_at, sender, control_id, message_type, version, sha256, raw)"
                    " VALUES (?,?,?,?,?,?,?)",
                    (now, header.sender, header.control_id, f"{header.message_type}^{header.trigger_event}",
                     header.version, digest, raw),
                )
                mid = int(cur.lastrowid)
                self._db.executemany(
                    "INSERT INTO message_patients (message_id, patient_id, issuer, birth_date, sex) VALUES (?,?,?,?,?)",
                    [(mid, p.id, p.issuer, header.birth_date, header.sex) for p in header.patient_ids
                     if p.names_the_patient],  # an account or visit number never matches a study's Patient ID
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return StoreOutcome(mid, False)

    def pending_messages(self, *, patient_id: str | None = None, limit: int | None = None) -> list[tuple[int, bytes]]:
        sql = "SELECT id, raw FROM messages WHERE parse_state='pending'"
        args: tuple = ()
        if patient_id is not None:
            sql += " AND id IN (SELECT message_id FROM message_patients WHERE patient_id=?)"
            args = (patient_id,)
        sql += " ORDER BY id" + (f" LIMIT {int(limit)}" if limit else "")
        with self._lock:
            return [(r[0], r[1]) for r in self._db.execute(sql, args)]

    def parse_errors(self) -> list[tuple[int, str, str, str]]:
        """(message id, received at, sender|control id, error) of messages that could not be parsed."""
        with self._lock:
            return [tuple(r) for r in self._db.execute(  # type: ignore[misc]
                "SELECT id, received_at, sender || ' ' || control_id, parse_error FROM messages"
                " WHERE parse_state='failed' ORDER BY id")]

    def save_parse(self, message_id: int, observations: list[dict], error: str | None) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM observations WHERE message_id=?", (message_id,))
                self._db.executemany(
                    "INSERT INTO observations (message_id, seq, code, code_system, alt_code, alt_system, name, loinc,"
                    " value_type, value_text, unit_text, value, unit, abnormal_flags, status, observed_at, problem)"
                    " VALUES (:message_id,:seq,:code,:code_system,:alt_code,:alt_system,:name,:loinc,:value_type,"
                    ":value_text,:unit_text,:value,:unit,:abnormal_flags,:status,:observed_at,:problem)",
                    [{**_OBSERVATION_DEFAULTS, **o, "message_id": message_id} for o in observations],
                )
                self._db.execute(
                    "UPDATE messages SET parse_state=?, parse_error=? WHERE id=?",
                    ("failed" if error else "parsed", error, message_id),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def parse_states(self) -> dict[str, int]:
        with self._lock:
            return dict(self._db.execute("SELECT parse_state, count(*) FROM messages GROUP BY parse_state").fetchall())

    def message_count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM messages").fetchone()[0])

    def observations_for(self, patient_id: str, issuer: str | None, match_without_issuer: bool,
                         issuer_aliases: dict[str, str] | None = None) -> list[StoredObservation]:
        """Observations from messages about this patient.

        Identity is the identifier plus its assigning authority. ``issuer_aliases``
        maps the names either side uses for one authority (DICOM IssuerOfPatientID,
        HL7 PID-3.4 namespace or universal ID) to one name before they are compared.
        """
        canon = issuer_canon(issuer_aliases)

        sql = (
            "SELECT o.message_id, m.sender || ' ' || m.control_id, o.code, o.name, o.loinc, o.value_text, o.unit_text,"
            " o.value, o.unit, o.status, o.observed_at, o.problem, mp.issuer, mp.birth_date, mp.sex,"
            " o.code_system, o.alt_code, o.alt_system, o.value_type, o.abnormal_flags"
            " FROM observations o JOIN messages m ON m.id=o.message_id"
            " JOIN message_patients mp ON mp.message_id=o.message_id WHERE mp.patient_id=? ORDER BY o.message_id, o.seq"
        )
        with self._lock:
            rows = self._db.execute(sql, (patient_id,)).fetchall()
        want = canon(issuer)
        out, seen = [], set()
        for r in rows:
            theirs = canon(r[12])
            if want and theirs and want != theirs:
                continue
            if (not want or not theirs) and not match_without_issuer and want != theirs:
                continue
            key = (r[0], r[2], r[10], r[5])
            if key in seen:
                continue
            seen.add(key)
            out.append(StoredObservation(
                message_id=r[0], source=r[1], code=r[2], code_system=r[15], alt_code=r[16], alt_system=r[17],
                value_type=r[18], abnormal_flags=r[19], name=r[3], loinc=r[4], value_text=r[5], unit_text=r[6],
                value=r[7], unit=r[8], status=r[9],
                observed_at=dt.datetime.fromisoformat(r[10]) if r[10] else None, problem=r[11],
                birth_date=r[13], sex=r[14],
            ))
        return out
