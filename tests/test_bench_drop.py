"""scripts/bench-drop.py: which records it drops so that a resumed `adaspec bench` remeasures them together."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench-drop.py"
_spec = importlib.util.spec_from_file_location("bench_drop", SCRIPT)
bench_drop = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_drop)


def run_dir(tmp_path: Path, ends: dict[tuple[int, str], float | None]) -> Path:
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps({"methods": ["ar", "sd"]}))
    (tmp_path / "records.jsonl").write_text("".join(
        json.dumps({"question_id": q, "method": m, "wall_s": 5.0} | ({} if end is None else {"tstamp": end})) + "\n"
        for (q, m), end in ends.items()))
    return tmp_path


@pytest.fixture
def kept(monkeypatch):
    """kept(run, *options): the (question, method) pairs left in run's records after bench-drop with options."""
    def drop(run: Path, *args: str) -> set[tuple[int, str]]:
        monkeypatch.setattr(sys, "argv", ["bench-drop.py", str(run), *args])
        bench_drop.main()
        records = map(json.loads, (run / "records.jsonl").read_text().splitlines())
        return {(r["question_id"], r["method"]) for r in records}
    return drop


def test_apart_drops_every_record_of_a_question_measured_far_apart(tmp_path, kept):
    run = run_dir(tmp_path, {(1, "ar"): 100.0, (1, "sd"): 110.0, (2, "ar"): 120.0, (2, "sd"): 120.0 + 3600,
                             (3, "ar"): None, (3, "sd"): None})  # records without a time: kept
    assert kept(run, "--apart") == {(1, "ar"), (1, "sd"), (3, "ar"), (3, "sd")}
    assert list(tmp_path.glob("records.jsonl.*.bak"))  # the old file is kept


def test_pauses_drop_the_overlapping_record_and_with_incomplete_its_question(tmp_path, kept):
    ends = {(1, "ar"): 100.0, (1, "sd"): 110.0, (2, "ar"): 200.0, (2, "sd"): 210.0}
    (tmp_path / "pauses.log").write_text("stop 206.0\ncont 207.0\n")  # inside question 2's sd record
    pauses = ("--pauses", str(tmp_path / "pauses.log"))
    assert kept(run_dir(tmp_path / "a", ends), *pauses) == {(1, "ar"), (1, "sd"), (2, "ar")}
    assert kept(run_dir(tmp_path / "b", ends), *pauses, "--incomplete") == {(1, "ar"), (1, "sd")}
