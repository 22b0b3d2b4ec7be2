"""Evaluation a researcher can trust: the speedup's bootstrap interval, the analytic bound, `adaspec report`
rebuilding a run from its records, `adaspec compare`, Spec-Bench answer files, multi-turn questions, the
environment in every record, and `adaspec sweep --ray` writing what the sequential sweep writes."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import tiny_llama
from typer.testing import CliRunner

from adaspec.bench.bound import expected_speedup, forward_ms, method_bound, method_costs, token_acceptance
from adaspec.bench.data import load_questions
from adaspec.bench.report import _backend_drafters, _ceiling, _forward_ms
from adaspec.bench.rundir import build_summary, compare, rebuild
from adaspec.bench.stats import bootstrap_speedup_ci, paired_speedup
from adaspec.bench.summary import RECORD_SCHEMA, summarize
from adaspec.cli import app
from adaspec.core.config import GenerationConfig
from adaspec.core.costmodel import Costs, alpha_needed, best_draft_length, expected_tokens, interpolate
from adaspec.core.decode import ROUTE, VERIFY, GenerationResult
from adaspec.core.errors import AdaspecError

# ---------------------------------------------------------------- a tiny model directory with a tokenizer

WORDS = ["<unk>", "<s>", "</s>", "<pad>", "user", "assistant", ":"] + [f"w{i}" for i in range(57)]  # 64 tokens
TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}assistant : {% endif %}")


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = TEMPLATE
    return fast


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A local Hugging Face model directory: a tiny random Llama (peaked, so it repeats itself and prompt lookup
    drafts get accepted) with a 64-word tokenizer and a chat template."""
    path = tmp_path_factory.mktemp("models") / "tiny"
    model = tiny_llama(3, scale=6.0)
    model.config.update(dict(bos_token_id=1, eos_token_id=2, pad_token_id=3))
    model.save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


def words(seed: int, n: int = 12) -> str:
    rng = random.Random(seed)
    return " ".join(f"w{rng.randrange(57)}" for _ in range(n))


