"""summary.json from records alone (fields as defined in the design), load_records errors, and report.md."""

from __future__ import annotations

import json
import sys

import pytest

from adaspec.bench.report import write_report
from adaspec.bench.summary import RECORD_SCHEMA, load_records, summarize
from adaspec.core.decode import VERIFY
from adaspec.core.errors import AdaspecError

CAT = "the cat sat on the mat with a hat"
NO_DRAFT = {"kind": VERIFY, "drafted": 0, "accepted": 0, "confidence": []}


def record(qid, method, tokens, wall, category="qa", steps=None, text=None, reference=None, turns=None):
    return {"schema": RECORD_SCHEMA, "question_id": qid, "category": category, "method": method,
            "new_tokens": len(tokens), "wall_s": wall, "token_ids": tokens, "text": text or " ".join(map(str, tokens)),
            "turns": turns, "reference": reference, "steps": steps}


def step(drafted, accepted):
    return {"kind": VERIFY, "drafted": drafted, "accepted": accepted, "confidence": [0.9] * drafted}


@pytest.fixture
def records():
    return [
        record(1, "ar", [1, 2, 3, 4, 5, 6], 2.0, steps=[NO_DRAFT] * 6),
        record(2, "ar", [7, 8], 1.0, category="translation", reference=[CAT], text=CAT, steps=[NO_DRAFT] * 2),
        record(1, "sd", [1, 2, 3, 4, 5, 6], 1.0, steps=[step(4, 3), step(4, 1)]),
        record(2, "sd", [7, 9], 0.5, category="translation", reference=[CAT], text=CAT + " twice",
               steps=[step(4, 1)]),
        record(1, "hf", [1, 2, 3, 4, 5, 6], 1.5),  # a peer: steps not visible
        record(3, "hf", [1], 1.0),  # a question `ar` did not answer
    ]


def test_speed_fields_follow_their_definitions(records):
    methods = summarize(records, {"x": 1})["methods"]
    sd = methods["sd"]
    assert (sd["n"], sd["new_tokens"], sd["wall_s"]) == (2, 8, 1.5)
    assert sd["tokens_per_s"] == round(8 / 1.5, 4) == 5.3333
    assert sd["speedup_vs_ar"] == round((8 / 1.5) / (8 / 3.0), 4) == 2.0
    assert methods["ar"]["speedup_vs_ar"] == 1.0


def test_speedup_uses_only_questions_ar_also_answered(records):
    hf = summarize(records, {})["methods"]["hf"]
    assert hf["tokens_per_s"] == round(7 / 2.5, 4)  # all of hf's records
    assert hf["speedup_vs_ar"] == round((6 / 1.5) / (6 / 2.0), 4) == 1.3333  # question 1 only


def test_acceptance_fields_follow_their_definitions(records):
    methods = summarize(records, {})["methods"]
    sd = methods["sd"]
    assert sd["mean_accepted"] == round(8 / 3, 4) == 2.6667  # tokens per target forward
    assert sd["acceptance_rate"] == round(5 / 12, 4) == 0.4167
    assert sd["mean_draft_len"] == 4.0
    ar = methods["ar"]
    assert ar["mean_accepted"] == 1.0 and ar["mean_draft_len"] == 0.0
    assert ar["acceptance_rate"] is None  # nothing drafted


def test_peer_without_steps_has_null_acceptance_fields(records):
    hf = summarize(records, {})["methods"]["hf"]
    assert hf["mean_accepted"] is None and hf["acceptance_rate"] is None and hf["mean_draft_len"] is None


def test_exact_match_and_alignment_compare_with_ar(records):
    methods = summarize(records, {})["methods"]
    assert methods["sd"]["exact_match"] == 0.5
    assert methods["hf"]["exact_match"] == 1.0
    assert methods["ar"]["exact_match"] == 1.0 and methods["ar"]["alignment"] == pytest.approx(100)
    assert 0 < methods["sd"]["alignment"] < 100


def test_task_quality_only_where_the_category_has_references(records):
    methods = summarize(records, {})["methods"]
    assert methods["ar"]["bleu"] == pytest.approx(100)
    assert 0 < methods["sd"]["bleu"] < 100
    assert methods["hf"]["bleu"] is None  # no translation record
    for name in ("ar", "sd", "hf"):
        m = methods[name]
        assert m["rouge1"] is None and m["rouge2"] is None and m["rougeL"] is None and m["gsm8k_acc"] is None


def test_task_quality_scores_the_first_turn_against_the_first_reference():
    records = [
        record(1, "ar", [1], 1.0, category="summarization", text="x", turns=["the cat sat", "more"],
               reference=["the cat sat", "other"]),
        record(2, "ar", [1], 1.0, category="math_reasoning", text="so 6\n\nthen 9", turns=["so 6", "then 9"],
               reference=["#### 6", "#### 9"]),
        record(3, "ar", [1], 1.0, category="math_reasoning", text="it is 4", reference=["#### 5"]),
        record(4, "ar", [1], 1.0, category="math_reasoning", text="7"),  # no reference: not scored
    ]
    ar = summarize(records, {})["methods"]["ar"]
    assert (ar["rouge1"], ar["rouge2"], ar["rougeL"]) == (100.0, 100.0, 100.0)
    assert ar["gsm8k_acc"] == 0.5
    assert ar["bleu"] is None


