"""Torch backend: a Hugging Face causal LM, run by the lean forward on a preallocated KV cache where the
architecture allows (Llama: backends/lean.py), else by transformers' own forward (Qwen2, Gemma 3, Phi-3, Mistral, any
causal LM) with a `DynamicCache` that rolls back exactly (cache.new_cache). It runs on the model's device: token ids
go there once per forward and logits stay there (the decoding loop reads back what it needs)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from adaspec.core.backends.base import Backend
from adaspec.core.backends.lean import LeanLlama, lean_unsupported
from adaspec.core.cache import StaticKV, crop_cache, new_cache
from adaspec.core.config import TORCH_CACHE_LEN
from adaspec.core.errors import AdaspecError


class TorchBackend(Backend):
    """`vocab_ids` restricts the LM head to those rows (a drafter's reduced vocabulary): logits of every
    other token are -inf, so the full-vocabulary interface holds while the head costs len(vocab_ids)/V.
    `keep_hidden` keeps the final hidden states of every position of the last forward in `hidden`
    ([n, H], the first at position `hidden_start`), for drafters that read the target's features.

    `lean`: None runs the lean forward when the architecture allows it, True insists on it, False runs
    transformers' forward. The lean forward's cache holds `cache_len` positions (capped by the model's
    context), which bounds `max_context`."""

    def __init__(self, model: PreTrainedModel, vocab_ids: list[int] | None = None, keep_hidden: bool = False,
                 lean: bool | None = None, cache_len: int = TORCH_CACHE_LEN) -> None:
        super().__init__()
        self.keep_hidden = keep_hidden
        self.hidden = torch.empty(0)  # [n, H] on the model's device
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.vocab_size = int(model.config.vocab_size)
        self.max_context = int(getattr(model.config, "max_position_embeddings", 1 << 30))
        reason = lean_unsupported(model)
        if lean and reason is not None:
            raise AdaspecError(f"the lean torch forward cannot run this model ({reason}); use lean=False")
        self.lean = LeanLlama(model, min(cache_len, self.max_context)) if reason is None and lean is not False else None
        if self.lean is not None:
            self.max_context = self.lean.capacity
        self.cache: StaticKV | Cache = self.lean.new_cache() if self.lean else new_cache(model)
        self.vocab_ids = None if vocab_ids is None else torch.tensor(vocab_ids, dtype=torch.long, device=self.device)
        if self.lean is not None:
            self.head = self.lean.head(self.vocab_ids)  # [V or v, H], prepared for self.lean.linear
        else:
            head = model.get_output_embeddings().weight.detach()
            self.head = head if vocab_ids is None else head[self.vocab_ids].contiguous()  # [V or v, H]

    @torch.inference_mode()
    def _forward(self, ids: torch.Tensor, keep: int) -> torch.Tensor:
        if self.lean is None and self.vocab_ids is None and not self.keep_hidden:
            out = self.model(input_ids=ids, cache=self.cache, use_cache=True, logits_to_keep=keep)
            return out.logits.float()  # [B, keep, V]
        if self.lean is not None:
            hidden = self.lean.hidden(ids, self.cache)  # [B, n, H]
        else:
            hidden = self.model.model(input_ids=ids, cache=self.cache, use_cache=True).last_hidden_state  # [B, n, H]
        if self.keep_hidden:
            self.hidden = hidden[0]
        logits = (self.lean.linear if self.lean else F.linear)(hidden[:, -keep:], self.head)  # [B, keep, V or v]
        if self.vocab_ids is None:
            return logits.float()
        full = torch.full((ids.shape[0], keep, self.vocab_size), float("-inf"), device=logits.device)
        full[..., self.vocab_ids] = logits.float()
        return full

    def _truncate(self, length: int) -> None:
        if length == 0 and self.lean is None:
            self.cache = new_cache(self.model)
        else:
            crop_cache(self.cache, length)
