"""Any local Hugging Face causal LM: tiny random models of five architectures, built offline from their configs.

Llama runs the lean forward; Qwen2, Gemma 3, Phi-3 and Mistral run transformers' own forward, each with sliding-window
attention on some layers and a window shorter than the sequences, so rollbacks cross it. On each: the cached forward
after rollbacks equals a cache-free forward, greedy `sd` (prompt lookup and a model drafter) equals `ar` and a naive
decoder token for token, and lossless speculative sampling fits the exact law of the first tokens (chi-square, the
harness of tests/test_lossless.py). ADASPEC_TEST_DEVICE=cuda runs them on that device (scripts/gpu-check.sh).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from conftest import random_prompt
from test_lossless import PASS, PROMPT, SCALE, T1, TOKENS, V, fit_pvalue, probs_from_logits
from transformers import AutoConfig, AutoModelForCausalLM

from adaspec.core.backends import TorchBackend
from adaspec.core.config import GenerationConfig
from adaspec.core.decode import generate
from adaspec.core.drafters import ModelDrafter, PromptLookupDrafter
from adaspec.core.policies import FixedLength

DEVICE = torch.device(os.environ.get("ADASPEC_TEST_DEVICE", "cpu"))
SAMPLES = 600  # per architecture (tests/test_lossless.py draws 3000 on Llama, and shows the check's power)
WINDOW = 6  # sliding-window layers see this many positions: shorter than every sequence below
ARCHITECTURES = {
    "llama": {},
    "qwen2": {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
    "gemma3_text": {"head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": WINDOW,
                    "layer_types": ["sliding_attention", "full_attention"]},
    "phi3": {"sliding_window": WINDOW},
    "mistral": {"sliding_window": WINDOW},
}


def tiny_model(model_type: str, seed: int, vocab: int = 64, scale: float = 1.0, noise: float = 0.0, layers: int = 2):
    """A random model of `model_type` (hidden 32, 4 heads, 2 kv heads); `scale` multiplies the LM head (peaked
    laws), `noise` jitters every weight by that share of its std (a drafter that agrees often but not always)."""
    torch.manual_seed(seed)
    extra = dict(ARCHITECTURES[model_type])
    if "layer_types" in extra:
        extra["layer_types"] = extra["layer_types"][:layers]  # sliding first
    config = AutoConfig.for_model(model_type, vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                  tie_word_embeddings=False, **extra)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)
        generator = torch.Generator().manual_seed(seed + 1000)
        for p in model.parameters():
            p.add_(noise * p.std() * torch.randn(p.shape, generator=generator))
    return model.to(DEVICE)


def full_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits [T, V] of a fresh, cache-free forward of `ids` (on the host)."""
    with torch.inference_mode():
        return model(torch.tensor([ids], device=model.device)).logits[0].float().cpu()


def naive_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Reference decoder: a cache-free forward of the whole sequence per token, argmax of the last logits."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(full_logits(model, ids)[-1].argmax()))
    return ids[len(prompt):]


def perturbed(model, noise: float, seed: int = 7):
    twin = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(noise * p.std() * torch.randn(p.shape, generator=generator).to(p.device))
    return twin


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def arch(request):
    return request.param


def test_every_architecture_but_llama_runs_transformers_forward(arch):
    backend = TorchBackend(tiny_model(arch, 0))
    assert (backend.lean is not None) == (arch == "llama")
    assert backend.max_context == 256


def test_rollback_across_the_sliding_window_is_exact(arch):
    # transformers' own sliding-window cache layers drop the keys a rollback needs (and refuse to crop once past
    # the window); the backend's cache keeps every position, the model's mask applies the window
    model = tiny_model(arch, 1)
    backend = TorchBackend(model)
    ids = random_prompt(3, length=20)
    other = random_prompt(4, length=5)
    backend.extend(ids, keep=1)
    backend.rollback(11)  # back past the window of the last positions
    backend.extend(other[:2], keep=1)
    backend.rollback(12)
    got = backend.extend(other[2:], keep=3).cpu()  # [3, V]
    want = full_logits(model, ids[:11] + other[:1] + other[2:])[-3:]
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())


