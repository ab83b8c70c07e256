"""The learned selector as the service runs it, and the rule that decides whether its answer is used.

The agent answers only where the anatomical localiser (its prior and fallback) found L1
with confidence and the agents agree (``min_agreement``) on a slice inside the middle of
the localiser's L1: then the agent's slice is the selected slice, reported as chosen by
the agent (the measurement still searches the localiser's disc-to-disc range for the
cleanest mid-body slice: see pipeline.selection). Everywhere else the localiser decides,
and the result says why the agent was not used.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import engines
from pipeline.drlis.agent import AgentVote, rollout
from pipeline.drlis.views import SelectorViews

AGREEMENT_ZONE = 0.6  # the agent's slice must lie in this central share of the localiser's L1 range


@dataclass(frozen=True)
class Decision:
    use_agent: bool
    note: str


class DrlisSelector:
    def __init__(self, bundle: str | Path = "drlis_v1", backend: str = "auto", threads: int = 1) -> None:
        b = engines.load_bundle(bundle)
        self.bundle = b
        self.engine = engines.load(b.path, backend, graph="qnet", threads=threads)
        self.min_agreement = float(b.card.thresholds.get("min_agreement", 0.6))
        self.name = f"drlis {b.card.version}"

    @property
    def backend(self) -> str:
        return self.engine.backend

    def vote(self, views: SelectorViews) -> AgentVote:
        return rollout(views, lambda s: self.engine(**s)["q"])

    def decide(self, vote: AgentVote, localiser_range: tuple[float, float] | None) -> Decision:
        share = f"{vote.confidence * len(vote.finals):.0f}/{len(vote.finals)} agents agree"
        if localiser_range is None:
            return Decision(False, "learned selector not used: the anatomical localiser did not confirm L1")
        if not vote.found:
            return Decision(False, f"learned selector not used: its agents stopped at the {vote.at_edge} edge")
        if vote.confidence < self.min_agreement:
            return Decision(False, f"learned selector not used: only {share}")
        lo, hi = localiser_range
        margin = (1 - AGREEMENT_ZONE) / 2 * (hi - lo)
        if not lo + margin <= vote.native_index <= hi - margin:
            # slice numbers counted from 1, as everywhere else in the report ("slice k of N")
            return Decision(False, f"learned selector not used: its slice {vote.native_index + 1} lies outside the "
                                   f"middle of the localiser's L1 (slices {lo + 1:.0f}-{hi + 1:.0f})")
        # "consistent with", not "confirms": the agents see the localiser's level probabilities as their prior
        # (moving those by one level moved the agents' answer with them), so agreeing is no independent check.
        return Decision(True, f"learned selector ({share}) is consistent with the anatomical localiser")
