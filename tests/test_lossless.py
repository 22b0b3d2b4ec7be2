"""Lossless speculative sampling, checked statistically against the exact autoregressive distribution.

On a vocabulary of 8, the exact law of the first three sampled tokens is enumerated from the target
(forward passes on every prefix). Samples drawn with fixed seeds must fit it (chi-square goodness of fit),
for ar, for model drafters and for prompt lookup, and for every lossless method of the registry
(tests/exactness.py); the same statistic must reject deliberately biased rules and methods.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import full_logits, tiny_backend, tiny_llama
from exactness import (
    FAIL,
    PASS,
    PROMPT,
    T1,
    TOKENS,
    Draws,
    N,
    Seq,
    V,
    assert_both_paths_ran,
    chisquare_pvalue,
    draw_runner,
    exact_joint,
    fit_pvalue,
    lossless_methods,
    method_runner,
    tiny_models,
)

from adaspec.core.backends import TorchBackend
from adaspec.core.config import GenerationConfig, SamplingConfig
from adaspec.core.decode import generate
from adaspec.core.drafters import ModelDrafter, PromptLookupDrafter
from adaspec.core.policies import FixedLength
from adaspec.core.sampling import probs_from_logits, sample
from adaspec.core.verify import speculative_sampling
from adaspec.methods import Method, build_engine, parse_method, register, unregister
from adaspec.methods.sd import SDOptions

SCALE = 10.0  # LM-head scale: next-token laws far from uniform, target and drafter far apart
WARPED = SamplingConfig(temperature=0.8, top_k=5, top_p=0.9)


@pytest.fixture(scope="module")
def target():
    return tiny_backend(10, vocab=V, layers=1, scale=SCALE)


@pytest.fixture(scope="module")
def drafter():
    return ModelDrafter(tiny_backend(11, vocab=V, layers=1, scale=SCALE))


@pytest.fixture(scope="module")
def joints(target) -> dict[SamplingConfig, dict[Seq, float]]:
    return {sampling: exact_joint(target.model, sampling) for sampling in (T1, WARPED)}


def draw(target, sampling, drafter=None, k=2, max_new=TOKENS, rule=None, policy=None, confidence=None) -> Draws:
    """N generations, seeds 0..N-1; the first TOKENS tokens of each."""
    out = Draws()
    for seed in range(N):
        config = GenerationConfig(max_new_tokens=max_new, sampling=sampling, seed=seed)
        out.add(generate(target, PROMPT, config, drafter, policy or FixedLength(k), rule=rule, confidence=confidence))
    return out


def total_variation(a: dict, b: dict) -> float:
    return 0.5 * sum(abs(a.get(c, 0.0) - b.get(c, 0.0)) for c in set(a) | set(b))


def test_the_laws_are_far_from_uniform_and_the_drafter_differs(target, drafter, joints):
    # otherwise a biased rule could not be told apart from a lossless one
    t12: dict = {}
    for seq, p in joints[T1].items():
        t12[seq[:2]] = t12.get(seq[:2], 0.0) + p
    assert total_variation(t12, dict.fromkeys(t12, 1 / V**2)) > 0.2
    p = probs_from_logits(full_logits(target.model, PROMPT)[-1], T1)
    q = probs_from_logits(full_logits(drafter.backend.model, PROMPT)[-1], T1)
    assert 0.5 * float((p - q).abs().sum()) > 0.2


def test_ar_sampling_matches_the_exact_distribution(target, joints):
    assert fit_pvalue(draw(target, T1).samples, joints[T1]) > PASS


@pytest.mark.parametrize(
    ("sampling", "k", "max_new"),
    [(T1, 2, TOKENS), (WARPED, 3, TOKENS + 1)],
    ids=["t1-k2-bonus-within-3", "t0.8-topk5-topp0.9-k3"],
)
def test_speculative_sampling_matches_the_ar_distribution(target, drafter, joints, sampling, k, max_new):
    draws = draw(target, sampling, drafter, k=k, max_new=max_new)
    assert_both_paths_ran(draws)
    assert fit_pvalue(draws.samples, joints[sampling]) > PASS


def test_reduced_vocabulary_drafter_is_lossless(target, joints):
    # q is zero outside the drafter's vocabulary: those tokens can only come from the residual max(0, p - q)
    reduced = ModelDrafter(TorchBackend(tiny_llama(11, vocab=V, layers=1, scale=SCALE), vocab_ids=[0, 2, 3, 5, 6]))
    draws = draw(target, T1, reduced, k=2)
    assert_both_paths_ran(draws)
    assert fit_pvalue(draws.samples, joints[T1]) > PASS


def test_cmasd_k_early_stop_is_lossless(target, drafter, joints):
    # the early stop decides after the t-th token from C_1..C_t, confidences of positions whose distributions
    # depend only on earlier tokens: whether a token is verified never depends on that token or later ones
    parts = parse_method("cmasd-k:k_max=3,alpha=3.4").options.parts()
    draws = draw(target, T1, drafter, max_new=TOKENS + 1, policy=parts.policy, confidence=parts.confidence)
    assert_both_paths_ran(draws)
    assert min(draws.first_lengths[2], draws.first_lengths[3]) > N // 10  # the sampled token moves the stop
    assert fit_pvalue(draws.samples, joints[T1]) > PASS


def test_prompt_lookup_drafts_are_lossless(target, joints):
    # a deterministic drafter: q is one-hot, the rule accepts x with probability p(x)
    draws = draw(target, T1, PromptLookupDrafter(), k=2)
    assert_both_paths_ran(draws)
    assert fit_pvalue(draws.samples, joints[T1]) > PASS


def resample_from_p(target_logits, draft_tokens, draft_probs, sampling, generator, confidence=None):
    """Biased on purpose: on rejection draw the correction from p instead of norm(max(0, p - q))."""
    n, x = speculative_sampling(target_logits, draft_tokens, draft_probs, sampling, generator)
    if n < len(draft_tokens):
        x = sample(probs_from_logits(target_logits[n], sampling), generator)
    return n, x


def accept_everything(target_logits, draft_tokens, draft_probs, sampling, generator, confidence=None):
    """Biased on purpose: keep every drafted token."""
    return len(draft_tokens), sample(probs_from_logits(target_logits[-1], sampling), generator)


@pytest.mark.parametrize("rule", [resample_from_p, accept_everything])
def test_the_check_catches_a_biased_acceptance_rule(target, drafter, joints, rule):
    assert fit_pvalue(draw(target, T1, drafter, rule=rule).samples, joints[T1]) < FAIL


# Every lossless method of the registry, built by its build() at its defaults: a method is checked by being registered


@pytest.fixture(scope="module")
def tiny():
    return tiny_models()


@pytest.fixture(scope="module")
def tiny_joint(tiny) -> dict[Seq, float]:
    return exact_joint(tiny.target.model, T1)


@pytest.mark.parametrize("name", lossless_methods())
def test_every_lossless_method_samples_the_target_law(tiny, tiny_joint, name):
    runner = method_runner(name, tiny)
    draws = draw_runner(runner)
    if runner.drafter is not None:
        assert_both_paths_ran(draws)
    assert fit_pvalue(draws.samples, tiny_joint) > PASS


def test_the_registry_check_catches_a_biased_method(tiny, tiny_joint):
    """The control: sd keeping every drafted token, registered as if lossless, fails the same check."""
    def build(spec, ctx):
        return replace(build_engine(spec, ctx), rule=accept_everything)

    register(Method("sd-keeps-all", SDOptions, build, "sd that keeps every draft (biased on purpose)", lossless=True))
    try:
        draws = draw_runner(method_runner("sd-keeps-all", tiny))
    finally:
        unregister("sd-keeps-all")
    assert draws.drafted > N and fit_pvalue(draws.samples, tiny_joint) < FAIL


# The rule alone, without models: for any draft law q, the first emitted token is distributed as p.

RULE_N = 20000
P = torch.tensor([0.30, 0.02, 0.25, 0.0, 0.08, 0.15, 0.05, 0.15])
Q_CASES = {
    "q-random": torch.tensor([0.05, 0.30, 0.10, 0.10, 0.05, 0.20, 0.15, 0.05]),
    "q-zero-where-p-is-large": torch.tensor([0.0, 0.40, 0.0, 0.20, 0.10, 0.10, 0.10, 0.10]),
    "q-one-hot": None,  # a deterministic drafter always proposing token 1
}


def first_token_pvalue(rule, q: torch.Tensor | None) -> float:
    generator = torch.Generator().manual_seed(0)
    logits = torch.log(P).expand(2, V)  # [k+1, V]: position 0 verifies the draft
    counts = torch.zeros(V)
    for _ in range(RULE_N):
        x = 1 if q is None else sample(q, generator)
        n, y = rule(logits, [x], None if q is None else q[None], T1, generator)
        counts[x if n == 1 else y] += 1
    return chisquare_pvalue({t: int(c) for t, c in enumerate(counts)}, {t: float(p) * RULE_N for t, p in enumerate(P)})


@pytest.mark.parametrize("q", Q_CASES.values(), ids=Q_CASES.keys())
def test_the_rule_emits_p_whatever_q(q):
    assert first_token_pvalue(speculative_sampling, q) > PASS


@pytest.mark.parametrize("q", Q_CASES.values(), ids=Q_CASES.keys())
def test_the_rule_check_catches_a_correction_drawn_from_p(q):
    assert first_token_pvalue(resample_from_p, q) < FAIL
