"""The base of every "this study cannot be screened" error: the reason is what the job records."""
from __future__ import annotations


class Refusal(Exception):
    """A refusal with an operator-readable ``reason`` (stored with the job and shown in the report)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
