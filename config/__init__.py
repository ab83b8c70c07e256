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


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _split_key(text: str) -> tuple[list[str], str] | None:
    """A TOML (dotted) key at the start of ``text``: its parts and the rest of the text; None if none."""
    parts: list[str] = []
    rest = text.lstrip()
    while True:
        if rest[:1] == '"':
            m = re.match(r'"((?:[^"\\]|\\.)*)"', rest)
            if m is None:
                return None
            try:
                parts.append(tomllib.loads(f"k = {m.group(0)}")["k"])
            except tomllib.TOMLDecodeError:
                parts.append(m.group(1))
        elif rest[:1] == "'":
            m = re.match(r"'([^']*)'", rest)
            if m is None:
                return None
            parts.append(m.group(1))
        else:
            m = _BARE_KEY.match(rest)
            if m is None:
                return None
            parts.append(m.group(0))
        rest = rest[m.end():].lstrip()
        if rest[:1] != ".":
            return parts, rest
        rest = rest[1:].lstrip()


def _depth(text: str) -> int:
    """How many brackets and braces ``text`` leaves open (strings and a trailing comment skipped)."""
    depth, quote, i = 0, "", 0
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\" and quote == '"':
                i += 1
            elif c == quote:
                quote = ""
        elif c in "\"'":
            quote = c
        elif c == "#":
            break
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
        i += 1
    return depth


def _key_lines(text: str) -> dict[tuple[Any, ...], int]:
    """Line number (1-based) of every table header and key in ``text``, by its path as pydantic reports it:
    the n-th ``[[table]]`` is (``table``, n - 1); dotted keys and sub-tables are expanded. Best effort: a
    multi-line string or array is skipped, inline tables are not looked into."""
    lines: dict[tuple[Any, ...], int] = {}
    arrays: dict[tuple[str, ...], int] = {}  # array-of-tables name -> index of its current element
    table: tuple[Any, ...] = ()
    in_string: str | None = None
    open_brackets = 0  # a multi-line array or inline table goes on
    for number, line in enumerate(text.splitlines(), start=1):
        if in_string:
            if line.count(in_string) % 2:
                in_string = None
            continue
        if open_brackets > 0:
            open_brackets += _depth(line)
            continue
        stripped = line.strip()
        if stripped.startswith("["):
            array = stripped.startswith("[[")
            split = _split_key(stripped[2 if array else 1:])
            close = "]]" if array else "]"
            if split is None or not split[1].startswith(close) or split[1][len(close):].strip()[:1] not in ("", "#"):
                continue  # not a header: a line of a multi-line array, say
            names = split[0]
            if array:
                arrays[tuple(names)] = arrays.get(tuple(names), -1) + 1
            path: list[Any] = []
            for i in range(len(names)):
                path.append(names[i])
                if tuple(names[:i + 1]) in arrays:
                    path.append(arrays[tuple(names[:i + 1])])
            table = tuple(path)
            lines.setdefault(table, number)
            continue
        split = _split_key(stripped)
        if split is None or not split[1].startswith("="):
            continue
        value = split[1][1:].lstrip()
        for quote in ('"""', "'''"):
            if value.startswith(quote) and value.count(quote) == 1:
                in_string = quote
        if not in_string:
            open_brackets = _depth(value)
        for i in range(1, len(split[0]) + 1):
            lines.setdefault(table + tuple(split[0][:i]), number)
    return lines


def _line_of(text: str, loc: tuple[Any, ...]) -> int | None:
    """Best-effort line number of the setting at ``loc``: its key, else the nearest enclosing table or key that
    is in the file (a missing key: its table's header)."""
    lines = _key_lines(text)
    path = tuple(p for p in loc if p != "[key]")  # "[key]": pydantic's mark of an error in a dictionary key
    for n in range(len(path), 0, -1):
        if path[:n] in lines:
            return lines[path[:n]]
    return None


def _hint(err: Any) -> str:
    """What most likely went wrong, where the validator's own message does not say."""
    if tuple(err["loc"]) == ("destinations",) and err["type"] == "list_type" and isinstance(err.get("input"), dict):
        return ("; write each destination as its own [[destinations]] block (double brackets), "
                "not one [destinations] table")
    name = err["loc"][-1] if err["loc"] else ""
    if err["type"] == "less_than_equal" and isinstance(name, str):
        for suffix, unit, per_day in (("_s", "seconds", 86400), ("_h", "hours", 24), ("_days", "days", 1)):
            if name.endswith(suffix):
                days = float(err["ctx"]["le"]) / per_day
                span = f"{days / 365:g} years" if days >= 3650 else f"{days:g} days"
                return f" {unit} ({span}): longer is a typo (and overflows timers and date arithmetic)"
    return ""


def settings_from_dict(data: dict[str, Any], *, source: str = "<settings>", text: str = "") -> Settings:
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            key = ".".join(str(p) for p in loc if p != "[key]") or "(top level)"
            line = _line_of(text, loc) if text else None
            where = f"{source}:{line}" if line else source
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"] + _hint(err)
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
