"""KV cache rollback: a rolled-back cache continues exactly like a fresh forward of the same sequence."""

from __future__ import annotations

import pytest
import torch
from conftest import random_prompt, tiny_backend

from adaspec.backends import TorchBackend
from adaspec.cache import crop_cache


@pytest.fixture
def backend():
    return tiny_backend(0)


def full_logits(backend, ids):
    with torch.inference_mode():
        return backend.model(torch.tensor([ids])).logits[0].float()


def test_rollback_then_extend_matches_a_fresh_forward(backend):
    ids = random_prompt(0, length=14)
    backend.extend(ids[:10])
    backend.extend(ids[10:14])
    backend.rollback(11)
    assert backend.tokens == ids[:11] and backend.cache.get_seq_length() == 11
    new = [5, 6, 7]
    logits = backend.extend(new, keep=3)
    assert torch.allclose(logits, full_logits(backend, ids[:11] + new)[-3:], atol=1e-5)


def test_sync_feeds_only_the_missing_suffix(backend):
    ids = random_prompt(1, length=12)
    backend.sync(ids[:8])
    assert backend.tokens == ids[:8]
    logits = backend.sync(ids, keep=2)
    assert backend.tokens == ids
    assert torch.allclose(logits, full_logits(backend, ids)[-2:], atol=1e-5)
    diverged = ids[:5] + [9, 9]
    logits = backend.sync(diverged)
    assert backend.tokens == diverged and backend.cache.get_seq_length() == 7
    assert torch.allclose(logits[-1], full_logits(backend, diverged)[-1], atol=1e-5)
    backend.sync(diverged)  # already cached: the last position is re-scored, nothing else
    assert backend.tokens == diverged


def test_crop_beyond_the_cache_is_refused(backend):
    backend.extend(random_prompt(2, length=4))
    with pytest.raises(ValueError, match="cannot crop"):
        crop_cache(backend.cache, 9)


def test_reset_empties_the_cache(backend):
    backend.extend(random_prompt(3, length=4))
    backend.reset()
    assert backend.tokens == [] and backend.cache.get_seq_length() == 0


def test_reduced_vocab_head_scores_only_its_rows():
    model = tiny_backend(0).model
    vocab = [2, 5, 9, 30]
    reduced = TorchBackend(model, vocab)
    full = TorchBackend(model)
    ids = random_prompt(4, length=6)
    r, f = reduced.extend(ids, keep=2), full.extend(ids, keep=2)
    assert torch.allclose(r[:, vocab], f[:, vocab], atol=1e-5)
    others = [i for i in range(64) if i not in vocab]
    assert torch.isinf(r[:, others]).all()
