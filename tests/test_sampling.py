"""Logit warping: greedy, temperature, top-k, top-p (applied in that order), and drawing a token."""

from __future__ import annotations

import pytest
import torch

from adaspec.core.config import SamplingConfig
from adaspec.core.errors import AdaspecError
from adaspec.core.sampling import probs_from_logits, sample

PROBS = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
LOGITS = torch.log(PROBS)


def kept(p: torch.Tensor) -> list[int]:
    return (p > 0).nonzero().flatten().tolist()


def test_greedy_is_one_hot_on_the_argmax():
    assert probs_from_logits(LOGITS, SamplingConfig()).tolist() == [0, 1, 0, 0, 0]
    logits = torch.randn(3, 7, 50)
    p = probs_from_logits(logits, SamplingConfig())
    assert torch.equal(p.argmax(-1), logits.argmax(-1)) and torch.equal(p.sum(-1), torch.ones(3, 7))
    assert set(p.unique().tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("t", [5e-324, 1e-300, 1e-45, 1e-6])
def test_a_vanishing_temperature_is_greedy(t):
    """Below GREEDY_BELOW the limit (the argmax) is taken: float32 logits / 1e-300 would be inf, the softmax NaN."""
    assert SamplingConfig(temperature=t).greedy
    assert probs_from_logits(LOGITS, SamplingConfig(temperature=t)).tolist() == [0, 1, 0, 0, 0]


def test_a_small_temperature_gives_a_distribution_even_over_wide_logits():
    logits = torch.tensor([0.0, 30.0, -30.0, float("-inf"), 30.0 - 1e-4])
    p = probs_from_logits(logits, SamplingConfig(temperature=2e-5))
    assert torch.isfinite(p).all() and abs(float(p.sum()) - 1) < 1e-6 and kept(p) == [1, 4]
    assert sample(p, torch.Generator().manual_seed(0)) in (1, 4)


@pytest.mark.parametrize("t", [float("nan"), float("inf"), -1.0])
def test_a_temperature_must_be_finite_and_not_negative(t):
    with pytest.raises(AdaspecError, match="temperature"):
        SamplingConfig(temperature=t)


def test_temperature_one_is_the_softmax():
    assert torch.allclose(probs_from_logits(LOGITS, SamplingConfig(temperature=1.0)), PROBS, atol=1e-6)


def test_temperature_divides_the_logits():
    p = probs_from_logits(LOGITS, SamplingConfig(temperature=0.5))
    assert torch.allclose(p, PROBS**2 / (PROBS**2).sum(), atol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_top_k_keeps_exactly_k(k):
    p = probs_from_logits(LOGITS, SamplingConfig(temperature=1.0, top_k=k))
    top = PROBS.argsort(descending=True)[:k]
    assert kept(p) == sorted(top.tolist())
    assert torch.allclose(p[top], PROBS[top] / PROBS[top].sum())
    logits = torch.randn(4, 100)
    assert ((probs_from_logits(logits, SamplingConfig(temperature=0.7, top_k=k)) > 0).sum(-1) == k).all()


def test_top_k_at_or_above_the_vocabulary_is_no_filter():
    for k in (5, 9):
        p = probs_from_logits(LOGITS, SamplingConfig(temperature=1.0, top_k=k))
        assert torch.allclose(p, PROBS, atol=1e-6)


def test_top_p_keeps_the_smallest_set_reaching_p():
    # sorted: 0.4 (id 1), 0.3 (id 3), 0.15 (id 4), 0.1 (id 2), 0.05 (id 0)
    cases = {0.39: [1], 0.41: [1, 3], 0.69: [1, 3], 0.71: [1, 3, 4], 0.86: [1, 2, 3, 4], 0.96: [0, 1, 2, 3, 4]}
    for top_p, ids in cases.items():
        p = probs_from_logits(LOGITS, SamplingConfig(temperature=1.0, top_p=top_p))
        assert kept(p) == ids, top_p
        assert torch.allclose(p[ids], PROBS[ids] / PROBS[ids].sum())


def test_top_p_always_keeps_the_top_token():
    p = probs_from_logits(LOGITS, SamplingConfig(temperature=1.0, top_p=0.01))
    assert p.tolist() == [0, 1, 0, 0, 0]
    logits = torch.randn(6, 40) * 5
    p = probs_from_logits(logits, SamplingConfig(temperature=1.0, top_p=1e-6))
    assert torch.equal(p, torch.nn.functional.one_hot(logits.argmax(-1), 40).float())


def test_top_p_applies_after_top_k():
    # top-k 3 leaves {0.4, 0.3, 0.15} / 0.85 = {0.47, 0.35, 0.18}: top-p 0.8 then drops 0.18;
    # top-p alone would keep id 4, since 0.4 + 0.3 < 0.8
    both = probs_from_logits(LOGITS, SamplingConfig(temperature=1.0, top_k=3, top_p=0.8))
    assert kept(both) == [1, 3]
    assert kept(probs_from_logits(LOGITS, SamplingConfig(temperature=1.0, top_p=0.8))) == [1, 3, 4]


@pytest.mark.parametrize(
    "sampling",
    [SamplingConfig(), SamplingConfig(temperature=1.0), SamplingConfig(temperature=0.7, top_k=10, top_p=0.9),
     SamplingConfig(temperature=2.0, top_p=0.5), SamplingConfig(temperature=0.3, top_k=1)],
)
def test_rows_sum_to_one_in_batches(sampling):
    logits = torch.randn(3, 4, 50) * 3
    p = probs_from_logits(logits, sampling)
    assert p.shape == logits.shape and (p >= 0).all()
    assert torch.allclose(p.sum(-1), torch.ones(3, 4), atol=1e-5)


def test_minus_infinity_logits_get_zero_probability():
    # a reduced-vocabulary drafter scores the other tokens -inf
    logits = torch.tensor([float("-inf"), 1.0, float("-inf"), 0.5, 2.0])
    for sampling in (SamplingConfig(temperature=1.0), SamplingConfig(temperature=0.5, top_k=4, top_p=0.95)):
        p = probs_from_logits(logits, sampling)
        assert p[0] == 0 and p[2] == 0 and torch.isclose(p.sum(), torch.tensor(1.0))


def test_sample_follows_the_probabilities():
    generator = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([sample(PROBS, generator) for _ in range(20000)]), minlength=5)
    assert torch.allclose(counts / 20000, PROBS, atol=0.015)
