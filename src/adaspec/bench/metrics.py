"""Task quality metrics: BLEU, ROUGE, GSM8K answer accuracy. Pure functions over strings."""

from __future__ import annotations

import re

import sacrebleu

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")
# an optionally signed, optionally $-prefixed number; thousands commas only in groups of three ("3,4" is two numbers)
_NUMBER = re.compile(r"-?\$?-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def corpus_bleu(hyps: list[str], refs: list[str]) -> float | None:
    """sacrebleu corpus BLEU of hyps against one reference each, 0-100; None when there is nothing to score."""
    if not hyps:
        return None
    return float(sacrebleu.corpus_bleu(hyps, [refs]).score)


def rouge(hyps: list[str], refs: list[str]) -> dict[str, float] | None:
    """Mean ROUGE-1/2/L F1 x 100 (with stemming); None when there is nothing to score."""
    if not hyps:
        return None
    from rouge_score import rouge_scorer  # imports nltk and scipy (half a second): not on every `import` of bench/

    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    scores = [scorer.score(r, h) for h, r in zip(hyps, refs, strict=True)]
    return {k: 100 * sum(s[k].fmeasure for s in scores) / len(scores) for k in ROUGE_KEYS}


def _normalise_number(raw: str) -> str:
    value = raw.replace(",", "").replace("$", "").replace("-", "")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    value = re.sub(r"^0+(?=\d)", "", value)
    return "-" + value if "-" in raw and value != "0" else value


def gsm8k_answer(text: str) -> str | None:
    """The final numeric answer, normalised ("$1,234.00" -> "1234"): the first number after '####' when the
    text has one (GSM8K references end "#### 72"), else the last number in the text; None if there is none."""
    if "####" in text:
        found = _NUMBER.findall(text.rsplit("####", 1)[1])
        return _normalise_number(found[0]) if found else None
    found = _NUMBER.findall(text)
    return _normalise_number(found[-1]) if found else None


def gsm8k_accuracy(hyps: list[str], refs: list[str]) -> float | None:
    """Share (0-1) of hyps whose final number equals the reference's; None when there is nothing to score."""
    if not hyps:
        return None
    hits = 0
    for h, r in zip(hyps, refs, strict=True):
        answer = gsm8k_answer(h)
        hits += answer is not None and answer == gsm8k_answer(r)
    return hits / len(hyps)
