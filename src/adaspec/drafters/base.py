"""The drafter interface: `propose` tokens, then `observe` what the target kept."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from adaspec.config import SamplingConfig
from adaspec.policies import LengthPolicy


@dataclass
class DraftContext:
    ids: list[int]  # prompt + every token emitted so far
    k_max: int  # most tokens to draft (policy length, capped by the remaining budget)
    sampling: SamplingConfig
    generator: torch.Generator | None = None


@dataclass
class Draft:
    tokens: list[int] = field(default_factory=list)  # [k]
    probs: torch.Tensor | None = None  # q [k, V] the tokens were drawn from; None: deterministic (one-hot)
    confidence: list[float] = field(default_factory=list)  # [k] the drafter's own confidence per token

    def __len__(self) -> int:
        return len(self.tokens)


class Drafter(Protocol):
    name: str

    def reset(self) -> None:
        """Forget the previous sequence."""

    def propose(self, ctx: DraftContext, policy: LengthPolicy) -> Draft:
        """Draft up to ctx.k_max tokens continuing ctx.ids (fewer if the policy says stop)."""

    def observe(self, accepted: int, ids: list[int]) -> None:
        """The target kept `accepted` drafted tokens; `ids` is the sequence after this step."""
