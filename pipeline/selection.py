"""Slice selection: which axial slices through L1 the measurement and the model see."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.localiser import Localisation, localise
from pipeline.volume import Volume

SELECTOR_NAME = "anatomical-localiser"
SELECTOR_VERSION = "1"


class SelectionError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class SliceSelection:
    level: str
    centre_index: int  # the level's disc-to-disc midpoint; the measurement picks its own mid-body slice
    confidence: float
    method: str
    anchor: str | None
    z_range: tuple[float, float]  # the level's disc-to-disc extent (slice indices)


def select_level_slices(volume: Volume, level: str = "L1", *,
                        localisation: Localisation | None = None) -> tuple[SliceSelection, Localisation]:
    """The vertebral body of ``level``: its disc-to-disc range and midpoint."""
    loc = localisation or localise(volume)
    if loc.reason:
        raise SelectionError(loc.reason)
    seg = loc.find(level)
    if seg is None:
        raise SelectionError(f"{level} not found in the field of view")
    if loc.confidence <= 0:
        raise SelectionError(f"{level} found with no confidence")
    centre = int(round(seg.centre))
    return (
        SliceSelection(
            level=level,
            centre_index=centre,
            confidence=loc.confidence,
            method=f"{SELECTOR_NAME} v{SELECTOR_VERSION}",
            anchor=loc.anchor,
            z_range=(seg.z_lower, seg.z_upper),
        ),
        loc,
    )
