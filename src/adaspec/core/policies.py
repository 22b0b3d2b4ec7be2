"""Draft-length policies: how many tokens to draft this step."""

from __future__ import annotations

import math
from dataclasses import dataclass
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


class LengthPolicy(Protocol):
    def reset(self) -> None:
        """A new generation starts."""

    def draft_length(self) -> int:
        """The most tokens to draft this step."""

    def keep_drafting(self, confidences: list[float]) -> bool:
        """Asked by the drafter after each drafted token: draft another one?"""

    def verify_length(self, confidences: list[float]) -> int:
        """How many of the drafted tokens the target verifies (the rest are cut unverified)."""

    def observe(self, drafted: int, accepted: int, proposed: list[int], emitted: list[int]) -> None:
        """Told the outcome of each verification: `drafted` tokens verified, `accepted` kept; `proposed` is the whole
        draft before any cut, `emitted` what the step emitted (the accepted tokens and the correction/bonus)."""


@dataclass
class FixedLength:
    k: int

    def __post_init__(self) -> None:
        if self.k < 1:
            raise AdaspecError(f"draft length k must be >= 1, got {self.k}")

    def reset(self) -> None:
        pass

    def draft_length(self) -> int:
        return self.k

    def keep_drafting(self, confidences: list[float]) -> bool:
        return True

    def verify_length(self, confidences: list[float]) -> int:
        return len(confidences)

    def observe(self, drafted: int, accepted: int, proposed: list[int], emitted: list[int]) -> None:
        pass


@dataclass
class BatchTable:
    """A draft length by batch size (vLLM's num_speculative_tokens_per_batch_size, SGLang's switch-off by batch size):
    `table` maps a batch size to k, the entry of the largest size not above the batch's applying (k = 0: no drafting).
    The batched engine sets `batch` before each step; one sequence alone is a batch of 1."""

    table: dict[int, int]
    batch: int = 1

    def __post_init__(self) -> None:
        if not self.table or min(self.table) != 1 or min(self.table.values()) < 0:
            raise AdaspecError(f"a batch-size table needs an entry for batch size 1 and lengths >= 0, got {self.table}")

    def reset(self) -> None:
        pass

    def draft_length(self) -> int:
        return self.table[max(b for b in self.table if b <= self.batch)]

    def keep_drafting(self, confidences: list[float]) -> bool:
        return True

    def verify_length(self, confidences: list[float]) -> int:
        return len(confidences)

    def observe(self, drafted: int, accepted: int, proposed: list[int], emitted: list[int]) -> None:
        pass


def adaptive_length(confidence: list[float], alpha: float, k_min: int, k_max: int) -> int:
    """CM-ASD's draft length k_j = clamp(floor(alpha * mean(C) * k_max), k_min, k_max); no confidence: k_min."""
    mean = sum(confidence) / len(confidence) if confidence else 0.0
    return max(k_min, min(k_max, math.floor(alpha * mean * k_max + 1e-9)))  # 1e-9: 0.75*1.0*8 is 6, not 5


@dataclass(frozen=True)
class ConfidenceLength:
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

    def reset(self) -> None:
        pass

    def draft_length(self) -> int:
        return self.k_max

    def keep_drafting(self, confidences: list[float]) -> bool:
        return not self.early_stop or len(confidences) < self.length(confidences)

    def verify_length(self, confidences: list[float]) -> int:
        return len(confidences) if self.early_stop else min(len(confidences), self.length(confidences))

    def observe(self, drafted: int, accepted: int, proposed: list[int], emitted: list[int]) -> None:
        pass


@dataclass(frozen=True)
class ExitBound:
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

    def reset(self) -> None:
        pass

    def draft_length(self) -> int:
        return self.d_max

    def keep_drafting(self, confidences: list[float]) -> bool:
        return True

    def verify_length(self, confidences: list[float]) -> int:
        return len(confidences)

    def observe(self, drafted: int, accepted: int, proposed: list[int], emitted: list[int]) -> None:
        pass


def expected_tokens(alpha: float, k: float) -> float:
    """E(k): expected tokens emitted by a forward verifying k drafted tokens, each accepted with prob. alpha."""
    if k <= 0:
        return 1.0
    if alpha >= 1:
        return k + 1.0
    return (1 - alpha ** (k + 1)) / (1 - alpha)


