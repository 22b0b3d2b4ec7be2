"""CM-ASD and SpecDec: adaptive draft length, top-beta / tau verification (greedy and sampled), the methods,
their option errors, calibration, the ablation report and `adaspec sweep`."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from conftest import perturbed_llama, random_prompt, save_tiny, tiny_backend, tiny_llama
from scipy.stats import chisquare

from adaspec.bench.calibration import calibrate, calibration, ranks, spearman
from adaspec.bench.report import write_report
from adaspec.bench.runner import ABLATION, BenchOptions, bench_methods
from adaspec.bench.summary import summarize
from adaspec.bench.sweep import point_specs
from adaspec.core.backends import TorchBackend
from adaspec.core.config import CMASD_EARLY_STOP, CMASD_K_MAX, CMASD_K_MIN, GenerationConfig, SamplingConfig
from adaspec.core.decode import VERIFY, generate
from adaspec.core.drafters import Draft, DraftContext, ModelDrafter, PromptLookupDrafter
from adaspec.core.errors import AdaspecError
from adaspec.core.policies import ConfidenceLength, FixedLength, adaptive_length
from adaspec.core.sampling import probs_from_logits
from adaspec.core.verify import (
    TopBetaTau,
    greedy_accept,
    lenient_speculative_sampling,
    modulated_tau,
    speculative_sampling,
    top_beta_tau_accept,
)
from adaspec.methods import parse_method, split_specs

MAX_NEW = 24
CONFIG = GenerationConfig(max_new_tokens=MAX_NEW)
PROMPTS = [random_prompt(seed, length=2 + seed % 10) for seed in range(12)]
T1 = SamplingConfig(temperature=1.0)
WARPED = SamplingConfig(temperature=0.8, top_k=5, top_p=0.9)


@pytest.fixture(scope="module")
def target():
    return tiny_backend(0, scale=8.0)


@pytest.fixture(scope="module")
def drafter():
    """The target's weights jittered: its drafts are accepted often, not always."""
    return ModelDrafter(TorchBackend(perturbed_llama(0, 0.3, scale=8.0)))


@pytest.fixture(scope="module")
def ar_outputs(target) -> list[list[int]]:
    return [generate(target, p, CONFIG).token_ids for p in PROMPTS]


def run(spec: str, target, drafter, prompt, config=CONFIG):
    parts = parse_method(spec).options.parts()
    return generate(target, prompt, config, drafter, parts.policy, parts.rule, confidence=parts.confidence)


# --- adaptive draft length -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("confidence", "alpha", "k_min", "k_max", "expected"), [
    ([1.0, 1.0], 0.75, 1, 8, 6),  # floor(0.75 * 1 * 8) = 6 exactly, not 5 from rounding
    ([0.5, 0.5], 1.0, 1, 8, 4),
    ([0.2, 0.9], 1.0, 1, 8, 4),  # the mean: floor(0.55 * 8) = floor(4.4)
    ([0.3], 0.5, 1, 10, 1),  # floor(1.5)
    ([0.0, 0.1], 1.0, 3, 8, 3),  # clamped up to k_min
    ([1.0], 2.0, 1, 8, 8),  # clamped down to k_max
    ([], 1.0, 2, 8, 2),  # no confidence yet: k_min
])
def test_adaptive_length_is_the_clamped_floor_of_alpha_mean_confidence_k_max(confidence, alpha, k_min, k_max,
                                                                             expected):
    assert adaptive_length(confidence, alpha, k_min, k_max) == expected


def draft_with(policy, confidences: list[float], k_max: int) -> int:
    """How many tokens a drafter drafts under `policy` when its t-th token has confidence confidences[t]."""
    drafted: list[float] = []
    while True:
        drafted.append(confidences[len(drafted)])
        if len(drafted) >= k_max or not policy.keep_drafting(drafted):
            return len(drafted)


@pytest.mark.parametrize("c", [0.0, 0.3, 0.55, 0.8, 1.0])
def test_early_stop_and_paper_variant_verify_the_same_length_at_constant_confidence(c):
    paper = ConfidenceLength(alpha=0.9, k_min=2, k_max=8, early_stop=False)
    early = ConfidenceLength(alpha=0.9, k_min=2, k_max=8, early_stop=True)
    k_j = adaptive_length([c], 0.9, 2, 8)
    assert draft_with(paper, [c] * 8, 8) == 8 and paper.verify_length([c] * 8) == k_j  # drafts k_max, cuts
    assert draft_with(early, [c] * 8, 8) == k_j and early.verify_length([c] * k_j) == k_j  # stops at k_j


