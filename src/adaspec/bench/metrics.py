"""Task quality metrics: BLEU, ROUGE, GSM8K answer accuracy. Pure functions over strings."""

from __future__ import annotations

import re

import sacrebleu
from rouge_score import rouge_scorer

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def corpus_bleu(hyps: list[str], refs: list[str]) -> float | None:
    """sacrebleu corpus BLEU, 0-100; None when there is nothing to score."""
    if not hyps:
        return None
    return float(sacrebleu.corpus_bleu(hyps, [refs]).score)


def rouge(hyps: list[str], refs: list[str]) -> dict[str, float] | None:
    """Mean ROUGE-1/2/L F1 x 100 (with stemming); None when there is nothing to score."""
    if not hyps:
        return None
    keys = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=True)
    scores = [scorer.score(r, h) for h, r in zip(hyps, refs, strict=True)]
    return {k: 100 * sum(s[k].fmeasure for s in scores) / len(scores) for k in keys}


def _normalise_number(raw: str) -> str:
    value = raw.replace(",", "").replace("$", "").rstrip(".")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value


def gsm8k_answer(text: str) -> str | None:
    """The final numeric answer: what follows '####' (GSM8K references), else the last number in the text."""
    if "####" in text:
        text = text.split("####")[-1]
        found = _NUMBER.findall(text)
        return _normalise_number(found[0]) if found else None
    found = _NUMBER.findall(text)
    return _normalise_number(found[-1]) if found else None


def gsm8k_accuracy(hyps: list[str], refs: list[str]) -> float | None:
    """Share (0-1) of answers whose final number equals the reference's; None when there is nothing to score."""
    if not hyps:
        return None
    hits = [gsm8k_answer(h) is not None and gsm8k_answer(h) == gsm8k_answer(r) for h, r in zip(hyps, refs, strict=True)]
    return sum(hits) / len(hits)
