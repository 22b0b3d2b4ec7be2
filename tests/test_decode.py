"""The decoding loop: greedy speculative decoding equals greedy autoregressive decoding, stops, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import random_prompt, tiny_backend, tiny_llama

from adaspec.backends import TorchBackend
from adaspec.config import GenerationConfig, SamplingConfig
from adaspec.decode import StopCriteria, generate
from adaspec.drafters import ModelDrafter, PromptLookupDrafter
from adaspec.errors import AdaspecError
from adaspec.policies import FixedLength

CONFIG = GenerationConfig(max_new_tokens=30)


@pytest.fixture(scope="module")
def target():
    return tiny_backend(0, scale=8.0)


@pytest.fixture(scope="module")
def drafters():
    # a drafter that agrees often (the target's own weights, shallower) and one that is unrelated
    return {"lookup": PromptLookupDrafter(), "unrelated": ModelDrafter(tiny_backend(1, layers=1, scale=8.0)),
            "self": ModelDrafter(tiny_backend(0, scale=8.0)),
            "reduced": ModelDrafter(TorchBackend(tiny_llama(0, scale=8.0), vocab_ids=list(range(0, 64, 2))))}


def assert_step_accounting(result) -> None:
    assert sum(len(s.tokens) for s in result.steps) == result.new_tokens
    for s in result.steps[:-1]:
        assert 0 <= s.accepted <= s.drafted and len(s.tokens) == s.accepted + 1
    assert len(result.steps[-1].tokens) <= result.steps[-1].accepted + 1


@pytest.mark.parametrize("k", [1, 3, 6])
@pytest.mark.parametrize("name", ["lookup", "unrelated", "self", "reduced"])
def test_greedy_sd_equals_ar_token_for_token(target, drafters, name, k):
    for seed in range(12):
        prompt = random_prompt(seed)
        ar = generate(target, prompt, CONFIG)
        sd = generate(target, prompt, CONFIG, drafters[name], FixedLength(k))
        assert sd.token_ids == ar.token_ids, (name, k, seed)
        assert_step_accounting(sd)
        if name == "self":
            assert sd.mean_accepted > 1.5  # identical drafter: everything is accepted


def test_ar_equals_a_naive_decoder_without_cache(target):
    model = target.model
    for seed in range(5):
        prompt = random_prompt(seed)
        ids = list(prompt)
        with torch.inference_mode():
            for _ in range(20):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        assert generate(target, prompt, GenerationConfig(max_new_tokens=20)).token_ids == ids[len(prompt):]


def test_max_new_tokens_is_exact_even_when_a_step_could_emit_more(target, drafters):
    for n in (1, 2, 7):
        config = GenerationConfig(max_new_tokens=n)
        result = generate(target, random_prompt(3), config, drafters["self"], FixedLength(6))
        assert result.new_tokens == n and result.stop_reason == "length"


@pytest.mark.parametrize("name", [None, "self", "lookup"])
def test_eos_stops_and_is_kept(target, drafters, name):
    prompt = random_prompt(4)
    ar = generate(target, prompt, CONFIG).token_ids
    eos = ar[5]
    cut = ar.index(eos) + 1
    drafter = drafters[name] if name else None
    result = generate(target, prompt, CONFIG, drafter, FixedLength(4), stop=StopCriteria(frozenset({eos})))
    assert result.token_ids == ar[:cut] and result.stop_reason == "eos"


def test_stop_string_cuts_after_the_token_that_completes_it(target, drafters):
    prompt = random_prompt(5)
    ar = generate(target, prompt, CONFIG).token_ids
    needle = f"{ar[6]} {ar[7]}"
    stop = StopCriteria(stop_strings=(needle,), decode=lambda ids: " ".join(map(str, ids)))
    result = generate(target, prompt, CONFIG, drafters["self"], FixedLength(5), stop=stop)
    assert needle in " ".join(map(str, result.token_ids)) and result.stop_reason == "stop"
    assert needle not in " ".join(map(str, result.token_ids[:-1]))


def test_bad_requests_are_refused():
    backend = tiny_backend(0, context=64)
    with pytest.raises(AdaspecError, match="empty"):
        generate(backend, [], CONFIG)
    with pytest.raises(AdaspecError, match="context of 64"):
        generate(backend, random_prompt(0, length=40), CONFIG)
    with pytest.raises(AdaspecError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0)
    with pytest.raises(AdaspecError, match="temperature"):
        SamplingConfig(temperature=-1)
    with pytest.raises(AdaspecError, match="top_p"):
        SamplingConfig(temperature=1, top_p=0)
    with pytest.raises(AdaspecError, match="draft length"):
        FixedLength(0)


def test_lookup_copies_what_followed_the_latest_match():
    from adaspec.drafters import DraftContext

    ids = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    draft = PromptLookupDrafter().propose(DraftContext(ids, 3, SamplingConfig()), FixedLength(3))
    assert draft.tokens == [7, 8, 5]
    assert PromptLookupDrafter().propose(DraftContext([4, 5, 6], 3, SamplingConfig()), FixedLength(3)).tokens == []


def test_tiny_models_are_not_degenerate():
    # the equality tests above are only meaningful if outputs vary between prompts
    target = tiny_backend(0, scale=8.0)
    outs = {tuple(generate(target, random_prompt(s), GenerationConfig(max_new_tokens=10)).token_ids) for s in range(6)}
    assert len(outs) > 3
    assert tiny_llama(0).config.vocab_size == 64