def test_early_stop_uses_the_running_mean_and_verifies_everything_drafted():
    early = ConfidenceLength(alpha=1.0, k_min=1, k_max=8, early_stop=True)
    # running means 1, 1, 0.67 (length 5), 0.5 (length 4): stops after the 4th token
    assert draft_with(early, [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0], 8) == 4
    assert early.verify_length([0.1, 0.2, 0.3]) == 3
    paper = ConfidenceLength(alpha=1.0, k_min=1, k_max=8, early_stop=False)
    assert paper.verify_length([1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]) == 6  # mean 0.75 of all eight


class ScriptedDrafter:
    """Drafts the token `token` at every position with confidence `confidence`, asking the policy after each."""

    name = "scripted"
    wants_hidden = False

    def __init__(self, confidence: float, token: int = 0) -> None:
        self.confidence, self.token = confidence, token

    def reset(self) -> None:
        pass

    def propose(self, ctx: DraftContext) -> Draft:
        conf: list[float] = []
        while True:
            conf.append(self.confidence)
            if len(conf) >= ctx.k_max or not ctx.keep_drafting(conf):
                return Draft([self.token] * len(conf), None, conf)

    def observe(self, accepted: int, ids: list[int], hidden=None) -> None:
        pass


@pytest.mark.parametrize("drafter_kind", ["scripted", "lookup"])
def test_paper_variant_counts_the_cut_tokens_and_early_stop_cuts_nothing(target, drafter_kind):
    prompt = list(range(10, 30)) + [10, 11, 12]  # prompt lookup drafts 13..20 first
    make = (lambda: ScriptedDrafter(1.0)) if drafter_kind == "scripted" else PromptLookupDrafter
    config = GenerationConfig(max_new_tokens=40)
    paper = generate(target, prompt, config, make(), ConfidenceLength(0.5, 1, 8, early_stop=False))
    early = generate(target, prompt, config, make(), ConfidenceLength(0.5, 1, 8, early_stop=True))
    full = [s for s in paper.steps if s.drafted + s.cut == 8]  # steps whose budget allowed k_max
    assert full and all(s.cut == 8 - s.drafted and 1 <= s.drafted <= 4 for s in full)  # verified floor(0.5 C 8)
    assert all(s.cut == 0 and s.drafted <= 4 for s in early.steps)
    if drafter_kind == "scripted":  # confidence 1: exactly floor(0.5 * 8) (lookup's is its acceptance prior, < 1)
        assert all(s.drafted == 4 for s in full) and sum(s.drafted == 4 for s in early.steps) >= len(full)
    assert paper.token_ids == early.token_ids  # greedy exact either way


# --- top-beta / tau verification -------------------------------------------------------------------------------

def test_beta_1_tau_0_is_exactly_greedy_on_random_logits_ties_included():
    g = torch.Generator().manual_seed(0)
    rejected_mid = 0
    for trial in range(400):
        k, v = 1 + trial % 6, 3 + trial % 20
        # integer logits on a small range: ties with the top-1 are common
        logits = torch.randint(0, 4, (k + 1, v), generator=g).float() if trial % 2 else torch.randn(k + 1, v,
                                                                                                    generator=g)
        top1 = logits.argmax(-1).tolist()
        draft = [top1[i] if torch.rand((), generator=g) < 0.7 else int(torch.randint(0, v, (), generator=g))
                 for i in range(k)]
        expected = greedy_accept(logits, draft)
        assert top_beta_tau_accept(logits, draft, beta=1, tau=[0.0] * k) == expected, trial
        assert top_beta_tau_accept(logits, draft, beta=1, tau=[9.0] * k) == expected, trial  # beta=1 alone
        assert TopBetaTau(beta=1, tau_base=0.0)(logits, draft, None, SamplingConfig(), None) == expected
        rejected_mid += 0 < expected[0] < k
    assert rejected_mid > 50  # partial acceptances were exercised


