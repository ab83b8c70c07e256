"""ER7 text helpers shared by the messages osteoscreen builds (queries, result messages)."""
from __future__ import annotations


def escape(text: str, encoding: str = "^~\\&") -> str:
    """Escape HL7 delimiters in a value put into a field (IDs and free text can contain '&', '^', '|')."""
    out = text.replace("\\", "\\E\\").replace("|", "\\F\\")
    for ch, esc in ((encoding[0], "\\S\\"), (encoding[1], "\\R\\"), (encoding[3], "\\T\\")):
        out = out.replace(ch, esc)
    return out.replace("\r", " ").replace("\n", " ")
