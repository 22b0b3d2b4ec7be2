"""R-Stitch and R-Stitch+ (routing.py, train/router.py) on tiny models: threshold extremes, lazy cache catch-up
against a cache-free reference, per-token records, the learned router's artifact and training, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import full_logits, perturbed_llama, random_prompt, tiny_llama

from adaspec.bench.runner import step_record
from adaspec.bench.summary import method_fields
from adaspec.core.backends import TorchBackend
from adaspec.core.config import GenerationConfig, SamplingConfig
from adaspec.core.decode import ROUTE, VERIFY, StopCriteria, generate
from adaspec.core.errors import AdaspecError
from adaspec.methods import make_router, parse_method
from adaspec.routing import (
    FEATURES,
    LARGE,
    SMALL,
    LearnedRouter,
    RouteState,
    ThresholdRouter,
    forward_counts,
    large_share,
    router_path,
    stitch,
)

SCALE = 60.0  # peaked tiny models: normalised entropies spread over ~0.001-0.5, so thresholds split tokens
MAX_NEW = 24
CONFIG = GenerationConfig(max_new_tokens=MAX_NEW)
PROMPTS = [random_prompt(seed, length=1 + seed % 9) for seed in range(10)]
MIXED = (0.25, 0.15)  # (tau_up, tau_down): both models produce tokens on these prompts


@pytest.fixture(scope="module")
def large_model():
    return tiny_llama(0, scale=SCALE)


@pytest.fixture(scope="module")
def small_model():
    return perturbed_llama(0, 0.3, scale=SCALE)  # the large model's weights jittered: often agrees, not always


def backends(small_model, large_model) -> tuple[TorchBackend, TorchBackend]:
    return TorchBackend(small_model), TorchBackend(large_model)


def entropy_of(logits: torch.Tensor) -> float:
    logp = torch.log_softmax(logits.float(), -1)
    return float(-(logp.exp() * logp).sum()) / math.log(logits.shape[-1])


def naive_stitch(small_model, large_model, prompt: list[int], n: int, tau_up: float, tau_down: float):
    """Reference R-Stitch: a fresh, cache-free forward of the whole sequence for every decision."""
    ids, sources, entropies = list(prompt), [], []
    active = SMALL
    for _ in range(n):
        logits = full_logits(small_model if active == SMALL else large_model, ids)[-1]
        if active == SMALL and entropy_of(logits) > tau_up:
            active = LARGE
            logits = full_logits(large_model, ids)[-1]
        h = entropy_of(logits)
        ids.append(int(logits.argmax()))
        sources.append(active)
        entropies.append(h)
        if active == LARGE and h < tau_down:
            active = SMALL
    return ids[len(prompt):], sources, entropies


def test_lazy_catch_up_equals_a_cache_free_reference_token_source_and_entropy(small_model, large_model):
    small, large = backends(small_model, large_model)
    router = ThresholdRouter(*MIXED)
    sources_seen: set[str] = set()
    handoffs = 0
    for prompt in PROMPTS:
        result = stitch(small, large, prompt, CONFIG, router)
        tokens, sources, entropies = naive_stitch(small_model, large_model, prompt, MAX_NEW, *MIXED)
        assert result.token_ids == tokens
        assert [s.source for s in result.steps] == sources
        assert [s.entropy for s in result.steps] == pytest.approx(entropies, abs=1e-4)
        sources_seen.update(sources)
        handoffs += sum(a != b for a, b in zip(sources, sources[1:], strict=False))
    assert sources_seen == {SMALL, LARGE} and handoffs >= 10  # both directions ran, many times


def test_every_token_is_its_producers_argmax_over_the_whole_sequence(small_model, large_model):
    small, large = backends(small_model, large_model)
    for prompt in PROMPTS[:4]:
        result = stitch(small, large, prompt, CONFIG, ThresholdRouter(*MIXED))
        ids = list(prompt)
        for step in result.steps:
            model = large_model if step.source == LARGE else small_model
            assert step.tokens == [int(full_logits(model, ids)[-1].argmax())]
            ids += step.tokens


def test_small_only_never_calls_the_large_model_and_equals_the_small_models_output(small_model, large_model):
    for sampling in (SamplingConfig(), SamplingConfig(temperature=0.8)):
        config = GenerationConfig(max_new_tokens=MAX_NEW, sampling=sampling, seed=3)
        for prompt in PROMPTS[:5]:
            small, large = backends(small_model, large_model)
            result = stitch(small, large, prompt, config, ThresholdRouter(1.0, 1.0))
            assert large.tokens == []  # its cache was never filled: not one forward
            assert all(s.source == SMALL for s in result.steps) and large_share(result.steps) == 0.0
            assert result.token_ids == generate(TorchBackend(small_model), prompt, config).token_ids


def test_large_only_equals_ar_greedy_and_sampled(small_model, large_model):
    for sampling in (SamplingConfig(), SamplingConfig(temperature=0.8, top_p=0.9)):
        config = GenerationConfig(max_new_tokens=MAX_NEW, sampling=sampling, seed=5)
        for prompt in PROMPTS[:5]:
            small, large = backends(small_model, large_model)
            result = stitch(small, large, prompt, config, ThresholdRouter(0.0, 0.0))
            assert small.tokens == prompt  # the small model scored the first position only
            assert all(s.source == LARGE for s in result.steps) and large_share(result.steps) == 1.0
            assert result.token_ids == generate(TorchBackend(large_model), prompt, config).token_ids


def test_sampling_is_reproducible_from_the_seed(small_model, large_model):
    config = GenerationConfig(max_new_tokens=MAX_NEW, sampling=SamplingConfig(temperature=1.0), seed=11)
    small, large = backends(small_model, large_model)
    first = stitch(small, large, PROMPTS[2], config, ThresholdRouter(*MIXED))
    again = stitch(small, large, PROMPTS[2], config, ThresholdRouter(*MIXED))
    other = stitch(small, large, PROMPTS[2], GenerationConfig(max_new_tokens=MAX_NEW, sampling=config.sampling,
                                                              seed=12), ThresholdRouter(*MIXED))
    assert first.token_ids == again.token_ids and [s.source for s in first.steps] == [s.source for s in again.steps]
    assert first.token_ids != other.token_ids


def test_stops_at_eos_and_keeps_it(small_model, large_model):
    small, large = backends(small_model, large_model)
    full = stitch(small, large, PROMPTS[1], CONFIG, ThresholdRouter(*MIXED)).token_ids
    eos = full[5]
    cut = stitch(small, large, PROMPTS[1], CONFIG, ThresholdRouter(*MIXED), StopCriteria(frozenset({eos})))
    assert cut.token_ids == full[: full.index(eos) + 1] and cut.stop_reason == "eos"


def test_records_and_summary_say_which_model_produced_each_token(small_model, large_model):
    small, large = backends(small_model, large_model)
    result = stitch(small, large, PROMPTS[3], CONFIG, ThresholdRouter(*MIXED))
    steps = [step_record(s) for s in result.steps]
    assert [s["source"] for s in steps] == [s.source for s in result.steps]
    assert {s["kind"] for s in steps} == {ROUTE}  # tokens, not target forwards verifying drafts
    assert all(s["drafted"] == 0 and 0.0 <= s["entropy"] <= 1.0 and s["ms"] > 0 for s in steps)  # each token timed
    record = {"question_id": 1, "category": "x", "method": "rstitch", "new_tokens": result.new_tokens, "wall_s": 1.0,
              "token_ids": result.token_ids, "text": "", "steps": steps}
    ar = dict(record, method="ar", steps=[{"kind": VERIFY, "drafted": 0, "accepted": 0, "confidence": []}]
              * result.new_tokens)
    fields = method_fields([record], {1: ar})
    assert fields.large_share == pytest.approx(large_share(result.steps))
    assert fields.mean_accepted is None and fields.acceptance_rate is None
    assert method_fields([ar], {1: ar}).large_share is None  # null for methods that do not route


def test_forward_counts_charge_the_small_models_look_before_each_handoff():
    assert forward_counts([SMALL, SMALL]) == (2, 0)
    assert forward_counts([LARGE, LARGE, SMALL, LARGE]) == (3, 3)  # first token and after a small one


# -- R-Stitch+: the learned router


def state(entropy: float, large: bool) -> RouteState:
    probs = torch.tensor([0.7, 0.2, 0.1])
    return RouteState(probs, entropy, large, 3, 10, (True, False))


def test_a_router_initialised_from_thresholds_decides_as_they_do():
    learned, threshold = LearnedRouter.from_thresholds(0.3, 0.1), ThresholdRouter(0.3, 0.1)
    for h in (0.0, 0.05, 0.12, 0.29, 0.31, 0.6, 1.0):
        for large in (False, True):
            assert learned(state(h, large)) == threshold(state(h, large)), (h, large)


def test_router_round_trips_through_its_file(tmp_path):
    router = LearnedRouter(torch.linspace(-1, 1, len(FEATURES)), meta={"lambda": 0.5})
    path = router.save(tmp_path / "r" / "router.json")
    loaded = LearnedRouter.load(router_path(str(tmp_path / "r"), None))  # a directory finds its router.json
    assert torch.allclose(loaded.weights, router.weights, atol=1e-6) and loaded.meta == {"lambda": 0.5}
    assert make_router(parse_method(f"rstitch+:router={path}")).weights.tolist() == loaded.weights.tolist()


def test_exploring_router_traces_its_decisions():
    router = LearnedRouter.from_thresholds(0.3, 0.3)
    router.explore = torch.Generator().manual_seed(0)
    decisions = [router(state(0.3, False)) for _ in range(200)]  # p = 0.5 at the threshold
    assert len(router.trace) == 200 and 60 < sum(decisions) < 140
    assert all(phi.shape == (len(FEATURES),) for phi, _ in router.trace)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("rstitch:tau_up=1.5", "tau_up must be in [0, 1]"),
        ("rstitch:tau_down=-0.1", "tau_down must be in [0, 1]"),
        ("rstitch:tau_up=high", "must be float"),
        ("rstitch:k=3", "has no option 'k'"),
        ("rstitch+:tau_up=0.1", "has no option 'tau_up'"),
        ("rstitch+:router=/no/such/router.json", "train-router"),
    ],
)
def test_bad_options_give_a_clear_error(spec, message):
    with pytest.raises(AdaspecError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_method(spec)


def test_a_file_that_is_not_a_router_is_refused(tmp_path):
    bad = tmp_path / "router.json"
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(AdaspecError, match="not an adaspec router"):
        parse_method(f"rstitch+:router={bad}")
    bad.write_text(json.dumps({"format": "adaspec-router", "features": ["bias"], "window": 8, "weights": [1]}))
    with pytest.raises(AdaspecError, match="other features"):
        parse_method(f"rstitch+:router={bad}")


def test_rstitch_plus_without_a_router_says_how_to_train_one():
    with pytest.raises(AdaspecError, match="adaspec train-router"):
        make_router(parse_method("rstitch+"), "no-such-target")


# -- train-router


def fake_text(ids: list[int]) -> str:
    return " ".join(map(str, ids))


def fake_ids(text: str) -> list[int]:
    return [ord(c) % 64 for c in text][:12]


def train(small_model, large_model, tmp_path, correct, **overrides):
    from adaspec.train.router import RouterTrainConfig, train_router

    small, large = backends(small_model, large_model)
    options = dict(problems=6, held_out=4, rollouts=4, epochs=2, max_new_tokens=12, tau_up=MIXED[0],
                   tau_down=MIXED[1], small_cost=0.1, lr=0.1, lam=0.8)
    config = RouterTrainConfig(**{**options, **overrides})
    return train_router(small, large, fake_ids, fake_text, tmp_path, config, correct=correct, log=lambda _: None)


def test_train_router_runs_end_to_end_and_writes_a_router_rstitch_plus_loads(small_model, large_model, tmp_path):
    report = train(small_model, large_model, tmp_path, correct=lambda text, p: text.endswith(str(p.answer % 64)))
    assert len(report["history"]) == 6 * 2
    assert set(report["held_out"]) == {"thresholds", "learned"}
    assert (tmp_path / "report.md").is_file() and (tmp_path / "train_report.json").is_file()
    router = make_router(parse_method(f"rstitch+:router={tmp_path}"))
    assert router.meta["lambda"] == 0.8 and router.meta["init"]["tau_up"] == MIXED[0]
    small, large = backends(small_model, large_model)
    result = stitch(small, large, PROMPTS[0], CONFIG, router)
    assert result.new_tokens == MAX_NEW and {s.source for s in result.steps} <= {SMALL, LARGE}


def test_when_every_answer_is_right_the_latency_term_teaches_the_router_to_use_the_large_model_less(
        small_model, large_model, tmp_path):
    report = train(small_model, large_model, tmp_path, correct=lambda text, p: True, epochs=3)
    held = report["held_out"]
    assert held["thresholds"]["large_share"] > 0.2  # the start routes a fair share to the large model
    assert held["learned"]["large_share"] < held["thresholds"]["large_share"]
    assert held["learned"]["reward"] > held["thresholds"]["reward"]


def test_problems_are_reproducible_distinct_and_their_answers_check():
    from adaspec.train.router import is_correct, make_problems

    problems = make_problems(40, 1)
    assert problems == make_problems(40, 1) and len({p.text for p in problems}) == 40
    assert all(is_correct(f"so the answer is {p.answer}.", p) for p in problems)
    assert not is_correct("I do not know", problems[0])


def test_bad_training_options_give_a_clear_error():
    from adaspec.train.router import RouterTrainConfig

    for bad, message in (({"rollouts": 1}, "--rollouts must be >= 2"), ({"lam": -1.0}, "--lam must be >= 0"),
                         ({"tau_up": 2.0}, "tau_up must be in")):
        with pytest.raises(AdaspecError, match=message):
            RouterTrainConfig(**bad)


# -- threshold sweep


def test_threshold_sweep_grid_and_its_speed_quality_share_curve(tmp_path):
    from adaspec.bench.routing_sweep import write_threshold_report
    from adaspec.bench.sweep import append_line, point_specs

    specs = point_specs("rstitch", {"tau_up": (0.05, 0.2), "tau_down": ()})
    assert [s for s, _ in specs] == ["rstitch:tau_up=0.05", "rstitch:tau_up=0.2"]
    assert [s for s, _ in point_specs("rstitch:drafter=small", {"tau_up": (0.1,), "tau_down": (0.02,)})] == [
        "rstitch:drafter=small,tau_up=0.1,tau_down=0.02"]
    ar = {"question_id": 1, "category": "translation", "method": "ar", "new_tokens": 10, "wall_s": 1.0,
          "token_ids": [1], "text": "a b c", "reference": ["a b c"], "steps": None}
    append_line(tmp_path / "ar.jsonl", ar)
    for (spec, point), speed, share in zip(specs, (1.6, 1.1), (0.2, 0.7), strict=True):
        append_line(tmp_path / "sweep.jsonl", {"key": spec, "spec": spec, **point, "speedup_vs_ar": speed,
                                               "large_share": share, "alignment": 60 + 40 * share, "quality": 50.0})
    text = write_threshold_report(tmp_path).read_text()
    assert "| 0.05 | 0.05 | 1.6 | 0.2 | 68 |" in text and "| 0.2 | 0.2 | 1.1 | 0.7 | 88 |" in text
    assert (tmp_path / "plots" / "rstitch_curve.png").stat().st_size > 0


# -- the method


def loaded(name: str, model):
    from pathlib import Path

    from adaspec.core.models import LoadedModel

    return LoadedModel(name, Path("."), model, None)


def test_rstitch_method_runs_through_build_runner_with_the_drafter_as_small_model(small_model, large_model):
    from adaspec.methods import build_runner

    target, drafter = loaded("tiny-target", large_model), loaded("tiny-small", small_model)
    runner = build_runner(parse_method(f"rstitch:tau_up={MIXED[0]},tau_down={MIXED[1]}"), target, drafter, CONFIG)
    result = runner(PROMPTS[4], CONFIG)
    assert result.token_ids == naive_stitch(small_model, large_model, PROMPTS[4], MAX_NEW, *MIXED)[0]
    assert runner.label == f"rstitch:tau_up={MIXED[0]},tau_down={MIXED[1]}"


def test_rstitch_without_a_small_model_says_how_to_get_one(large_model):
    from adaspec.methods import build_runner

    target = loaded("tiny-target", large_model)
    with pytest.raises(AdaspecError, match="needs a small model"):
        build_runner(parse_method("rstitch"), target, "lookup", CONFIG)
    with pytest.raises(AdaspecError, match="not a language model"):
        build_runner(parse_method("rstitch:drafter=lookup"), target, None, CONFIG)