def interpolate(table: dict[str, float] | dict[int, float], n: float) -> float:
    """table {size: value} at n: linear between the measured sizes, extended linearly beyond them."""
    points = sorted((float(k), float(v)) for k, v in table.items())
    if len(points) == 1:
        return points[0][1]
    i = next((i for i in range(1, len(points)) if n <= points[i][0]), len(points) - 1)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return y0 + (y1 - y0) * (n - x0) / (x1 - x0)


def shadow_acceptance(proposed: list[int], emitted: list[int]) -> tuple[int, int]:
    """(accepted, examined) for a draft against the tokens the target emitted at its positions: the drafted tokens
    that equal them up to the first that does not, and that one. Drafted tokens the step did not verify are judged
    too (a cut draft costs nothing to judge): under greedy decoding this is exactly what verifying them would give."""
    accepted = 0
    for d, t in zip(proposed, emitted, strict=False):
        if d != t:
            return accepted, accepted + 1
        accepted += 1
    return accepted, accepted


@dataclass
class CostAware:
    """The draft length that the backend's measured costs and a running acceptance estimate favour (adaspec's own;
    README "Backends and weight formats").

    Each step verifies the k in 0..k_max that maximises E(k) / (verify(k + 1) + k * draft), with
    E(k) = (1 - a^(k+1)) / (1 - a) the expected tokens of Leviathan et al., verify(n) the measured cost of scoring n
    positions relative to one and draft the drafter's cost per token relative to one target step. The per-token
    acceptance a is a recency-weighted estimate (weight `decay` per observed token, Beta(1, 1) prior), so runs of
    copyable text lift it and ordinary text lets it fall. k = 0 is a plain step.

    A free drafter (draft == 0, prompt lookup) always proposes k_max tokens and the policy verifies the first k,
    token by token: each drafted token i is kept with chance a_i, the drafter's confidence in it refined online by
    what tokens of that confidence did so far (per confidence bin of width 1/`bins`, recency-weighted, the
    confidence itself a prior worth `prior` tokens), and k maximises (1 + sum_j prod_{i<=j} a_i) / verify(k + 1).
    The tokens not verified are judged against what the target emits next (`shadow_acceptance`), so the estimates
    keep learning while nothing is verified. A paid drafter drafts only k; after `probe` plain steps in a row it
    drafts one token to learn again. Whether a token is verified depends only on earlier tokens: exact verification
    stays exact.
    """

    verify_ratio: dict[int, float]  # n -> cost of scoring n positions / cost of one (measured; 1 -> 1.0)
    draft_ratio: float = 0.0  # the drafter's cost per drafted token / one target step
    k_max: int = 8
    decay: float = 0.9
    probe: int = 16
    bins: int = 10
    prior: float = 2.0

    def __post_init__(self) -> None:
        if self.k_max < 1:
            raise AdaspecError(f"k_max must be >= 1, got {self.k_max}")
        if not 0 < self.decay <= 1:
            raise AdaspecError(f"decay must be in (0, 1], got {self.decay}")
        self.k_max = min(self.k_max, max(self.verify_ratio) - 1)  # no extrapolation beyond the measured sizes
        ratios, floor = {}, 1.0
        for n in sorted(self.verify_ratio):  # scoring more positions never costs less: smooth out timing noise
            floor = ratios[n] = max(floor, self.verify_ratio[n])
        self.verify_ratio = ratios
        # the cost of a forward verifying k drafted tokens, k = 0..k_max (fixed: computed once, not every step)
        self.cost = [interpolate(ratios, k + 1) + k * self.draft_ratio for k in range(self.k_max + 1)]
        self.reset()

    def reset(self) -> None:
        self.accepted = 0.0  # recency-weighted counts of accepted and examined drafted tokens
        self.examined = 0.0
        self.plain = 0  # plain steps in a row
        self.bin_accepted = [0.0] * self.bins  # the same, per confidence bin (a free drafter's tokens)
        self.bin_examined = [0.0] * self.bins
        self.pending: list[float] = []  # the confidences of the proposal being verified

    def _bin(self, confidence: float) -> int:
        return min(self.bins - 1, max(0, int(confidence * self.bins)))

    def rate(self, confidence: float) -> float:
        """The chance a drafted token of this confidence is kept: its bin's record, with the confidence as prior."""
        b = self._bin(confidence)
        return (self.bin_accepted[b] + self.prior * confidence) / (self.bin_examined[b] + self.prior)

    def best_for(self, confidences: list[float]) -> int:
        """The k <= len(confidences) that maximises expected tokens per cost, token i kept with `rate`."""
        best, gain, run, tokens = 0, 1.0 / self.cost[0], 1.0, 1.0
        for k, c in enumerate(confidences[: self.k_max], start=1):
            run *= self.rate(c)
            tokens += run
            if tokens / self.cost[k] > gain:
                best, gain = k, tokens / self.cost[k]
        return best

    @property
    def alpha(self) -> float:
        return (self.accepted + 1) / (self.examined + 2)

    def best(self) -> int:
        a = self.alpha
        gain = [expected_tokens(a, k) / c for k, c in enumerate(self.cost)]  # k + 1 <= the largest measured size
        return max(range(self.k_max + 1), key=gain.__getitem__)

    @property
    def free(self) -> bool:
        return self.draft_ratio == 0

    def draft_length(self) -> int:
        if self.free:
            return self.k_max
        k = self.best()
        return k if k or self.plain < self.probe else 1

    def keep_drafting(self, confidences: list[float]) -> bool:
        return True

    def verify_length(self, confidences: list[float]) -> int:
        if not confidences:  # nothing proposed (lookup found no match)
            self.pending = []
            return 0
        if not self.free:
            return len(confidences)
        self.pending = list(confidences)
        return self.best_for(confidences)

    def observe(self, drafted: int, accepted: int, proposed: list[int], emitted: list[int]) -> None:
        acc, seen = shadow_acceptance(proposed, emitted) if self.free else (accepted, accepted + (accepted < drafted))
        self.plain = 0 if drafted else self.plain + 1
        for i in range(seen):  # one decay per observed token
            self.accepted = self.decay * self.accepted + (i < acc)
            self.examined = self.decay * self.examined + 1
        if self.free:
            for i, c in enumerate(self.pending[:seen]):
                b = self._bin(c)
                self.bin_accepted[b] = self.decay * self.bin_accepted[b] + (i < acc)
                self.bin_examined[b] = self.decay * self.bin_examined[b] + 1
            self.pending = []


