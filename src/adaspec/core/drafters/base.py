"""The drafter interface: `propose` tokens, then `observe` what the target kept. A drafter gets everything it needs
from the loop: the sequence, a budget and the length policy's stop rule in `DraftContext`, and, where it
`wants_hidden`, the target's hidden states in `observe`; it never reaches into the target's backend."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from adaspec.core.config import SamplingConfig

Scorer = Callable[[torch.Tensor], float]  # a drafted position's logits [V] -> its confidence in [0, 1]


def always(confidences: list[float]) -> bool:
    return True


@dataclass
class DraftContext:
    ids: list[int]  # prompt + every token emitted so far
    k_max: int  # most tokens to draft (policy length, capped by the remaining budget)
    sampling: SamplingConfig
    generator: torch.Generator | None = None
    score: Scorer | None = None  # the method's confidence (CM-ASD ensemble); None: the drafter's own, p(token)
    # asked after each drafted token with the confidences so far: draft another? (the length policy's keep_drafting)
    keep_drafting: Callable[[list[float]], bool] = always


@dataclass(frozen=True)
class Hidden:
    """The target's final hidden states of its last forward: states [n, H] of positions start .. start + n - 1."""

    start: int
    states: torch.Tensor


@dataclass
class Draft:
    tokens: list[int] = field(default_factory=list)  # [k]
    probs: torch.Tensor | None = None  # q [k, V] the tokens were drawn from; None: deterministic (one-hot)
    confidence: list[float] = field(default_factory=list)  # [k] ctx.score per token, else the drafter's own
    # [k, V] the drafter's logits, full vocabulary (-inf outside a reduced head); None: no distribution (prompt
    # lookup) or not built (an EAGLE head builds full-size rows only when sampling or scoring needs them)
    logits: torch.Tensor | None = None
    # an early-exit drafter (SpecBound): the layer each token exited after, and why the draft ended ("bound": a
    # token reached the deepest exit without exiting, "d_max": the length bound, "budget", "policy")
    exit_layers: list[int] = field(default_factory=list)
    stop: str | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    def prefix(self, n: int) -> Draft:
        """The first n drafted tokens (what a length policy keeps for verification)."""
        if n >= len(self.tokens):
            return self
        cut = slice(0, n)
        return Draft(self.tokens[cut], None if self.probs is None else self.probs[cut], self.confidence[cut],
                     None if self.logits is None else self.logits[cut], self.exit_layers[cut], self.stop)


class Drafter(Protocol):
    name: str
    wants_hidden: bool  # whether `observe` needs the target's hidden states (the loop has the backend keep them)

    def reset(self) -> None:
        """Forget the previous sequence."""

    def propose(self, ctx: DraftContext) -> Draft:
        """Draft up to ctx.k_max tokens continuing ctx.ids (fewer if ctx.keep_drafting says stop)."""

    def observe(self, accepted: int, ids: list[int], hidden: Hidden | None = None) -> None:
        """The target kept `accepted` drafted tokens; `ids` is the sequence after this step (the target has computed
        every position but the last); `hidden`, where wanted, the target's hidden states of the step's forward."""
