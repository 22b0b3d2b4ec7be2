"""The cost model: what a draft of k tokens is expected to emit, what scoring it costs, and the draft length that
pays best, for one sequence and for a batch.

A target forward that verifies k drafted tokens, each accepted with probability alpha once the ones before it were
(Leviathan et al. 2023), emits in expectation

    E(k) = (1 - alpha^(k+1)) / (1 - alpha)            tokens (the correction/bonus token included)

and costs draft(k) + verify(k + 1): the drafter's k tokens and the target scoring k + 1 positions. Costs are
measured, never assumed: `verify_costs` times the target scoring n positions on a cached context, `drafter_cost`
a drafter's first and marginal token, `measure_batch_costs` one batched call by the total positions it scores.

- `Costs`, `best_draft_length`, `alpha_needed`: the analytic side (the bench report's bound and ceiling tables).
- `CostAware` (and `CostCapped`, a cap on another length policy): one sequence's length policy that drafts the k
  with the most expected tokens per cost, from the measured costs and a running acceptance estimate.
- `BatchCosts`, `plan_lengths`: the batched engine's rule, the draft lengths that maximise a whole call's expected
  tokens per ms.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from adaspec.core.backends.base import Backend
from adaspec.core.backends.batched import BatchBackend
from adaspec.core.config import (
    BATCH_COST_CONTEXT,
    BATCH_COST_SIZES,
    BATCH_DRAFT_MARGIN,
    BATCH_PREFILL_CHUNK,
    GenerationConfig,
    SamplingConfig,
)
from adaspec.core.decode import generate
from adaspec.core.drafters.base import DraftContext, Drafter
from adaspec.core.errors import AdaspecError
from adaspec.core.machine import cpu_model
from adaspec.core.models import cache_root
from adaspec.core.policies import FixedLength, LengthPolicy, Outcome


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


BEST_K_MAX = 16


@dataclass(frozen=True)
class Costs:
    """Measured costs in ms: the target scoring n positions (verify_ms), a drafter's first and marginal token."""

    verify_ms: dict[str, float]
    draft_first_ms: float = 0.0
    draft_step_ms: float = 0.0

    @property
    def step_ms(self) -> float:
        """One target step: scoring one position."""
        return interpolate(self.verify_ms, 1)

    def verify(self, n: float) -> float:
        return interpolate(self.verify_ms, n)

    def draft(self, k: float) -> float:
        return 0.0 if k <= 0 else self.draft_first_ms + (k - 1) * self.draft_step_ms

    @classmethod
    def of(cls, verify_ms: dict[str, float], drafter: dict) -> Costs:
        """From a costs.json verify curve and a drafter entry (drafter_first_ms, drafter_step_ms; only the marginal
        cost in older runs; {}: a free drafter)."""
        step = float(drafter.get("drafter_step_ms", 0.0))
        return cls(verify_ms, float(drafter.get("drafter_first_ms", step)), step)


def best_draft_length(alpha: float | None, costs: Costs, k_max: int = BEST_K_MAX) -> tuple[int | None, float | None]:
    """(k, expected speedup) of the fixed draft length that maximises E(k) / (draft(k) + verify(k + 1)), k at most
    k_max and within the measured verify sizes (no extrapolation); (None, None) without a measured alpha."""
    if alpha is None:
        return None, None
    k_max = min(k_max, max(int(n) for n in costs.verify_ms) - 1)
    step = costs.step_ms
    return max(((k, expected_tokens(alpha, k) * step / (costs.draft(k) + costs.verify(k + 1)))
                for k in range(k_max + 1)), key=lambda kv: kv[1])


def alpha_needed(speedup: float, costs: Costs, tol: float = 1e-3) -> float | None:
    """The least per-token acceptance alpha at which some fixed draft length (within the measured verify sizes) is
    expected to reach `speedup` under `costs`, to within tol; None if none is even when every drafted token is
    accepted. E(k) grows with alpha at every k, so the best expected speedup does too: bisection."""
    if best_draft_length(1.0, costs)[1] < speedup:
        return None
    lo, hi = 0.0, 1.0
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if best_draft_length(mid, costs)[1] >= speedup else (mid, hi)
    return hi


VERIFY_SIZES = (1, 2, 4, 6, 8)  # positions scored at once, for the verify cost curve


def forward_ms_by_size(backend: Backend, context: list[int], sizes, repeats: int = 7) -> dict[int, float]:
    """Median ms to score n new positions on top of a cached `context`, for each n in `sizes`; the sizes take
    turns in every round, so a load that comes and goes weighs on all of them alike."""
    backend.reset()
    backend.extend(context)
    times: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(repeats):
        for n in sizes:
            backend.rollback(len(context))
            t0 = time.perf_counter()
            backend.extend(context[-n:], keep=n)  # any n tokens will do: the cost does not depend on them
            times[n].append(time.perf_counter() - t0)
    backend.reset()
    return {n: 1000 * statistics.median(t) for n, t in times.items()}


