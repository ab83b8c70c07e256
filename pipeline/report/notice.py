"""Wording shared by every output."""

DISCLAIMER = (
    "RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE. Automated opportunistic screening "
    "result for research and pipeline validation; not validated at this site. "
    "Confirm with DXA before any clinical decision."
)
SHORT_DISCLAIMER = "RESEARCH USE ONLY - not for diagnostic use"
