"""The torch backend's lean forward (core/backends/lean.py) computes transformers' logits on a preallocated cache:
prefill, verification after rollback, reduced heads and kept hidden states all equal the Hugging Face path,
and greedy decoding emits the same tokens on both."""

from __future__ import annotations

import pytest
import torch
from conftest import full_logits, random_prompt, tiny_llama
from transformers import Qwen2Config, Qwen2ForCausalLM

from adaspec.core.backends import TorchBackend
from adaspec.core.backends.lean import lean_unsupported
from adaspec.core.cache import StaticKV
from adaspec.core.config import GenerationConfig
from adaspec.core.decode import generate
from adaspec.core.drafters import ModelDrafter, PromptLookupDrafter
from adaspec.core.errors import AdaspecError
from adaspec.core.policies import FixedLength

ATOL = 1e-5


@pytest.fixture(scope="module")
def model():
    return tiny_llama(0, scale=4.0)


def pair(model, **kwargs) -> tuple[TorchBackend, TorchBackend]:
    """(lean, Hugging Face) backends of one model."""
    lean, hf = TorchBackend(model, lean=True, **kwargs), TorchBackend(model, lean=False, **kwargs)
    assert isinstance(lean.cache, StaticKV) and not isinstance(hf.cache, StaticKV)
    return lean, hf


def test_llama_runs_lean_by_default(model):
    assert lean_unsupported(model) is None
    assert TorchBackend(model).lean is not None


def test_a_torch_backend_says_where_it_runs(model):
    assert TorchBackend(model).where == "torch:float32"
    assert TorchBackend(tiny_llama(0).to(torch.bfloat16)).where == "torch:bfloat16"


def test_prefill_logits_equal_the_hf_forward(model):
    lean, hf = pair(model)
    ids = random_prompt(0, length=20)
    a, b = lean.extend(ids, keep=20), hf.extend(ids, keep=20)
    assert a.shape == (20, 64) and torch.allclose(a, b, atol=ATOL)
    assert torch.allclose(a, full_logits(model, ids), atol=ATOL)


@pytest.mark.parametrize("k", [0, 1, 3, 5])
def test_scoring_k_plus_1_positions_after_rollback_equals_the_hf_forward(model, k):
    lean, hf = pair(model)
    ids = random_prompt(1, length=16)
    for backend in (lean, hf):
        backend.extend(ids)
        backend.extend(random_prompt(2, length=4))  # a rejected draft
        backend.rollback(len(ids))
    draft = random_prompt(3, length=k + 1)
    a, b = lean.extend(draft, keep=k + 1), hf.extend(draft, keep=k + 1)
    assert a.shape == (k + 1, 64) and torch.allclose(a, b, atol=ATOL)
    assert torch.allclose(a, full_logits(model, ids + draft)[-(k + 1):], atol=ATOL)


def test_rollback_then_re_extend_equals_never_having_extended(model):
    ids, more = random_prompt(4, length=10), random_prompt(5, length=6)
    once = TorchBackend(model)
    once.extend(ids)
    expected = once.extend(more, keep=6)
    twice = TorchBackend(model)
    twice.extend(ids)
    twice.extend(random_prompt(6, length=7))
    twice.rollback(10)
    assert torch.equal(twice.extend(more, keep=6), expected)  # the overwritten positions leave no trace


def test_reset_starts_a_new_sequence(model):
    lean = TorchBackend(model)
    lean.extend(random_prompt(7, length=30))
    lean.reset()
    ids = random_prompt(8, length=5)
    assert torch.allclose(lean.extend(ids, keep=5), full_logits(model, ids), atol=ATOL)


def test_reduced_vocab_head_equals_the_hf_forward(model):
    vocab = [1, 4, 9, 16, 25, 36, 49]
    lean, hf = pair(model, vocab_ids=vocab)
    ids = random_prompt(9, length=12)
    a, b = lean.extend(ids, keep=3), hf.extend(ids, keep=3)
    assert torch.allclose(a[:, vocab], b[:, vocab], atol=ATOL)
    assert torch.allclose(a[:, vocab], full_logits(model, ids)[-3:, vocab], atol=ATOL)
    assert torch.isinf(a[:, [0, 2, 3]]).all()


