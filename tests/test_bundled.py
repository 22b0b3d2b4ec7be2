"""The bundled SmolLM2-135M-Instruct: real tokenizer, chat template, greedy exactness on real prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adaspec.core.backends import TorchBackend
from adaspec.core.config import BackendChoice, GenerationConfig
from adaspec.core.decode import StopCriteria, generate
from adaspec.core.drafters import ModelDrafter, PromptLookupDrafter
from adaspec.core.errors import AdaspecError
from adaspec.core.models import encode_prompt, load_model
from adaspec.core.policies import FixedLength
from adaspec.methods import build_runner, load_drafter, parse_method
from adaspec.train.truncate import truncate_model

pytestmark = pytest.mark.bundled
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "specbench_dev.jsonl"
PROMPTS = [
    "Summarize: The river flooded the town. The town council said the river will be dredged. "
    "The river has flooded the town three times this year.",
    "Translate German to English: Der Hund spielt im Garten mit dem Ball.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
]


@pytest.fixture(scope="module")
def smollm():
    return load_model()


@pytest.fixture(scope="module")
def trunc_drafter(smollm, tmp_path_factory):
    path = truncate_model(smollm, 3, tmp_path_factory.mktemp("trunc3"))
    return load_drafter(str(path), smollm, "float32")


def test_chat_template_wraps_the_user_turn(smollm):
    ids = encode_prompt(smollm.tokenizer, "Hello there")
    text = smollm.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system") and "<|im_start|>user\nHello there<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert smollm.tokenizer.decode(encode_prompt(smollm.tokenizer, "Hello there", chat=False)) == "Hello there"


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_sd_equals_ar_on_the_bundled_model(smollm, trunc_drafter, prompt):
    target = TorchBackend(smollm.model)
    ids = encode_prompt(smollm.tokenizer, prompt)
    config = GenerationConfig(max_new_tokens=24)
    stop = StopCriteria(smollm.eos_ids)
    ar = generate(target, ids, config, stop=stop)
    lookup = generate(target, ids, config, PromptLookupDrafter(), FixedLength(5), stop=stop)
    model = generate(target, ids, config, ModelDrafter(TorchBackend(trunc_drafter.model)), FixedLength(3), stop=stop)
    assert lookup.token_ids == ar.token_ids
    assert model.token_ids == ar.token_ids
    assert len(model.steps) < len(model.token_ids) or all(s.accepted == 0 for s in model.steps)


def test_peers_produce_the_same_greedy_tokens(smollm, trunc_drafter):
    ids = encode_prompt(smollm.tokenizer, PROMPTS[0])
    config = GenerationConfig(max_new_tokens=16)
    torch_backend = BackendChoice("torch")  # the transformers peers' numerics (llama.cpp rounds differently)
    outputs = {m: build_runner(parse_method(m), smollm, trunc_drafter, config, torch_backend)(ids, config).token_ids
               for m in ("ar", "sd", "hf", "hf-assisted", "hf-lookup")}
    assert all(tokens == outputs["ar"] for tokens in outputs.values()), outputs


def test_drafter_with_another_tokenizer_is_refused(smollm, tmp_path):
    tokenizer = load_model().tokenizer  # a fresh copy, so the shared fixture is not modified
    tokenizer.add_tokens(["<adaspec-extra-token>"])
    path = truncate_model(smollm, 1, tmp_path / "other")
    tokenizer.save_pretrained(path)
    with pytest.raises(AdaspecError, match="tokenizer differs"):
        load_drafter(str(path), smollm, "float32")


def test_prompt_longer_than_the_context_is_refused(smollm):
    ids = encode_prompt(smollm.tokenizer, "word " * 9000)
    with pytest.raises(AdaspecError, match="context of 8192"):
        generate(TorchBackend(smollm.model), ids, GenerationConfig(max_new_tokens=8))


def test_bench_writes_records_and_summary(tmp_path):
    from adaspec.bench.runner import BenchOptions, run_bench

    data = tmp_path / "q.jsonl"
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    chosen = [next(r for r in rows if r["category"] == c) for c in ("translation", "math_reasoning")]
    chosen.append(next(r for r in rows if len(r["turns"]) == 2))  # a multi-turn MT-bench question
    data.write_text("".join(json.dumps(r) + "\n" for r in chosen))
    out = tmp_path / "run"
    opts = BenchOptions(data=data, out=out, methods=["ar", "sd", "hf", "hf-lookup"],
                        generation=GenerationConfig(max_new_tokens=12), backend=BackendChoice("torch"))
    summary = run_bench(opts)
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == 3 * 4
    for r in records:
        assert {"question_id", "category", "method", "new_tokens", "wall_s", "token_ids", "text", "steps"} <= set(r)
        assert r["new_tokens"] == len(r["token_ids"])
        assert r["backend"] == "torch:float32"
        assert all(0 < t <= w for t, w in zip(r["turn_ttft_s"], r["turn_wall_s"], strict=True))  # the peers' too
    multi = [r for r in records if r["question_id"] == chosen[2]["question_id"] and r["method"] == "ar"][0]
    assert len(multi["turns"]) == 2
    m = summary["methods"]
    assert m["sd"]["exact_match"] == 1.0 and m["hf"]["exact_match"] == 1.0
    assert m["ar"]["speedup_vs_ar"] == 1.0
    assert m["hf"]["mean_accepted"] is None and m["sd"]["mean_accepted"] >= 1.0
    assert m["sd"]["rougeL"] is None  # no summarization question in this run
    assert json.loads((out / "summary.json").read_text())["costs"]["verify_ratio"]["1"] == 1.0
    assert (out / "report.md").is_file()
    # a rerun with the same options resumes: nothing is run twice
    run_bench(opts)
    assert len((out / "records.jsonl").read_text().splitlines()) == 3 * 4


def test_bench_with_concurrency_decodes_questions_together_and_reports_the_load(tmp_path):
    # torch, 3 questions (one of two turns: its second turn joins the batch when its first ends), 2 at a time
    from adaspec.bench.runner import BenchOptions, run_bench

    data = tmp_path / "q.jsonl"
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    chosen = [next(r for r in rows if r["category"] == c) for c in ("translation", "math_reasoning")]
    chosen.append(next(r for r in rows if len(r["turns"]) == 2))
    data.write_text("".join(json.dumps(r) + "\n" for r in chosen))
    out = tmp_path / "run"
    opts = BenchOptions(data=data, out=out, methods=["ar", "sd", "sd:k=3"], concurrency=2,
                        generation=GenerationConfig(max_new_tokens=12), backend=BackendChoice("torch"))
    summary = run_bench(opts)
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == 3 * 3 and all(r["concurrency"] == 2 and r["block_wall_s"] > 0 for r in records)
    assert max(s["batch"] for r in records for s in r["steps"]) == 2
    for name, m in summary["methods"].items():
        assert m["exact_match"] == 1.0, name
        load = m["load"]
        assert load["concurrency"] == 2 and load["aggregate_tokens_per_s"] > 0
        assert load["latency_p50_s"] <= load["latency_p99_s"] and load["ttft_p50_ms"] > 0
    assert summary["methods"]["ar"]["load"]["aggregate_vs_ar"] == 1.0
    assert "batch_ms" in summary["costs"] and "## Under load" in (out / "report.md").read_text()
    with pytest.raises(AdaspecError, match="cannot run batched"):
        run_bench(BenchOptions(data=data, out=tmp_path / "peer", methods=["ar", "hf"], concurrency=2,
                               generation=GenerationConfig(max_new_tokens=4), backend=BackendChoice("torch")))


def test_generate_many_returns_each_prompts_tokens_decoded_alone(smollm):
    # the Python API: text prompts, 3 at a time on the torch backend, each equal to the prompt decoded alone
    from adaspec.api import generate_many

    prompts = ["Translate to French: good morning", "Name three colours.", "What is 2 + 3?", "Say hi."]
    config = GenerationConfig(max_new_tokens=10)
    results = generate_many(prompts, "sd", smollm, config, concurrency=3, backend=BackendChoice("torch"))
    alone = build_runner(parse_method("sd"), smollm, "lookup", config, BackendChoice("torch"))
    assert [r.token_ids for r in results] == [alone(encode_prompt(smollm.tokenizer, p), config).token_ids
                                              for p in prompts]
    with pytest.raises(AdaspecError, match="cannot run batched"):
        generate_many(prompts[:1], "hf", smollm, config, backend=BackendChoice("torch"))
