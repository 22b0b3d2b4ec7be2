"""Logit warping: greedy, temperature, top-k, top-p."""

from __future__ import annotations

import torch

from adaspec.config import SamplingConfig
from adaspec.sampling import probs_from_logits

LOGITS = torch.log(torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15]))


def test_greedy_is_one_hot_on_the_argmax():
    assert probs_from_logits(LOGITS, SamplingConfig()).tolist() == [0, 1, 0, 0, 0]


def test_temperature_one_is_the_softmax():
    assert torch.allclose(probs_from_logits(LOGITS, SamplingConfig(temperature=1.0)), LOGITS.exp(), atol=1e-6)


def test_top_k_keeps_exactly_k():
    p = probs_from_logits(LOGITS, SamplingConfig(temperature=1.0, top_k=2))
    assert (p > 0).tolist() == [False, True, False, True, False]
    assert torch.allclose(p[[1, 3]], torch.tensor([0.4, 0.3]) / 0.7)


def test_top_p_keeps_the_smallest_set_reaching_p():
    p = probs_from_logits(LOGITS, SamplingConfig(temperature=1.0, top_p=0.69))  # 0.4 + 0.3 reaches 0.69
    assert (p > 0).tolist() == [False, True, False, True, False]
    p = probs_from_logits(LOGITS, SamplingConfig(temperature=1.0, top_p=0.71))  # needs the 0.15 as well
    assert (p > 0).tolist() == [False, True, False, True, True]
    p = probs_from_logits(LOGITS, SamplingConfig(temperature=1.0, top_p=0.01))  # top-1 always stays
    assert p.tolist() == [0, 1, 0, 0, 0]


def test_rows_sum_to_one_in_batches():
    logits = torch.randn(3, 4, 50)
    p = probs_from_logits(logits, SamplingConfig(temperature=0.7, top_k=10, top_p=0.9))
    assert torch.allclose(p.sum(-1), torch.ones(3, 4), atol=1e-5)