@dataclass
class CostCapped:
    """A length policy (CM-ASD's ConfidenceLength) capped by CostAware: each step drafts and verifies no more than
    both allow (adaspec's own, `cmasd:cost=1`). The confidence rule says how far the drafter is sure; the cost rule
    says how far verification pays on this backend for the acceptance seen so far (a llama.cpp verify of n
    positions costs nearly n steps, where the paper's GPU setting makes it nearly free). Both observe every step;
    with a free drafter (prompt lookup) CostAware learns from the whole proposal as ever."""

    policy: LengthPolicy
    costs: CostAware

    def reset(self) -> None:
        self.policy.reset()
        self.costs.reset()

    def draft_length(self) -> int:
        return min(self.policy.draft_length(), self.costs.draft_length())

    def keep_drafting(self, confidences: list[float]) -> bool:
        return self.policy.keep_drafting(confidences) and self.costs.keep_drafting(confidences)

    def verify_length(self, confidences: list[float]) -> int:
        return min(self.policy.verify_length(confidences), self.costs.verify_length(confidences))

    def observe(self, drafted: int, accepted: int, proposed: list[int], emitted: list[int]) -> None:
        self.policy.observe(drafted, accepted, proposed, emitted)
        self.costs.observe(drafted, accepted, proposed, emitted)


@dataclass(frozen=True)
class BatchCosts:
    """The measured cost of one target call by the total positions it scores, over every sequence in it (ms): what
    the batched engine's cost rule (batch.plan_lengths) weighs drafted tokens against. Linear between the measured
    sizes, extended linearly beyond them."""

    ms_by_positions: dict[int, float]

    def __post_init__(self) -> None:
        if not self.ms_by_positions or min(self.ms_by_positions) != 1:
            raise AdaspecError("batch costs need the cost of one position and of larger calls")
        floor, smooth = 0.0, {}
        for n in sorted(self.ms_by_positions):  # scoring more positions never costs less: smooth out timing noise
            floor = smooth[n] = max(floor, float(self.ms_by_positions[n]))
        object.__setattr__(self, "ms_by_positions", smooth)

    def ms(self, positions: int) -> float:
        return interpolate(self.ms_by_positions, positions)


def token_rates(policy: LengthPolicy, confidences: list[float]) -> list[float] | None:
    """The chance that each drafted token is kept given the ones before it, by what a cost-aware policy has learned
    (CostAware, also as the cap of CostCapped); None for a policy whose length is fixed by its own rule."""
    costs = policy.costs if isinstance(policy, CostCapped) else policy
    if not isinstance(costs, CostAware):
        return None
    if costs.free:
        return [costs.rate(c) for c in confidences]
    return [costs.alpha] * len(confidences)
