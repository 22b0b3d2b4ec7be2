"""Tiny randomly initialised Llama models, built in the tests (no files, no downloads).

Random Llama heads give near-uniform next-token distributions; `scale` multiplies the LM head so that
the distributions are peaked (greedy outputs vary between prompts, sampled ones are far from uniform).
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from adaspec.core.backends import TorchBackend


def tiny_llama(seed: int, vocab: int = 64, layers: int = 2, scale: float = 1.0, context: int = 256):
    """A tiny Llama (hidden 32, 4 heads, 2 kv heads); `scale` multiplies the LM head weights."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


def perturbed_llama(seed: int, noise: float, noise_seed: int = 99, **kwargs):
    """`tiny_llama(seed, **kwargs)` with every weight jittered by `noise` times its own std: a drafter that
    agrees with that target often but not always (accepts, partial accepts and rejections all happen)."""
    return jittered(tiny_llama(seed, **kwargs), noise, noise_seed)


def jittered(model, noise: float, noise_seed: int = 99):
    """`model` (in place) with every weight jittered by `noise` times its own std."""
    generator = torch.Generator().manual_seed(noise_seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * p.std() * torch.randn(p.shape, generator=generator))
    return model


def damped_llama(seed: int, damp: float = 0.3, scale: float = 40.0, layers: int = 6, **kwargs):
    """A tiny Llama whose layers from the third on add `damp` times their usual update: early exits (SpecBound's)
    after 1, 2 or 4 layers often predict the final token; the LM head is scaled so that exits can be confident."""
    model = tiny_llama(seed, layers=layers, scale=scale, **kwargs)
    with torch.no_grad():
        for layer in model.model.layers[2:]:
            layer.self_attn.o_proj.weight.mul_(damp)
            layer.mlp.down_proj.weight.mul_(damp)
    return model


def tiny_backend(seed: int, **kwargs) -> TorchBackend:
    return TorchBackend(tiny_llama(seed, **kwargs))


def random_prompt(seed: int, length: int = 8, vocab: int = 64) -> list[int]:
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def naive_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Reference decoder: a full forward of the whole sequence per token, no cache, argmax of the last logits."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def full_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits [T, V] of a fresh, cache-free forward of `ids`."""
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()


def save_tiny(path, model) -> None:
    """`model` saved as a local Hugging Face model directory with a 64-word tokenizer (w0 .. w62), no EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(63)} | {"[UNK]": 63}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    model.config.eos_token_id = None  # run to the token budget
    model.generation_config.eos_token_id = None
    model.save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
