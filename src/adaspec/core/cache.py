"""KV caches with rollback.

Two caches, one operation speculative decoding needs from both: roll back to a length.
- `StaticKV`: keys and values preallocated once ([layers, B, kv_heads, capacity, head_dim]) and a write
  index; rollback sets the length (gpt-fast / nanochat style). The lean Llama forward (backends/lean.py)
  runs on it.
- transformers' `DynamicCache` (keys [B, heads, T, head_dim] per layer, grown by concatenation), for the
  Hugging Face forward of any other architecture. Every layer keeps every position, sliding-window layers included
  (Gemma 3, Mistral, Qwen2, Phi-3): the model's mask applies the window, and a rollback past the window stays exact
  (transformers' sliding-window layers drop the keys a rollback would need).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from adaspec.core.errors import AdaspecError


class StaticKV:
    """Preallocated keys and values for `layers` layers and up to `capacity` positions of `batch` rows.

    `length` positions are valid; a forward writes its n new positions at [length, length + n) in every
    layer (`write`), then `advance(n)` makes them valid. Rollback is `crop(length)`: nothing is freed or
    copied, later writes overwrite the dropped positions."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype,
                 batch: int = 1, device: torch.device | str | None = None) -> None:
        shape = (layers, batch, kv_heads, capacity, head_dim)
        # [L, B, kv, T, D] (on a CPU, pages are committed as written; on a GPU the whole capacity is allocated)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)  # [L, B, kv, T, D]
        self.capacity = capacity
        self.length = 0

    def get_seq_length(self) -> int:
        return self.length

    def check_room(self, batch: int, n: int) -> None:
        """Refuse a forward of n positions of `batch` rows that does not fit (before anything is written)."""
        if batch != self.keys.shape[1]:
            raise AdaspecError(f"this KV cache holds {self.keys.shape[1]} batch rows, not {batch}; "
                               "make a backend per batch size")
        if self.length + n > self.capacity:
            raise AdaspecError(f"the KV cache holds {self.capacity} positions; {self.length} + {n} do not fit. "
                               "Roll back first, or make the backend with a larger cache_len")

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, kv, n, D] at the next n positions of `layer`; return that layer's keys and values
        [B, kv, length + n, D] (views, the new positions included)."""
        end = self.length + k.shape[2]
        self.keys[layer, :, :, self.length: end] = k
        self.values[layer, :, :, self.length: end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def crop(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of {self.length} positions to {length}")
        self.length = length


def new_cache(model: PreTrainedModel) -> Cache:
    """A `DynamicCache` whose every layer keeps every position. Not `DynamicCache(config=...)`: its sliding-window
    layers keep only the last window - 1 positions and refuse to crop once past the window (RuntimeError), so a
    speculative rollback could not be exact; the model's own mask applies the window to a full layer."""
    cache = DynamicCache()
    layers = int(getattr(model.config.get_text_config(), "num_hidden_layers", 0) or 0)
    cache.layers = [DynamicLayer() for _ in range(layers)]  # made up front: layer-wise runs read any layer's length
    return cache


def cache_length(cache: Cache | StaticKV) -> int:
    return int(cache.get_seq_length())


def crop_cache(cache: Cache | StaticKV, length: int) -> None:
    """Drop every cached position at index >= `length` (all batch rows alike)."""
    if isinstance(cache, StaticKV):
        cache.crop(length)
        return
    current = cache_length(cache)
    if length < 0 or length > current:
        raise ValueError(f"cannot crop a cache of {current} positions to {length}")
    if length < current:
        cache.crop(length - current)  # transformers >= 5.24: a negative count of positions to remove
