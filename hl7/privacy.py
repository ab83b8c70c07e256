"""What may appear in logs about a patient: a keyed hash (HMAC-SHA256), never the identifier itself.

The key is a per-site secret, ``patient-key.secret`` in the state directory (32 random bytes, 0600),
made at the node's first start and reused after: without it a short key cannot be turned back into a
patient ID by trying every ID (an unkeyed hash of a 7-digit MRN falls in seconds). Each process that
writes keys loads it once with ``configure(state_dir)``; IT computes the key of a known patient with
``osteoscreen patient-key ID --config F`` to find that patient's log lines.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
from pathlib import Path

log = logging.getLogger("osteoscreen.privacy")
SECRET_NAME = "patient-key.secret"
SECRET_BYTES = 32

_site_key: bytes | None = None  # this process's key (configure); a random one until then


class PatientKeyError(RuntimeError):
    pass


def secret_path(state_dir: Path) -> Path:
    return Path(state_dir) / SECRET_NAME


def _read_secret(path: Path) -> bytes:
    data = path.read_bytes()
    if len(data) < 16:
        raise PatientKeyError(f"{path} is too short ({len(data)} bytes) to be the site's patient-key secret: "
                              "restore it from a backup (`osteoscreen backup` copies it), or delete it to start "
                              "a new one (keys in older log lines will no longer match)")
    return data


def _create_secret(path: Path) -> None:
    """Write a new secret so that no process ever reads a half-written one, and two starting at once agree:
    a private temporary file is linked to the final name, which fails if another process made it first."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secrets.token_bytes(SECRET_BYTES))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass  # another process of this node made it first: theirs is the site's key
    finally:
        tmp.unlink()


def load_site_key(state_dir: Path, *, create: bool = True) -> bytes:
    """The site's patient-key secret from ``state_dir``, made there (0600) when absent and ``create``."""
    path = secret_path(state_dir)
    if not path.exists():
        if not create:
            raise PatientKeyError(f"no patient-key secret in {path.parent}: the node makes it at its first start "
                                  "(`osteoscreen serve`); check [node] state_dir in this configuration")
        _create_secret(path)
        log.info("made the site's patient-key secret %s (back it up with the state: log keys depend on it)", path)
    return _read_secret(path)


def configure(state_dir: Path, *, create: bool = True) -> None:
    """Load the site's key for this process (once per process: the node's, the CLI's)."""
    global _site_key
    _site_key = load_site_key(state_dir, create=create)


def _key() -> bytes:
    global _site_key
    if _site_key is None:  # a process that never configured: keys are still not reversible, just not the site's
        _site_key = secrets.token_bytes(SECRET_BYTES)
        log.warning("patient keys in this process use a temporary secret (the state directory's was not loaded): "
                    "they will not match `osteoscreen patient-key`")
    return _site_key


# A quoted value in an error text: opened after a non-word character (so the apostrophe of "patient's" or
# "can't" opens nothing), optionally as a bytes repr (b'...'), closed by the same quote before a non-word one.
_QUOTED_VALUE = re.compile(r"(?<![\w])(b?)(['\"])(.{1,400}?)\2(?![\w])")


def redact_values(text: str) -> str:
    """An error text about received data, with every quoted value replaced by an ellipsis.

    Parsers (pydicom, hl7apy, int()) quote the value they could not read, which may be a patient's name, ID or
    birth date; a log line keeps the reason and loses the value. The full text stays where patient data is kept
    anyway (the job's or message's error in the state database)."""
    return _QUOTED_VALUE.sub(lambda m: f"{m.group(1)}{m.group(2)}\u2026{m.group(2)}", text)


def patient_key(patient_id: str, issuer: str | None = None, *, key: bytes | None = None) -> str:
    """A short, stable pseudonym for log lines: HMAC-SHA256 of issuer|ID under the site's secret (or ``key``)."""
    message = f"{(issuer or '').strip()}|{patient_id.strip()}".encode()
    digest = hmac.new(key if key is not None else _key(), message, hashlib.sha256).hexdigest()
    return f"pk-{digest[:12]}"
