"""records.jsonl's schema: every record says its version and every step its kind; `load_records` migrates records
written before (schema 0) once, and refuses records from a newer adaspec."""

from __future__ import annotations

import copy
import json

import pytest

from adaspec.bench.rundir import rebuild
from adaspec.bench.runner import step_record
from adaspec.bench.summary import RECORD_SCHEMA, load_records
from adaspec.core.decode import ROUTE, STEP_KINDS, VERIFY, Step
from adaspec.core.errors import AdaspecError

RUN_BACKEND = "llamacpp:q4_1"  # the run's backend (costs.json's `backend`): where methods without backend= ran


def v0(qid: int, method: str, tokens: list[int], wall: float, steps: list[dict] | None) -> dict:
    """A record as adaspec wrote it before records had a schema: no `schema`, no step `kind`, no `costs_key`."""
    return {"question_id": qid, "category": "qa", "method": method, "new_tokens": len(tokens), "wall_s": wall,
            "token_ids": tokens, "text": " ".join(map(str, tokens)), "turns": None, "reference": None,
            "steps": steps, "turn_new_tokens": [len(tokens)], "turn_wall_s": [wall], "turn_ttft_s": [wall / 4],
            "turn_steps": [len(steps)] if steps else [None]}


def drafted(k: int, accepted: int, ms: float) -> dict:
    return {"drafted": k, "accepted": accepted, "confidence": [0.9] * k, "ms": ms}


def routed(source: str, ms: float) -> dict:
    return {"drafted": 0, "accepted": 0, "confidence": [], "source": source, "entropy": 0.25, "ms": ms}


def v0_records() -> list[dict]:
    """A run on llama.cpp: ar and sd there, ar and sd on torch, R-Stitch (one routed step per token), a peer."""
    out = []
    for q in (1, 2):
        out += [v0(q, "ar", [1, 2, 3, 4], 1.0, [drafted(0, 0, 250.0)] * 4),
                v0(q, "sd", [1, 2, 3, 4], 0.5, [drafted(3, 2, 200.0), drafted(3, 0, 100.0)]),
                v0(q, "ar:backend=torch", [1, 2, 3, 4], 2.0, [drafted(0, 0, 500.0)] * 4),
                v0(q, "sd:backend=torch,k=2", [1, 2, 3, 4], 1.0, [drafted(2, 2, 500.0), drafted(2, 0, 500.0)]),
                v0(q, "rstitch", [1, 2, 3, 4], 0.8, [routed("small", 100.0), routed("large", 300.0),
                                                     routed("small", 100.0), routed("small", 100.0)]),
                v0(q, "llamacpp", [1, 2, 3, 4], 0.9, None)]
    return out


# what adaspec writes now for each method of that run: the backend whose costs apply (None: none measured)
COSTS_KEY = {"ar": RUN_BACKEND, "sd": RUN_BACKEND, "ar:backend=torch": "torch", "sd:backend=torch,k=2": "torch",
             "rstitch": RUN_BACKEND, "llamacpp": None}


def v1(record: dict) -> dict:
    """The same record as adaspec writes it now, written out by hand (not by the migration under test)."""
    out = {"schema": 1, **copy.deepcopy(record), "costs_key": COSTS_KEY[record["method"]]}
    for s in out["steps"] or []:
        s["kind"] = "route" if record["method"] == "rstitch" else "verify"
    return out


COSTS = {"backend": RUN_BACKEND, "verify_ms": {"1": 200.0, "4": 300.0}, "drafter_first_ms": 1.0,
         "drafter_step_ms": 0.5, "backends": {
             RUN_BACKEND: {"verify_ms": {"1": 200.0, "4": 300.0}, "drafter_first_ms": 1.0, "drafter_step_ms": 0.5},
             "torch": {"verify_ms": {"1": 400.0, "3": 420.0}, "drafter_first_ms": 2.0, "drafter_step_ms": 1.0}}}


def write_run(path, records: list[dict]):
    path.mkdir()
    (path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "config.json").write_text(json.dumps({"methods": sorted({r["method"] for r in records})}))
    (path / "costs.json").write_text(json.dumps(COSTS))
    return path