def test_kept_hidden_states_equal_the_hf_forward(model):
    lean, hf = pair(model, keep_hidden=True)
    ids = random_prompt(10, length=12)
    for backend in (lean, hf):
        backend.extend(ids[:8])
        backend.extend(ids[8:], keep=2)
    assert lean.hidden_start == hf.hidden_start == 8
    assert lean.hidden.shape == (4, 32) and torch.allclose(lean.hidden, hf.hidden, atol=ATOL)
    with torch.inference_mode():
        expected = model.model(torch.tensor([ids])).last_hidden_state[0, 8:]  # [4, H]
    assert torch.allclose(lean.hidden, expected, atol=ATOL)


def test_bf16_logits_match_the_hf_forward():
    model = tiny_llama(0, scale=4.0).to(torch.bfloat16)
    lean, hf = pair(model)
    ids = random_prompt(11, length=12)
    a, b = lean.extend(ids[:9], keep=9), hf.extend(ids[:9], keep=9)
    assert torch.allclose(a, b, atol=0.05)
    a, b = lean.extend(ids[9:], keep=3), hf.extend(ids[9:], keep=3)
    assert lean.cache.keys.dtype == torch.bfloat16 and torch.allclose(a, b, atol=0.05)


@pytest.mark.parametrize("method", ["ar", "sd-model", "sd-lookup"])
def test_greedy_decoding_emits_the_same_tokens_on_both_paths(method):
    target = tiny_llama(0, scale=8.0)
    drafter = tiny_llama(0, layers=1, scale=8.0)
    config = GenerationConfig(max_new_tokens=40)
    for seed in range(4):
        prompt = random_prompt(20 + seed, length=3 + 4 * seed)
        out = []
        for lean in (True, False):
            draft = {"ar": None, "sd-lookup": PromptLookupDrafter(),
                     "sd-model": ModelDrafter(TorchBackend(drafter, lean=lean))}[method]
            result = generate(TorchBackend(target, lean=lean), prompt, config, draft, FixedLength(4))
            out.append(result.token_ids)
        assert out[0] == out[1] and len(out[0]) == 40


def test_exceeding_the_preallocated_cache_is_a_clear_error(model):
    lean = TorchBackend(model, cache_len=16)
    assert lean.max_context == 16
    ids = random_prompt(12, length=12)
    lean.extend(ids)
    with pytest.raises(AdaspecError, match="context of 16"):
        lean.extend([1, 2, 3, 4, 5])
    assert lean.tokens == ids and lean.cache.length == 12
    with pytest.raises(AdaspecError, match="holds 16 positions"):  # below the backend's check, the cache's own
        lean.lean.hidden(torch.tensor([[1, 2, 3, 4, 5]]), lean.cache)
    assert lean.cache.length == 12
    lean.extend([1, 2, 3, 4])  # exactly full is fine
    assert lean.cache.length == 16


def test_an_unsupported_architecture_falls_back_to_the_hf_forward():
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    qwen = Qwen2ForCausalLM(config).eval()
    assert "qwen2" in lean_unsupported(qwen)
    backend = TorchBackend(qwen)
    assert backend.lean is None
    ids = random_prompt(13, length=6)
    assert torch.allclose(backend.extend(ids, keep=6), full_logits(qwen, ids), atol=ATOL)
    with pytest.raises(AdaspecError, match="lean=False"):
        TorchBackend(qwen, lean=True)


@pytest.mark.bundled
def test_the_bundled_model_gives_the_hf_logits_on_the_lean_path():
    from adaspec.core.models import load_model

    model = load_model().model
    lean, hf = pair(model)
    ids = random_prompt(14, length=40, vocab=49152)
    a, b = lean.extend(ids[:36], keep=2), hf.extend(ids[:36], keep=2)
    assert torch.allclose(a, b, atol=1e-3)
    a, b = lean.extend(ids[36:], keep=4), hf.extend(ids[36:], keep=4)
    assert torch.allclose(a, b, atol=1e-3)
    assert a.argmax(-1).tolist() == b.argmax(-1).tolist()