def verify_costs(target: Backend, context: list[int], sizes=VERIFY_SIZES, repeats: int = 7) -> dict:
    ms = forward_ms_by_size(target, context, sizes, repeats)
    return {
        "context_tokens": len(context),
        "verify_ms": {str(n): round(v, 3) for n, v in ms.items()},
        "verify_ratio": {str(n): round(v / ms[1], 3) for n, v in ms.items()},
    }


def propose_ms(drafter: Drafter, context: list[int], k: int, repeats: int = 7) -> float:
    """Median ms of one `propose` of exactly k tokens after `context` (the drafter already caught up)."""
    times = []
    for _ in range(repeats):
        ctx = DraftContext(context, k, SamplingConfig())
        t0 = time.perf_counter()
        drafter.propose(ctx)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def drafter_cost(drafter: Drafter, target: Backend, target_step_ms: float, context: list[int], k: int = 5) -> dict:
    """A drafter's cost per drafted token: (propose k tokens - propose 1) / (k - 1), the marginal cost of
    one more drafted token, against one target step. The drafter first follows a 2-token generation on
    `context`, so it holds its cache (and, for an EAGLE head, the target's features) as in decoding."""
    result = generate(target, context, GenerationConfig(max_new_tokens=2), drafter, FixedLength(1))
    ids = context + result.token_ids
    one, many = propose_ms(drafter, ids, 1), propose_ms(drafter, ids, k)
    per_token = max(0.0, (many - one) / (k - 1))
    target.reset()
    return {"drafter": drafter.name, "drafter_first_ms": round(one, 3), "drafter_step_ms": round(per_token, 3),
            "drafter_cost_ratio": round(per_token / target_step_ms, 4)}


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
    benchmarks/README.md "Backends and weight formats").

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
            return 0
        return self.best_for(confidences) if self.free else len(confidences)

    def observe(self, outcome: Outcome) -> None:
        o = outcome
        if self.free:  # every proposed token is judged against what the target emitted, verified or not
            acc, seen = shadow_acceptance(o.proposed, o.emitted)
        else:  # the verified ones up to the first rejection, that one included
            acc, seen = o.accepted, o.accepted + (o.accepted < o.verified)
        self.plain = 0 if o.verified else self.plain + 1
        for i in range(seen):  # one decay per observed token
            self.accepted = self.decay * self.accepted + (i < acc)
            self.examined = self.decay * self.examined + 1
        if self.free:
            for i, c in enumerate(o.confidence[:seen]):
                b = self._bin(c)
                self.bin_accepted[b] = self.decay * self.bin_accepted[b] + (i < acc)
                self.bin_examined[b] = self.decay * self.bin_examined[b] + 1


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

    def observe(self, outcome: Outcome) -> None:
        self.policy.observe(outcome)
        self.costs.observe(outcome)


FREE_DRAFTER = 0.01  # a drafter whose token costs less than this share of a target step drafts for free (lookup)


