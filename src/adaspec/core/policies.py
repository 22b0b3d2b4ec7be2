"""Draft-length policies: how many tokens to draft this step. The ones that weigh measured costs (CostAware,
CostCapped) are part of the cost model (costmodel.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch

from adaspec.core.confidence import annealed_confidence, annealed_temperature
from adaspec.core.config import (
    CMASD_ALPHA,
    CMASD_EARLY_STOP,
    CMASD_K_MAX,
    CMASD_K_MIN,
    SPECBOUND_A,
    SPECBOUND_D_MAX,
    SPECBOUND_THRESHOLD,
)
from adaspec.core.errors import AdaspecError


@dataclass(frozen=True)
class Outcome:
    """What one step did with a proposal: what a length policy learns from."""

    verified: int  # drafted tokens the target verified (the proposal's first ones)
    accepted: int  # of those, the ones it kept
    proposed: list[int] = field(default_factory=list)  # the whole proposal, before any cut
    confidence: list[float] = field(default_factory=list)  # the proposal's per-token confidence
    emitted: list[int] = field(default_factory=list)  # what the step emitted: the accepted tokens, then one more


class LengthPolicy(Protocol):
    def reset(self) -> None:
        """A new generation starts."""

    def draft_length(self) -> int:
        """The most tokens to draft this step."""

    def keep_drafting(self, confidences: list[float]) -> bool:
        """Asked by the drafter after each drafted token: draft another one?"""

    def verify_length(self, confidences: list[float]) -> int:
        """How many of the drafted tokens the target verifies (the rest are cut unverified). A pure function of the
        policy's state: what it learns comes through `observe`."""

    def observe(self, outcome: Outcome) -> None:
        """Told the outcome of each step."""


class Memoryless:
    """What a length policy that learns nothing does by default: draft while the drafter can, verify all of it."""

    def reset(self) -> None:
        pass

    def keep_drafting(self, confidences: list[float]) -> bool:
        return True

    def verify_length(self, confidences: list[float]) -> int:
        return len(confidences)

    def observe(self, outcome: Outcome) -> None:
        pass


@dataclass
class FixedLength(Memoryless):
    k: int

    def __post_init__(self) -> None:
        if self.k < 1:
            raise AdaspecError(f"draft length k must be >= 1, got {self.k}")

    def draft_length(self) -> int:
        return self.k


@dataclass
class BatchTable(Memoryless):
    """A draft length by batch size (vLLM's num_speculative_tokens_per_batch_size, SGLang's switch-off by batch size):
    `table` maps a batch size to k, the entry of the largest size not above the batch's applying (k = 0: no drafting).
    The batched engine sets `batch` before each step; one sequence alone is a batch of 1."""

    table: dict[int, int]
    batch: int = 1

    def __post_init__(self) -> None:
        if not self.table or min(self.table) != 1 or min(self.table.values()) < 0:
            raise AdaspecError(f"a batch-size table needs an entry for batch size 1 and lengths >= 0, got {self.table}")

    def draft_length(self) -> int:
        return self.table[max(b for b in self.table if b <= self.batch)]


def adaptive_length(confidence: list[float], alpha: float, k_min: int, k_max: int) -> int:
    """CM-ASD's draft length k_j = clamp(floor(alpha * mean(C) * k_max), k_min, k_max); no confidence: k_min."""
    mean = sum(confidence) / len(confidence) if confidence else 0.0
    return max(k_min, min(k_max, math.floor(alpha * mean * k_max + 1e-9)))  # 1e-9: 0.75*1.0*8 is 6, not 5


