"""Lossless speculative sampling, checked statistically against the exact autoregressive distribution.

On a vocabulary of 8, the exact distribution of the first three sampled tokens is enumerated from the
target; speculative samples must fit it (chi-square), and a deliberately biased rule must not.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import tiny_backend
from scipy.stats import chisquare

from adaspec.config import GenerationConfig, SamplingConfig
from adaspec.decode import generate
from adaspec.drafters import ModelDrafter, PromptLookupDrafter
from adaspec.policies import FixedLength
from adaspec.sampling import probs_from_logits, sample
from adaspec.verify import speculative_sampling

V = 8
N = 4000
PROMPT = [1, 2, 3, 1, 2, 4, 5, 1, 2]  # repeats, so prompt lookup proposes drafts
TOKENS = 3


@pytest.fixture(scope="module")
def target():
    return tiny_backend(10, vocab=V, scale=3.0)


@pytest.fixture(scope="module")
def drafter():
    return ModelDrafter(tiny_backend(11, vocab=V, scale=3.0))


def exact_joint(target, sampling: SamplingConfig) -> dict[tuple[int, ...], float]:
    """P(t1, t2, t3) under token-by-token sampling from the target."""
    model = target.model
    joint = {}
    with torch.inference_mode():
        for seq in itertools.product(range(V), repeat=TOKENS):
            prob = 1.0
            for i in range(TOKENS):
                logits = model(torch.tensor([PROMPT + list(seq[:i])])).logits[0, -1].float()
                prob *= float(probs_from_logits(logits, sampling)[seq[i]])
            joint[seq] = prob
    return joint


def fit_pvalue(samples: list[tuple[int, ...]], joint: dict[tuple[int, ...], float]) -> float:
    """Chi-square p-value of the samples' (t1, t2) joint and t3 marginal against the exact law (the smaller)."""
    pvalues = []
    for project in (lambda s: s[:2], lambda s: s[2:]):
        expected: dict = {}
        for seq, p in joint.items():
            expected[project(seq)] = expected.get(project(seq), 0.0) + p * len(samples)
        observed = {cell: 0 for cell in expected}
        for s in samples:
            observed[project(s)] += 1
        if any(observed[c] for c in expected if expected[c] == 0):
            return 0.0  # a sample the target can never produce
        # merge cells with expected count < 5 into one; drop impossible cells (checked above)
        small = [c for c in expected if 0 < expected[c] < 5]
        cells = [c for c in expected if expected[c] >= 5]
        exp = [expected[c] for c in cells] + ([sum(expected[c] for c in small)] if small else [])
        obs = [observed[c] for c in cells] + ([sum(observed[c] for c in small)] if small else [])
        pvalues.append(chisquare(obs, exp, sum_check=False).pvalue)
    return min(pvalues)


def draw(target, sampling, drafter=None, k=2, rule=None) -> list[tuple[int, ...]]:
    samples = []
    for seed in range(N):
        config = GenerationConfig(max_new_tokens=TOKENS, sampling=sampling, seed=seed)
        result = generate(target, PROMPT, config, drafter, FixedLength(k), rule=rule)
        samples.append(tuple(result.token_ids))
    return samples


SAMPLINGS = [SamplingConfig(temperature=1.0), SamplingConfig(temperature=0.8, top_k=5, top_p=0.9)]


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["t1", "t0.8-topk-topp"])
def test_speculative_sampling_matches_ar_distribution(target, drafter, sampling):
    joint = exact_joint(target, sampling)
    assert fit_pvalue(draw(target, sampling, drafter), joint) > 1e-3


def test_ar_sampling_matches_the_exact_distribution(target):
    sampling = SAMPLINGS[0]
    assert fit_pvalue(draw(target, sampling), exact_joint(target, sampling)) > 1e-3


def test_lookup_drafts_are_lossless_too(target):
    sampling = SAMPLINGS[0]
    assert fit_pvalue(draw(target, sampling, PromptLookupDrafter(), k=2), exact_joint(target, sampling)) > 1e-3


def resample_from_p(target_logits, draft_tokens, draft_probs, sampling, generator):
    """Biased on purpose: on rejection draw from p instead of norm(max(0, p - q))."""
    n, x = speculative_sampling(target_logits, draft_tokens, draft_probs, sampling, generator)
    if n < len(draft_tokens):
        x = sample(probs_from_logits(target_logits[n], sampling), generator)
    return n, x


def accept_everything(target_logits, draft_tokens, draft_probs, sampling, generator):
    """Biased on purpose: keep every drafted token."""
    return len(draft_tokens), sample(probs_from_logits(target_logits[-1], sampling), generator)


@pytest.mark.parametrize("rule", [resample_from_p, accept_everything])
def test_the_check_catches_a_biased_acceptance_rule(target, drafter, rule):
    sampling = SAMPLINGS[0]
    assert fit_pvalue(draw(target, sampling, drafter, rule=rule), exact_joint(target, sampling)) < 1e-6