def test_a_record_without_schema_gets_its_step_kinds_once_at_load(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in v0_records()))
    records = load_records(path)
    assert all(r["schema"] == RECORD_SCHEMA for r in records)
    kinds = {r["method"]: {s["kind"] for s in r["steps"] or []} for r in records}
    assert kinds["rstitch"] == {ROUTE}
    assert kinds["ar"] == kinds["sd"] == kinds["sd:backend=torch,k=2"] == {VERIFY}
    assert kinds["llamacpp"] == set()  # a peer: no steps to say anything of
    assert set().union(*kinds.values()) <= set(STEP_KINDS)
    assert "costs_key" not in records[0]  # the run's backend not given: unknown, not guessed
    keyed = load_records(path, RUN_BACKEND)
    assert {r["method"]: r["costs_key"] for r in keyed} == COSTS_KEY


def test_a_record_of_the_current_schema_is_read_as_written(tmp_path):
    path = tmp_path / "records.jsonl"
    rows = [v1(r) for r in v0_records()]
    rows[4]["steps"][0]["kind"] = VERIFY  # what a record says is what is read: nothing re-inferred from fields
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_records(path, RUN_BACKEND) == rows


def test_a_record_from_a_newer_adaspec_is_refused_with_its_file_and_line(tmp_path):
    path = tmp_path / "records.jsonl"
    future = {**v1(v0_records()[0]), "schema": RECORD_SCHEMA + 1}
    path.write_text(json.dumps(v1(v0_records()[0])) + "\n\n" + json.dumps(future) + "\n")
    with pytest.raises(AdaspecError, match=rf"records\.jsonl:3: record schema {RECORD_SCHEMA + 1} is newer than this "
                                           rf"adaspec reads \(up to {RECORD_SCHEMA}\)"):
        load_records(path)
    path.write_text(json.dumps({**future, "schema": "1"}) + "\n")
    with pytest.raises(AdaspecError, match=r"records\.jsonl:1: record schema '1' is not a version"):
        load_records(path)


def test_summary_and_report_of_old_records_equal_those_of_the_same_records_written_now(tmp_path):
    old = write_run(tmp_path / "old", v0_records())
    new = write_run(tmp_path / "new", [v1(r) for r in v0_records()])
    summary = rebuild(old)
    assert rebuild(new) == summary
    assert (old / "summary.json").read_bytes() == (new / "summary.json").read_bytes()
    assert (old / "report.md").read_bytes() == (new / "report.md").read_bytes()
    # what the kinds and costs keys decide: R-Stitch's steps are tokens, not target forwards; each method is
    # bound with its own backend's costs and against `ar` there; a peer has no bound
    methods = summary["methods"]
    assert methods["rstitch"]["large_share"] == 0.25 and methods["rstitch"]["mean_accepted"] is None
    assert methods["sd"]["mean_accepted"] == 2.0 and methods["sd"]["mean_draft_len"] == 3.0
    assert summary["forward_ms"]["rstitch"] == {"large": [300.0, 2], "small": [100.0, 4]}
    assert summary["bound"]["sd"]["backend"] == RUN_BACKEND and summary["bound"]["sd"]["measured_speedup"] == 2.0
    assert summary["bound"]["sd:backend=torch,k=2"]["backend"] == "torch"
    assert summary["bound"]["sd:backend=torch,k=2"]["measured_speedup"] == 2.0  # against ar on torch
    assert set(summary["bound"]) == {"ar", "sd", "ar:backend=torch", "sd:backend=torch,k=2"}


def test_a_step_record_carries_its_kind():
    forward = step_record(Step(3, 2, [7, 8, 9], [0.9, 0.8, 0.1]))
    assert forward["kind"] == VERIFY and "source" not in forward
    token = step_record(Step(0, 0, [7], source="large", entropy=0.5, kind=ROUTE))
    assert token["kind"] == ROUTE and (token["source"], token["entropy"]) == ("large", 0.5)
