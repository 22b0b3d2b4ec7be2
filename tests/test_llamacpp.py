"""The llama.cpp backend and peer on the bundled GGUF (skipped where llama-cpp-python is not installed), and the
clear errors where it is missing or cannot apply."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import tiny_llama

from adaspec.core.config import BackendChoice, GenerationConfig
from adaspec.core.decode import generate
from adaspec.core.drafters import PromptLookupDrafter
from adaspec.core.errors import AdaspecError
from adaspec.core.models import LoadedModel, encode_prompt, load_model
from adaspec.core.policies import FixedLength
from adaspec.methods import build_runner, parse_method, target_gguf

ONE_THREAD = BackendChoice(threads=1)  # llama.cpp's threads spin-wait: on a busy 2-core machine one thread is faster
PROMPTS = [
    "Summarize in one sentence: The city council voted on Tuesday to expand the bike lane network by 40 km, "
    "citing a 30% rise in cycling since 2020. The city council said the bike lane network would be finished "
    "by 2027.",
    "What is 17 times 23? Think step by step.",
    "Translate to German: The weather is nice today and we are going to the park.",
]


def test_the_backend_without_llama_cpp_says_how_to_install_it(monkeypatch):
    from adaspec.core.backends import llamacpp

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    assert not llamacpp.available()
    with pytest.raises(AdaspecError, match=r"adaspec\[llamacpp\]"):
        llamacpp.llama_cpp()


def test_bad_backend_or_format_in_a_spec_fails_before_loading():
    with pytest.raises(AdaspecError, match="unknown backend 'cuda'"):
        parse_method("sd:backend=cuda")
    with pytest.raises(AdaspecError, match="unknown llama.cpp weight format 'q3'"):
        parse_method("ar:format=q3")
    with pytest.raises(AdaspecError, match="unknown backend"):
        BackendChoice("tensorrt")


def test_llamacpp_needs_a_gguf_target(tmp_path):
    target = LoadedModel("tiny", tmp_path, tiny_llama(0), None)
    with pytest.raises(AdaspecError, match="llama.cpp runs GGUF files"):
        target_gguf(target, "shipped")


def _have_llama_cpp() -> bool:
    from adaspec.core.backends.llamacpp import available

    return available()


needs_llama = pytest.mark.skipif(not _have_llama_cpp(), reason="the llamacpp extra is not installed")


@pytest.fixture(scope="module")
def smollm():
    return load_model()


@pytest.fixture(scope="module")
def backend(smollm):
    from adaspec.core.backends.llamacpp import LlamaCppBackend

    return LlamaCppBackend(smollm.gguf, n_ctx=1024, threads=1)  # one thread: robust to a busy machine


def ids_of(smollm, prompt: str) -> list[int]:
    return encode_prompt(smollm.tokenizer, prompt)


@pytest.mark.bundled
@needs_llama
def test_rollback_then_extend_gives_the_logits_of_never_having_extended(backend):
    prompt = list(range(200, 260))
    backend.reset()
    backend.extend(prompt)
    first = backend.extend([5, 6, 7], keep=3)  # [3, V]
    backend.extend([8, 9])
    backend.rollback(len(prompt))
    assert backend.tokens == prompt
    again = backend.extend([5, 6, 7], keep=3)
    torch.testing.assert_close(again, first, rtol=0, atol=0)


@pytest.mark.bundled
@needs_llama
def test_scoring_k_positions_at_once_agrees_with_one_at_a_time(backend):
    prompt = list(range(300, 340))
    backend.reset()
    backend.extend(prompt)
    batched = backend.extend([11, 12, 13, 14], keep=4)  # [4, V]
    backend.rollback(len(prompt))
    single = torch.stack([backend.extend([t])[0] for t in (11, 12, 13, 14)])  # [4, V]
    assert batched.shape == (4, backend.vocab_size)
    from adaspec.core.backends.llamacpp import batch_invariant

    if batch_invariant():  # built as scripts/setup.sh builds it: the same logits to the bit
        torch.testing.assert_close(batched, single, rtol=0, atol=0)
    else:  # tinyBLAS rounds a batch differently; the distributions still agree closely
        assert torch.nn.functional.cosine_similarity(batched, single, dim=-1).min() > 0.99


@pytest.mark.bundled
@needs_llama
@pytest.mark.parametrize("fmt", ["q4_k_m", "q6_k"])
def test_k_quant_weights_score_a_batch_as_one_row_at_a_time(smollm, tmp_path, fmt):
    """K-quant weights (Gemma 3's GGUF is q4_k_m) take two batch-only kernels in llama.cpp: weights repacked at load
    for multi-row products, and a tiled matmul from 8 rows on. The backend avoids both; with either, rows of a
    12-row call differ from one-row calls (they did here: 1-3 of 12 equal). Greedy sd then equals ar."""
    from adaspec.core.backends.llamacpp import LlamaCppBackend, batch_invariant, file_type, requantize

    if not batch_invariant():
        pytest.skip("this llama.cpp build rounds batches differently (tinyBLAS): build it as scripts/setup.sh does")
    gguf = requantize(smollm.gguf, fmt, tmp_path)
    assert file_type(gguf) == fmt
    backend = LlamaCppBackend(gguf, n_ctx=512, threads=2)
    prompt, tokens = ids_of(smollm, PROMPTS[0]), list(range(2000, 2012))
    backend.reset()
    backend.extend(prompt)
    batched = backend.extend(tokens, keep=len(tokens))  # [12, V]
    backend.rollback(len(prompt))
    single = torch.stack([backend.extend([t])[0] for t in tokens])
    torch.testing.assert_close(batched, single, rtol=0, atol=0)
    config = GenerationConfig(max_new_tokens=32)
    ar = generate(backend, prompt, config)
    sd = generate(backend, prompt, config, PromptLookupDrafter(max_ngram=3), FixedLength(8))
    assert sd.token_ids == ar.token_ids


@pytest.mark.bundled
@needs_llama
def test_keep_hidden_returns_the_final_normed_hidden_states_of_every_position(smollm, backend):
    ids = ids_of(smollm, PROMPTS[1])
    backend.reset()
    backend.keep_hidden = True
    try:
        logits = backend.extend(ids, keep=2)
        hidden = backend.hidden  # [n, H]
    finally:
        backend.keep_hidden = False
    assert hidden.shape == (len(ids), smollm.model.config.hidden_size)
    with torch.inference_mode():
        reference = smollm.model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]  # [n, H]
        top = smollm.model.lm_head(reference[-2:]).argmax(-1).tolist()
    cos = torch.nn.functional.cosine_similarity(hidden, reference, dim=-1)
    assert cos.min() > 0.95, cos  # Q4_1 on llama.cpp vs its dequantized weights in torch fp32
    assert logits.argmax(-1).tolist() == top


@pytest.mark.bundled
@needs_llama
def test_the_peer_decodes_the_same_model_greedily(smollm):
    """The peer runs with flash attention where it is faster, prefilling in one batch; our backend may differ (it
    needs exactness): the same weights and argmax with different rounding, so their texts may part at a near-tie.
    Teacher-forced through our backend, every token the peer chose is our top-1 or a near-tie of it."""
    from adaspec.core.backends.llamacpp import LlamaCppBackend

    config = GenerationConfig(max_new_tokens=40)
    peer = build_runner(parse_method("llamacpp"), smollm, None, config, ONE_THREAD)
    ours = LlamaCppBackend(smollm.gguf, n_ctx=1024, threads=1)
    assert peer.where.removesuffix("+fa") == ours.where.removesuffix("+fa") == "llamacpp:q4_1"  # llama.cpp's metadata
    for prompt in PROMPTS[:2]:
        ids = ids_of(smollm, prompt)
        result = peer(ids, config)
        tokens = result.token_ids
        assert 0 < result.ttft_s < result.wall_s
        ours.reset()
        logits = ours.extend(ids + tokens[:-1], keep=len(tokens))  # [n, V]
        chosen = logits.gather(1, torch.tensor(tokens)[:, None])[:, 0]
        assert (logits.max(-1).values - chosen).max() < 1.5  # logits; 0 where the two agree


@pytest.mark.bundled
@needs_llama
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_sd_on_llamacpp_equals_ar_on_llamacpp(smollm, backend, prompt):
    from adaspec.core.backends.llamacpp import batch_invariant

    if not batch_invariant():
        pytest.skip("this llama.cpp build rounds batches differently (tinyBLAS): build it as scripts/setup.sh does")
    ids = ids_of(smollm, prompt)
    config = GenerationConfig(max_new_tokens=48)
    ar = generate(backend, ids, config)
    sd = generate(backend, ids, config, PromptLookupDrafter(max_ngram=3), FixedLength(4))
    assert sd.token_ids == ar.token_ids
    assert len(sd.steps) <= len(ar.steps)


@pytest.mark.bundled
@needs_llama
@pytest.mark.parametrize("flash", [None, True])
def test_greedy_sd_equals_ar_past_a_512_token_cache_with_either_attention(smollm, flash, monkeypatch):
    """Past 512 cached tokens llama.cpp's flash attention takes a split-cache path for one row; the backend turns it
    on only where the build has that path patched out (flash_attention_exact) and it is faster here
    (use_flash_attention), and then prefills apart. None: the backend's own choice; True: flash attention forced
    wherever the build keeps it exact."""
    from adaspec.core.backends.llamacpp import (
        LlamaCppBackend,
        batch_invariant,
        flash_attention_exact,
        use_flash_attention,
    )

    monkeypatch.delenv("ADASPEC_FLASH_ATTN", raising=False)
    if not batch_invariant():
        pytest.skip("this llama.cpp build rounds batches differently (tinyBLAS): build it as scripts/setup.sh does")
    if flash and not flash_attention_exact(smollm.gguf, 2):
        pytest.skip("flash attention is not exact on this build")
    backend = LlamaCppBackend(smollm.gguf, n_ctx=1024, threads=2, flash_attn=flash)
    expected = use_flash_attention(smollm.gguf, 2) if flash is None else True
    assert backend.llm.flash_attn == expected == backend.split_prefill
    assert backend.where.endswith("+fa") == expected
    ids = ids_of(smollm, " ".join([PROMPTS[0]] * 12))  # a summary of a repeated passage: lookup drafts much
    assert len(ids) > 540
    config = GenerationConfig(max_new_tokens=40)
    ar = generate(backend, ids, config)
    sd = generate(backend, ids, config, PromptLookupDrafter(max_ngram=3), FixedLength(4))
    assert sd.token_ids == ar.token_ids
    assert sum(s.drafted for s in sd.steps) > 0


@pytest.mark.bundled
@needs_llama
def test_the_shipped_eagle_head_drafts_over_llamacpp_features_from_the_first_step(smollm):
    from adaspec.core.backends.llamacpp import batch_invariant

    config = GenerationConfig(max_new_tokens=24)
    choice = BackendChoice("llamacpp", "shipped", threads=2)
    eagle = build_runner(parse_method("sd:drafter=eagle,k=3"), smollm, None, config, choice)
    ids = ids_of(smollm, PROMPTS[2])
    result = eagle(ids, config)
    if eagle.target.split_prefill:  # the prompt's features come with the prefill: the first step drafts already
        assert result.steps[0].drafted == 3
    assert sum(s.accepted for s in result.steps) > 0
    if batch_invariant():
        ar = build_runner(parse_method("ar"), smollm, None, config, choice)
        assert result.token_ids == ar(ids, config).token_ids


def test_flash_attention_can_be_forced_either_way(monkeypatch, tmp_path):
    from adaspec.core.backends.llamacpp import flash_attention_exact

    monkeypatch.setenv("ADASPEC_FLASH_ATTN", "0")
    assert flash_attention_exact(tmp_path / "never-read.gguf") is False
    monkeypatch.setenv("ADASPEC_FLASH_ATTN", "1")
    assert flash_attention_exact(tmp_path / "never-read.gguf") is True


@needs_llama
def test_a_build_that_crashes_on_a_batch_is_named_once_and_remembered(monkeypatch, tmp_path):
    """ggml's AMX kernels crash in a VM that gives a process no AMX state: the probe runs in a child process, so a
    crash becomes a clear error (cached per build) instead of killing adaspec."""
    import subprocess

    from adaspec.core.backends import llamacpp

    monkeypatch.setenv("ADASPEC_CACHE", str(tmp_path))
    monkeypatch.delenv("ADASPEC_FLASH_ATTN", raising=False)
    calls = []

    def crashed(args, **kwargs):
        calls.append(args)
        return subprocess.CompletedProcess(args, -11, "", "")

    monkeypatch.setattr(llamacpp.subprocess, "run", crashed)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    for _ in range(2):
        with pytest.raises(AdaspecError, match="crashes when it scores several positions.*signal 11.*setup.sh"):
            llamacpp.LlamaCppBackend(gguf, threads=2)
        llamacpp._probed.clear()  # a new process: only the file remembers
    assert len(calls) == 1  # the second answer came from ~/.cache/adaspec/llamacpp.json


@pytest.mark.bundled
@needs_llama
def test_the_peer_honours_the_budget_and_eos(smollm):
    config = GenerationConfig(max_new_tokens=7)
    peer = build_runner(parse_method("llamacpp"), smollm, None, config, ONE_THREAD)
    result = peer(ids_of(smollm, PROMPTS[1]), config)
    assert result.new_tokens == 7 and result.stop_reason == "length" and result.wall_s > 0
    long = GenerationConfig(max_new_tokens=400)
    done = peer(ids_of(smollm, "Say just the word yes."), long)
    assert done.stop_reason == "eos" and done.token_ids[-1] in smollm.eos_ids and done.new_tokens < 400


@pytest.mark.bundled
@needs_llama
def test_requantized_formats_are_cached_and_named_by_their_metadata(smollm, tmp_path, monkeypatch):
    from adaspec.core.backends.llamacpp import file_type, requantize

    assert file_type(smollm.gguf) == "q4_1"
    out = requantize(smollm.gguf, "q8_0", tmp_path)
    assert file_type(out) == "q8_0" and out.parent == tmp_path
    from adaspec.core.backends.llamacpp import LlamaCppModel

    loaded = LlamaCppModel(out, n_ctx=64, threads=1)  # a loaded model reads it from llama.cpp's own metadata
    assert loaded.weights == "q8_0"
    loaded.close()
    stamp = out.stat().st_mtime_ns
    assert requantize(smollm.gguf, "q8_0", tmp_path) == out and out.stat().st_mtime_ns == stamp  # converted once
    assert not list(tmp_path.glob("*.tmp*"))
    with pytest.raises(AdaspecError, match="unknown llama.cpp weight format"):
        requantize(smollm.gguf, "q2_k", tmp_path)


@pytest.mark.bundled
@needs_llama
def test_the_shipped_small_drafter_runs_on_llamacpp_as_a_gguf_and_sd_stays_exact(smollm):
    from adaspec.core.backends.llamacpp import LlamaCppBackend, batch_invariant, file_type

    config = GenerationConfig(max_new_tokens=24)
    choice = BackendChoice("llamacpp", "shipped", threads=1)
    sd = build_runner(parse_method("sd:drafter=small,k=3"), smollm, None, config, choice)
    assert isinstance(sd.drafter.backend, LlamaCppBackend)
    assert file_type(sd.drafter.backend.llm.path) == "q4_1"  # the target's format
    ids = ids_of(smollm, PROMPTS[2])
    result = sd(ids, config)
    assert sum(s.drafted for s in result.steps) > 0
    if batch_invariant():
        ar = build_runner(parse_method("ar"), smollm, None, config, choice)
        assert result.token_ids == ar(ids, config).token_ids


@pytest.mark.bundled
@needs_llama
def test_a_drafters_reduced_vocabulary_holds_on_llamacpp(smollm):
    """The GGUF keeps the full head; the backend leaves only the drafter's own tokens finite, as torch's slice."""
    from adaspec.methods import load_drafter

    small = load_drafter("small", smollm)
    sd = build_runner(parse_method("sd:drafter=small,k=3"), smollm, None, GenerationConfig(max_new_tokens=4),
                      BackendChoice("llamacpp", "shipped", threads=1))
    logits = sd.drafter.backend.extend(ids_of(smollm, PROMPTS[0]), keep=2)  # [2, V]
    finite = torch.isfinite(logits).all(dim=0).nonzero().flatten().tolist()
    assert small.draft_vocab is not None and finite == sorted(small.draft_vocab)


@pytest.mark.bundled
@needs_llama
def test_rstitch_runs_both_models_on_llamacpp_with_their_own_caches(smollm):
    from adaspec.core.backends.llamacpp import LlamaCppBackend

    config = GenerationConfig(max_new_tokens=24)
    choice = BackendChoice("llamacpp", "shipped", threads=1)
    ids = ids_of(smollm, " ".join([PROMPTS[0]] * 4))  # past flash attention's 64-row tiles: prefilled as `ar` does
    assert len(ids) > 100
    everything_large = build_runner(parse_method("rstitch:tau_up=0,tau_down=0"), smollm, None, config, choice)
    assert isinstance(everything_large.small, LlamaCppBackend) and isinstance(everything_large.large, LlamaCppBackend)
    assert everything_large.small.llm.path != everything_large.large.llm.path
    assert everything_large.where.removesuffix("+fa") == "llamacpp:q4_1"  # bench records: where the target ran
    result = everything_large(ids, config)
    assert {s.source for s in result.steps} == {"large"}  # tau_up=0: every token handed to the large model
    ar = build_runner(parse_method("ar"), smollm, None, config, choice)
    assert result.token_ids == ar(ids, config).token_ids  # the large model alone is ar, to the bit
    mixed = build_runner(parse_method("rstitch"), smollm, None, config, choice)(ids, config)
    assert len(mixed.token_ids) > 0 and {s.source for s in mixed.steps} <= {"small", "large"}


def test_costs_refuses_a_backend_it_cannot_measure(capsys):
    from adaspec.cli import app

    with pytest.raises(AdaspecError, match="torch:float32, torch:bfloat16 or llamacpp:FORMAT"):
        app(["costs", "--backends", "torch:int8"], standalone_mode=False)
    with pytest.raises(AdaspecError, match="unknown llama.cpp weight format"):
        app(["costs", "--backends", "llamacpp:q3"], standalone_mode=False)


@pytest.mark.bundled
@needs_llama
def test_a_long_catch_up_after_the_prefill_scores_each_position_as_alone(smollm):
    """With flash attention a batch of 64+ rows goes in tiles; after the prefill the backend cuts a long batch
    (R-Stitch's large model catching up) into pieces that go row by row, so its logits equal one-at-a-time."""
    from adaspec.core.backends.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend(smollm.gguf, n_ctx=1024, threads=2, flash_attn=True)
    assert backend.split_prefill
    prompt, more = list(range(300, 360)), list(range(400, 480))  # 80 positions after a 60-token prefill
    backend.extend(prompt)
    together = backend.extend(more, keep=len(more))  # [80, V]
    backend.rollback(len(prompt))
    alone = torch.cat([backend.extend([t]) for t in more])  # [80, V]
    torch.testing.assert_close(together, alone, rtol=0, atol=0)


@pytest.mark.bundled
@needs_llama
def test_a_long_catch_up_returns_the_logits_and_hidden_states_of_every_position_asked_for(smollm):
    from adaspec.core.backends.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend(smollm.gguf, n_ctx=1024, threads=2, flash_attn=True, keep_hidden=True)
    backend.extend(list(range(300, 310)))
    logits = backend.extend(list(range(400, 540)), keep=100)  # 140 positions in 63-row pieces, 100 with logits
    assert logits.shape == (100, backend.vocab_size) and torch.isfinite(logits).all()
    assert backend.hidden.shape == (140, backend.llm.n_embd) and backend.hidden_start == 10


def test_our_decoding_runs_without_flash_attention_unless_asked(monkeypatch, tmp_path):
    # alone, in a batch and in the server a sequence runs the same kernels: flash attention only when asked for
    from adaspec.core.backends.llamacpp import use_flash_attention

    monkeypatch.delenv("ADASPEC_FLASH_ATTN", raising=False)
    assert use_flash_attention(tmp_path / "never-read.gguf") is False
    monkeypatch.setenv("ADASPEC_FLASH_ATTN", "0")
    assert use_flash_attention(tmp_path / "never-read.gguf", exact=False) is False