@dataclass(frozen=True)
class ConfidenceLength(Memoryless):
    """CM-ASD's adaptive draft length over the drafter's per-token confidence C (Sen et al., arXiv 2508.15371).

    early_stop=False (the paper): draft k_max tokens, then verify the first k_j = adaptive_length(C_1..C_kmax);
    the other k_max - k_j were paid for and are cut (recorded as `cut`).
    early_stop=True: stop drafting after the t-th token once t >= adaptive_length(C_1..C_t), the same rule on
    the running mean, and verify every drafted token: nothing is paid for and cut. Whether a token is verified
    then depends only on the tokens before it, so exact verification stays exact (lossless when sampling).
    """

    alpha: float = CMASD_ALPHA
    k_min: int = CMASD_K_MIN
    k_max: int = CMASD_K_MAX
    early_stop: bool = bool(CMASD_EARLY_STOP)

    def __post_init__(self) -> None:
        if not 0 < self.alpha < math.inf:  # nan and inf too: floor(alpha * mean * k_max) needs a number
            raise AdaspecError(f"alpha must be a finite number > 0, got {self.alpha}")
        if not 1 <= self.k_min <= self.k_max:
            raise AdaspecError(f"draft lengths need 1 <= k_min <= k_max, got k_min={self.k_min}, k_max={self.k_max}")

    def length(self, confidences: list[float]) -> int:
        return adaptive_length(confidences, self.alpha, self.k_min, self.k_max)

    def draft_length(self) -> int:
        return self.k_max

    def keep_drafting(self, confidences: list[float]) -> bool:
        return not self.early_stop or len(confidences) < self.length(confidences)

    def verify_length(self, confidences: list[float]) -> int:
        return len(confidences) if self.early_stop else min(len(confidences), self.length(confidences))


@dataclass(frozen=True)
class ExitBound(Memoryless):
    """SpecBound's exit rule and speculation bound (arXiv 2604.12247), for an early-exit drafter over a target of
    `depth` layers.

    A drafted token exits after the first layer l of `exits` where its annealed confidence
    max softmax(z_l / T_l), T_l = 1 + a (1 - l / L), reaches `threshold`; a token that reaches the deepest exit
    (the bound layer) without exiting ends the draft; at most `d_max` tokens are drafted a step. The exit rule
    runs inside the drafter (it alone sees the layers); as a length policy this is a fixed bound of d_max.
    Every decision depends only on the draft side, so exact verification stays exact (lossless when sampling).
    """

    exits: tuple[int, ...]  # layers after which a token may exit (layers run), increasing, each in 1..depth-1
    depth: int  # L, the target's layer count
    threshold: float = SPECBOUND_THRESHOLD
    a: float = SPECBOUND_A  # temperature slope
    d_max: int = SPECBOUND_D_MAX

    def __post_init__(self) -> None:
        if not self.exits or list(self.exits) != sorted(set(self.exits)):
            raise AdaspecError(f"exits must be increasing layer numbers, got {list(self.exits)}")
        if not 1 <= self.exits[0] <= self.exits[-1] < self.depth:
            raise AdaspecError(f"exits must lie in 1..{self.depth - 1} (the target has {self.depth} layers; an exit "
                               f"after the last one is the full model), got {list(self.exits)}")
        if not 0.0 <= self.threshold <= 1.0:
            raise AdaspecError(f"threshold must be in [0, 1], got {self.threshold}")
        if not 0.0 <= self.a < math.inf:
            raise AdaspecError(f"the temperature slope a must be a finite number >= 0, got {self.a}")
        if self.d_max < 1:
            raise AdaspecError(f"d_max (the most tokens drafted a step) must be >= 1, got {self.d_max}")

    @property
    def bound(self) -> int:
        """The deepest exit: a token still unsure there ends the draft."""
        return self.exits[-1]

    def temperature(self, layer: int) -> float:
        return annealed_temperature(layer, self.depth, self.a)

    def confidence(self, logits: torch.Tensor, layer: int) -> float:
        """The annealed confidence of an exit's logits [V] after `layer` layers."""
        return float(annealed_confidence(logits, layer, self.depth, self.a))

    def exits_at(self, confidence: float) -> bool:
        return confidence >= self.threshold

    def draft_length(self) -> int:
        return self.d_max
