"""Slice selection: which axial slices through L1 the measurement and the model see."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from pipeline.localiser import TRANSITIONAL_NOTE, Localisation, localise
from pipeline.refusal import Refusal
from pipeline.volume import Volume

if TYPE_CHECKING:
    from pipeline.drlis.selector import DrlisSelector

SELECTOR_NAME = "anatomical-localiser"
SELECTOR_VERSION = "1"


class SelectionError(Refusal):
    """No slice through the wanted level can be chosen."""


@dataclass(frozen=True)
class SliceSelection:
    level: str
    centre_index: int  # the level's disc-to-disc midpoint, or the agent's slice; the measurement picks its own
    confidence: float
    method: str
    anchor: str | None
    z_range: tuple[float, float]  # the level's disc-to-disc extent (slice indices)
    note: str | None = None  # why the learned selector's answer was or was not used


def select_level_slices(volume: Volume, level: str = "L1", *, localisation: Localisation | None = None,
                        agent: DrlisSelector | None = None) -> tuple[SliceSelection, Localisation]:
    """The vertebral body of ``level``: its disc-to-disc range and midpoint.

    With ``agent`` (L1 only), the learned selector proposes the mid-body slice; it is used
    only where the localiser found L1 too and the rule in ``pipeline.drlis.selector`` accepts
    it. A localiser refusal stands: the agent alone never names a level.
    """
    loc = localisation or localise(volume)
    if loc.reason:
        raise SelectionError(loc.reason)
    seg = loc.find(level)
    if seg is None:
        raise SelectionError(f"{level} not found in the field of view")
    if loc.confidence <= 0:
        raise SelectionError(f"{level} found with no confidence")
    centre = int(round(seg.centre))
    sel = SliceSelection(
        level=level,
        centre_index=centre,
        confidence=loc.confidence,
        method=f"{SELECTOR_NAME} v{SELECTOR_VERSION}",
        anchor=loc.anchor,
        z_range=(seg.z_lower, seg.z_upper),
    )
    if agent is not None and level == "L1":
        sel = _with_agent(volume, loc, sel, agent)
    transitional = [n for n in loc.notes if TRANSITIONAL_NOTE in n]
    if transitional:  # the SR's slice-selection text carries it: the level may be one off
        sel = replace(sel, note="; ".join(x for x in (*transitional, sel.note) if x))
    return sel, loc


def _with_agent(volume: Volume, loc: Localisation, sel: SliceSelection, agent: DrlisSelector) -> SliceSelection:
    from pipeline.drlis.views import build_views

    vote = agent.vote(build_views(volume, loc))
    decision = agent.decide(vote, sel.z_range)
    if not decision.use_agent:
        return replace(sel, note=decision.note)
    # The measurement keeps the localiser's disc-to-disc range: it finds the cleanest mid-body slice
    # inside it. Re-centring that search on the agent's slice (trained on whole-vertebra label centres,
    # which lie below the body's mid-height) moved the ROI towards an endplate: +34-37 HU on both real CTs.
    # So the report says the agent's vote was consistent with the level; it is not credited with choosing the
    # slices, and as it sees the localiser's probabilities, its agreement is not an independent confirmation.
    return replace(sel, note=f"{decision.note} (its slice {vote.native_index + 1}); the ROI is searched in the "
                             "localiser's L1 range")