# position 0: top-1 is token 0; token 1 is 0.05 behind (rank 2), token 2 1.0 behind (rank 3)
ROW = [5.0, 4.95, 4.0, 3.0, 2.0, 1.0]


@pytest.mark.parametrize(("x", "beta", "tau", "accepted"), [
    (0, 1, 0.0, True),  # the top-1 always passes
    (1, 2, 0.1, True),  # in the top-2 and within tau
    (1, 1, 0.1, False),  # within tau but outside the top-1
    (1, 2, 0.01, False),  # in the top-2 but beyond tau
    (2, 3, 2.0, True),
    (2, 2, 2.0, False),  # two tokens ahead of it: outside the top-2
    (2, 3, 0.99, False),  # gap 1.0 > tau
    (2, 3, 1.0, True),  # gap == tau passes
])
def test_relaxed_rule_needs_both_top_beta_and_the_tau_gap(x, beta, tau, accepted):
    logits = torch.tensor([ROW, ROW[::-1]])  # the bonus position's top-1 is token 5
    n, token = top_beta_tau_accept(logits, [x], beta, [tau])
    assert (n, token) == ((1, 5) if accepted else (0, 0))  # rejection emits the target's top-1


def test_tau_is_per_position_and_the_gap_is_in_target_log_probabilities():
    logits = torch.tensor([ROW, ROW, ROW])
    assert top_beta_tau_accept(logits, [1, 1], 5, [0.1, 0.01]) == (1, 0)
    assert top_beta_tau_accept(logits, [1, 1], 5, [0.1, 0.1]) == (2, 0)
    logp = torch.log_softmax(logits[0], -1)
    assert float(logp[0] - logp[2]) == pytest.approx(1.0)  # tau compares log p(top1) - log p(x) in nats


def test_modulated_tau_intent_relaxes_confident_drafts_and_literal_uncertain_ones():
    c = [0.0, 0.5, 1.0]
    assert modulated_tau(c, 0.1, 1.0, "intent") == pytest.approx([0.1, 0.6, 1.1])
    assert modulated_tau(c, 0.1, 1.0, "literal") == pytest.approx([1.1, 0.6, 0.1])
    assert modulated_tau(c, 0.2, 0.0, "literal") == modulated_tau(c, 0.2, 0.0, "intent") == [0.2] * 3
    with pytest.raises(AdaspecError, match="unknown tau_mode 'both'"):
        modulated_tau(c, 0.1, 1.0, "both")
    # token 2 trails by 1.0 nat: a confident draft passes under intent and fails under literal, and the reverse
    logits = torch.tensor([ROW, ROW])
    intent, literal = TopBetaTau(5, 0.1, 1.0, "intent"), TopBetaTau(5, 0.1, 1.0, "literal")
    greedy = SamplingConfig()
    assert intent(logits, [2], None, greedy, None, confidence=[0.95]) == (1, 0)
    assert literal(logits, [2], None, greedy, None, confidence=[0.95]) == (0, 0)
    assert intent(logits, [2], None, greedy, None, confidence=[0.05]) == (0, 0)
    assert literal(logits, [2], None, greedy, None, confidence=[0.05]) == (1, 0)
    with pytest.raises(AdaspecError, match="needs the drafter's confidence"):
        intent(logits, [2], None, greedy, None)


@pytest.mark.parametrize("sampling", [T1, WARPED], ids=["t1", "warped"])
@pytest.mark.parametrize("one_hot", [False, True], ids=["q", "one-hot"])
def test_lenient_sampling_with_tau_0_and_full_beta_is_speculative_sampling(sampling, one_hot):
    g = torch.Generator().manual_seed(1)
    v, outcomes = 12, set()
    for trial in range(200):
        k = 1 + trial % 5
        target_logits = 2 * torch.randn(k + 1, v, generator=g)
        q = None if one_hot else probs_from_logits(2 * torch.randn(k, v, generator=g), sampling)  # [k, V]
        draft = [int(torch.multinomial(q[i], 1, generator=g)) if q is not None
                 else int(torch.randint(0, v, (), generator=g)) for i in range(k)]
        seed = 1000 + trial
        exact = speculative_sampling(target_logits, draft, q, sampling, torch.Generator().manual_seed(seed))
        lenient = lenient_speculative_sampling(target_logits, draft, q, sampling, torch.Generator().manual_seed(seed),
                                               beta=v, tau=[0.0] * k)
        assert lenient == exact, trial
        outcomes.add(exact[0] == k)
    assert outcomes == {True, False}  # both full acceptance and rejection happened


