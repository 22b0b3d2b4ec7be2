"""The cost-aware draft length (costmodel.CostAware): what it verifies under steep and flat verify costs, how its
acceptance estimate moves, and that greedy decoding with it stays exact."""

from __future__ import annotations

import copy

import pytest
from conftest import perturbed_llama, random_prompt, tiny_backend

from adaspec.core.backends import TorchBackend
from adaspec.core.config import GenerationConfig
from adaspec.core.costmodel import CostAware, shadow_acceptance
from adaspec.core.decode import generate
from adaspec.core.drafters import ModelDrafter, PromptLookupDrafter
from adaspec.core.errors import AdaspecError
from adaspec.core.policies import FixedLength, Outcome
from adaspec.methods import build_runner, parse_method

STEEP = {1: 1.0, 2: 1.85, 3: 2.6, 4: 3.4, 9: 7.5}  # llama.cpp on Q4_1 weights: n positions cost about n steps
FLAT = {1: 1.0, 2: 1.02, 4: 1.05, 9: 1.1}  # a backend where scoring 9 positions costs one step


def test_shadow_acceptance_counts_matches_up_to_the_first_miss_and_that_miss():
    assert shadow_acceptance([5, 6, 7], [5, 6, 9]) == (2, 3)
    assert shadow_acceptance([5, 6, 7], [5, 6]) == (2, 2)  # nothing emitted at the third position: not judged
    assert shadow_acceptance([4], [5, 6]) == (0, 1)
    assert shadow_acceptance([], [5]) == (0, 0)


def test_steep_costs_verify_nothing_until_acceptance_is_high():
    policy = CostAware(STEEP)
    assert policy.alpha == 0.5 and policy.best() == 0
    for _ in range(30):
        policy.observe(Outcome(0, 0, [1, 2, 3, 4], [], [1, 2, 3, 4]))  # a copy run: every drafted token was right
    assert policy.alpha > 0.9 and policy.best() >= 2
    for _ in range(30):
        policy.observe(Outcome(0, 0, [1, 2], [], [7]))  # ordinary text: the draft misses
    assert policy.best() == 0


def test_flat_costs_verify_the_longest_draft():
    policy = CostAware(FLAT, k_max=8)
    assert policy.k_max == 8 and policy.best() >= 4  # at alpha 0.5, E(k) is near 2 from k = 4 on
    for _ in range(30):
        policy.observe(Outcome(0, 0, [1, 2, 3, 4], [], [1, 2, 3, 4]))
    assert policy.best() == 8


def test_a_free_drafter_drafts_the_most_and_verifies_the_tokens_it_is_sure_of():
    policy = CostAware(STEEP, draft_ratio=0.0, k_max=6)
    assert policy.draft_length() == 6
    assert policy.verify_length([0.3] * 6) == 0  # at 1.85 steps for 2 positions, a 0.3 token does not pay
    assert policy.verify_length([0.99] * 6) >= 4 and CostAware(FLAT, k_max=6).verify_length([0.99] * 6) == 6
    assert policy.verify_length([0.99, 0.99, 0.2, 0.99]) == 2  # the rest hangs on the unsure third token


def test_each_confidence_bin_learns_what_its_tokens_are_worth_also_from_tokens_not_verified():
    policy = CostAware(STEEP, draft_ratio=0.0, k_max=6)
    for _ in range(20):
        assert policy.verify_length([0.95, 0.95]) in (0, 2)
        policy.observe(Outcome(0, 0, [5, 6], [0.95, 0.95], [7]))  # the target differs: a 0.95 token was wrong
    assert policy.rate(0.95) < 0.2 and policy.verify_length([0.95] * 6) == 0
    assert policy.rate(0.55) == pytest.approx(0.55) and policy.verify_length([0.55] * 3) == 0  # untouched: its prior
    for _ in range(40):
        # the next tokens the target emits: all three were right
        policy.observe(Outcome(0, 0, [5, 6, 7], [0.55] * 3, [5, 6, 7, 8]))
    assert policy.rate(0.55) > 0.9 and policy.verify_length([0.55] * 3) >= 2


