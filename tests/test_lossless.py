"""Lossless speculative sampling, checked statistically against the exact autoregressive distribution.

On a vocabulary of 8, the exact law of the first three sampled tokens is enumerated from the target
(forward passes on every prefix). Samples drawn with fixed seeds must fit it (chi-square goodness of fit),
for ar, for model drafters and for prompt lookup; the same statistic must reject deliberately biased rules.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pytest
import torch
from conftest import full_logits, tiny_backend, tiny_llama
from scipy.stats import chisquare

from adaspec.backends import TorchBackend
from adaspec.config import GenerationConfig, SamplingConfig
from adaspec.decode import generate
from adaspec.drafters import ModelDrafter, PromptLookupDrafter
from adaspec.methods import parse_method
from adaspec.policies import FixedLength
from adaspec.sampling import probs_from_logits, sample
from adaspec.verify import speculative_sampling

V = 8
N = 3000  # samples per check
PROMPT = [1, 2, 3, 1, 2, 4, 5, 1, 2]  # repeats, so prompt lookup proposes drafts
SCALE = 10.0  # LM-head scale: next-token laws far from uniform, target and drafter far apart
TOKENS = 3  # the law of the first three generated tokens is checked
PASS = 1e-3  # a lossless method must fit with p-value above this
FAIL = 1e-6  # a biased rule must be rejected with p-value below this

T1 = SamplingConfig(temperature=1.0)
WARPED = SamplingConfig(temperature=0.8, top_k=5, top_p=0.9)

Seq = tuple[int, ...]


@pytest.fixture(scope="module")
def target():
    return tiny_backend(10, vocab=V, layers=1, scale=SCALE)


@pytest.fixture(scope="module")
def drafter():
    return ModelDrafter(tiny_backend(11, vocab=V, layers=1, scale=SCALE))


@pytest.fixture(scope="module")
def joints(target) -> dict[SamplingConfig, dict[Seq, float]]:
    return {sampling: exact_joint(target.model, sampling) for sampling in (T1, WARPED)}


def exact_joint(model, sampling: SamplingConfig) -> dict[Seq, float]:
    """P(t1 .. t_TOKENS) under token-by-token sampling from the target, by enumerating every prefix."""
    joint: dict[Seq, float] = {(): 1.0}
    for _ in range(TOKENS):
        longer: dict[Seq, float] = {}
        for prefix, mass in joint.items():
            if mass == 0.0:
                longer.update({prefix + (t,): 0.0 for t in range(V)})
                continue
            probs = probs_from_logits(full_logits(model, PROMPT + list(prefix))[-1], sampling)  # [V]
            longer.update({prefix + (t,): mass * float(probs[t]) for t in range(V)})
        joint = longer
    assert abs(sum(joint.values()) - 1.0) < 1e-4
    return joint


def chisquare_pvalue(observed: dict, expected: dict) -> float:
    """Goodness of fit of counts to expected counts over the same cells; cells with expected count < 5
    are merged into one; a sample in a cell of probability zero fails outright."""
    if any(observed.get(c, 0) for c in expected if expected[c] == 0.0):
        return 0.0
    assert set(observed) <= set(expected)
    small = [c for c in expected if 0.0 < expected[c] < 5]
    cells = [c for c in expected if expected[c] >= 5]
    exp = [expected[c] for c in cells] + ([sum(expected[c] for c in small)] if small else [])
    obs = [observed.get(c, 0) for c in cells] + ([sum(observed.get(c, 0) for c in small)] if small else [])
    return float(chisquare(obs, exp, sum_check=False).pvalue)


def fit_pvalue(samples: list[Seq], joint: dict[Seq, float]) -> float:
    """The smaller chi-square p-value of the samples' (t1, t2) joint and t3 marginal against the exact law."""
    pvalues = []
    for project in (lambda s: s[:2], lambda s: s[2:3]):
        expected: dict = {}
        for seq, p in joint.items():
            expected[project(seq)] = expected.get(project(seq), 0.0) + p * len(samples)
        observed: dict = {}
        for s in samples:
            observed[project(s)] = observed.get(project(s), 0) + 1
        pvalues.append(chisquare_pvalue(observed, expected))
    return min(pvalues)


@dataclass
class Draws:
    samples: list[Seq]
    drafted: int = 0
    accepted: int = 0
    rejections: int = 0  # steps that kept fewer tokens than drafted
    full_accepts: int = 0  # steps that kept every drafted token (a bonus token was drawn)
    first_lengths: Counter = field(default_factory=Counter)  # tokens the first step drafted


def draw(target, sampling, drafter=None, k=2, max_new=TOKENS, rule=None, policy=None, confidence=None) -> Draws:
    """N generations, seeds 0..N-1; the first TOKENS tokens of each."""
    out = Draws([])
    for seed in range(N):
        config = GenerationConfig(max_new_tokens=max_new, sampling=sampling, seed=seed)
        result = generate(target, PROMPT, config, drafter, policy or FixedLength(k), rule=rule, confidence=confidence)
        out.samples.append(tuple(result.token_ids[:TOKENS]))
        out.first_lengths[result.steps[0].drafted] += 1
        for s in result.steps:
            if s.drafted:
                out.drafted += s.drafted
                out.accepted += s.accepted
                out.rejections += s.accepted < s.drafted
                out.full_accepts += s.accepted == s.drafted
    return out


def assert_both_paths_ran(draws: Draws) -> None:
    """A fit is only evidence if drafts were both accepted and rejected many times."""
    assert draws.rejections > N // 20 and draws.full_accepts > N // 20 and draws.accepted > N // 10


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
