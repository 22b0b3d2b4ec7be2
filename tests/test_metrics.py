"""Quality metrics: BLEU, ROUGE, GSM8K answer extraction and accuracy."""

from __future__ import annotations

import pytest

from adaspec.bench.metrics import corpus_bleu, gsm8k_accuracy, gsm8k_answer, rouge


def test_bleu_of_identical_text_is_100_and_of_disjoint_text_is_0():
    assert corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100)
    assert corpus_bleu(["a b c d e"], ["v w x y z"]) == 0.0


def test_rouge_of_identical_text_is_100_for_every_key():
    assert rouge(["the cat sat"], ["the cat sat"]) == {"rouge1": 100, "rouge2": 100, "rougeL": 100}


def test_rouge_is_mean_f1_times_100():
    scores = rouge(["the cat sat", "a dog"], ["the cat sat", "the bird"])
    assert scores["rouge1"] == pytest.approx(50.0)  # 100 and 0


def test_rouge_stems_words():
    assert rouge(["cats running"], ["cat runs"])["rouge1"] == pytest.approx(100)


def test_metrics_of_nothing_are_none():
    assert corpus_bleu([], []) is None and rouge([], []) is None and gsm8k_accuracy([], []) is None


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("The answer is $1,234.", "1234"),
        ("#### 72", "72"),
        ("no numbers", None),
        ("so 3+2 = <<3+2=5>>5 apples\n#### 5", "5"),
        ("it costs 72.00 dollars", "72"),
        ("it is 72.0", "72"),
        ("first 3 then 4.5", "4.5"),
        ("half is 0.50", "0.5"),
        ("#### -7", "-7"),
        ("she lost $-5 or -$5", "-5"),
        ("#### 1,000,000", "1000000"),
        ("pick 3,4", "4"),
        ("#### no number after the marker", None),
    ],
)
def test_gsm8k_answer_extraction(text, answer):
    assert gsm8k_answer(text) == answer


def test_gsm8k_answer_prefers_the_marker_over_later_numbers():
    assert gsm8k_answer("#### 18\nThat took 2 steps.") == "18"


def test_gsm8k_accuracy_compares_final_numbers():
    hyps = ["It is 5.", "It is 6.", "It is $5.00"]
    assert gsm8k_accuracy(hyps, ["#### 5", "#### 5", "#### 5"]) == pytest.approx(2 / 3)


def test_gsm8k_accuracy_counts_a_hyp_without_number_as_wrong():
    assert gsm8k_accuracy(["no idea"], ["#### 5"]) == 0.0