def test_lenient_sampling_emits_its_documented_law_bounded_by_e_tau_p():
    """One drafted position: the emitted token's law is a + (1 - sum a) * norm(max(0, p - a)) with
    a = min(q, e^tau p) on p's top-beta, and never exceeds e^tau p."""
    p_logits = torch.tensor([[2.0, 1.5, 0.5, 0.0, -1.0], [0.0] * 5])
    q = torch.tensor([[0.1, 0.6, 0.25, 0.05, 0.0]])
    beta, tau = 3, 0.3
    p = torch.softmax(p_logits[0], -1)
    a = torch.minimum(q[0], math.exp(tau) * p)
    a[3:] = 0.0  # outside the top-3
    residual = (p - a).clamp_min(0)
    law = a + (1 - a.sum()) * residual / residual.sum()
    assert bool((law <= math.exp(tau) * p + 1e-7).all()) and float(law.sum()) == pytest.approx(1.0)
    assert float(law[1]) > float(p[1])  # the slack moved mass towards the draft's favourite
    g = torch.Generator().manual_seed(2)
    counts = torch.zeros(5)
    n = 6000
    for _ in range(n):
        x = int(torch.multinomial(q[0], 1, generator=g))
        kept, token = lenient_speculative_sampling(p_logits, [x], q, T1, g, beta, [tau])
        counts[x if kept else token] += 1
    nonzero = law > 0
    assert chisquare(counts[nonzero].numpy(), (n * law[nonzero]).numpy()).pvalue > 1e-3
    assert counts[~nonzero].sum() == 0


def test_a_huge_tau_at_temperature_above_0_keeps_every_top_beta_draft():
    logits = torch.tensor([ROW, ROW])
    q = torch.full((1, 6), 1 / 6)
    g = torch.Generator().manual_seed(0)
    assert lenient_speculative_sampling(logits, [2], q, T1, g, 3, [1000.0])[0] == 1  # no overflow
    assert lenient_speculative_sampling(logits, [4], q, T1, g, 3, [1000.0])[0] == 0  # outside the top-3


# --- the methods, end to end on tiny models -----------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["specdec:beta=1,tau=0", "cmasd-k", "cmasd-k:early_stop=0", "cmasd-k:k_min=3,k_max=6",
                                  "cmasd:beta=1", "cmasd-tau:beta=1,tau_base=1"])
def test_exact_greedy_configurations_equal_ar_token_for_token(target, drafter, ar_outputs, spec):
    drafted = accepted = 0
    for i, prompt in enumerate(PROMPTS):
        result = run(spec, target, drafter, prompt)
        assert result.token_ids == ar_outputs[i], (spec, i)
        drafted += sum(s.drafted for s in result.steps)
        accepted += sum(s.accepted for s in result.steps)
    assert 0 < accepted < drafted  # accept and reject paths both ran


def test_cmasd_k_adapts_the_draft_length_to_the_drafters_confidence(target, drafter):
    lengths = set()
    for prompt in PROMPTS[:6]:
        result = run("cmasd-k:alpha=1", target, drafter, prompt)  # alpha 1: lengths spread over 1..k_max
        emitted = 0
        for s in result.steps:
            cap = min(CMASD_K_MAX, MAX_NEW - emitted - 1)  # the budget caps the last steps
            emitted += len(s.tokens)
            if not cap:
                continue
            # early stop: the first t with t >= k_j of the running mean C_1..C_t
            length = [adaptive_length(s.confidence[:t], 1.0, CMASD_K_MIN, CMASD_K_MAX)
                      for t in range(1, s.drafted + 1)]
            assert s.drafted == cap or s.drafted >= length[-1]
            assert all(t < length[t - 1] for t in range(1, s.drafted))
            assert len(s.confidence) == len(s.exact) == s.drafted and s.cut == 0
            assert set(s.metrics) == {"entropy", "margin", "softmax"}
        lengths |= {s.drafted for s in result.steps}
    assert len(lengths) > 2


