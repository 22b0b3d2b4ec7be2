"""Quality metrics and the summary computed from records alone."""

from __future__ import annotations

import pytest

from adaspec.bench.metrics import corpus_bleu, gsm8k_accuracy, gsm8k_answer, rouge
from adaspec.bench.summary import load_records, summarize
from adaspec.errors import AdaspecError


def test_bleu_and_rouge_of_identical_text_are_perfect():
    assert corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100)
    assert rouge(["the cat sat"], ["the cat sat"]) == {"rouge1": 100, "rouge2": 100, "rougeL": 100}
    assert corpus_bleu([], []) is None and rouge([], []) is None


@pytest.mark.parametrize(
    ("text", "answer"),
    [("The answer is $1,234.", "1234"), ("so 3+2 = <<3+2=5>>5\n#### 5", "5"), ("it costs 72.00 dollars", "72"),
     ("first 3 then 4.5", "4.5"), ("no numbers here", None), ("#### -7", "-7")],
)
def test_gsm8k_answer_extraction(text, answer):
    assert gsm8k_answer(text) == answer


def test_gsm8k_accuracy_compares_final_numbers():
    assert gsm8k_accuracy(["It is 5.", "It is 6."], ["#### 5", "#### 5"]) == 0.5


def record(qid, method, tokens, wall, category="qa", steps=None, text=None, reference=None):
    return {"question_id": qid, "category": category, "method": method, "new_tokens": len(tokens), "wall_s": wall,
            "token_ids": tokens, "text": text or " ".join(map(str, tokens)), "reference": reference, "steps": steps}


CAT = "the cat sat on the mat with a hat"


def test_summary_fields_follow_their_definitions():
    steps = [{"drafted": 4, "accepted": 3, "confidence": []}, {"drafted": 4, "accepted": 1, "confidence": []}]
    records = [
        record(1, "ar", [1, 2, 3, 4, 5, 6], 2.0, steps=[{"drafted": 0, "accepted": 0, "confidence": []}] * 6),
        record(2, "ar", [7, 8], 1.0, category="translation", reference=[CAT], text=CAT,
               steps=[{"drafted": 0, "accepted": 0, "confidence": []}] * 2),
        record(1, "sd", [1, 2, 3, 4, 5, 6], 1.0, steps=steps),
        record(2, "sd", [7, 9], 0.5, category="translation", reference=[CAT], text=CAT + " twice", steps=steps[1:]),
        record(1, "hf", [1, 2, 3, 4, 5, 6], 1.5),
    ]
    methods = summarize(records, {"x": 1})["methods"]
    assert methods["ar"]["speedup_vs_ar"] == 1.0 and methods["ar"]["mean_accepted"] == 1.0
    sd = methods["sd"]
    assert sd["tokens_per_s"] == pytest.approx(8 / 1.5, abs=1e-4)
    assert sd["speedup_vs_ar"] == pytest.approx((8 / 1.5) / (8 / 3.0), abs=1e-4)
    assert sd["mean_accepted"] == pytest.approx(8 / 3, abs=1e-4)
    assert sd["acceptance_rate"] == pytest.approx(5 / 12, abs=1e-4) and sd["mean_draft_len"] == 4.0
    assert sd["exact_match"] == 0.5
    assert sd["per_category"]["qa"]["exact_match"] == 1.0 and sd["per_category"]["translation"]["exact_match"] == 0
    assert methods["ar"]["bleu"] == pytest.approx(100) and sd["bleu"] < 100
    hf = methods["hf"]
    assert hf["mean_accepted"] is None and hf["acceptance_rate"] is None and hf["bleu"] is None
    assert hf["speedup_vs_ar"] == pytest.approx((6 / 1.5) / (6 / 2.0), abs=1e-4)  # on question 1 only
    assert sd["rougeL"] is None and sd["gsm8k_acc"] is None


def test_summary_without_ar_has_no_comparisons():
    methods = summarize([record(1, "sd", [1, 2], 1.0)], {})["methods"]
    assert methods["sd"]["speedup_vs_ar"] is None and methods["sd"]["exact_match"] is None
    assert methods["sd"]["alignment"] is None


def test_malformed_record_line_is_named(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"a": 1}\n{oops\n')
    with pytest.raises(AdaspecError, match="records.jsonl:2"):
        load_records(path)
