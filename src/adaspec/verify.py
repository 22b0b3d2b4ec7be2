"""Acceptance rules, in paper notation: p = target distributions, q = draft distributions.

Every rule takes the target's logits at the k+1 verified positions (position i scores the token after
the i-th drafted one; position k gives the bonus token) and returns (n, x): the number of drafted
tokens kept, and the token appended after them (the correction on rejection, the bonus otherwise).
"""

from __future__ import annotations

from typing import Protocol

import torch

from adaspec.config import SamplingConfig
from adaspec.sampling import probs_from_logits, sample


class AcceptanceRule(Protocol):
    def __call__(
        self,
        target_logits: torch.Tensor,  # [k+1, V]
        draft_tokens: list[int],  # [k]
        draft_probs: torch.Tensor | None,  # [k, V]; None: a deterministic drafter (q is one-hot)
        sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> tuple[int, int]: ...


def greedy_accept(
    target_logits: torch.Tensor,
    draft_tokens: list[int],
    draft_probs: torch.Tensor | None = None,
    sampling: SamplingConfig | None = None,
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """Keep the longest drafted prefix equal to the target's argmax; the output equals greedy decoding."""
    top1 = target_logits.argmax(-1).tolist()  # [k+1]
    n = 0
    while n < len(draft_tokens) and draft_tokens[n] == top1[n]:
        n += 1
    return n, top1[n]


def speculative_sampling(
    target_logits: torch.Tensor,
    draft_tokens: list[int],
    draft_probs: torch.Tensor | None,
    sampling: SamplingConfig,
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """Lossless speculative sampling (Leviathan et al. 2023; Chen et al. 2023).

    Accept x_i with probability min(1, p_i(x_i) / q_i(x_i)); on the first rejection draw from
    norm(max(0, p_i - q_i)); if all k are accepted draw the bonus from p_k. The emitted tokens are
    distributed exactly as sampling from p token by token.
    """
    p = probs_from_logits(target_logits, sampling)  # [k+1, V]
    for i, x in enumerate(draft_tokens):
        q_x = 1.0 if draft_probs is None else float(draft_probs[i, x])
        if float(torch.rand((), generator=generator)) * q_x < float(p[i, x]):
            continue
        if draft_probs is None:
            residual = p[i].clone()
            residual[x] = 0.0
        else:
            residual = (p[i] - draft_probs[i]).clamp_min(0.0)
        mass = float(residual.sum())
        return i, sample(residual / mass if mass > 0 else p[i], generator)
    return len(draft_tokens), sample(p[-1], generator)


def rule_for(sampling: SamplingConfig) -> AcceptanceRule:
    """The exact rule for a sampling config: greedy matching at temperature 0, else speculative sampling."""
    return greedy_accept if sampling.greedy else speculative_sampling
