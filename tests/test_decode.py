"""The decoding loop: greedy speculative decoding equals greedy autoregressive decoding, budget, stops, errors."""

from __future__ import annotations

import pytest
from conftest import naive_greedy, perturbed_llama, random_prompt, tiny_backend, tiny_llama
from exactness import V, greedy_check, lossless_methods, method_runner, tiny_models

from adaspec.core.backends import TorchBackend
from adaspec.core.config import GenerationConfig, SamplingConfig
from adaspec.core.decode import GenerationResult, StopCriteria, generate
from adaspec.core.drafters import DraftContext, ModelDrafter, PromptLookupDrafter
from adaspec.core.errors import AdaspecError
from adaspec.core.policies import FixedLength

MAX_NEW = 30
CONFIG = GenerationConfig(max_new_tokens=MAX_NEW)
PROMPTS = [random_prompt(seed, length=1 + seed % 16) for seed in range(32)]  # lengths 1..16


def spaced(ids: list[int]) -> str:
    """A fake tokenizer decode for stop strings: '12 7 40'."""
    return " ".join(map(str, ids))


@pytest.fixture(scope="module")
def target():
    return tiny_backend(0, scale=8.0)


@pytest.fixture(scope="module")
def ar_outputs(target) -> list[list[int]]:
    return [generate(target, prompt, CONFIG).token_ids for prompt in PROMPTS]


@pytest.fixture(scope="module")
def drafters():
    return {
        "lookup": PromptLookupDrafter(),
        # the target's weights jittered: agrees often, not always (full, partial and zero acceptance)
        "perturbed": ModelDrafter(TorchBackend(perturbed_llama(0, 0.3, scale=8.0))),
        # a different random model: almost every draft is rejected
        "unrelated": ModelDrafter(tiny_backend(1, layers=1, scale=8.0)),
        # the target's own weights: every draft is accepted
        "self": ModelDrafter(tiny_backend(0, scale=8.0)),
        # the target's weights with a reduced-vocabulary head (even ids only)
        "reduced": ModelDrafter(TorchBackend(tiny_llama(0, scale=8.0), vocab_ids=list(range(0, 64, 2)))),
    }


def assert_step_accounting(result: GenerationResult, k: int, max_new: int, cut_last: bool = False) -> None:
    """Steps add up to the output; accepted <= drafted <= what the budget can use; every step emits its
    accepted tokens plus one, except the last when a stop cut it (`cut_last`)."""
    assert sum(len(s.tokens) for s in result.steps) == result.new_tokens <= max_new
    emitted: list[int] = []
    for i, s in enumerate(result.steps):
        assert 0 <= s.accepted <= s.drafted <= min(k, max_new - len(emitted) - 1)
        assert len(s.confidence) == s.drafted
        if i == len(result.steps) - 1 and cut_last:
            assert 1 <= len(s.tokens) <= s.accepted + 1
        else:
            assert len(s.tokens) == s.accepted + 1
        if i < len(result.steps) - 1:
            assert s.stop is None
        emitted += s.tokens
    assert emitted == result.token_ids


@pytest.mark.parametrize("k", [1, 3, 6])
@pytest.mark.parametrize("name", ["lookup", "perturbed", "unrelated", "self", "reduced"])
def test_greedy_sd_equals_ar_token_for_token(target, ar_outputs, drafters, name, k):
    drafted = accepted = rejecting_steps = 0
    for i, prompt in enumerate(PROMPTS):
        sd = generate(target, prompt, CONFIG, drafters[name], FixedLength(k))
        assert sd.token_ids == ar_outputs[i], (name, k, i)
        assert sd.new_tokens == MAX_NEW and sd.stop_reason == "length"
        assert_step_accounting(sd, k, MAX_NEW)
        drafted += sum(s.drafted for s in sd.steps)
        accepted += sum(s.accepted for s in sd.steps)
        rejecting_steps += sum(s.accepted < s.drafted for s in sd.steps)
    # the equality is only meaningful if both the accept and the reject paths ran
    assert drafted > 0
    if name == "self":
        assert accepted == drafted  # identical weights: every draft is the target's argmax
    elif name == "unrelated":
        assert rejecting_steps > len(PROMPTS)
    else:
        assert 0 < accepted < drafted and rejecting_steps > 0


def test_ar_equals_a_naive_decoder_without_cache(target, ar_outputs):
    for i in range(0, len(PROMPTS), 4):
        assert ar_outputs[i] == naive_greedy(target.model, PROMPTS[i], MAX_NEW), i


