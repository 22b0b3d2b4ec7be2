"""KV cache rollback: a rolled-back cache continues exactly like a fresh forward of the same sequence, and
`sync` feeds a cache exactly the positions it is missing."""

from __future__ import annotations

import pytest
import torch
from conftest import full_logits, random_prompt, tiny_backend

from adaspec.core.backends import TorchBackend
from adaspec.core.cache import cache_length, crop_cache
from adaspec.core.errors import AdaspecError

ATOL = 1e-5


@pytest.fixture
def backend():
    return tiny_backend(0, scale=4.0)


def record_feeds(backend) -> list[list[int]]:
    """Spy on the backend: every list of ids actually fed to the model, in order."""
    fed: list[list[int]] = []
    forward = backend._forward

    def spy(ids, keep):
        fed.append(ids[0].tolist())
        return forward(ids, keep)

    backend._forward = spy
    return fed


def assert_cache_holds(backend, ids: list[int]) -> None:
    assert backend.tokens == ids and cache_length(backend.cache) == len(ids)


def test_rollback_then_extend_matches_a_fresh_forward(backend):
    ids = random_prompt(0, length=14)
    first = backend.extend(ids[:10], keep=10)
    assert torch.allclose(first, full_logits(backend.model, ids[:10]), atol=ATOL)
    backend.extend(ids[10:14])
    backend.rollback(11)
    assert_cache_holds(backend, ids[:11])
    new = [(t + 1) % 64 for t in ids[11:14]]  # three tokens different from the ones rolled back
    logits = backend.extend(new, keep=3)
    assert torch.allclose(logits, full_logits(backend.model, ids[:11] + new)[-3:], atol=ATOL)
    assert_cache_holds(backend, ids[:11] + new)


@pytest.mark.parametrize("length", [0, 1, 7, 13, 14])
def test_rollback_to_any_length_continues_like_a_fresh_forward(backend, length):
    ids = random_prompt(1, length=14)
    backend.extend(ids)
    backend.rollback(length)
    assert_cache_holds(backend, ids[:length])
    new = [3, 60, 17]
    logits = backend.extend(new, keep=3)
    assert torch.allclose(logits, full_logits(backend.model, ids[:length] + new)[-3:], atol=ATOL)


def test_repeated_rollbacks_do_not_drift(backend):
    # the verify loop rolls back every step: many small crops must leave an exact cache
    ids = random_prompt(2, length=6)
    backend.extend(ids)
    for step in range(10):
        draft = random_prompt(100 + step, length=4)
        backend.extend(draft)
        backend.rollback(len(ids) + 1)  # keep the first drafted token only
        ids = ids + draft[:1]
    assert_cache_holds(backend, ids)
    logits = backend.extend([5], keep=1)
    assert torch.allclose(logits[-1], full_logits(backend.model, ids + [5])[-1], atol=ATOL)


def test_rollback_beyond_the_cache_is_a_no_op(backend):
    ids = random_prompt(3, length=5)
    backend.extend(ids)
    backend.rollback(9)
    assert_cache_holds(backend, ids)


def test_sync_feeds_only_the_missing_suffix(backend):
    fed = record_feeds(backend)
    ids = random_prompt(4, length=12)
    backend.sync(ids[:8])
    assert fed == [ids[:8]]
    assert_cache_holds(backend, ids[:8])
    logits = backend.sync(ids, keep=2)
    assert fed[-1] == ids[8:]  # only the 4 missing positions
    assert_cache_holds(backend, ids)
    assert torch.allclose(logits, full_logits(backend.model, ids)[-2:], atol=ATOL)


def test_sync_with_a_diverging_sequence_rolls_back_to_the_common_prefix(backend):
    ids = random_prompt(5, length=12)
    backend.sync(ids)
    fed = record_feeds(backend)
    diverged = ids[:5] + [(ids[5] + 1) % 64, 9]
    logits = backend.sync(diverged)
    assert fed == [diverged[5:]]  # rolled back to the 5 common tokens, fed the 2 new ones
    assert_cache_holds(backend, diverged)
    assert torch.allclose(logits[-1], full_logits(backend.model, diverged)[-1], atol=ATOL)


def test_sync_of_a_shorter_prefix_rescores_only_its_last_position(backend):
    ids = random_prompt(6, length=12)
    backend.sync(ids)
    fed = record_feeds(backend)
    logits = backend.sync(ids[:6])
    assert fed == [ids[5:6]]
    assert_cache_holds(backend, ids[:6])
    assert torch.allclose(logits[-1], full_logits(backend.model, ids[:6])[-1], atol=ATOL)
    backend.sync(ids[:6])  # already cached: the last position is re-scored, nothing else
    assert fed[-1] == ids[5:6]
    assert_cache_holds(backend, ids[:6])


def test_sync_feeds_at_least_keep_positions(backend):
    ids = random_prompt(7, length=12)
    backend.sync(ids[:10])
    fed = record_feeds(backend)
    logits = backend.sync(ids, keep=5)  # 2 positions missing, 5 asked for: the last 5 are re-fed
    assert fed == [ids[7:]] and logits.shape == (5, 64)
    assert torch.allclose(logits, full_logits(backend.model, ids)[-5:], atol=ATOL)
    assert_cache_holds(backend, ids)


def test_reset_empties_the_cache(backend):
    backend.extend(random_prompt(8, length=4))
    backend.reset()
    assert_cache_holds(backend, [])
    ids = random_prompt(9, length=3)
    assert torch.allclose(backend.extend(ids)[-1], full_logits(backend.model, ids)[-1], atol=ATOL)


def test_crop_cache_rejects_a_length_beyond_the_cache(backend):
    backend.extend(random_prompt(10, length=4))
    with pytest.raises(ValueError, match="cannot crop"):
        crop_cache(backend.cache, 9)
    with pytest.raises(ValueError, match="cannot crop"):
        crop_cache(backend.cache, -1)
    crop_cache(backend.cache, 4)  # to its own length: nothing happens
    assert cache_length(backend.cache) == 4
    crop_cache(backend.cache, 2)
    assert cache_length(backend.cache) == 2


def test_extending_past_the_context_is_refused_and_leaves_the_cache_alone():
    backend = tiny_backend(0, context=16)
    ids = random_prompt(11, length=12)
    backend.extend(ids)
    with pytest.raises(AdaspecError, match="context of 16"):
        backend.extend([1, 2, 3, 4, 5])
    assert_cache_holds(backend, ids)
    backend.extend([1, 2, 3, 4])  # exactly full is fine
    assert len(backend.tokens) == 16


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
    reduced.extend([7, 8])
    reduced.rollback(6)
    r2 = reduced.extend([9], keep=1)
    assert torch.allclose(r2[-1, vocab], full_logits(model, ids + [9])[-1, vocab], atol=1e-5)