def test_relaxed_verification_keeps_more_and_departs_from_ar(target, drafter, ar_outputs):
    exact = relaxed = 0
    differs = 0
    for i, prompt in enumerate(PROMPTS):
        sd = generate(target, prompt, CONFIG, drafter, FixedLength(5))
        loose = run("specdec:k=5,tau=3", target, drafter, prompt)
        exact += sum(s.accepted for s in sd.steps) / sum(s.drafted for s in sd.steps)
        relaxed += sum(s.accepted for s in loose.steps) / sum(s.drafted for s in loose.steps)
        differs += loose.token_ids != ar_outputs[i]
    assert relaxed > exact and differs > 0


@pytest.mark.parametrize("spec", ["cmasd", "cmasd:early_stop=0", "specdec", "cmasd-k"])
def test_sampled_cmasd_is_reproducible_from_the_seed(target, drafter, spec):
    def sampled(seed: int) -> list[list[int]]:
        config = GenerationConfig(max_new_tokens=16, sampling=SamplingConfig(temperature=0.8, top_p=0.95), seed=seed)
        return [run(spec, target, drafter, p, config).token_ids for p in PROMPTS[:4]]

    first = sampled(1)
    assert sampled(1) == first
    assert sampled(2) != first


# --- method specs ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("spec", "message"), [
    ("cmasd:alpha=0", "alpha must be a finite number > 0, got 0.0"),
    ("cmasd:alpha=-1", "alpha must be"),
    ("cmasd-k:alpha=nan", "alpha must be"),
    ("cmasd-k:alpha=inf", "alpha must be"),
    ("cmasd:k_min=5,k_max=3", "1 <= k_min <= k_max, got k_min=5, k_max=3"),
    ("cmasd-k:k_min=0", "1 <= k_min <= k_max"),
    ("cmasd:tau_mode=both", "unknown tau_mode 'both'; choose one of intent, literal"),
    ("cmasd:l1=0.5,l2=0.5", "give the confidence weights l1, l2 and l3 together (they sum to 1), got only l1, l2"),
    ("cmasd-tau:l3=1", "got only l3"),
    ("cmasd:l1=0.5,l2=0.3,l3=0.3", "sum to 1"),
    ("cmasd:metric=vibes", "unknown confidence metric 'vibes'"),
    ("cmasd:scale=0", "scale s must be"),
    ("cmasd-k:scale=nan", "scale s must be a finite number > 0"),
    ("cmasd:early_stop=2", "early_stop must be 0 (draft k_max, verify k_j) or 1 (stop at k_j), got 2"),
    ("specdec:beta=0", "beta (top-beta) must be >= 1"),
    ("specdec:tau=-0.1", "must be finite numbers >= 0"),
    ("specdec:tau=nan", "must be finite numbers >= 0"),
    ("cmasd-tau:gamma=inf", "must be finite numbers >= 0"),
    ("specdec:k=0", "draft length k must be >= 1"),
])
def test_bad_cmasd_options_are_clear_errors_naming_the_spec(spec, message):
    with pytest.raises(AdaspecError) as e:
        parse_method(spec)
    assert str(e.value).startswith(spec + ": ") and message in str(e.value)


