"""CSV files opened by people in a spreadsheet: sender-controlled text must never run as a formula.

A cell starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return is read by Excel, LibreOffice
and Google Sheets as a formula (``=HYPERLINK(...)`` in a patient ID sends the row to a web site when
clicked). Such text cells get a leading ``'``, which spreadsheets show as text; numbers the node writes
itself (probabilities, HU) are not text and stay as they are.
"""
from __future__ import annotations

import csv
import io
from typing import Iterable

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value: object) -> object:
    """``value``, with a leading ``'`` when it is text a spreadsheet would take for a formula."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def safe_row(row: dict) -> dict:
    return {k: safe_cell(v) for k, v in row.items()}


def csv_text(columns: Iterable[str], rows: Iterable[dict]) -> str:
    """The header and ``rows`` as CSV, every text cell made safe for a spreadsheet."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    w.writeheader()
    w.writerows(safe_row(r) for r in rows)
    return buf.getvalue()