def test_ar_emits_one_token_per_step(ar_outputs, target):
    result = generate(target, PROMPTS[3], CONFIG)
    assert result.token_ids == ar_outputs[3]
    assert len(result.steps) == MAX_NEW and all(s.drafted == 0 and len(s.tokens) == 1 for s in result.steps)


def test_tiny_target_is_not_degenerate(ar_outputs):
    # greedy equality is only meaningful if outputs vary between prompts and within an output
    assert len({tuple(out) for out in ar_outputs}) > len(PROMPTS) // 2
    assert sum(len(set(out)) > 3 for out in ar_outputs) > len(PROMPTS) // 2


@pytest.mark.parametrize("name", ["self", "perturbed", "lookup"])
def test_max_new_tokens_is_exact_even_when_a_step_could_emit_more(target, ar_outputs, drafters, name):
    for n in (1, 2, 3, 7, 11):
        for i in (0, 5, 9):
            config = GenerationConfig(max_new_tokens=n)
            result = generate(target, PROMPTS[i], config, drafters[name], FixedLength(6))
            assert result.token_ids == ar_outputs[i][:n] and result.stop_reason == "length"
            assert_step_accounting(result, 6, n)


@pytest.mark.parametrize("name", [None, "self", "perturbed", "lookup"])
def test_eos_stops_generation_and_is_kept_as_the_last_token(target, ar_outputs, drafters, name):
    drafter = drafters[name] if name else None
    cut_inside_a_step = 0
    for i in range(8):
        ar = ar_outputs[i]
        eos = ar[5]
        expected = ar[: ar.index(eos) + 1]  # cut right after the first occurrence
        result = generate(target, PROMPTS[i], CONFIG, drafter, FixedLength(6), stop=StopCriteria(frozenset({eos})))
        assert result.token_ids == expected, (name, i)
        assert result.stop_reason == "eos" and result.steps[-1].stop == "eos"
        assert_step_accounting(result, 6, MAX_NEW, cut_last=True)
        last = result.steps[-1]
        cut_inside_a_step += len(last.tokens) < last.accepted + 1
    if name == "self":
        assert cut_inside_a_step > 0  # the cut really dropped accepted tokens of a step


def test_any_of_several_eos_ids_stops(target, ar_outputs, drafters):
    ar = ar_outputs[1]
    eos = frozenset({ar[9], ar[4]})
    expected = ar[: min(ar.index(t) for t in eos) + 1]
    for drafter in (None, drafters["self"]):
        result = generate(target, PROMPTS[1], CONFIG, drafter, FixedLength(4), stop=StopCriteria(eos))
        assert result.token_ids == expected and result.stop_reason == "eos"


def test_eos_only_stops_when_given(target, ar_outputs):
    # the loop itself knows no EOS: without stop criteria the budget decides
    result = generate(target, PROMPTS[2], CONFIG)
    assert result.token_ids == ar_outputs[2] and result.stop_reason == "length"


@pytest.mark.parametrize("name", [None, "self", "perturbed", "lookup"])
def test_stop_string_cuts_after_the_token_that_completes_it(target, ar_outputs, drafters, name):
    drafter = drafters[name] if name else None
    for i in range(6):
        ar = ar_outputs[i]
        needle = spaced(ar[6:8])
        cut = next(n for n in range(1, len(ar) + 1) if needle in spaced(ar[:n]))  # reference cut
        stop = StopCriteria(stop_strings=(needle,), decode=spaced)
        result = generate(target, PROMPTS[i], CONFIG, drafter, FixedLength(5), stop=stop)
        assert result.token_ids == ar[:cut], (name, i)
        assert result.stop_reason == "stop" and result.steps[-1].stop == "stop"
        assert_step_accounting(result, 5, MAX_NEW, cut_last=True)


def test_a_stop_string_that_never_appears_does_not_stop(target, ar_outputs, drafters):
    stop = StopCriteria(stop_strings=("never",), decode=spaced)
    result = generate(target, PROMPTS[0], CONFIG, drafters["self"], FixedLength(3), stop=stop)
    assert result.token_ids == ar_outputs[0] and result.stop_reason == "length"


def test_on_step_sees_every_step(target, drafters):
    seen = []
    result = generate(target, PROMPTS[4], CONFIG, drafters["perturbed"], FixedLength(3), on_step=seen.append)
    assert seen == result.steps