def test_greedy_sd_equals_ar_and_a_naive_decoder(arch):
    model = tiny_model(arch, 2, scale=4.0)
    target = TorchBackend(model)
    drafter = ModelDrafter(TorchBackend(perturbed(model, 0.05)))
    config = GenerationConfig(max_new_tokens=40)
    steps = []
    for seed in range(3):
        prompt = random_prompt(10 + seed, length=12)
        ar = generate(target, prompt, config).token_ids
        assert ar == naive_greedy(model, prompt, 40)
        lookup = generate(target, prompt, config, PromptLookupDrafter(), FixedLength(4))
        drafted = generate(target, prompt, config, drafter, FixedLength(3))
        assert lookup.token_ids == ar and drafted.token_ids == ar
        steps += drafted.steps
    # both verdicts, many times: rollbacks of 1..3 positions and full accepts with a bonus token
    assert sum(s.accepted < s.drafted for s in steps) >= 3 and sum(s.accepted == s.drafted > 0 for s in steps) >= 3
    assert len(steps) < 3 * 40  # the drafter saved forwards


def test_lossless_sampling_fits_the_exact_law(arch):
    if arch == "llama":
        pytest.skip("tests/test_lossless.py checks the lean Llama forward")
    # one layer, sliding (where the architecture has one): 9 + 3 positions over a window of 6
    target = TorchBackend(tiny_model(arch, 10, vocab=V, scale=SCALE, layers=1))
    drafter = ModelDrafter(TorchBackend(tiny_model(arch, 11, vocab=V, scale=SCALE, layers=1)))
    joint = exact_joint(target.model)
    samples, rejections, full_accepts = [], 0, 0
    for seed in range(SAMPLES):
        result = generate(target, PROMPT, GenerationConfig(max_new_tokens=TOKENS, sampling=T1, seed=seed), drafter,
                          FixedLength(2))
        samples.append(tuple(result.token_ids))
        rejections += sum(s.accepted < s.drafted for s in result.steps)
        full_accepts += sum(s.accepted == s.drafted > 0 for s in result.steps)
    assert rejections > SAMPLES // 20 and full_accepts > SAMPLES // 20  # both paths, many times
    assert fit_pvalue(samples, joint) > PASS


def exact_joint(model) -> dict[tuple[int, ...], float]:
    """P(t1, t2, t3) at temperature 1 by enumerating every prefix with cache-free forwards."""
    joint: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(3):
        longer = {}
        for prefix, mass in joint.items():
            probs = probs_from_logits(full_logits(model, PROMPT + list(prefix))[-1], T1)  # [V]
            longer.update({prefix + (t,): mass * float(probs[t]) for t in range(V)})
        joint = longer
    return joint


def test_the_cost_table_measures_a_transformers_forward_target(monkeypatch):
    # `adaspec costs --target gemma3 --backends torch:float32`: the verify curve of a model the lean forward cannot run
    from pathlib import Path

    import adaspec.core.models
    from adaspec.bench.costs import cost_table, cost_table_markdown
    from adaspec.core.models import LoadedModel

    model = tiny_model("gemma3_text", 3).cpu()
    monkeypatch.setattr(adaspec.core.models, "load_model", lambda spec, dtype="auto", device="auto":
                        LoadedModel("tiny-gemma3", Path("."), model, None))
    rows = cost_table("tiny-gemma3", ("torch:float32",), context_tokens=20, drafters=(), repeats=1, log=lambda _: None)
    assert [r["backend"] for r in rows] == ["torch:float32"]
    assert set(rows[0]["verify_ms"]) == {"1", "2", "4", "6", "8"} and rows[0]["verify_ratio"]["1"] == 1.0
    assert "torch:float32" in cost_table_markdown(rows)