@pytest.mark.parametrize(("spec", "message"), [
    ("cmasd-k:gamma=1", "method 'cmasd-k' has no option 'gamma'"),
    ("specdec:alpha=1", "method 'specdec' has no option 'alpha'"),
    ("cmasd:alpha=high", "option alpha='high' of 'cmasd' must be float"),
])
def test_options_a_method_lacks_or_of_the_wrong_type_are_refused(spec, message):
    with pytest.raises(AdaspecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_method(spec)


def test_method_parts_compose_as_documented():
    spec = parse_method("cmasd:alpha=0.8,gamma=1.0,tau_base=0.1,beta=5,k_min=1,k_max=8")
    parts = spec.options.parts()
    assert parts.policy == ConfidenceLength(0.8, 1, 8, bool(CMASD_EARLY_STOP))
    assert parts.rule == TopBetaTau(5, 0.1, 1.0, "intent") and parts.confidence is not None
    specdec = parse_method("specdec:k=4,beta=3,tau=0.2").options.parts()
    assert specdec.policy == FixedLength(4) and specdec.rule == TopBetaTau(3, 0.2) and specdec.confidence is None
    cmasd_k = parse_method("cmasd-k:metric=entropy").options.parts()
    assert isinstance(cmasd_k.policy, ConfidenceLength) and cmasd_k.rule is None
    assert cmasd_k.confidence.only == "entropy"
    tau = parse_method("cmasd-tau:k=3,tau_mode=literal").options.parts()
    assert tau.policy == FixedLength(3) and tau.rule.tau_mode == "literal" and tau.rule.gamma > 0


@pytest.mark.parametrize(("text", "specs"), [
    ("ar,sd", ["ar", "sd"]),
    ("ar,cmasd:alpha=0.8,gamma=1,sd", ["ar", "cmasd:alpha=0.8,gamma=1", "sd"]),
    ("specdec:beta=1,tau=0,cmasd-k:k_max=4,early_stop=0", ["specdec:beta=1,tau=0", "cmasd-k:k_max=4,early_stop=0"]),
    (" ar , sd:k=3 ,, hf", ["ar", "sd:k=3", "hf"]),
])
def test_split_specs_keeps_options_with_their_method(text, specs):
    assert split_specs(text) == specs


def test_ablation_runs_the_table_iii_methods_then_the_extra_ones():
    methods = bench_methods(BenchOptions(data=None, out=None, methods=["cmasd", "sd:k=3"], ablation=True), "x")
    assert methods == [*ABLATION, "sd:k=3"]
    assert methods[:6] == ["ar", "sd", "specdec", "cmasd-k", "cmasd-tau", "cmasd"]
    assert {parse_method(m).label for m in methods} == set(methods)


# --- calibration and the report -------------------------------------------------------------------------------

def cal_step(confidence: list[float], exact: list[int], metrics: dict | None = None) -> dict:
    return {"kind": VERIFY, "drafted": len(confidence), "accepted": 0, "confidence": confidence, "exact": exact,
            "metrics": metrics or {m: confidence for m in ("entropy", "margin", "softmax")}}


def cal_record(qid, method, steps, category="translation") -> dict:
    return {"question_id": qid, "category": category, "method": method, "new_tokens": len(steps), "wall_s": 1.0,
            "token_ids": [1] * len(steps), "text": "a b", "turns": ["a b"], "reference": None, "steps": steps}


def test_ranks_share_ties_and_spearman_follows_the_ranks():
    assert ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]
    assert spearman([1, 2, 3, 4], [10, 20, 25, 100]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [5, 5, 5]) is None and spearman([1], [1]) is None


def test_calibration_bins_count_tokens_and_their_exact_acceptance():
    # 30 tokens at 0.05 (6 accepted), 30 at 0.55 (15), 30 at 0.95 (27); 1.0 lands in the last bin, 5 at 0.35
    pairs = ([(0.05, i < 6) for i in range(30)] + [(0.55, i < 15) for i in range(30)]
             + [(0.95, i < 27) for i in range(30)] + [(1.0, True)] + [(0.35, i < 4) for i in range(5)])
    c = calibrate(pairs)
    assert len(c["bins"]) == 10 and c["tokens"] == 96
    counts = [b["count"] for b in c["bins"]]
    assert counts == [30, 0, 0, 5, 0, 30, 0, 0, 0, 31]
    assert c["bins"][0]["acceptance"] == 0.2 and c["bins"][5]["acceptance"] == 0.5
    assert c["bins"][9]["acceptance"] == round(28 / 31, 4) and c["bins"][1]["acceptance"] is None
    assert c["bins"][3]["acceptance"] == 0.8  # reported, but under min_count: out of the bin-level Spearman
    assert c["spearman"] == 1.0  # bins 0, 5, 9: acceptance rises with confidence
    assert 0 < c["spearman_tokens"] < 1
    assert c["acceptance"] == round((6 + 15 + 27 + 1 + 4) / 96, 4)