def test_verify_length_is_pure_what_the_policy_learns_comes_through_observe():
    policy = CostAware(STEEP, draft_ratio=0.0, k_max=6)
    before = copy.deepcopy(vars(policy))
    lengths = [policy.verify_length(c) for c in ([0.99] * 6, [0.3] * 6, [0.99] * 6)]
    assert lengths[0] == lengths[2] >= 4 and lengths[1] == 0 and vars(policy) == before
    policy.observe(Outcome(0, 0, [5, 6], [0.95, 0.95], [5, 6, 7]))  # learns from the Outcome's confidences alone
    assert policy.rate(0.95) > 0.95


def test_a_paid_drafter_drafts_only_what_pays_and_probes_after_plain_steps():
    policy = CostAware(STEEP, draft_ratio=0.2, probe=3)
    lengths = []
    for _ in range(4):
        k = policy.draft_length()
        lengths.append(k)
        policy.observe(Outcome(k, 0, [9] * k, [0.5] * k, [1]))
    assert lengths == [0, 0, 0, 1]  # three plain steps, then one token to learn from


def test_verify_costs_that_fall_with_n_are_read_as_flat_and_k_max_stays_within_the_measured_sizes():
    policy = CostAware({1: 1.0, 2: 1.4, 4: 1.2, 6: 1.5}, k_max=16)
    assert policy.verify_ratio == {1: 1.0, 2: 1.4, 4: 1.4, 6: 1.5} and policy.k_max == 5
    with pytest.raises(AdaspecError, match="k_max"):
        CostAware(STEEP, k_max=0)


@pytest.mark.parametrize("ratios", [STEEP, FLAT])
def test_greedy_sd_with_the_cost_aware_length_equals_ar(ratios):
    target = tiny_backend(3, scale=6.0)
    drafter = ModelDrafter(TorchBackend(perturbed_llama(3, 0.3, scale=6.0)), "perturbed")
    config = GenerationConfig(max_new_tokens=40)
    for seed in range(3):
        prompt = random_prompt(seed)
        ar = generate(target, prompt, config)
        paid = generate(target, prompt, config, drafter, CostAware(ratios, draft_ratio=0.1, probe=2))
        free = generate(target, prompt, config, PromptLookupDrafter(), CostAware(ratios))
        assert paid.token_ids == ar.token_ids and free.token_ids == ar.token_ids


def test_sd_k_auto_is_the_default_and_bad_k_is_refused(tmp_path):
    from conftest import tiny_llama

    from adaspec.core.models import LoadedModel

    assert parse_method("sd").options.k == "auto"
    with pytest.raises(AdaspecError, match="k must be auto, table or a draft length"):
        parse_method("sd:k=many")
    with pytest.raises(AdaspecError, match="sd:k=0: draft length k must be >= 1"):
        parse_method("sd:k=0")
    target = LoadedModel("tiny", tmp_path, tiny_llama(1, scale=6.0), None)
    runner = build_runner(parse_method("sd"), target, "lookup", GenerationConfig(max_new_tokens=8))
    assert isinstance(runner.policy, CostAware) and runner.policy.draft_ratio == 0.0


def test_the_bound_names_the_best_fixed_length_within_the_measured_sizes():
    from adaspec.core.costmodel import Costs, best_draft_length

    steep = Costs({str(n): 10.0 * r for n, r in STEEP.items()})
    flat = Costs({str(n): 10.0 * r for n, r in FLAT.items()})
    assert best_draft_length(0.5, steep) == (0, 1.0)
    k, speedup = best_draft_length(0.9, flat)
    assert k == 8 and speedup > 5  # 9 positions measured: k at most 8, never extrapolated
    assert best_draft_length(None, flat) == (None, None)  # nothing drafted: no acceptance measured


def test_the_report_shows_the_verify_curve_of_every_backend(tmp_path):
    from adaspec.bench.report import _costs

    torch_costs = {"verify_ms": {"1": 50.0, "8": 60.0}, "verify_ratio": {"1": 1.0, "8": 1.2}, "context_tokens": 40}
    llama = {"verify_ms": {"1": 10.0, "8": 40.0}, "verify_ratio": {"1": 1.0, "8": 4.0}, "weights": "bf16",
             "drafter": "lookup", "drafter_step_ms": 0.0, "drafter_first_ms": 0.02, "drafter_cost_ratio": 0.0}
    text = "\n".join(_costs({**torch_costs, "backend": "torch",
                             "backends": {"torch": torch_costs, "llamacpp:auto": llama}}))
    assert "| llamacpp:auto | bf16 | ratio | 1.00 | 4.00 |" in text and "| torch | – | ms | 50.00 | 60.00 |" in text
    assert "- llamacpp:auto, drafter lookup:" in text


