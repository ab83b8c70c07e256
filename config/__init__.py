"""Configuration: the pydantic schema and a loader that points at the offending line."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from config.schema import Destination, Settings

__all__ = ["ConfigError", "Destination", "Settings", "default_toml", "load_settings", "settings_from_dict"]


class ConfigError(Exception):
    """A configuration file that cannot be used; the message says where and why."""


def default_toml() -> str:
    """The documented default configuration file shipped with the package."""
    return (Path(__file__).resolve().parent / "default.toml").read_text(encoding="utf-8")


def _line_of(text: str, loc: tuple[Any, ...]) -> int | None:
    """Best-effort line number of the key at ``loc`` (table names, then key)."""
    lines = text.splitlines()
    keys = [k for k in loc if isinstance(k, str)]
    if not keys:
        return None
    start = 0
    if len(keys) > 1:
        table = ".".join(keys[:-1])
        pat = re.compile(r"^\s*\[\[?\s*" + re.escape(table) + r"\s*\]\]?")
        for i, line in enumerate(lines):
            if pat.match(line):
                start = i
                # a list-of-tables index picks the n-th [[table]]
                idx = next((k for k in loc if isinstance(k, int)), None)
                if idx is None or idx == 0:
                    break
                idx -= 1
    key_pat = re.compile(r"^\s*" + re.escape(keys[-1]) + r"\s*=")
    for i in range(start, len(lines)):
        if key_pat.match(lines[i]):
            return i + 1
    return start + 1 if len(keys) > 1 else None


def settings_from_dict(data: dict[str, Any], *, source: str = "<settings>", text: str = "") -> Settings:
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            key = ".".join(str(p) for p in loc) or "(top level)"
            line = _line_of(text, loc) if text else None
            where = f"{source}:{line}" if line else source
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{where}: {key}: {msg}")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems)) from None


def load_settings(path: str | Path | None) -> Settings:
    """Load and validate a TOML file; ``None`` gives the embedded defaults."""
    if path is None:
        return Settings()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not TOML
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8 (byte 0x{exc.object[exc.start]:02x}); save the file as "
                          "UTF-8 (an editor's 'Latin-1' or 'ANSI' encoding is not TOML)") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return settings_from_dict(data, source=str(path), text=text)
