"""Benchmark questions: any JSONL whose lines have `question_id`, `turns` (user turns) and optionally
`category` and `reference` (Spec-Bench's question.jsonl shape)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from adaspec.core.errors import AdaspecError

DEFAULT_DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "specbench_dev.jsonl"


@dataclass(frozen=True)
class Question:
    question_id: int | str
    category: str
    turns: list[str]
    reference: list[str] | None = None


def load_questions(path: Path, categories: list[str] | None = None, limit: int | None = None) -> list[Question]:
    """Read questions; keep the given categories (in file order); at most `limit` per category."""
    if not path.is_file():
        raise AdaspecError(f"data file {path} not found; pass --data PATH to a JSONL with `turns`")
    questions: list[Question] = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            turns = row["turns"]
            if not (isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns)):
                raise ValueError("`turns` must be a non-empty list of strings")
            q = Question(row.get("question_id", n), row.get("category", "default"), turns, row.get("reference"))
        except (ValueError, KeyError, TypeError) as e:
            raise AdaspecError(f"{path}:{n}: not a question line ({e})") from None
        questions.append(q)
    present = sorted({q.category for q in questions})
    if categories:
        unknown = [c for c in categories if c not in present]
        if unknown:
            raise AdaspecError(f"unknown categories {unknown}; {path.name} has: {', '.join(present)}")
        questions = [q for q in questions if q.category in categories]
    if limit is not None:
        if limit < 1:
            raise AdaspecError(f"--limit must be >= 1, got {limit}")
        seen: dict[str, int] = {}
        kept = []
        for q in questions:
            seen[q.category] = seen.get(q.category, 0) + 1
            if seen[q.category] <= limit:
                kept.append(q)
        questions = kept
    return questions