def test_specdec_and_cmasd_tau_take_k_auto_and_refuse_a_bad_k():
    assert parse_method("cmasd-tau:k=auto").options.parts().policy is None  # CostAware, built with the runner
    assert parse_method("specdec:k=auto").options.parts().policy is None
    assert parse_method("specdec:k=3").options.parts().policy.draft_length() == 3
    with pytest.raises(AdaspecError, match="cmasd-tau:k=0: draft length k must be >= 1"):
        parse_method("cmasd-tau:k=0")
    with pytest.raises(AdaspecError, match="k must be auto, table or a draft length"):
        parse_method("specdec:k=long")


def test_cmasd_cost_caps_the_confidence_length_by_the_cost_aware_one(tmp_path):
    from conftest import tiny_llama

    from adaspec.core.costmodel import CostCapped
    from adaspec.core.models import LoadedModel
    from adaspec.core.policies import ConfidenceLength

    capped = CostCapped(ConfidenceLength(alpha=1.0, k_min=1, k_max=6), CostAware(STEEP, draft_ratio=0.0, k_max=6))
    assert capped.draft_length() == 6 and capped.verify_length([0.45] * 6) == 0  # steep costs, unsure: plain
    for _ in range(30):
        # copies that keep coming true lift the estimate
        capped.observe(Outcome(0, 0, [1, 2, 3, 4], [0.45] * 4, [1, 2, 3, 4]))
    assert 2 <= capped.verify_length([0.45] * 6) <= capped.policy.verify_length([0.45] * 6)
    with pytest.raises(AdaspecError, match="cost must be 0"):
        parse_method("cmasd:cost=2")
    target = LoadedModel("tiny", tmp_path, tiny_llama(1, scale=6.0), None)
    config = GenerationConfig(max_new_tokens=24)
    runner = build_runner(parse_method("cmasd-k"), target, "lookup", config)  # capped by default (cost=1)
    assert isinstance(runner.policy, CostCapped)
    assert isinstance(build_runner(parse_method("cmasd-k:cost=0"), target, "lookup", config).policy,
                      ConfidenceLength)
    ar = build_runner(parse_method("ar"), target, None, config)
    prompt = random_prompt(0) * 3
    assert runner(prompt, config).token_ids == ar(prompt, config).token_ids  # the exact rule stays exact


def test_cost_table_markdown_says_what_acceptance_each_backend_needs():
    from adaspec.bench.costs import cost_table_markdown

    def row(label: str, ratios: dict) -> dict:
        return {"backend": label, "verify_ms": {n: 10.0 * r for n, r in ratios.items()}, "verify_ratio": ratios,
                "prefill_ms": 100.0, "drafter_small": {"drafter_cost_ratio": 0.2}}

    lines = cost_table_markdown([row("flat", FLAT), row("linear", {n: float(n) for n in FLAT})]).splitlines()
    assert lines[0].endswith("| small drafter / step | alpha for 1.3x | alpha for 1.8x |")
    flat, linear = (line.split(" | ") for line in lines[2:])
    assert 0 < float(flat[-2]) < float(flat[-1].rstrip(" |")) < 1  # 1.8x needs a better drafter than 1.3x
    assert linear[-2:] == ["–", "– |"]  # scoring n positions costs n steps: no acceptance pays


def test_the_verdict_says_where_speculation_cannot_pay_and_where_it_does():
    from adaspec.core.costmodel import verdict

    steep = CostAware({1: 1.0, 2: 1.9, 3: 2.7, 4: 3.5})
    said = verdict(steep, drafted=100, accepted=60)
    assert "plain decoding is the fastest here" in said and "90%" in said and "60 of 100" in said
    flat = CostAware({1: 1.0, 2: 1.05, 3: 1.1, 4: 1.15})
    assert "speculation pays here: best fixed k=3" in verdict(flat, drafted=100, accepted=80)
    assert verdict(FixedLength(3), 10, 5) is None
