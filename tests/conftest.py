"""Tiny randomly initialised Llama models, built in the tests (no files, no downloads)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from adaspec.backends import TorchBackend


def tiny_llama(seed: int, vocab: int = 64, layers: int = 2, scale: float = 1.0, context: int = 256):
    """A tiny Llama; `scale` multiplies the LM head so next-token distributions are far from uniform."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


def tiny_backend(seed: int, **kwargs) -> TorchBackend:
    return TorchBackend(tiny_llama(seed, **kwargs))


def random_prompt(seed: int, length: int = 8, vocab: int = 64) -> list[int]:
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
