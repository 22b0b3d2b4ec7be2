"""Measured costs: the target scoring n positions at once relative to one step, and a drafter's cost
per drafted token relative to one target step. These explain every speedup."""

from __future__ import annotations

import statistics
import time

from adaspec.backends.base import Backend
from adaspec.config import GenerationConfig, SamplingConfig
from adaspec.decode import generate
from adaspec.drafters.base import DraftContext, Drafter
from adaspec.policies import FixedLength

VERIFY_SIZES = (1, 2, 4, 6, 8)


def forward_ms(backend: Backend, context: list[int], n: int, repeats: int = 7) -> float:
    """Median ms for the backend to score n new positions on top of a cached `context`."""
    backend.reset()
    backend.extend(context)
    times = []
    for _ in range(repeats):
        backend.rollback(len(context))
        t0 = time.perf_counter()
        backend.extend(context[-n:], keep=n)  # any n tokens will do: the cost does not depend on them
        times.append(time.perf_counter() - t0)
    backend.reset()
    return 1000 * statistics.median(times)


def verify_costs(target: Backend, context: list[int], sizes=VERIFY_SIZES) -> dict:
    ms = {n: forward_ms(target, context, n) for n in sizes}
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
        drafter.propose(ctx, FixedLength(k))
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
