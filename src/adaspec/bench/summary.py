"""summary.json from records.jsonl alone: per method and per category, speed, acceptance, agreement
with `ar`, and task quality. A field that does not apply is None (null), never a made-up number."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from adaspec.bench.metrics import corpus_bleu, gsm8k_accuracy, rouge
from adaspec.errors import AdaspecError

BASELINE = "ar"


def load_records(path: Path) -> list[dict]:
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise AdaspecError(f"{path}:{n}: malformed record ({e.msg})") from None
    return records


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def _first_turn(r: dict) -> str:
    return (r.get("turns") or [r["text"]])[0]


def _with_reference(records: list[dict], category: str) -> tuple[list[str], list[str]]:
    chosen = [r for r in records if r["category"] == category and r.get("reference")]
    return [_first_turn(r) for r in chosen], [r["reference"][0] for r in chosen]


def method_fields(records: list[dict], baseline: dict[object, dict]) -> dict:
    """Fields for one method's records; `baseline` maps question_id -> the `ar` record (may be empty)."""
    new_tokens = sum(r["new_tokens"] for r in records)
    wall = sum(r["wall_s"] for r in records)
    steps = [s for r in records if r.get("steps") for s in r["steps"]]
    with_steps = [r for r in records if r.get("steps")]
    drafted = sum(s["drafted"] for s in steps)
    fields: dict = {
        "n": len(records),
        "new_tokens": new_tokens,
        "wall_s": round(wall, 4),
        "tokens_per_s": _ratio(new_tokens, wall),
        "speedup_vs_ar": None,
        "mean_accepted": _ratio(sum(r["new_tokens"] for r in with_steps), len(steps)),
        "acceptance_rate": _ratio(sum(s["accepted"] for s in steps), drafted),
        "mean_draft_len": _ratio(drafted, len(steps)),
        "exact_match": None,
        "alignment": None,
    }
    paired = [(r, baseline[r["question_id"]]) for r in records if r["question_id"] in baseline]
    if paired:
        base_tps = _ratio(sum(b["new_tokens"] for _, b in paired), sum(b["wall_s"] for _, b in paired))
        tps = _ratio(sum(r["new_tokens"] for r, _ in paired), sum(r["wall_s"] for r, _ in paired))
        fields["speedup_vs_ar"] = _ratio(tps, base_tps) if tps is not None and base_tps else None
        fields["exact_match"] = sum(r["token_ids"] == b["token_ids"] for r, b in paired) / len(paired)
        fields["alignment"] = corpus_bleu([r["text"] for r, _ in paired], [b["text"] for _, b in paired])
    fields["bleu"] = corpus_bleu(*_with_reference(records, "translation"))
    scores = rouge(*_with_reference(records, "summarization"))
    fields.update(scores or {"rouge1": None, "rouge2": None, "rougeL": None})
    fields["gsm8k_acc"] = gsm8k_accuracy(*_with_reference(records, "math_reasoning"))
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in fields.items()}


def summarize(records: list[dict], config: dict) -> dict:
    by_method: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_method[r["method"]].append(r)
    baseline = {r["question_id"]: r for r in by_method.get(BASELINE, [])}
    methods = {}
    for name, rs in by_method.items():
        fields = method_fields(rs, baseline)
        by_category: dict[str, list[dict]] = defaultdict(list)
        for r in rs:
            by_category[r["category"]].append(r)
        fields["per_category"] = {c: method_fields(crs, baseline) for c, crs in sorted(by_category.items())}
        methods[name] = fields
    return {"config": config, "methods": methods}
