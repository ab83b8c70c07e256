"""ER7 text helpers shared by the messages osteoscreen builds (queries, result messages)."""
from __future__ import annotations


def escape(text: str, encoding: str = "^~\\&") -> str:
    """Escape HL7 delimiters in a value put into a field (IDs and free text can contain '&', '^', '|')."""
    out = text.replace("\\", "\\E\\").replace("|", "\\F\\")
    for ch, esc in ((encoding[0], "\\S\\"), (encoding[1], "\\R\\"), (encoding[3], "\\T\\")):
        out = out.replace(ch, esc)
    # Every other control character too: a VT (0x0B, MLLP's start block) or FS (0x1C, its end block) in a DICOM
    # value let the value start a forged message inside the frame
    return "".join(" " if c in "\r\n\t" else f"\\X{ord(c):02X}\\" if ord(c) < 0x20 or c == "\x7f" else c
                   for c in out)


def unescape(text: str, encoding: str = "^~\\&") -> str:
    """The value an ER7 field text stands for: \\F\\ \\S\\ \\R\\ \\T\\ \\E\\ back to their characters (a unit such as
    ``10\\S\\9/L`` is how HL7 writes 10^9/L); other escapes (highlighting, hex) are left as they are."""
    if "\\" not in text:
        return text
    for esc, ch in (("\\F\\", "|"), ("\\S\\", encoding[0]), ("\\R\\", encoding[1]), ("\\T\\", encoding[3])):
        text = text.replace(esc, ch)
    return text.replace("\\E\\", "\\")