def cost_aware(backend: Backend, drafter: Drafter) -> CostAware:
    """CostAware for `drafter` on `backend`, from their costs measured now on a 256-token context."""
    context = [i % backend.vocab_size for i in range(min(256, backend.max_context // 2))]  # the ids do not matter
    verify = verify_costs(backend, context, sizes=(1, 2, 3, 4, 6, 8, 9))
    ratio = drafter_cost(drafter, backend, verify["verify_ms"]["1"], context)["drafter_cost_ratio"]
    drafter.reset()
    return CostAware({int(n): float(r) for n, r in verify["verify_ratio"].items()},
                     0.0 if ratio < FREE_DRAFTER else ratio)


@dataclass(frozen=True)
class BatchCosts:
    """The measured cost of one target call by the total positions it scores, over every sequence in it (ms): what
    the batched engine's cost rule (`plan_lengths`) weighs drafted tokens against. Linear between the measured
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


def plan_lengths(gains: list[list[float]], fixed_positions: int, fixed_tokens: float, costs: BatchCosts,
                 extra: list[float] | None = None, fixed_extra: float = 0.0, split_ms: float = 0.0,
                 fixed_lengths: Iterable[int] = (), margin: float = 0.0) -> list[int]:
    """The draft lengths k_i that maximise the call's expected tokens per ms.

    gains[i][j] is the chance that sequence i's (j+1)-th drafted token is emitted as an accepted token (the product
    of its per-token acceptance up to j: non-increasing in j). The call scores `fixed_positions` positions whatever
    is drafted and emits `fixed_tokens` expected tokens from them; drafting m more tokens scores m more positions.
    A call costs costs.ms(positions) plus what the measured curve leaves out: `fixed_extra` ms for the fixed positions,
    extra[i] ms for each position drafted for sequence i (attention over a context longer than the curve's), and
    `split_ms` for each row length beyond the first among the call's rows (a backend that runs rows of unequal length
    as one pass per length: llama.cpp with a KV stream per sequence); `fixed_lengths` are the lengths of the rows the
    rule does not set, and each sequence it sets has a row of k_i + 1. Drafted tokens are taken best gain per ms
    first (a prefix of each sequence's, as gains do not rise), and the rule is one scan over m: maximise
    (fixed_tokens + the m best gains) / (the call's cost with them). `margin`: with rows of two or more sequences in
    the call, drafting must beat not drafting by this share of its rate (the curve and the acceptance are estimates,
    and a call of unequal rows strays from the curve; where drafting only just pays by them, a small error makes it
    cost more than it brings). One sequence alone is `sd:k=auto`'s case, and the margin does not apply."""
    extra = extra or [0.0] * len(gains)
    base = max(fixed_positions, 1)
    step = max((costs.ms(2 * base) - costs.ms(base)) / base, 1e-9)  # the curve's ms per further position
    ranked = sorted(((g, i, j) for i, row in enumerate(gains) for j, g in enumerate(row)),
                    key=lambda t: (-t[0] / (step + extra[t[1]]), t[1], t[2]))
    rows = Counter(fixed_lengths)
    rows[1] += len(gains)
    if rows.total() < 2:
        margin = 0.0
    ks = [0] * len(gains)

    def cost(positions: int, added: float) -> float:
        return costs.ms(positions) + added + split_ms * (len(rows) - 1)

    best_m, best_rate = 0, (1 + margin) * fixed_tokens / cost(fixed_positions, fixed_extra)
    tokens, added = fixed_tokens, fixed_extra
    for m, (g, i, _) in enumerate(ranked, start=1):
        tokens += g
        added += extra[i]
        rows[ks[i] + 1] -= 1
        if not rows[ks[i] + 1]:
            del rows[ks[i] + 1]
        ks[i] += 1
        rows[ks[i] + 1] += 1
        rate = tokens / cost(fixed_positions + m, added)
        if rate > best_rate:
            best_m, best_rate = m, rate
    ks = [0] * len(gains)
    for _, i, _ in ranked[:best_m]:
        ks[i] += 1
    return ks


class ContextCost:
    """What a call costs beyond the measured curve, learned from the engine's own calls: `per_token` ms for each
    position scored per token of its context beyond `context` (the curve's), and `per_split` ms for each row length
    beyond the first in a call. Attention grows with the context and a batch does not share it, so on a long context
    a drafted position costs about what a plain one does; and a backend that runs rows of unequal length as separate
    passes (llama.cpp with a KV stream per sequence) pays a pass for each length a draft adds. Both make drafting
    stop paying sooner than the curve says. Fitted by recency-weighted least squares through the origin of
    (observed - curve) ms on (sum over rows of positions x context beyond, row lengths - 1), over calls that only
    decode; the curve's own sizes spread positions evenly over the sequences, as plain decoding does."""

    def __init__(self, context: int, decay: float = 0.98) -> None:
        self.context, self.decay = context, decay
        self.sums = [0.0] * 5  # decayed sums of x*x, x*d, d*d, x*r, d*r (r: observed - curve)
        self.per_token = self.per_split = 0.0

    def beyond(self, positions: int, end: int) -> float:
        """The fit's first regressor for a row of `positions` positions ending at position `end`."""
        return positions * max(0, end - positions // 2 - self.context)

    def observe(self, curve_ms: float, ms: float, x: float, splits: int = 0) -> None:
        if x <= 0 and splits <= 0:
            return
        r = ms - curve_ms
        self.sums = [self.decay * s + v for s, v in zip(self.sums, (x * x, x * splits, splits * splits, x * r,
                                                                      splits * r), strict=True)]
        xx, xd, dd, xr, dr = self.sums
        det = xx * dd - xd * xd
        if det > 1e-9 * max(xx * dd, 1e-30):
            a, b = (xr * dd - dr * xd) / det, (dr * xx - xr * xd) / det
        else:  # one regressor never varied apart from the other: fit them one at a time
            a, b = (xr / xx if xx else 0.0), (dr / dd if dd and not xx else 0.0)
        if a < 0 or b < 0:  # a cost does not fall below the curve: refit the other one alone
            a, b = (max(0.0, xr / xx) if xx else 0.0, 0.0) if b < 0 else (0.0, max(0.0, dr / dd) if dd else 0.0)
        self.per_token, self.per_split = max(0.0, a), max(0.0, b)


def measure_batch_costs(backend: BatchBackend, context: list[int], sizes: Iterable[int] = BATCH_COST_SIZES,
                        repeats: int = 5) -> dict[int, float]:
    """Median ms of one call scoring T positions in all, for each T in `sizes`: spread over min(T, slots) sequences
    that each hold `context`, every position with logits (as verification needs). The sizes take turns in every
    round, so a load that comes and goes weighs on all alike."""
    sizes = sorted(set(sizes))
    used = min(backend.slots, max(sizes))
    for slot in range(used):  # prefill each slot's context, a chunk at a time
        backend.reset(slot)
        for end in range(BATCH_PREFILL_CHUNK, len(context) + BATCH_PREFILL_CHUNK, BATCH_PREFILL_CHUNK):
            backend.sync([(slot, context[: min(end, len(context))], 0)])
    times: dict[int, list[float]] = {n: [] for n in sizes}
    extra = [(7919 * i + 17) % backend.vocab_size for i in range(max(sizes))]  # any ids will do
    for _ in range(repeats):
        for n in sizes:
            b = min(n, used)
            wants = []
            for slot in range(b):
                m = n // b + (slot < n % b)
                backend.rollback(slot, len(context))
                wants.append((slot, context + extra[:m], m))
            t0 = time.perf_counter()
            backend.sync(wants)
            times[n].append(time.perf_counter() - t0)
    for slot in range(used):
        backend.reset(slot)
    return {n: 1000 * statistics.median(t) for n, t in times.items()}


def machine_costs(backend: BatchBackend, model_key: str, context_tokens: int = BATCH_COST_CONTEXT,
                  refresh: bool = False) -> BatchCosts:
    """`measure_batch_costs` on a `context_tokens`-token context, cached per machine in
    ~/.cache/adaspec/batch_costs.json by model, backend, slots, threads and CPU (measured once, then read)."""
    record = cache_root() / "batch_costs.json"
    key = "|".join([model_key, backend.where, f"slots={backend.slots}", f"threads={torch.get_num_threads()}",
                    f"context={context_tokens}", platform.machine(), cpu_model() or "cpu"])
    try:
        cached = json.loads(record.read_text()) if record.is_file() else {}
    except json.JSONDecodeError:
        cached = {}
    if refresh or key not in cached:
        context = [(100 + 7919 * i) % backend.vocab_size for i in range(context_tokens)]
        cached[key] = {str(n): round(ms, 3) for n, ms in measure_batch_costs(backend, context).items()}
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(cached, indent=1))
    return BatchCosts({int(n): float(ms) for n, ms in cached[key].items()})


def rule_table(costs: BatchCosts, alphas: Iterable[float] = (0.5, 0.7, 0.9),
               batches: Iterable[int] = (1, 2, 4, 8, 16, 32), k_max: int = 8) -> dict[float, dict[int, float]]:
    """{alpha: {batch size: mean tokens drafted per sequence}}: what the cost rule picks for a batch of sequences
    whose drafted tokens are each kept with chance alpha (`adaspec costs --batch`)."""
    table: dict[float, dict[int, float]] = {}
    for a in alphas:
        gains = [a ** (j + 1) for j in range(k_max)]
        table[a] = {b: sum(plan_lengths([gains] * b, b, float(b), costs, margin=BATCH_DRAFT_MARGIN)) / b
                    for b in batches}
    return table


def verdict(policy: LengthPolicy, drafted: int, accepted: int) -> str | None:
    """What the measured costs say of speculation on this machine, given `accepted` of `drafted` tokens kept (one
    generation's): the acceptance at which drafting one token breaks even, and the best fixed draft length at the
    acceptance seen with its expected speedup. None for a policy that does not weigh costs (a fixed k, CM-ASD's own
    length, SpecBound's bound)."""
    costs = policy.costs if isinstance(policy, CostCapped) else policy
    if not isinstance(costs, CostAware):
        return None
    alpha = accepted / drafted if drafted else costs.alpha
    gains = [expected_tokens(alpha, k) / c for k, c in enumerate(costs.cost)]
    best = max(range(len(gains)), key=gains.__getitem__)
    even = min(1.0, costs.cost[1] - 1)  # (1 + a) / cost(1) = 1: one drafted token pays above this acceptance
    seen = f"{accepted} of {drafted} drafted tokens kept ({alpha:.0%})" if drafted else "nothing drafted"
    tail = (f"plain decoding is the fastest here (a drafted token pays when kept more than {even:.0%} of the time)"
            if best == 0 else f"speculation pays here: best fixed k={best}, expected {gains[best]:.2f}x plain decoding")
    return (f"cost model, this machine: a step verifying 1 drafted token costs {costs.cost[1]:.2f}x a plain step, "
            f"{len(costs.cost) - 1} tokens {costs.cost[-1]:.2f}x; {seen}: {tail}")
