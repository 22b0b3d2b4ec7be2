"""Torch backend: a Hugging Face causal LM with a `DynamicCache`."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from adaspec.backends.base import Backend
from adaspec.cache import crop_cache, new_cache


class TorchBackend(Backend):
    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model.eval()
        self.vocab_size = int(model.config.vocab_size)
        self.max_context = int(getattr(model.config, "max_position_embeddings", 1 << 30))
        self.cache = new_cache(model)

    @torch.inference_mode()
    def _forward(self, ids: torch.Tensor, keep: int) -> torch.Tensor:
        out = self.model(input_ids=ids, cache=self.cache, use_cache=True, logits_to_keep=keep)
        return out.logits.float()  # [B, keep, V]

    def _truncate(self, length: int) -> None:
        if length == 0:
            self.cache = new_cache(self.model)
        else:
            crop_cache(self.cache, length)
