"""Measured costs: the target scoring n positions at once relative to one step, and a drafter's cost
per drafted token relative to one target step. These explain every speedup."""

from __future__ import annotations

import statistics
import time

from adaspec.backends.base import Backend

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


def drafter_cost(drafter: Backend, target_step_ms: float, context: list[int]) -> dict:
    ms = forward_ms(drafter, context, 1)
    return {"drafter_step_ms": round(ms, 3), "drafter_cost_ratio": round(ms / target_step_ms, 4)}
