"""On-disk cache of compiled (TensorRT) engines, keyed by everything that makes a plan valid.

A plan is only valid for one GPU model and compute capability, one TensorRT version,
one ONNX file, one precision and one optimisation profile: all of them go into the key.
Each entry is written atomically with a header that repeats the key and the payload's
SHA-256, so a stale entry (another key under the same name), a truncated write or a
corrupted file is detected on load and rebuilt, never handed to the runtime.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("osteoscreen.engines")

MAGIC = b"OSTEOSCREEN-ENGINE-1\n"


@dataclass(frozen=True)
class CacheKey:
    gpu_name: str
    compute_capability: str
    runtime_version: str
    onnx_sha256: str
    precision: str
    profile: str  # canonical JSON of the per-input (min, opt, max) shapes

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def entry_path(cache_dir: Path, graph: str, key: CacheKey) -> Path:
    return cache_dir / f"{graph}-{key.digest()[:20]}.plan"


def load(path: Path, key: CacheKey) -> bytes | None:
    """The cached payload for ``key``, or None (missing, stale or corrupt: the reason is logged)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("engine cache %s unreadable (%s): rebuilding", path, exc)
        return None
    reason = None
    if not raw.startswith(MAGIC):
        reason = "not an engine cache file"
    else:
        head_end = raw.find(b"\n", len(MAGIC))
        try:
            header = json.loads(raw[len(MAGIC):head_end])
        except ValueError:
            header, reason = {}, "header unreadable"
        payload = raw[head_end + 1:]
        if reason is None and header.get("key") != asdict(key):
            reason = "built for another GPU, runtime, model, precision or profile"
        elif reason is None and header.get("size") != len(payload):
            reason = f"truncated ({len(payload)} of {header.get('size')} bytes)"
        elif reason is None and header.get("sha256") != hashlib.sha256(payload).hexdigest():
            reason = "checksum mismatch"
        if reason is None:
            return payload
    log.warning("engine cache %s rejected (%s): rebuilding", path, reason)
    return None


def store(path: Path, key: CacheKey, payload: bytes) -> None:
    """Write atomically (temporary file, fsync, rename), readable by the service user only."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    header = json.dumps({"key": asdict(key), "size": len(payload),
                         "sha256": hashlib.sha256(payload).hexdigest()}, sort_keys=True).encode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + header + b"\n" + payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
