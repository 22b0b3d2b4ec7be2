"""Spec-Bench interop: its answer files, written from records.jsonl alone.

Spec-Bench (`evaluation/eval.py`) writes one JSONL per method, `model_answer/<model_id>.jsonl`, one line per
question: `question_id`, `category`, `answer_id`, `model_id`, `choices` = [{`index`, `turns` (one answer per
user turn), `decoding_steps`, `new_tokens`, `wall_time` (per turn), `accept_lengths` (tokens emitted per target
forward, all turns)}], `tstamp`; its `evaluation/speed.py` reads `new_tokens`, `wall_time` and
`accept_lengths`. We write the same shape per method, `model_id` = `<target>-<method>`, `answer_id` a UUID
derived from (model_id, question_id) so a rebuild writes the same file. A peer's forwards are not visible:
its `decoding_steps` are null and `accept_lengths` empty. Records written before per-turn fields existed give
a multi-turn question's totals as one entry.

Reading goes the other way through bench/data.py: any JSONL whose lines have `turns` (Spec-Bench's
question.jsonl) is a question file, multi-turn questions answered turn by turn.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

ANSWER_DIR = "model_answer"


def model_id(target: str, method: str) -> str:
    return f"{target}-{method}"


def file_name(model: str) -> str:
    """A file name for a model id: anything but letters, digits, '.', '_' and '-' becomes '-'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", model).strip("-") + ".jsonl"


def answer_line(record: dict, model: str, tstamp: float) -> dict:
    """One Spec-Bench answer line from one record."""
    turns = record.get("turns") or [record["text"]]
    per_turn = "turn_new_tokens" in record
    steps = record.get("steps")
    if per_turn:
        new_tokens, wall = record["turn_new_tokens"], record["turn_wall_s"]
        decoding_steps = record.get("turn_steps") or [None] * len(turns)
    else:  # older records: totals only
        new_tokens, wall = [record["new_tokens"]], [record["wall_s"]]
        decoding_steps = [len(steps) if steps else None]
    choice = {"index": 0, "turns": turns, "decoding_steps": decoding_steps, "new_tokens": new_tokens,
              "wall_time": wall, "accept_lengths": [s["accepted"] + 1 for s in steps or []]}
    return {"question_id": record["question_id"], "category": record["category"],
            "answer_id": uuid.uuid5(uuid.NAMESPACE_URL, f"adaspec/{model}/{record['question_id']}").hex,
            "model_id": model, "choices": [choice], "tstamp": record.get("tstamp", tstamp)}


def write_answers(records: list[dict], target: str, out_dir: Path, tstamp: float = 0.0) -> list[Path]:
    """out_dir/model_answer/<target>-<method>.jsonl for every method in `records`, lines in record order;
    `tstamp` stands in for records that carry none. Returns the paths written."""
    by_method: dict[str, list[dict]] = {}
    for r in records:
        by_method.setdefault(r["method"], []).append(r)
    folder = out_dir / ANSWER_DIR
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for method, rs in by_method.items():
        model = model_id(target, method)
        path = folder / file_name(model)
        path.write_text("".join(json.dumps(answer_line(r, model, tstamp)) + "\n" for r in rs))
        paths.append(path)
    return paths