def test_per_category_has_the_same_fields(records):
    summary = summarize(records, {"x": 1})
    assert summary["config"] == {"x": 1}
    sd = summary["methods"]["sd"]
    assert set(sd["per_category"]) == {"qa", "translation"}
    assert set(sd["per_category"]["qa"]) == set(sd) - {"per_category", "vs_peers"}  # the peers: whole run only
    assert sd["per_category"]["qa"]["exact_match"] == 1.0
    assert sd["per_category"]["translation"]["exact_match"] == 0.0
    assert sd["per_category"]["qa"]["speedup_vs_ar"] == 2.0  # 6/1.0 vs 6/2.0
    assert sd["per_category"]["qa"]["bleu"] is None
    assert summary["methods"]["hf"]["per_category"]["qa"]["n"] == 2


def test_summary_without_ar_has_no_comparisons():
    sd = summarize([record(1, "sd", [1, 2], 1.0, steps=[step(2, 1)])], {})["methods"]["sd"]
    assert sd["speedup_vs_ar"] is None and sd["exact_match"] is None and sd["alignment"] is None
    assert sd["mean_accepted"] == 2.0


def test_summary_is_json_serialisable(records):
    summary = summarize(records, {})
    assert json.loads(json.dumps(summary)) == summary


def test_load_records_reads_jsonl_and_skips_blank_lines(tmp_path, records):
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records[:2]) + "\n\n")
    assert load_records(path) == records[:2]
    assert load_records(str(path)) == records[:2]


def test_load_records_names_file_and_line_of_malformed_json(tmp_path, records):
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps(records[0]) + "\n{oops\n")
    with pytest.raises(AdaspecError, match=r"records\.jsonl:2: malformed record"):
        load_records(path)


def test_load_records_names_missing_fields(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"question_id": 1}\n')
    with pytest.raises(AdaspecError, match=r"records\.jsonl:1: record lacks category, method"):
        load_records(path)


def test_load_records_of_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(AdaspecError, match="no such records file"):
        load_records(tmp_path / "records.jsonl")


def test_report_has_tables_costs_and_histogram(tmp_path, records):
    summary = summarize(records, {"target": "smollm2"})
    summary["costs"] = {"verify_ms": {"1": 36.1, "6": 57.6}, "verify_ratio": {"6": 1.6}, "context_tokens": 40}
    path = write_report(summary, records, tmp_path / "run")
    text = path.read_text()
    assert path == tmp_path / "run" / "report.md"
    assert '"target": "smollm2"' in text
    # backend, TTFT and decode rate: – (records without them)
    assert "| sd | – | 5.33 | 2.00 | – | – | 2.67 | 0.42 | 4.00 | 0.50 |" in text
    assert "| hf | – | 2.80 | 1.33 | – | – | – | – | – |" in text
    assert "| method | all | qa | translation |" in text and "| hf | 1.33 | 1.33 | – |" in text
    assert "| sd | 2.00 [2.00, 2.00] | 2.00 | 2.00 |" in text  # 2 questions (both 2x): a bootstrap interval
    assert "| torch | – | ms | 36.10 | 57.60 |" in text and "| torch | – | ratio | – | 1.60 |" in text
    assert "on a 40-token context" in text
    assert "](plots/acceptance_hist.png)" in text
    assert (tmp_path / "run" / "plots" / "acceptance_hist.png").stat().st_size > 1000


def test_report_without_drafting_methods_has_no_histogram(tmp_path):
    records = [record(1, "ar", [1, 2], 1.0, steps=[NO_DRAFT] * 2), record(1, "hf", [1, 2], 0.5)]
    text = write_report(summarize(records, {}), records, tmp_path).read_text()
    assert "no acceptance histogram" in text and "Measured costs" not in text
    assert not (tmp_path / "plots").exists()


