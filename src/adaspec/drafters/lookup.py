"""Prompt lookup decoding (Saxena 2023): copy what followed the latest earlier occurrence of the
last n tokens. No model, no cost; strong on summarization, extraction and code editing.

A copy has no distribution: a draft carries no logits, and its confidence is 1.0 per token, what every
CM-ASD metric gives a one-hot. CM-ASD over prompt lookup therefore drafts floor(alpha * k_max) tokens (clamped)
and verifies with tau at C = 1: a fixed-length, fixed-tau method, said here rather than dressed up."""

from __future__ import annotations

from adaspec.drafters.base import Draft, DraftContext
from adaspec.errors import AdaspecError
from adaspec.policies import LengthPolicy


class PromptLookupDrafter:
    name = "lookup"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise AdaspecError(f"lookup needs 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def reset(self) -> None:
        pass

    def propose(self, ctx: DraftContext, policy: LengthPolicy) -> Draft:
        ids = ctx.ids
        for n in range(min(self.max_ngram, len(ids) - 1), self.min_ngram - 1, -1):
            tail = ids[-n:]
            # the latest earlier occurrence, searched backwards
            for start in range(len(ids) - n - 1, -1, -1):
                if ids[start : start + n] == tail:
                    follow = ids[start + n : start + n + ctx.k_max]
                    if follow:
                        # the policy may stop early (CM-ASD's early stop), as after a model drafter's token
                        k = next(t for t in range(1, len(follow) + 1)
                                 if t == len(follow) or not policy.keep_drafting([1.0] * t))
                        return Draft(follow[:k], None, [1.0] * k)
        return Draft()

    def observe(self, accepted: int, ids: list[int]) -> None:
        pass
