"""Speedup over `ar` with a 95 % bootstrap interval over prompts.

The speedup of a method is the ratio of aggregate rates on the questions both it and `ar` answered,
(sum tokens / sum seconds) / (sum ar tokens / sum ar seconds): with equal outputs that is the ratio of total
times. Its interval resamples those questions with replacement (each resample keeps a question's method and
`ar` records together: paired) and takes the 2.5 and 97.5 percentiles of the resampled speedups. The RNG has
a fixed seed, so a summary rebuilt from the same records carries the same interval.
"""

from __future__ import annotations

import numpy as np

BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0
LEVEL = 0.95

Pair = tuple[float, float, float, float]  # (tokens, seconds, ar tokens, ar seconds) of one question


def paired_speedup(pairs: list[Pair]) -> float | None:
    """(sum tokens / sum seconds) / (sum ar tokens / sum ar seconds); None where a sum is zero."""
    tokens, wall, base_tokens, base_wall = (sum(col) for col in zip(*pairs, strict=True)) if pairs else (0,) * 4
    if not (wall and base_wall and base_tokens):
        return None
    return (tokens / wall) / (base_tokens / base_wall)


def bootstrap_speedup_ci(pairs: list[Pair], samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED,
                         level: float = LEVEL) -> tuple[float, float] | None:
    """Percentile bootstrap interval of `paired_speedup` over questions; None with fewer than 2 questions."""
    if len(pairs) < 2 or paired_speedup(pairs) is None:
        return None
    table = np.asarray(pairs, dtype=np.float64)  # [n, 4]
    n = len(table)
    weights = np.random.default_rng(seed).multinomial(n, np.full(n, 1 / n), size=samples)  # [samples, n]
    sums = weights @ table  # [samples, 4]: each resample's sums
    valid = (sums[:, 1] > 0) & (sums[:, 2] > 0) & (sums[:, 3] > 0)
    ratio = (sums[valid, 0] / sums[valid, 1]) / (sums[valid, 2] / sums[valid, 3])
    lo, hi = np.quantile(ratio, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)
