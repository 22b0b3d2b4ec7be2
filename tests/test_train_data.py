"""Self-distillation data: reproducible synthetic prompts, never Spec-Bench, resumable generation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adaspec.train.prompts import context_prompts, direct_prompts, passage_prompts

DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "specbench_dev.jsonl"


def test_prompts_are_reproducible_from_the_seed_and_varied():
    assert direct_prompts(50, seed=3) == direct_prompts(50, seed=3)
    assert direct_prompts(50, seed=3) != direct_prompts(50, seed=4)
    prompts = direct_prompts(500, seed=0)
    assert {p.kind for p in prompts} >= {"writing", "math", "translation", "coding", "qa"}
    assert len({p.text for p in prompts}) > 400


def test_no_prompt_is_a_spec_bench_question():
    questions = {t.strip() for line in DEV.read_text().splitlines() for t in json.loads(line)["turns"]}
    prompts = direct_prompts(3000, seed=0) + passage_prompts(300, seed=0)
    assert not questions & {p.text.strip() for p in prompts}


def test_context_prompts_wrap_the_passages():
    prompts = context_prompts([("Write a news article about glaciers.", "PASSAGE TEXT")] * 20, seed=0)
    assert all("PASSAGE TEXT" in p.text for p in prompts)
    assert {p.kind for p in prompts} == {"summarization", "rag"}


@pytest.mark.bundled
def test_generation_appends_and_resumes(tmp_path):
    from adaspec.core.models import load_model
    from adaspec.train.data import generate_corpus, read_corpus

    model = load_model()
    prompts = direct_prompts(5, seed=1)
    path = tmp_path / "corpus.jsonl"
    generate_corpus(model, prompts[:3], path, batch_size=2, max_new_tokens=6)
    generate_corpus(model, prompts, path, batch_size=2, max_new_tokens=6)  # resumes at row 3
    rows = read_corpus(path)
    assert [r["prompt"] for r in rows] == [p.text for p in prompts]
    assert all(1 <= len(r["completion_ids"]) <= 6 for r in rows)
    text = model.tokenizer.decode(rows[0]["prompt_ids"])
    assert prompts[0].text in text and text.endswith("<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="another run"):
        generate_corpus(model, prompts[:2], path)