QUESTIONS = [
    {"question_id": 1, "category": "translation", "turns": [words(1)], "reference": [words(1)]},
    {"question_id": 2, "category": "math_reasoning", "turns": [words(2)], "reference": ["#### 5"]},
    {"question_id": 3, "category": "writing", "turns": [words(3), words(4, 6)]},  # multi-turn, no reference
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "questions.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return path


# ---------------------------------------------------------------- bootstrap interval

def noisy_pairs(n: int, seed: int) -> list[tuple[float, float, float, float]]:
    """n questions: the method takes ~0.5 of ar's time, each question's times noisy."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        tokens = rng.randint(20, 120)
        ar = tokens * 0.04 * rng.lognormvariate(0, 0.2)
        pairs.append((tokens, ar * 0.5 * rng.lognormvariate(0, 0.3), tokens, ar))
    return pairs


def test_bootstrap_interval_contains_the_speedup_and_narrows_with_more_questions():
    small, large = noisy_pairs(12, 0), noisy_pairs(300, 1)
    for pairs in (small, large):
        lo, hi = bootstrap_speedup_ci(pairs)
        assert lo < paired_speedup(pairs) < hi
        assert lo < 2.0 < hi or abs(paired_speedup(pairs) - 2.0) < 0.15
    assert bootstrap_speedup_ci(large)[1] - bootstrap_speedup_ci(large)[0] < \
        0.5 * (bootstrap_speedup_ci(small)[1] - bootstrap_speedup_ci(small)[0])
    assert bootstrap_speedup_ci(small) == bootstrap_speedup_ci(small)  # fixed seed: reproducible
    assert bootstrap_speedup_ci(small[:1]) is None  # one question has no interval


def test_speedup_is_the_ratio_of_aggregate_rates():
    pairs = [(10, 1.0, 10, 2.0), (30, 1.0, 30, 4.0)]
    assert paired_speedup(pairs) == pytest.approx((40 / 2.0) / (40 / 6.0)) == pytest.approx(3.0)
    lo, hi = bootstrap_speedup_ci(pairs)
    assert 2.0 <= lo <= 3.0 <= hi <= 4.0  # every resample is one of 2, 3 (mixed) or 4


# ---------------------------------------------------------------- analytic bound

def test_expected_tokens_follow_leviathan_et_al():
    assert expected_tokens(0.8, 4) == pytest.approx((1 - 0.8 ** 5) / 0.2) == pytest.approx(3.3616)
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(0.5, 0) == 1.0  # a forward without a draft emits its one token


def test_alpha_needed_inverts_the_bound():
    flat = Costs({"1": 10.0, "8": 10.0})  # scoring 8 positions costs one step: k = 7 at no extra cost
    # E(7) = (1 - alpha^8) / (1 - alpha) = 2 just above alpha = 0.5 (E = 1.992 there)
    alpha = alpha_needed(2.0, flat)
    assert 0.5 < alpha < 0.51 and best_draft_length(alpha, flat)[1] >= 2.0 > best_draft_length(alpha - 0.002, flat)[1]
    assert alpha_needed(9.0, flat) is None  # 8 tokens a forward at most
    linear = Costs({"1": 10.0, "8": 80.0})  # verify(n) = n steps: no draft pays
    assert alpha_needed(1.1, linear) is None and alpha_needed(1.0, linear) <= 0.001
    dear = Costs({"1": 10.0, "8": 10.0}, draft_first_ms=10.0, draft_step_ms=10.0)  # a drafter as dear as the target
    assert alpha_needed(1.3, dear) is None


def test_ceiling_table_in_the_report(tmp_path):
    costs = {"context_tokens": 78, "backends": {"llamacpp:shipped": {
        "verify_ms": {"1": 13.326, "2": 17.812, "4": 27.499, "6": 37.477, "8": 48.234}, "drafter": "lookup",
        "drafter_first_ms": 0.003, "drafter_step_ms": 0.0}, "torch:float32": {"verify_ms": {"1": 50.0, "8": 55.0}}}}
    lines = _ceiling(_backend_drafters(costs))
    assert lines[0] == "## What these costs allow"
    rows = {line.split(" | ")[0].strip("| "): line for line in lines if line.startswith("| llamacpp") or
            line.startswith("| torch")}
    assert "| 1.12 (k=1) |" in rows["llamacpp:shipped"] and rows["llamacpp:shipped"].endswith("| 0.93 | 0.97 |")
    assert "| free |" in rows["torch:float32"]  # no drafter measured there: what a free one could do
    assert _ceiling(_backend_drafters({"backend": "torch"})) == []  # no verify curve, no table


def test_expected_speedup_against_hand_computed_values():
    costs = Costs({"1": 10.0, "5": 13.0}, draft_first_ms=1.0, draft_step_ms=1.0)  # c_draft 0.1, verify(5) 1.3
    tokens, cost, speedup = expected_speedup(0.8, [(4, 4)], costs)
    assert (tokens, cost) == (pytest.approx(3.3616), pytest.approx(0.4 + 1.3))
    assert speedup == pytest.approx(3.3616 / 1.7) == pytest.approx(1.97741, abs=1e-5)
    # a first drafted token dearer than the next ones: 3 + 3 * 1 ms = 0.6 target steps
    assert expected_speedup(0.8, [(4, 4)], Costs({"1": 10.0, "5": 13.0}, 3.0, 1.0))[1] == pytest.approx(1.9)
    # varying lengths: E and the cost averaged over forwards (a forward with no draft costs one step, emits one)
    tokens, cost, speedup = expected_speedup(0.8, [(0, 0), (4, 4)], costs)
    assert (tokens, cost) == (pytest.approx((1 + 3.3616) / 2), pytest.approx((1 + 1.7) / 2))
    # tokens drafted but cut before verification are paid for, not verified
    assert expected_speedup(0.8, [(4, 6)], costs)[1] == pytest.approx(0.6 + 1.3)


def test_verify_cost_interpolates_between_and_beyond_measured_sizes():
    table = {"1": 10.0, "4": 13.0, "6": 15.0}
    assert interpolate(table, 4) == 13.0
    assert interpolate(table, 5) == pytest.approx(14.0)
    assert interpolate(table, 8) == pytest.approx(17.0)  # the last slope, extended
    assert interpolate(table, 2) == pytest.approx(11.0)


def test_token_acceptance_counts_one_rejection_per_short_forward():
    steps = [{"drafted": 4, "accepted": 3}, {"drafted": 4, "accepted": 1}, {"drafted": 4, "accepted": 4},
             {"drafted": 0, "accepted": 0}]
    assert token_acceptance(steps) == pytest.approx(8 / (8 + 2))
    assert token_acceptance([{"drafted": 0, "accepted": 0}]) is None


def test_method_bound_splits_the_time_per_forward():
    step = {"kind": VERIFY, "drafted": 4, "accepted": 3, "confidence": [1.0] * 4}
    records = [{"question_id": 1, "method": "sd", "new_tokens": 8, "wall_s": 0.04, "steps": [step, step]}]
    costs = Costs({"1": 10.0, "5": 13.0}, 1.0, 1.0)
    b = method_bound(records, costs, measured_speedup=1.5)
    assert b["alpha"] == 0.75  # 3 accepted, 1 rejected, twice
    assert b["expected_tokens_per_step"] == pytest.approx((1 - 0.75 ** 5) / 0.25, abs=1e-4) == 3.0508
    assert b["measured_tokens_per_step"] == 4.0
    assert b["expected_speedup"] == pytest.approx(3.05078 / 1.7, abs=1e-4)
    assert b["efficiency"] == pytest.approx(1.5 / (3.05078 / 1.7), abs=1e-4)
    assert (b["ms_per_step"], b["draft_ms"], b["verify_ms"]) == (20.0, 4.0, 13.0)
    assert b["overhead_ms"] == pytest.approx(3.0) and b["measured_step_cost"] == 2.0


def test_the_prefill_forward_is_not_counted_as_a_decoding_step():
    """Each turn's first step is the prefill (timed as its TTFT): left out of the time per forward, with every
    token it emits, drafted ones it accepted included."""
    step = {"kind": VERIFY, "drafted": 4, "accepted": 3, "confidence": [1.0] * 4}
    first = {"kind": VERIFY, "drafted": 0, "accepted": 0, "confidence": []}
    records = [{"question_id": 1, "category": "qa", "method": "sd", "new_tokens": 10, "wall_s": 0.54,
                "token_ids": [1] * 10, "text": "", "turns": None, "reference": None, "turn_ttft_s": [0.5, 0.0],
                "turn_wall_s": [0.52, 0.02], "turn_new_tokens": [5, 5], "turn_steps": [2, 2],
                "steps": [first, step, first, step]}]  # two turns: prefill + one decoding forward each
    b = method_bound(records, Costs({"1": 10.0, "5": 13.0}, 1.0, 1.0), measured_speedup=1.0)
    assert b["ms_per_step"] == pytest.approx(20.0)  # 40 ms over 2 decoding forwards, not 540 over 4
    assert b["measured_tokens_per_step"] == 4.0
    records[0].update(turn_ttft_s=[0.5, None], turn_steps=[2, 1], steps=[first, step, step])  # no TTFT: whole turn
    assert method_bound(records, Costs({"1": 10.0, "5": 13.0}, 1.0, 1.0), 1.0)["ms_per_step"] == pytest.approx(
        (20 + 20) / 2)
    # a prefill that accepts 2 tokens copied
    lookup = {"kind": VERIFY, "drafted": 2, "accepted": 2, "confidence": [1.0] * 2}
    records[0].update(turn_ttft_s=[0.5, 0.0], turn_new_tokens=[7, 5], new_tokens=12, turn_steps=[2, 2],
                      steps=[lookup, step, first, step])
    assert method_bound(records, Costs({"1": 10.0, "5": 13.0}, 1.0, 1.0), 1.0)["measured_tokens_per_step"] == 4.0
    summary = summarize(records, {})["methods"]["sd"]
    assert summary["decode_tokens_per_s"] == pytest.approx(8 / 0.04)  # 4 + 4 tokens after the prefills
    assert summary["ttft_ms"] == pytest.approx(250.0)
    records[0].pop("turn_steps")  # older records: one whole turn, no TTFT
    assert summarize(records, {})["methods"]["sd"]["decode_tokens_per_s"] is None


def test_time_per_forward_is_measured_by_positions_scored_and_by_router_source(tmp_path):
    """Each turn's prefill step is left out; steps without `ms` (older runs) are not counted."""
    def step(drafted, ms, kind=VERIFY, **extra):
        return {"kind": kind, "drafted": drafted, "accepted": 0, "confidence": [1.0] * drafted, "ms": ms, **extra}
    sd = {"method": "sd", "turn_steps": [3, 2],
          "steps": [step(4, 500.0), step(4, 20.0), step(0, 10.0), step(2, 900.0), step(4, 30.0)]}
    routed = {"method": "rstitch", "turn_steps": [3],
              "steps": [step(0, 99.0, ROUTE, source="small"), step(0, 2.0, ROUTE, source="small"),
                        step(0, 12.0, ROUTE, source="large")]}
    old = {"method": "ar", "turn_steps": [2], "steps": [{"kind": VERIFY, "drafted": 0, "accepted": 0,
                                                          "confidence": []}] * 2}
    times = forward_ms([sd, routed, old, {**sd, "turn_steps": None}])
    assert times == {"sd": {"1": [10.0, 1], "5": [25.0, 2]}, "rstitch": {"large": [12.0, 1], "small": [2.0, 1]}}
    costs = {"backends": {"llamacpp:Q4_1": {"verify_ms": {"1": 11.0, "5": 21.0}}}}
    table = "\n".join(_forward_ms(times, costs))
    assert "| sd | 10.0 (1) | 25.0 (2) | – | – |" in table
    assert "| costs: verify (llamacpp:Q4_1) | 11.00 | 21.00 | – | – |" in table


def test_each_method_is_bound_with_its_own_drafter_costs():
    costs = {"verify_ms": {"1": 10.0}, "drafter_first_ms": 2.0, "drafter_step_ms": 1.0,
             "drafters": {"lookup": {"drafter_first_ms": 0.1, "drafter_step_ms": 0.0}}}
    assert method_costs("sd:k=3", costs).draft_first_ms == 2.0
    assert method_costs("sd:drafter=lookup", costs).draft_first_ms == 0.1
    assert method_costs("sd:drafter=/other", costs) is None  # not measured: no bound rather than a wrong one
    assert method_costs("hf", costs) is None and method_costs("ar", costs).draft(3) == 0.0
    assert method_costs("cmasd:alpha=0.5", costs).draft_step_ms == 1.0
    assert method_costs("specbound", costs) is None  # drafts with its own early exits: costs unknown


# ---------------------------------------------------------------- multi-turn questions

def test_multi_turn_questions_are_answered_turn_by_turn(tmp_path):
    from adaspec.bench.runner import answer

    path = tmp_path / "q.jsonl"
    path.write_text('{"turns": ["w1 w2", "w3"]}\n{"question_id": "b", "category": "qa", "turns": ["w4"]}\n')
    first, second = load_questions(path)
    assert (first.question_id, first.category, first.turns) == (1, "default", ["w1 w2", "w3"])
    tok = tokenizer()
    prompts = []

    def runner(prompt, config, on_step=None):
        prompts.append(tok.decode(prompt))
        ids = tok.encode(f"w{10 + len(prompts)} w9", add_special_tokens=False)
        return GenerationResult(prompt, ids, [], 0.5 * len(prompts), "length")

    runner.label = "fake"
    record = answer(runner, SimpleNamespace(tokenizer=tok), first, GenerationConfig(), chat=True)
    assert prompts == ["user : w1 w2 assistant :", "user : w1 w2 assistant : w11 w9 user : w3 assistant :"]
    assert record["turns"] == ["w11 w9", "w12 w9"] and record["text"] == "w11 w9\n\nw12 w9"
    assert (record["new_tokens"], record["turn_new_tokens"], record["turn_wall_s"]) == (4, [2, 2], [0.5, 1.0])
    assert record["turn_steps"] == [None, None] and record["steps"] is None  # steps not visible (a peer)


# ---------------------------------------------------------------- bench -> report / answers / compare

@pytest.fixture(scope="module")
def bench_run(tiny_dir, data, tmp_path_factory) -> Path:
    from adaspec.bench.runner import BenchOptions, run_bench

    out = tmp_path_factory.mktemp("runs") / "tiny"
    run_bench(BenchOptions(data=data, out=out, methods=["ar", "sd:k=3", "sd:k=2,drafter=lookup"],
                           target=str(tiny_dir), drafter="lookup", answers=True,
                           generation=GenerationConfig(max_new_tokens=16)))
    return out


def test_records_carry_the_environment_and_per_turn_fields(bench_run):
    records = [json.loads(line) for line in (bench_run / "records.jsonl").read_text().splitlines()]
    assert len(records) == 3 * 3
    for r in records:
        env = r["environment"]
        assert {"python", "torch", "transformers", "torch_threads", "cpu_model", "adaspec"} <= set(env)
        assert sum(r["turn_new_tokens"]) == r["new_tokens"] and len(r["turns"]) == len(r["turn_wall_s"])
        assert sum(r["turn_steps"]) == len(r["steps"])
        # the format's version, what each step is, and which of costs.json's backends its costs are
        assert r["schema"] == RECORD_SCHEMA and {s["kind"] for s in r["steps"]} == {VERIFY}
        assert r["costs_key"] == "torch"
    multi = next(r for r in records if r["question_id"] == 3)
    assert len(multi["turns"]) == 2
    summary = json.loads((bench_run / "summary.json").read_text())
    assert summary["environment"] == records[0]["environment"]
    report = (bench_run / "report.md").read_text()
    assert "## Environment" in report and f"| torch_threads | {records[0]['environment']['torch_threads']} |" in report


def test_records_name_the_commit_that_measured_them(tmp_path):
    import subprocess

    from adaspec.bench.runner import source_revision

    package = Path(__file__).resolve().parents[1] / "src" / "adaspec"
    head = subprocess.run(["git", "-C", str(package), "rev-parse", "HEAD"], capture_output=True, text=True)
    revision = source_revision()
    if head.returncode != 0:  # not a git checkout (an sdist): nothing to name
        assert revision is None
        return
    assert revision is not None and revision.removesuffix("-dirty") == head.stdout.strip()


def test_report_rebuilds_summary_and_report_from_the_records(bench_run):
    summary_before = (bench_run / "summary.json").read_text()
    report_before = (bench_run / "report.md").read_text()
    (bench_run / "summary.json").unlink()
    (bench_run / "report.md").unlink()
    result = CliRunner().invoke(app, ["report", str(bench_run)])
    assert result.exit_code == 0, result.output
    assert (bench_run / "summary.json").read_text() == summary_before
    assert (bench_run / "report.md").read_text() == report_before
    summary = json.loads(summary_before)
    sd = summary["methods"]["sd:k=3"]
    assert sd["speedup_ci_lo"] <= sd["speedup_vs_ar"] <= sd["speedup_ci_hi"]
    assert set(sd["per_category"]) == {"translation", "math_reasoning", "writing"}
    assert sd["per_category"]["writing"]["speedup_ci_lo"] is None  # one question: no interval
    assert summary["methods"]["ar"]["exact_match"] == 1.0 and sd["exact_match"] == 1.0  # greedy, fp32
    assert set(summary["histograms"]["sd:k=3"]["per_category"]) == {"translation", "math_reasoning", "writing"}
    bound = summary["bound"]
    assert set(bound) == {"ar", "sd:k=3", "sd:k=2,drafter=lookup"}
    assert bound["ar"]["expected_speedup"] == 1.0
    b = bound["sd:k=3"]
    assert b["efficiency"] == pytest.approx(b["measured_speedup"] / b["expected_speedup"], rel=1e-3)
    assert b["draft_ms"] + b["verify_ms"] + b["overhead_ms"] == pytest.approx(b["ms_per_step"], abs=1e-3)
    assert "lookup" in json.loads((bench_run / "costs.json").read_text())["drafters"]
    for section in ("## Analytic bound", "## Per category", "### writing", "95 % bootstrap", "draft_len_hist.png"):
        assert section in report_before, section
    assert (bench_run / "plots" / "draft_len_hist.png").stat().st_size > 1000


def test_bench_writes_spec_bench_answer_files(bench_run):
    files = sorted((bench_run / "model_answer").glob("*.jsonl"))
    assert [f.name for f in files] == ["tiny-ar.jsonl", "tiny-sd-k-2-drafter-lookup.jsonl", "tiny-sd-k-3.jsonl"]
    lines = [json.loads(line) for line in files[2].read_text().splitlines()]
    records = {r["question_id"]: r for r in map(json.loads, (bench_run / "records.jsonl").read_text().splitlines())
               if r["method"] == "sd:k=3"}
    assert [a["question_id"] for a in lines] == [1, 2, 3]
    for a in lines:
        assert set(a) == {"question_id", "category", "answer_id", "model_id", "choices", "tstamp"}
        assert a["model_id"] == "tiny-sd:k=3" and isinstance(a["tstamp"], float)
        (choice,) = a["choices"]
        assert set(choice) == {"index", "turns", "decoding_steps", "new_tokens", "wall_time", "accept_lengths"}
        r = records[a["question_id"]]
        assert choice["turns"] == r["turns"] and choice["new_tokens"] == r["turn_new_tokens"]
        assert choice["wall_time"] == r["turn_wall_s"] and sum(choice["decoding_steps"]) == len(r["steps"])
        assert sum(choice["accept_lengths"]) >= r["new_tokens"]  # tokens per forward (a stop may cut the last)
    assert len(lines[2]["choices"][0]["turns"]) == 2  # the multi-turn question, turn by turn
    # the files are a function of the records: a rebuild writes them again, byte for byte
    before = files[2].read_text()
    rebuild(bench_run, answers=True)
    assert files[2].read_text() == before


def record(qid, method, tokens, wall, category="qa"):
    return {"question_id": qid, "category": category, "method": method, "new_tokens": tokens, "wall_s": wall,
            "token_ids": list(range(tokens)), "text": "w1 w2", "steps": None}


def test_compare_puts_two_runs_side_by_side(tmp_path, bench_run):
    other = tmp_path / "other"
    other.mkdir()
    rows = [record(q, m, 10, w) for q in (1, 2, 3) for m, w in (("ar", 1.0), ("hf", 0.5))]
    (other / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (other / "config.json").write_text(json.dumps({"target": "other", "dtype": "bfloat16"}))
    published = tmp_path / "published"  # a run that kept only its summary.json
    published.mkdir()
    (published / "summary.json").write_text(json.dumps(build_summary(other)[0]))
    text = compare([bench_run, other, published])
    assert f"| ar | {bench_run} |" in text and f"| ar | {other} |" in text and f"| hf | {published} |" in text
    assert f"| hf | {other} | 2.00 [2.00, 2.00] |" in text
    assert "| dtype | \"float32\" | \"bfloat16\" | \"bfloat16\" |" in text  # the options that differ
    assert "## Speedup vs ar per category" in text
    result = CliRunner().invoke(app, ["compare", str(bench_run), str(other), "--out", str(tmp_path / "c.md")])
    assert result.exit_code == 0
    assert (tmp_path / "c.md").read_text() == compare([bench_run, other], tmp_path / "c_throughput.png")
    with pytest.raises(AdaspecError, match="neither records.jsonl nor summary.json"):
        compare([tmp_path / "nothing"])
    with pytest.raises(AdaspecError, match="has no records.jsonl"):
        rebuild(published)  # a report is rebuilt from records, never from a summary


# ---------------------------------------------------------------- sweep --ray

TIMING = {"wall_s", "tokens_per_s", "speedup_vs_ar", "speedup_ci_lo", "speedup_ci_hi", "tstamp", "turn_wall_s",
          "ttft_ms", "decode_tokens_per_s", "turn_ttft_s"}


def untimed(rows: list[dict]) -> dict:
    """Rows without their timings: the fields in TIMING and each step's `ms`."""
    def strip(r: dict) -> dict:
        out = {k: v for k, v in r.items() if k not in TIMING}
        if out.get("steps"):
            out["steps"] = [{k: v for k, v in s.items() if k != "ms"} for s in out["steps"]]
        return out
    return {(r.get("key") or r["question_id"]): strip(r) for r in rows}


def test_sweep_on_a_local_ray_cluster_writes_what_the_sequential_sweep_writes(tiny_dir, data, tmp_path):
    import ray  # in the dev extra: this test runs wherever the tests do

    from adaspec.bench.summary import load_records
    from adaspec.bench.sweep import RayOptions, SweepOptions, read_points, run_sweep

    def options(out: Path) -> SweepOptions:
        # cost=0: the paper's length, so every process drafts alike (cost=1 reads timings measured in each)
        return SweepOptions(data=data, out=out, base="cmasd:cost=0",
                            grid={"alpha": (0.5, 1.0), "gamma": (), "tau_base": ()},
                            categories=["translation", "writing"], target=str(tiny_dir), drafter="lookup",
                            generation=GenerationConfig(max_new_tokens=12))

    run_sweep(options(tmp_path / "seq"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        run_sweep(options(tmp_path / "ray"), ray=RayOptions())
        sequential = untimed(read_points(tmp_path / "seq" / "sweep.jsonl"))
        assert untimed(read_points(tmp_path / "ray" / "sweep.jsonl")) == sequential
        assert len(sequential) == 2 and all("alpha=" in k for k in sequential)
        baseline = untimed(load_records(tmp_path / "seq" / "ar.jsonl"))
        assert untimed(load_records(tmp_path / "ray" / "ar.jsonl")) == baseline and len(baseline) == 2
        # resumable: a point lost from sweep.jsonl is run again, the others are not
        path = tmp_path / "ray" / "sweep.jsonl"
        kept = path.read_text().splitlines()[:1]
        path.write_text(kept[0] + "\n")
        run_sweep(options(tmp_path / "ray"), ray=RayOptions())
        lines = path.read_text().splitlines()
        assert lines[0] == kept[0] and len(lines) == 2 and untimed(read_points(path)) == sequential
        assert json.loads((tmp_path / "ray" / "pareto.json").read_text())["points"] == 2
    finally:
        ray.shutdown()


def test_sweep_ray_without_ray_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # importing it now fails, as when it is not installed
    result = CliRunner().invoke(app, ["sweep", "--ray", "--out", str(tmp_path / "s")])
    assert isinstance(result.exception, AdaspecError)  # main() prints it as one line, exit code 2
    assert "needs Ray, which is not installed: pip install 'adaspec\\[ray]'" in str(result.exception)
    assert not (tmp_path / "s").exists()  # refused before any work
