"""Torch backend: a Hugging Face causal LM with a `DynamicCache`."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from adaspec.backends.base import Backend
from adaspec.cache import crop_cache, new_cache


class TorchBackend(Backend):
    """`vocab_ids` restricts the LM head to those rows (a drafter's reduced vocabulary): logits of every
    other token are -inf, so the full-vocabulary interface holds while the head costs len(vocab_ids)/V.
    `keep_hidden` keeps the final hidden states of every position of the last forward in `hidden`
    ([n, H], the first at position `hidden_start`), for drafters that read the target's features."""

    def __init__(self, model: PreTrainedModel, vocab_ids: list[int] | None = None, keep_hidden: bool = False) -> None:
        super().__init__()
        self.keep_hidden = keep_hidden
        self.hidden = torch.empty(0)
        self.model = model.eval()
        self.vocab_size = int(model.config.vocab_size)
        self.max_context = int(getattr(model.config, "max_position_embeddings", 1 << 30))
        self.cache = new_cache(model)
        self.vocab_ids = None if vocab_ids is None else torch.tensor(vocab_ids, dtype=torch.long)
        if self.vocab_ids is not None:
            self.head = model.get_output_embeddings().weight[self.vocab_ids].detach().contiguous()  # [v, H]

    @torch.inference_mode()
    def _forward(self, ids: torch.Tensor, keep: int) -> torch.Tensor:
        if self.vocab_ids is None and not self.keep_hidden:
            out = self.model(input_ids=ids, cache=self.cache, use_cache=True, logits_to_keep=keep)
            return out.logits.float()  # [B, keep, V]
        hidden = self.model.model(input_ids=ids, cache=self.cache, use_cache=True).last_hidden_state  # [B, n, H]
        if self.keep_hidden:
            self.hidden = hidden[0]
        hidden = hidden[:, -keep:]
        if self.vocab_ids is None:
            return self.model.get_output_embeddings()(hidden).float()  # [B, keep, V]
        logits = torch.full((ids.shape[0], keep, self.vocab_size), float("-inf"))
        logits[..., self.vocab_ids] = (hidden @ self.head.T).float()  # [B, keep, v]
        return logits

    def _truncate(self, length: int) -> None:
        if length == 0:
            self.cache = new_cache(self.model)
        else:
            crop_cache(self.cache, length)