def test_sampling_is_reproducible_from_the_seed_and_drafter_state_does_not_leak(target):
    sampling = SamplingConfig(temperature=1.0)

    def run(seed, drafter, prompt=PROMPTS[7]):
        config = GenerationConfig(max_new_tokens=MAX_NEW, sampling=sampling, seed=seed)
        return generate(target, prompt, config, drafter).token_ids

    drafter = ModelDrafter(TorchBackend(perturbed_llama(0, 0.3, scale=8.0)))
    first = run(0, drafter)
    run(5, drafter, prompt=PROMPTS[8])  # leaves the drafter's cache on another sequence
    assert run(0, drafter) == first
    assert run(0, ModelDrafter(TorchBackend(perturbed_llama(0, 0.3, scale=8.0)))) == first
    assert len({tuple(run(seed, None)) for seed in range(6)}) > 1  # the seed matters


def test_a_sequence_filling_the_context_exactly_is_allowed(drafters):
    backend = tiny_backend(0, scale=8.0, context=64)
    prompt = random_prompt(0, length=34)
    ar = generate(backend, prompt, CONFIG)
    sd = generate(backend, prompt, CONFIG, ModelDrafter(tiny_backend(0, scale=8.0, context=64)), FixedLength(6))
    assert ar.new_tokens == MAX_NEW and sd.token_ids == ar.token_ids


def test_bad_requests_are_refused():
    backend = tiny_backend(0, context=64)
    with pytest.raises(AdaspecError, match="empty"):
        generate(backend, [], CONFIG)
    with pytest.raises(AdaspecError, match="context of 64"):
        generate(backend, random_prompt(0, length=35), CONFIG)  # 35 + 30 > 64
    with pytest.raises(AdaspecError, match="context of 64"):
        generate(backend, random_prompt(0, length=35), CONFIG, PromptLookupDrafter())
    with pytest.raises(AdaspecError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0)
    with pytest.raises(AdaspecError, match="temperature"):
        SamplingConfig(temperature=-1)
    with pytest.raises(AdaspecError, match="top_p"):
        SamplingConfig(temperature=1, top_p=0)
    with pytest.raises(AdaspecError, match="top_p"):
        SamplingConfig(temperature=1, top_p=1.5)
    with pytest.raises(AdaspecError, match="top_k"):
        SamplingConfig(temperature=1, top_k=-1)
    with pytest.raises(AdaspecError, match="draft length"):
        FixedLength(0)
    with pytest.raises(AdaspecError, match="tokenizer"):
        StopCriteria(stop_strings=("x",))


def test_lookup_copies_what_followed_the_latest_match():
    ids = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    draft = PromptLookupDrafter().propose(DraftContext(ids, 3, SamplingConfig()))
    assert draft.tokens == [7, 8, 5] and draft.probs is None
    assert PromptLookupDrafter().propose(DraftContext([4, 5, 6], 3, SamplingConfig())).tokens == []
    assert PromptLookupDrafter().propose(DraftContext([4], 3, SamplingConfig())).tokens == []


def test_time_to_first_token_is_the_first_steps_and_within_the_wall(target):
    result = generate(target, random_prompt(0), GenerationConfig(max_new_tokens=6))
    assert result.ttft_s is not None and 0 < result.ttft_s <= result.wall_s
    ms = [s.ms for s in result.steps]  # each step timed: together the wall, the first one the TTFT
    assert all(m is not None and m > 0 for m in ms) and ms[0] == pytest.approx(1000 * result.ttft_s)
    assert sum(ms) == pytest.approx(1000 * result.wall_s, rel=0.05)


@pytest.mark.parametrize("name", ["lookup", "perturbed"])
def test_a_backend_that_prefills_apart_gives_the_same_tokens(ar_outputs, drafters, name):
    """Backend.split_prefill: the prompt but its last token first, then the steps; the output is unchanged."""
    split = tiny_backend(0, scale=8.0)
    split.split_prefill = True
    for i, prompt in enumerate(PROMPTS):
        assert generate(split, prompt, CONFIG).token_ids == ar_outputs[i]
        sd = generate(split, prompt, CONFIG, drafters[name])
        assert sd.token_ids == ar_outputs[i]
        assert_step_accounting(sd, 3, MAX_NEW)


# --- every lossless method of the registry, built by its build() at its defaults (tests/exactness.py)


@pytest.fixture(scope="module")
def tiny():
    return tiny_models()


@pytest.mark.parametrize("name", lossless_methods())
def test_every_lossless_method_is_greedy_exact(tiny, name):
    runner = method_runner(name, tiny)
    prompts = [random_prompt(seed, length=2 + seed % 9, vocab=V) for seed in range(8)]
    drafted, accepted = greedy_check(runner, tiny.target.model, prompts)
    assert runner.drafter is None or 0 < accepted < drafted  # a drafting method ran both paths
