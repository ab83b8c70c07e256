"""What may appear in logs about a patient: a keyed hash, never the identifier itself."""
from __future__ import annotations

import hashlib


def patient_key(patient_id: str, issuer: str | None = None) -> str:
    """A short, stable pseudonym for log lines; IT can recompute it from a known ID to find a patient's lines."""
    digest = hashlib.sha256(f"{(issuer or '').strip()}|{patient_id.strip()}".encode()).hexdigest()
    return f"pk-{digest[:12]}"