def test_calibration_per_method_and_metric_from_records():
    good = [cal_step([0.9, 0.9, 0.1], [1, 1, 0], {"entropy": [0.1, 0.2, 0.9], "margin": [0.9, 0.8, 0.1],
                                                  "softmax": [0.5, 0.5, 0.5]})] * 20
    records = [cal_record(1, "cmasd", good), cal_record(1, "sd", [{"kind": VERIFY, "drafted": 2, "accepted": 1,
                                                                  "confidence": [0.5, 0.5]}]),
               cal_record(1, "ar", [{"kind": VERIFY, "drafted": 0, "accepted": 0, "confidence": []}])]
    calib = calibration(records)
    assert set(calib) == {"cmasd"}  # only methods that record exactness
    assert set(calib["cmasd"]) == {"entropy", "margin", "softmax", "ensemble"}
    assert calib["cmasd"]["ensemble"]["spearman_tokens"] == 1.0
    assert calib["cmasd"]["entropy"]["spearman_tokens"] < -0.8  # confident where the target disagrees
    assert calib["cmasd"]["softmax"]["spearman_tokens"] is None  # constant confidence: undefined
    assert calib["cmasd"]["margin"]["bins"][9]["count"] == 20 and calib["cmasd"]["margin"]["bins"][9]["acceptance"] == 1


def test_report_has_the_ablation_table_and_calibration_section(tmp_path):
    def steps(cut: int) -> list[dict]:
        return [{**cal_step([0.9, 0.2], [1, 0]), "cut": cut}] * 15 + [cal_step([0.6], [1])] * 15

    plain = {"kind": VERIFY, "drafted": 0, "accepted": 0, "confidence": []}
    records = [cal_record(q, "ar", [plain] * 30) for q in (1, 2)]
    records += [{**cal_record(q, "cmasd", steps(0)), "wall_s": 0.5} for q in (1, 2)]
    records += [{**cal_record(q, "cmasd:early_stop=0", steps(4)), "wall_s": 0.8} for q in (1, 2)]
    config = {"methods": ["ar", "cmasd", "cmasd:early_stop=0"], "ablation": True}
    summary = summarize(records, config)
    assert set(summary["calibration"]) == {"cmasd", "cmasd:early_stop=0"}
    text = write_report(summary, records, tmp_path).read_text()
    assert "## Ablation (CM-ASD, cf. the paper's Table III)" in text
    assert "| method | speedup | mean accepted | mean draft len | cut per step | BLEU |" in text
    assert "| cmasd | 2.00 | 1.00 | 1.50 | 0.00 |" in text
    assert "| cmasd:early_stop=0 | 1.25 | 1.00 | 1.50 | 2.00 |" in text
    assert "## Confidence calibration" in text and "| cmasd | ensemble | 90 | 0.67 | 0.87 | 0.87 |" in text
    assert "| cmasd | 0 / – | 0 / – | 30 / 0.00 |" in text  # the ensemble's bins: count / exact acceptance
    assert "](plots/calibration.png)" in text and (tmp_path / "plots" / "calibration.png").stat().st_size > 1000
    summary["config"].pop("ablation")
    assert "## Ablation" not in write_report(summary, records, tmp_path).read_text()


# --- adaspec sweep, on a tiny model directory -------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    save_tiny(root / "target", tiny_llama(0, scale=8.0))
    save_tiny(root / "drafter", perturbed_llama(0, 0.3, scale=8.0))
    data = root / "q.jsonl"
    lines = [{"question_id": 1, "category": "translation", "turns": ["w1 w2 w3 w1 w2"], "reference": ["w4 w5 w6"]},
             {"question_id": 2, "category": "summarization", "turns": ["w7 w8 w9 w7 w8"], "reference": ["w9 w9"]}]
    data.write_text("".join(json.dumps(q) + "\n" for q in lines))
    return root


def cli(monkeypatch, *args: str) -> None:
    from adaspec.cli import main

    monkeypatch.setattr(sys, "argv", ["adaspec", *args])
    main()


