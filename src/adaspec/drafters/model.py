"""A small causal LM that shares the target's tokenizer, drafting autoregressively on its own KV cache."""

from __future__ import annotations

import torch

from adaspec.backends.base import Backend
from adaspec.drafters.base import Draft, DraftContext
from adaspec.policies import LengthPolicy
from adaspec.sampling import probs_from_logits, sample


class ModelDrafter:
    def __init__(self, backend: Backend, name: str = "model") -> None:
        self.backend = backend
        self.name = name

    def reset(self) -> None:
        self.backend.reset()

    def propose(self, ctx: DraftContext, policy: LengthPolicy) -> Draft:
        # Lazy catch-up: the cache may lack the tokens the target emitted last step; sync feeds them.
        logits = self.backend.sync(ctx.ids)[-1]  # [V]
        tokens: list[int] = []
        probs: list[torch.Tensor] = []
        rows: list[torch.Tensor] = []
        confidence: list[float] = []
        while True:
            q = probs_from_logits(logits, ctx.sampling)  # [V]
            x = int(q.argmax()) if ctx.sampling.greedy else sample(q, ctx.generator)
            tokens.append(x)
            probs.append(q)
            rows.append(logits)
            confidence.append(ctx.score(logits) if ctx.score else float(torch.softmax(logits, -1)[x]))
            if len(tokens) >= ctx.k_max or not policy.keep_drafting(confidence):
                break
            logits = self.backend.extend([x])[-1]
        draft_probs = None if ctx.sampling.greedy else torch.stack(probs)  # [k, V]
        return Draft(tokens, draft_probs, confidence, torch.stack(rows))  # logits [k, V]

    def observe(self, accepted: int, ids: list[int]) -> None:
        pass  # rejected positions are dropped by the next `sync`, which compares token ids