def test_report_without_matplotlib_says_so(tmp_path, records, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # importing it now raises ImportError
    text = write_report(summarize(records, {}), records, tmp_path).read_text()
    assert "matplotlib is not installed" in text and "| sd |" in text
    assert not (tmp_path / "plots").exists()


def test_a_method_on_another_backend_is_also_compared_with_ar_on_its_own_backend(tmp_path):
    def on(backend, *args, **kw):
        return {**record(*args, **kw), "backend": backend}

    lc, pt = "llamacpp:q4_1", "torch:float32"
    rs = [on(lc, 1, "ar", [1, 2, 3, 4], 1.0), on(lc, 2, "ar", [5, 6], 1.0),
          on(lc, 1, "sd", [1, 2, 3, 4], 0.5), on(lc, 2, "sd", [5, 6], 0.5),
          on(pt, 1, "ar:backend=torch", [1, 2, 3, 9], 4.0), on(pt, 2, "ar:backend=torch", [5, 7], 4.0),
          on(pt, 1, "specbound", [1, 2, 3, 9], 2.0), on(pt, 2, "specbound", [5, 8], 8.0)]
    methods = summarize(rs, {})["methods"]
    assert methods["sd"]["backend"] == lc and "vs_backend_ar" not in methods["sd"]  # ar's own backend
    assert "vs_backend_ar" not in methods["ar:backend=torch"]  # the reference itself
    v = methods["specbound"]["vs_backend_ar"]
    assert v["baseline"] == "ar:backend=torch" and v["backend"] == pt
    assert v["exact_match"] == 0.5  # question 1 equal to torch's ar, question 2 not
    assert methods["specbound"]["exact_match"] == 0.0  # against llama.cpp's ar: neither
    assert v["speedup"] == pytest.approx(methods["specbound"]["speedup_vs_ar"] * 8 / 2)  # torch's ar: 4x slower
    report = write_report(summarize(rs, {}), rs, tmp_path).read_text()
    assert "## Against `ar` on the method's own backend" in report
    assert "| specbound | torch:float32 | ar:backend=torch |" in report


def test_time_to_first_token_and_the_decode_rate_after_it():
    rs = [{**record(1, "ar", [1] * 10, 2.0), "turn_ttft_s": [0.2, 0.4], "turn_wall_s": [1.0, 1.0],
           "turn_new_tokens": [4, 6]},
          {**record(2, "ar", [1] * 5, 1.0), "turn_ttft_s": [None], "turn_wall_s": [1.0], "turn_new_tokens": [5]}]
    fields = summarize(rs, {})["methods"]["ar"]
    assert fields["ttft_ms"] == pytest.approx(300.0)  # per turn, over the turns that observed it
    assert fields["decode_tokens_per_s"] == pytest.approx((3 + 5) / (0.8 + 0.6), abs=1e-4)  # the first is TTFT's
    assert summarize([record(1, "ar", [1], 1.0)], {})["methods"]["ar"]["ttft_ms"] is None


def test_every_method_is_compared_with_every_peer_in_the_run(tmp_path):
    rs = [record(1, "ar", [1, 2, 3, 4], 1.0), record(2, "ar", [5, 6], 1.0),
          record(1, "sd", [1, 2, 3, 4], 0.5), record(2, "sd", [5, 6], 0.5),
          record(1, "llamacpp", [1, 2, 3, 4], 0.8), record(2, "llamacpp", [5, 6], 0.8),
          record(1, "hf-lookup:k=4", [1, 2, 3, 4], 2.0)]  # one question only
    methods = summarize(rs, {})["methods"]
    assert methods["sd"]["vs_peers"]["llamacpp"]["speedup"] == pytest.approx(0.8 / 0.5)
    assert methods["sd"]["vs_peers"]["hf-lookup:k=4"]["speedup"] == pytest.approx(2.0 / 0.5)  # question 1 alone
    assert methods["sd"]["vs_peers"]["hf-lookup:k=4"]["speedup_ci_lo"] is None  # no interval from one question
    assert methods["ar"]["vs_peers"]["llamacpp"]["speedup"] == pytest.approx(0.8)
    assert "llamacpp" not in methods["llamacpp"].get("vs_peers", {})  # not against itself
    assert methods["llamacpp"]["vs_peers"]["hf-lookup:k=4"]["speedup"] == pytest.approx(2.0 / 0.8)
    report = write_report(summarize(rs, {}), rs, tmp_path).read_text()
    assert "## Against the peers" in report and "| method | vs hf-lookup:k=4 | vs llamacpp |" in report
    assert "| sd | 4.00 | 1.60 [" in report


def test_pairs_measured_far_apart_are_counted_and_left_out_of_the_together_speedup(tmp_path):
    # question 1: sd measured with ar (2x); question 2: sd rerun an hour later on a faster machine state (4x)
    at = {(1, "ar"): 1000.0, (1, "sd"): 1010.0, (2, "ar"): 1020.0, (2, "sd"): 4620.0}
    rs = [record(1, "ar", [1] * 10, 2.0), record(1, "sd", [1] * 10, 1.0),
          record(2, "ar", [1] * 10, 2.0), record(2, "sd", [1] * 10, 0.5)]
    for r in rs:
        r["tstamp"] = at[r["question_id"], r["method"]]
    summary = summarize(rs, {})
    sd = summary["methods"]["sd"]
    assert sd["measured_apart"] == 1
    assert sd["speedup_vs_ar"] == round(20 / 1.5 / (20 / 4.0), 4)  # every pair
    assert sd["speedup_together"] == 2.0  # question 1 alone
    assert summary["methods"]["ar"]["measured_apart"] == 0 and summary["methods"]["ar"]["speedup_together"] is None
    report = write_report(summary, rs, tmp_path).read_text()
    assert "## Measured apart" in report and "| sd | 1 | 2.67 [2.00, 4.00] | 2.00 |" in report
    for r in rs:  # all measured together: no section
        r["tstamp"] = 1000.0
    assert "## Measured apart" not in write_report(summarize(rs, {}), rs, tmp_path).read_text()
    for r in rs:  # records without a time: unknown, not zero
        del r["tstamp"]
    assert summarize(rs, {})["methods"]["sd"]["measured_apart"] is None
