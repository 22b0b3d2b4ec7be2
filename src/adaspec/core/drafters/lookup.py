"""Prompt lookup decoding (Saxena 2023): copy what followed an earlier occurrence of the last n tokens. No model,
no cost; strong on summarization, extraction, translation and code editing.

Two things beyond the plain method, both from the evidence a copy has (as suffix decoding, Oliaro et al. 2024,
scores its candidates by frequency):

- **Which occurrence.** Of the most recent `candidates` occurrences of the longest matching n-gram (n <= max_ngram),
  the one whose preceding tokens match the context furthest back (up to `max_match`; ties: the latest). A 3-gram
  match preceded by 20 matching tokens is a repeated passage; one preceded by nothing is a coincidence.
- **How sure.** Each drafted token carries the chance that the target keeps it, given that it keeps the ones before
  it, from two signals: how far back the context matches the copied source at that token (the match length m,
  plus one per token copied after it) and how often the longest n-gram ending there was followed by that token
  (agreement = count / (occurrences + 1)). `ACCEPTANCE` maps them to a probability; it was measured by replaying
  the bundled model's greedy outputs on the Spec-Bench dev split (every turn, llama.cpp) through this drafter,
  23k proposals: from 0.15 (m = 1, agreement < 0.5) to 0.999 (m > 12, agreement >= 0.75). It is a prior: CostAware
  refines it online per confidence bin (costmodel.py), and CM-ASD reads it as the drafter's confidence (a copy has
  no logits for the entropy and margin metrics).

The search is a table per n-gram size from each n-gram to its starts and to the tokens that followed it, extended
with the tokens added since the last call: a step costs what it adds, not a scan of the whole context (a backward
scan costs Python time in proportion to the context, every step)."""

from __future__ import annotations

from bisect import bisect_right
from collections import Counter

from adaspec.core.drafters.base import Draft, DraftContext, Hidden
from adaspec.core.errors import AdaspecError

# P(the target keeps a copied token | it keeps the ones before it) by match-length bin and agreement bin, measured
# on the dev split (module docstring). Match-length bins: upper bounds of m; agreement bins: < 0.5, < 0.75, >= 0.75.
MATCH_BINS = (1, 2, 3, 5, 8, 12)
AGREEMENT_BINS = (0.5, 0.75)
ACCEPTANCE = (
    (0.150, 0.380, 0.755),  # m = 1
    (0.280, 0.605, 0.829),  # m = 2
    (0.266, 0.690, 0.858),  # m = 3
    (0.411, 0.746, 0.962),  # m = 4-5
    (0.497, 0.825, 0.981),  # m = 6-8
    (0.541, 0.886, 0.997),  # m = 9-12
    (0.823, 0.939, 0.999),  # m > 12
)


def acceptance_bin(match: int, agreement: float) -> tuple[int, int]:
    """(row, column) of `ACCEPTANCE` for a copied token's match length and agreement."""
    row = next((i for i, top in enumerate(MATCH_BINS) if match <= top), len(MATCH_BINS))
    return row, bisect_right(AGREEMENT_BINS, agreement)


def acceptance(match: int, agreement: float) -> float:
    """The prior chance that a copied token is kept (`ACCEPTANCE`), for its match length and agreement."""
    row, column = acceptance_bin(match, agreement)
    return ACCEPTANCE[row][column]


class PromptLookupDrafter:
    name = "lookup"
    wants_hidden = False

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, candidates: int = 8, max_match: int = 32) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise AdaspecError(f"lookup needs 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        if candidates < 1 or max_match < max_ngram:
            raise AdaspecError(f"lookup needs candidates >= 1 and max_match >= max_ngram, got {candidates}, "
                               f"{max_match}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.candidates = candidates
        self.max_match = max_match
        self.reset()

    def reset(self) -> None:
        self.seen: list[int] = []  # the sequence the tables index
        sizes = range(self.min_ngram, self.max_ngram + 1)
        # n -> {n-gram: its starts s, oldest first}, over the starts whose n-gram has a token after it
        self.starts: dict[int, dict[tuple[int, ...], list[int]]] = {n: {} for n in sizes}
        # n -> {n-gram: Counter of the tokens that followed it} (their total: the n-gram's number of starts)
        self.follows: dict[int, dict[tuple[int, ...], Counter]] = {n: {} for n in sizes}

    def index(self, ids: list[int]) -> None:
        """Bring the tables up to `ids`: extend them when `ids` continues the indexed sequence, else rebuild."""
        old = len(self.seen)
        if len(ids) < old or ids[:old] != self.seen:
            self.reset()
            old = 0
        for n in self.starts:
            starts, follows = self.starts[n], self.follows[n]
            for s in range(max(0, old - n), len(ids) - n):  # the starts that gained a following token
                gram = tuple(ids[s: s + n])
                starts.setdefault(gram, []).append(s)
                follows.setdefault(gram, Counter())[ids[s + n]] += 1
        self.seen.extend(ids[old:])

    def match_length(self, ids: list[int], end: int) -> int:
        """How many tokens before `end` equal the last ones of `ids` (at most max_match)."""
        m = 0
        while m < self.max_match and m < end and ids[end - 1 - m] == ids[-1 - m]:
            m += 1
        return m

    def source(self, ids: list[int]) -> tuple[int, int] | None:
        """(where the copy starts, its match length) for the longest matching n-gram, None without a match."""
        for n in range(min(self.max_ngram, len(ids) - 1), self.min_ngram - 1, -1):
            starts = self.starts[n].get(tuple(ids[-n:]))
            if starts:  # the longest match; of equals, the latest start
                match, best = max((self.match_length(ids, s + n), s) for s in starts[-self.candidates:])
                return best + n, match
        return None

    def agreement(self, context: list[int], token: int) -> float:
        """count / (occurrences + 1) of `token` after the longest indexed n-gram ending `context` (0 if none)."""
        for n in range(min(self.max_ngram, len(context)), self.min_ngram - 1, -1):
            gram = tuple(context[-n:])
            follows = self.follows[n].get(gram)
            if follows:
                return follows[token] / (len(self.starts[n][gram]) + 1)
        return 0.0

    def propose(self, ctx: DraftContext) -> Draft:
        ids = ctx.ids
        self.index(ids)
        found = self.source(ids)
        if found is None:
            return Draft()
        start, match = found
        follow = ids[start: start + ctx.k_max]
        confidence: list[float] = []
        for i, token in enumerate(follow):
            confidence.append(acceptance(match + i, self.agreement(ids[-self.max_ngram:] + follow[:i], token)))
            # the policy may stop early (CM-ASD's early stop), as after a model drafter's token
            if not ctx.keep_drafting(confidence):
                break
        return Draft(follow[: len(confidence)], None, confidence)

    def observe(self, accepted: int, ids: list[int], hidden: Hidden | None = None) -> None:
        pass