def test_sweep_writes_points_and_fronts_and_resumes_without_redoing_points(tiny_dirs, tmp_path, monkeypatch,
                                                                           capsys):
    from adaspec.bench import sweep

    out = tmp_path / "sweep"
    args = ("sweep", "--out", str(out), "--target", str(tiny_dirs / "target"), "--drafter",
            str(tiny_dirs / "drafter"), "--data", str(tiny_dirs / "q.jsonl"), "--no-chat", "--max-new-tokens", "8",
            "--alpha", "0.5,1", "--gamma", "1", "--tau-base", "")
    cli(monkeypatch, *args)
    lines = (out / "sweep.jsonl").read_text().splitlines()
    points = [json.loads(line) for line in lines]
    assert [p["spec"] for p in points] == ["cmasd:alpha=0.5,gamma=1", "cmasd:alpha=1,gamma=1"]
    assert all(p["n"] == 2 and p["speedup_vs_ar"] is not None and p["alignment"] is not None for p in points)
    assert len((out / "ar.jsonl").read_text().splitlines()) == 2
    pareto = json.loads((out / "pareto.json").read_text())
    assert pareto["points"] == 2 and pareto["front_alignment"] and pareto["front_quality"]
    assert (out / "plots" / "pareto.png").stat().st_size > 1000
    assert "Pareto front" in capsys.readouterr().out

    # an interrupted rerun: the second point's line was cut short; only that point runs again
    (out / "sweep.jsonl").write_text(lines[0] + "\n" + lines[1][:20])
    ran: list[str] = []
    original = sweep.sweep_point
    monkeypatch.setattr(sweep, "sweep_point", lambda spec, *a, **k: ran.append(spec) or original(spec, *a, **k))
    cli(monkeypatch, *args)
    assert ran == ["cmasd:alpha=1,gamma=1"]
    assert "2 points (1 done)" in " ".join(capsys.readouterr().err.split())
    valid = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()[::2]]
    assert valid[0] == points[0] and [p["spec"] for p in sweep.read_points(out / "sweep.jsonl")] == [
        "cmasd:alpha=0.5,gamma=1", "cmasd:alpha=1,gamma=1"]

    ran.clear()
    cli(monkeypatch, *args)  # everything done: nothing runs, the fronts are rewritten
    assert ran == [] and json.loads((out / "pareto.json").read_text())["points"] == 2


def test_sweep_refuses_another_configuration_in_the_same_directory(tiny_dirs, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        cli(monkeypatch, "sweep", "--out", str(out), "--target", str(tiny_dirs / "target"), "--data",
            str(tiny_dirs / "q.jsonl"), "--alpha", "1", "--gamma", "1", "--tau-base", "")
    assert e.value.code == 2


def test_sweep_measures_its_points_against_ar_on_the_base_methods_backend():
    from adaspec.bench.sweep import baseline_spec

    assert baseline_spec("cmasd:gamma=2") == "ar"  # the default backend, as the points
    assert baseline_spec("sd:backend=llamacpp,format=q8_0,k=3") == "ar:backend=llamacpp,format=q8_0"
    assert baseline_spec("rstitch:backend=torch") == "ar:backend=torch"
    assert baseline_spec("specbound:adapters=none") == "ar:backend=torch"  # SpecBound runs on torch only
    baseline = parse_method(baseline_spec("specbound"))
    assert baseline.given == ("backend",) and baseline.options.backend == "torch"


def test_sweep_grid_specs_and_empty_axes():
    specs = point_specs("cmasd:early_stop=0", {"alpha": (0.5, 1.0), "gamma": (1.0,), "tau_base": ()})
    assert specs == [("cmasd:early_stop=0,alpha=0.5,gamma=1", {"alpha": 0.5, "gamma": 1.0}),
                     ("cmasd:early_stop=0,alpha=1,gamma=1", {"alpha": 1.0, "gamma": 1.0})]
    # an empty axis is left out: it neither clashes with the base nor needs to be an option of it
    empty = point_specs("cmasd-k", {"alpha": (0.5,), "gamma": (), "tau_base": ()})
    assert [s for s, _ in empty] == ["cmasd-k:alpha=0.5"]
    assert [s for s, _ in point_specs("cmasd:gamma=2", {"alpha": (1.0,), "gamma": ()})] == ["cmasd:gamma=2.0,alpha=1"]
    with pytest.raises(AdaspecError, match="sets gamma, which the grid sweeps"):
        point_specs("cmasd:gamma=2", {"gamma": (1.0,)})
    with pytest.raises(AdaspecError, match="has no option gamma to sweep"):
        point_specs("cmasd-k", {"gamma": (1.0,)})
    with pytest.raises(AdaspecError, match="alpha must be"):
        point_specs("cmasd", {"alpha": (0.0,)})
