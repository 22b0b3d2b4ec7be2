"""Prompt lookup: its n-gram tables find what a backward scan of the whole sequence finds, and how sure it is."""

import random

import pytest

from adaspec.core.config import SamplingConfig
from adaspec.core.drafters import DraftContext, PromptLookupDrafter
from adaspec.core.drafters.lookup import acceptance
from adaspec.core.errors import AdaspecError


def scan(ids: list[int], k: int, max_ngram: int = 3, min_ngram: int = 1, candidates: int = 8,
         max_match: int = 32) -> list[int]:
    """The reference: of the `candidates` latest earlier occurrences of the longest matching tail, searched
    backwards, the one whose preceding tokens match the context furthest back (the latest of equals)."""
    def match(end: int) -> int:
        m = 0
        while m < max_match and m < end and ids[end - 1 - m] == ids[-1 - m]:
            m += 1
        return m

    for n in range(min(max_ngram, len(ids) - 1), min_ngram - 1, -1):
        ends = [start + n for start in range(len(ids) - n - 1, -1, -1) if ids[start: start + n] == ids[-n:]]
        if ends:
            best = max(ends[:candidates], key=match)  # max keeps the first (latest) of equals
            return ids[best: best + k]
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
            got = drafter.propose(DraftContext(ids, k, sampling)).tokens
            assert got == scan(ids, k), ids
            ids = ids + [rng.randrange(6) for _ in range(rng.randrange(1, 4))]


def test_a_repeated_phrase_is_copied_with_the_chance_each_token_is_kept():
    ids = [5, 6, 7, 8, 9, 1, 2, 5, 6]
    draft = PromptLookupDrafter().propose(DraftContext(ids, 3, SamplingConfig()))
    assert draft.tokens == [7, 8, 9] and draft.probs is None
    # (5, 6) matched 2 tokens back, then 3 and 4 with each copied token; every n-gram seen once: agreement 1/2
    assert draft.confidence == [acceptance(2, 0.5), acceptance(3, 0.5), acceptance(4, 0.5)] == [0.605, 0.69, 0.746]


def test_of_several_occurrences_the_one_matching_furthest_back_is_copied():
    ids = [5, 6, 7, 8, 1, 2, 3, 40, 0, 0, 1, 2, 3, 50, 5, 6, 7, 8, 1, 2, 3]
    draft = PromptLookupDrafter().propose(DraftContext(ids, 2, SamplingConfig()))
    assert draft.tokens == [40, 0]  # not 50 after the latest (1, 2, 3), preceded by 0 where the context has 8
    assert draft.confidence[0] == acceptance(7, 1 / 3)  # 7 tokens match; (1, 2, 3) went on to 40 once of twice


def test_the_acceptance_prior_rises_with_the_match_and_the_agreement():
    for agreement in (0.2, 0.6, 0.9):
        row = [acceptance(m, agreement) for m in (1, 2, 4, 7, 10, 20)]
        assert row[0] < row[-1] and all(0 < a < 1 for a in row)
    for m in (1, 3, 6, 9, 13):
        assert acceptance(m, 0.1) < acceptance(m, 0.6) < acceptance(m, 0.8)


def test_bad_options_are_refused():
    for kwargs in ({"max_ngram": 0}, {"candidates": 0}, {"max_match": 2}):
        with pytest.raises(AdaspecError, match="lookup needs"):
            PromptLookupDrafter(**kwargs)
