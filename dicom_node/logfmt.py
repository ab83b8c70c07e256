"""Log formats: plain text for a terminal, one JSON object per line for journald and log shippers.

Every record gets ``job_id`` and ``patient_key`` (a hashed pseudonym, see
``hl7.privacy.patient_key``) from the job context it was logged in, in the main process
and in the workers alike. Names, IDs and birth dates are never logged: code logs series
UIDs and the patient key instead (tests/test_operations.py scans a full study's log).
"""
from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import json
import logging
import os
import warnings
from typing import Iterator

_context: contextvars.ContextVar[tuple[int | None, str | None]] = contextvars.ContextVar(
    "osteoscreen_log_context", default=(None, None))

TEXT_FORMAT = "%(asctime)s %(levelname)s %(process_role)s%(name)s: %(message)s%(job_suffix)s"


@contextlib.contextmanager
def job_context(job_id: int | None, patient_key: str | None) -> Iterator[None]:
    token = _context.set((job_id, patient_key or None))
    try:
        yield
    finally:
        _context.reset(token)


class ContextFilter(logging.Filter):
    def __init__(self, role: str = "") -> None:
        super().__init__()
        self.role = role

    def filter(self, record: logging.LogRecord) -> bool:
        job_id, pk = _context.get()
        record.job_id, record.patient_key = job_id, pk
        record.process_role = f"[{self.role}] " if self.role else ""
        record.job_suffix = "".join(f" [{x}]" for x in (f"job {job_id}" if job_id else None, pk) if x)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "role": getattr(record, "process_role", "").strip(" []") or "main",
            "pid": record.process,
            "msg": record.getMessage(),
        }
        for key in ("job_id", "patient_key"):
            value = getattr(record, key, None)
            if value:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F) if c not in (0x0A, 0x09)}
_CONTROL[0x0A] = "\n    "  # a continuation line is indented: a peer's text cannot start a line that looks like a record


class TextFormatter(logging.Formatter):
    """The text format, with control characters in the message made visible: a calling AE title or an HL7 field
    holding a newline could otherwise write a forged log line (the JSON format escapes them anyway)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = record.message.translate(_CONTROL)
        return super().formatMessage(record)


def resolve_format(fmt: str) -> str:
    """``auto``: JSON under systemd (journald sets JOURNAL_STREAM), text on a terminal."""
    if fmt == "auto":
        return "json" if os.environ.get("JOURNAL_STREAM") else "text"
    return fmt


def configure(level: int | str, fmt: str = "auto", *, filename: str | None = None, role: str = "") -> None:
    """Replace the root handlers with one (stderr or ``filename``) in the chosen format."""
    handler: logging.Handler = logging.FileHandler(filename) if filename else logging.StreamHandler()
    handler.addFilter(ContextFilter(role))
    handler.setFormatter(JsonFormatter() if resolve_format(fmt) == "json" else TextFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    # pydicom's "Invalid value for VR DA: '1958-03-12'" messages (log records and Python warnings) quote header
    # values, birth dates and names among them: the logs carry a hashed patient key, never those
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\..*)?$")


def current_target() -> tuple[int, str | None, str]:
    """Level, file (None: stderr) and format of the main process, for the workers to log the same way."""
    root = logging.getLogger()
    files = [h.baseFilename for h in root.handlers if isinstance(h, logging.FileHandler)]
    fmt = "json" if any(isinstance(h.formatter, JsonFormatter) for h in root.handlers) else "text"
    return root.level, files[0] if files else None, fmt
