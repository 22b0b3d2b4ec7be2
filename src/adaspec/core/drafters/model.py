"""A small causal LM that shares the target's tokenizer, drafting autoregressively on its own KV cache (on its
backend's device: a drafted token is read back to the host once, its id and confidence together)."""

from __future__ import annotations

import torch

from adaspec.core.backends.base import Backend
from adaspec.core.drafters.base import Draft, DraftContext, Hidden
from adaspec.core.sampling import probs_from_logits, sample


class ModelDrafter:
    wants_hidden = False

    def __init__(self, backend: Backend, name: str = "model") -> None:
        self.backend = backend
        self.name = name

    def reset(self) -> None:
        self.backend.reset()

    def propose(self, ctx: DraftContext) -> Draft:
        # Lazy catch-up: the cache may lack the tokens the target emitted last step; sync feeds them.
        logits = self.backend.sync(ctx.ids)[-1]  # [V]
        tokens: list[int] = []
        probs: list[torch.Tensor] = []
        rows: list[torch.Tensor] = []
        confidence: list[float] = []
        while True:
            q = probs_from_logits(logits, ctx.sampling)  # [V]
            if ctx.sampling.greedy:  # the id and its probability in one read from the device (float64: ids exact)
                top = logits.argmax()
                x, c = torch.stack([top.double(), torch.softmax(logits, -1)[top].double()]).tolist()
                x = int(x)
            else:  # one read: q for the host generator's draw and p(x) at temperature 1 for the confidence
                q_host, p_host = torch.stack([q, torch.softmax(logits, -1)]).cpu()
                x = sample(q_host, ctx.generator)
                c = None if ctx.score else float(p_host[x])
            tokens.append(x)
            probs.append(q)
            rows.append(logits)
            confidence.append(ctx.score(logits) if ctx.score else c)
            if len(tokens) >= ctx.k_max or not ctx.keep_drafting(confidence):
                break
            logits = self.backend.extend([x])[-1]
        draft_probs = None if ctx.sampling.greedy else torch.stack(probs)  # [k, V]
        return Draft(tokens, draft_probs, confidence, torch.stack(rows))  # logits [k, V]

    def observe(self, accepted: int, ids: list[int], hidden: Hidden | None = None) -> None:
        pass  # rejected positions are dropped by the next `sync`, which compares token ids
