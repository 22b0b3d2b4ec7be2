"""KV cache with rollback for Hugging Face models.

The cache itself is transformers' `DynamicCache` (batch-aware: keys are [B, heads, T, head_dim]);
this module owns the one operation speculative decoding needs from it: roll back to a length.
"""

from __future__ import annotations

from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache


def new_cache(model: PreTrainedModel) -> Cache:
    return DynamicCache(config=model.config)


def cache_length(cache: Cache) -> int:
    return int(cache.get_seq_length())


def crop_cache(cache: Cache, length: int) -> None:
    """Drop every cached position at index >= `length` (all batch rows alike)."""
    current = cache_length(cache)
    if length < 0 or length > current:
        raise ValueError(f"cannot crop a cache of {current} positions to {length}")
    if length < current:
        cache.crop(length - current)  # transformers >= 5.24: a negative count of positions to remove
