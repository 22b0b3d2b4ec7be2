"""Prompt lookup's n-gram tables find what a backward scan of the whole sequence finds."""

import random

from adaspec.config import SamplingConfig
from adaspec.drafters import DraftContext, PromptLookupDrafter
from adaspec.policies import FixedLength


def scan(ids: list[int], k: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """The reference: the latest earlier occurrence of the longest matching tail, searched backwards."""
    for n in range(min(max_ngram, len(ids) - 1), min_ngram - 1, -1):
        for start in range(len(ids) - n - 1, -1, -1):
            if ids[start: start + n] == ids[-n:]:
                return ids[start + n: start + n + k]
    return []


def test_tables_match_a_full_scan_as_the_sequence_grows_and_changes():
    rng = random.Random(0)
    drafter = PromptLookupDrafter()
    sampling = SamplingConfig()
    for trial in range(30):
        ids = [rng.randrange(6) for _ in range(rng.randrange(1, 12))]
        if trial % 3:
            drafter.reset()  # the decoding loop resets per sequence; a sequence that does not continue rebuilds
        for _ in range(40):
            k = rng.randrange(1, 6)
            got = drafter.propose(DraftContext(ids, k, sampling), FixedLength(k)).tokens
            assert got == scan(ids, k), ids
            ids = ids + [rng.randrange(6) for _ in range(rng.randrange(1, 4))]


def test_a_repeated_phrase_is_copied():
    ids = [5, 6, 7, 8, 9, 1, 2, 5, 6]
    draft = PromptLookupDrafter().propose(DraftContext(ids, 3, SamplingConfig()), FixedLength(3))
    assert draft.tokens == [7, 8, 9] and draft.confidence == [1.0] * 3 and draft.probs is None
