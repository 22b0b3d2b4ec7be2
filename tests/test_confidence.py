"""CM-ASD confidence metrics: ranges, extremes, monotonicity, reduced vocabularies, bad weights."""

from __future__ import annotations

import math

import pytest
import torch

from adaspec.core.confidence import (
    ConfidenceEnsemble,
    entropy_confidence,
    margin_confidence,
    softmax_margin_confidence,
)
from adaspec.core.errors import AdaspecError

UNIFORM = torch.zeros(10)
PEAKED = torch.tensor([20.0] + [0.0] * 9)


def test_uniform_is_least_and_peaked_most_confident():
    assert float(entropy_confidence(UNIFORM)) == pytest.approx(0.0, abs=1e-6)
    assert float(entropy_confidence(PEAKED)) == pytest.approx(1.0, abs=1e-4)
    assert float(margin_confidence(UNIFORM)) == pytest.approx(0.5)
    assert float(margin_confidence(PEAKED)) == pytest.approx(1.0, abs=1e-6)
    assert float(softmax_margin_confidence(UNIFORM)) == pytest.approx(0.0, abs=1e-6)
    assert float(softmax_margin_confidence(PEAKED)) == pytest.approx(1.0, abs=1e-6)


def test_values_match_their_formulas():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    p = torch.softmax(logits, -1)
    h = float(-(p * p.log()).sum())
    assert float(entropy_confidence(logits)) == pytest.approx(1 - h / math.log(4), abs=1e-6)
    assert float(margin_confidence(logits, scale=2.0)) == pytest.approx(1 / (1 + math.exp(-0.5)), abs=1e-6)
    assert float(softmax_margin_confidence(logits)) == pytest.approx(float(p[0] - p[1]), abs=1e-6)


def test_confidence_grows_as_the_distribution_sharpens():
    base = torch.randn(50, generator=torch.Generator().manual_seed(0))
    for metric in (entropy_confidence, margin_confidence, softmax_margin_confidence):
        values = [float(metric(base * t)) for t in (0.5, 1.0, 2.0, 4.0)]
        assert values == sorted(values), metric.__name__


def test_reduced_vocabulary_counts_only_finite_logits():
    logits = torch.full((100,), float("-inf"))
    logits[:4] = 0.0  # uniform over 4 tokens
    assert float(entropy_confidence(logits)) == pytest.approx(0.0, abs=1e-6)
    one = torch.full((100,), float("-inf"))
    one[7] = 3.0
    assert float(margin_confidence(one)) == pytest.approx(1.0)


def test_ensemble_is_the_weighted_sum_and_batched():
    logits = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(1))
    ens = ConfidenceEnsemble(0.5, 0.3, 0.2, scale=2.0)
    parts = ens.components(logits)
    expected = 0.5 * parts["entropy"] + 0.3 * parts["margin"] + 0.2 * parts["softmax"]
    assert torch.allclose(ens(logits), expected) and ens(logits).shape == (3, 5)
    assert ((ens(logits) >= 0) & (ens(logits) <= 1)).all()
    assert torch.equal(ConfidenceEnsemble(only="softmax")(logits), parts["softmax"])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"l1": 0.5, "l2": 0.5, "l3": 0.5}, "sum to 1"), ({"l1": -0.2, "l2": 0.6, "l3": 0.6}, ">= 0"),
    ({"scale": 0.0}, "scale"), ({"only": "vibes"}, "unknown confidence metric"),
])
def test_bad_ensemble_options_are_refused(kwargs, message):
    with pytest.raises(AdaspecError, match=message):
        ConfidenceEnsemble(**kwargs)
