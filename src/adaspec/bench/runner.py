"""`adaspec bench`: every method on the same prompts, interleaved per prompt after a warm-up, one record
per (question, method) appended to records.jsonl as it finishes (a rerun resumes), then summary.json
and report.md computed from the records alone."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from adaspec.api import batch_engine
from adaspec.bench.bound import costs_key
from adaspec.bench.data import Question, load_questions
from adaspec.bench.rundir import COSTS, SKIPPED, rebuild
from adaspec.bench.summary import RECORD_SCHEMA, load_records
from adaspec.core.batch import BatchEngine, Request
from adaspec.core.config import CMASD_EARLY_STOP, CMASD_TAU_MODE, BackendChoice, GenerationConfig
from adaspec.core.costmodel import drafter_cost, verify_costs
from adaspec.core.decode import ROUTE, GenerationResult, Step
from adaspec.core.errors import AdaspecError
from adaspec.core.machine import cpu_model
from adaspec.core.models import BUNDLED, LoadedModel, encode_prompt, is_gguf_target, load_model
from adaspec.methods import (
    DrafterChoice,
    DrafterOption,
    MethodSpec,
    Placement,
    Runner,
    backend_choice,
    build_runner,
    default_drafter,
    has_standalone,
    load_drafter,
    make_drafter,
    parse_method,
    resolve_backend,
    target_backend,
)

BLOCK_PER_SLOT = 4  # --concurrency N: questions per block, per sequence slot (a block's tail runs below N)
DEFAULT_METHODS = ("ar", "sd", "hf", "hf-assisted", "hf-lookup")
# --ablation (CM-ASD, the paper's Table III), plus the variants of cmasd's defaults it asks to compare: the
# other drafting variant (early_stop) and the other reading of tau (tau_mode)
ABLATION = ("ar", "sd", "specdec", "cmasd-k", "cmasd-tau", "cmasd", f"cmasd:early_stop={1 - CMASD_EARLY_STOP}",
            f"cmasd:tau_mode={'literal' if CMASD_TAU_MODE == 'intent' else 'intent'}")


@dataclass
class BenchOptions:
    data: Path
    out: Path
    methods: list[str] | None = None  # None: DEFAULT_METHODS (hf-assisted only if a model drafter exists)
    categories: list[str] | None = None
    limit: int | None = None
    target: str | None = None
    drafter: str | None = None
    dtype: str = "float32"
    device: str = "cpu"  # where torch runs the target and drafters (--device, made concrete)
    chat: bool = True
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    ablation: bool = False  # run ABLATION (then `methods` are added after it) and write its table
    answers: bool = False  # also write Spec-Bench answer files, out/model_answer/<target>-<method>.jsonl
    backend: BackendChoice = field(default_factory=BackendChoice)  # where methods run unless their spec says
    concurrency: int = 1  # > 1: questions decoded this many at a time by the batched engine (core/batch.py)


def source_revision() -> str | None:
    """The git commit adaspec runs from ('-dirty' appended when tracked files differ from it), so that a run
    resumed across changes says which code measured which records; None outside a git checkout."""
    here = str(Path(__file__).resolve().parents[1])  # the adaspec package: the code that measures

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", here, *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return None
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    return commit + ("-dirty" if dirty else "")


def environment() -> dict:
    """Where the numbers come from, carried by every record: package versions, torch threads, the CPU."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return {
        "python": sys.version.split()[0],
        "adaspec": installed("adaspec"),
        "adaspec_commit": source_revision(),
        "torch": torch.__version__,
        "transformers": installed("transformers"),
        "numpy": installed("numpy"),
        "llama_cpp_python": installed("llama_cpp_python"),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpus": len(cpus) if cpus is not None else os.cpu_count(),
        "os": platform.platform(),
    }


class Answer:
    """A question's record, built turn by turn: earlier answers become assistant turns, as Spec-Bench does."""

    def __init__(self, q: Question) -> None:
        self.q = q
        self.messages: list[dict] = []
        self.token_ids: list[int] = []
        self.texts: list[str] = []
        self.steps: list[dict] | None = []
        self.turn_tokens: list[int] = []
        self.turn_wall: list[float] = []
        self.turn_steps: list[int | None] = []
        self.turn_ttft: list[float | None] = []
        self.wall = 0.0

    @property
    def done(self) -> bool:
        return len(self.texts) == len(self.q.turns)

    def next_prompt(self, target: LoadedModel, chat: bool) -> list[int]:
        self.messages.append({"role": "user", "content": self.q.turns[len(self.texts)]})
        return encode_prompt(target.tokenizer, self.messages, chat)

    def add(self, result: GenerationResult, target: LoadedModel) -> None:
        text = target.tokenizer.decode(result.token_ids, skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": text})
        self.token_ids += result.token_ids
        self.texts.append(text)
        self.turn_tokens.append(len(result.token_ids))
        self.wall += result.wall_s
        self.turn_wall.append(round(result.wall_s, 5))
        self.turn_ttft.append(None if result.ttft_s is None else round(result.ttft_s, 5))
        self.turn_steps.append(len(result.steps) if result.steps else None)
        if result.steps and self.steps is not None:
            self.steps += [step_record(s) for s in result.steps]
        else:
            self.steps = None  # a peer: its steps are not visible

    def record(self, label: str) -> dict:
        q = self.q
        return {
            "schema": RECORD_SCHEMA, "question_id": q.question_id, "category": q.category, "method": label,
            "new_tokens": len(self.token_ids), "wall_s": round(self.wall, 5), "token_ids": self.token_ids,
            "text": "\n\n".join(self.texts), "turns": self.texts, "reference": q.reference, "steps": self.steps,
            "turn_new_tokens": self.turn_tokens, "turn_wall_s": self.turn_wall, "turn_steps": self.turn_steps,
            "turn_ttft_s": self.turn_ttft,
        }


def answer(runner: Runner, target: LoadedModel, q: Question, config: GenerationConfig, chat: bool) -> dict:
    """Run every turn of a question; the record keeps the totals and, per turn, the text, new tokens, seconds,
    target forwards (None for a peer) and the time to the first new token (prefill and first step; None where a
    runner cannot observe it)."""
    a = Answer(q)
    while not a.done:
        a.add(runner(a.next_prompt(target, chat), config), target)
    return a.record(runner.label)


def answer_batch(engine: BatchEngine, runner: Runner, target: LoadedModel, questions: list[Question],
                 config: GenerationConfig, chat: bool) -> tuple[list[dict], list[dict], float]:
    """Every turn of `questions` decoded together on `engine`: a question's next turn joins the batch when its
    previous one ends. (records, skipped, wall seconds of the whole block); a turn's wall_s is its request's
    latency, from its submission to its last token."""
    if not hasattr(runner, "decoding"):
        raise AdaspecError(f"{runner.label} cannot run batched (--concurrency > 1): only adaspec's own decoding loop "
                           "(ar, sd, specdec and the CM-ASD methods) can")
    answers = {q.question_id: Answer(q) for q in questions}
    records, skipped = [], []

    def submit(a: Answer) -> None:
        prompt = a.next_prompt(target, chat)
        engine.submit(Request(prompt, lambda: runner.decoding(prompt, config, engine.backend.max_context), tag=a))

    t0 = time.perf_counter()
    for a in answers.values():
        submit(a)
    while not engine.idle:
        for s in engine.step():
            a = s.request.tag
            if s.error is not None:
                skipped.append({"question_id": a.q.question_id, "method": runner.label, "error": str(s.error)})
                continue
            a.add(s.result, target)
            if a.done:
                records.append(a.record(runner.label))
            else:
                submit(a)
    return records, skipped, time.perf_counter() - t0


def step_record(s: Step) -> dict:
    """A step in records.jsonl: kind, drafted, accepted, confidence; `cut`, `metrics`, `exact` (0/1), `source` and
    `entropy` (a routed token), `exit_layers` and `draft_stop`, `ms` (its wall time) when present."""
    record: dict = {"kind": s.kind, "drafted": s.drafted, "accepted": s.accepted,
                    "confidence": [round(c, 4) for c in s.confidence]}
    if s.cut:
        record["cut"] = s.cut
    if s.metrics:
        record["metrics"] = {m: [round(c, 3) for c in v] for m, v in s.metrics.items()}
    if s.exact:
        record["exact"] = [int(e) for e in s.exact]
    if s.kind == ROUTE:  # routing methods (R-Stitch): which model produced the token, and its entropy
        record["source"] = s.source
        record["entropy"] = s.entropy
    if s.draft_stop is not None:  # early-exit drafting (SpecBound): exit layer per drafted token, why the draft ended
        record["exit_layers"] = s.exit_layers
        record["draft_stop"] = s.draft_stop
    if s.ms is not None:
        record["ms"] = round(s.ms, 3)
    if s.batch is not None:  # batched decoding: sequences in the step's target call
        record["batch"] = s.batch
    return record


def bench_methods(opts: BenchOptions, target_name: str) -> list[str]:
    if opts.ablation:
        return list(ABLATION) + [m for m in opts.methods or [] if m not in ABLATION]
    return opts.methods or [m for m in DEFAULT_METHODS
                            if m != "hf-assisted" or has_standalone(opts.drafter, target_name)]


def run_bench(opts: BenchOptions, console: Console | None = None) -> dict:
    console = console or Console(stderr=True)
    target_name = opts.target or BUNDLED
    methods = bench_methods(opts, target_name)
    specs = [parse_method(m) for m in methods]
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise AdaspecError(f"methods repeat: {labels}")
    spec_of = dict(zip(labels, specs, strict=True))
    questions = load_questions(opts.data, opts.categories, opts.limit)
    if not questions:
        raise AdaspecError("no questions selected")
    gen = opts.generation
    has_gguf = is_gguf_target(opts.target)
    opts = replace(opts, backend=resolve_backend(has_gguf, opts.backend))  # `auto` made concrete, and recorded
    config = {
        "data": str(opts.data), "categories": opts.categories, "limit": opts.limit, "methods": labels,
        "target": target_name, "drafter": opts.drafter or default_drafter(target_name), "dtype": opts.dtype,
        "chat": opts.chat, "max_new_tokens": gen.max_new_tokens, "temperature": gen.sampling.temperature,
        "top_k": gen.sampling.top_k, "top_p": gen.sampling.top_p, "seed": gen.seed,
        "questions": len(questions), "backend": opts.backend.label,
    }
    if opts.device != "cpu":  # recorded off the CPU only: CPU runs keep the configuration they always had
        config["device"] = opts.device
    if opts.ablation:
        config["ablation"] = True
    if opts.concurrency != 1:
        if opts.concurrency < 1:
            raise AdaspecError(f"--concurrency must be >= 1, got {opts.concurrency}")
        config["concurrency"] = opts.concurrency
    opts.out.mkdir(parents=True, exist_ok=True)
    records_path = opts.out / "records.jsonl"
    config_path = opts.out / "config.json"
    if records_path.exists() and config_path.exists():
        previous = json.loads(config_path.read_text())
        if previous != config:
            raise AdaspecError(f"{opts.out} holds a run with another configuration; choose a new --out")
    config_path.write_text(json.dumps(config, indent=2))
    done = {(r["question_id"], r["method"]) for r in load_records(records_path)} if records_path.exists() else set()

    console.print(f"loading target {config['target']} ({opts.dtype})")
    target = load_model(opts.target, opts.dtype, opts.device)
    drafter = load_drafter(opts.drafter, target, opts.dtype)
    runners = [build_runner(s, target, drafter, gen, opts.backend) for s in specs]
    env = environment()

    # warm-up: every method once on a short prompt, not recorded
    warm = encode_prompt(target.tokenizer, questions[0].turns[0], opts.chat)[:64]
    for runner in runners:
        runner(warm, GenerationConfig(max_new_tokens=8, sampling=gen.sampling, seed=gen.seed))

    skipped: list[dict] = []
    engines: dict[str, BatchEngine] = {}
    if opts.concurrency > 1:
        skipped = run_batched(opts, specs, runners, target, questions, done, records_path, env, console, engines)
    todo = [] if opts.concurrency > 1 else [(qi, q) for qi, q in enumerate(questions)]
    total = sum(1 for _, q in todo for s in specs if (q.question_id, s.label) not in done)
    columns = (TextColumn("[bold]bench"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.description}"))
    with Progress(*columns, console=console) as progress, records_path.open("a") as sink:
        task = progress.add_task("", total=total)
        for qi, q in todo:
            order = runners[qi % len(runners):] + runners[: qi % len(runners)]  # rotate to spread order bias
            for runner in order:
                if (q.question_id, runner.label) in done:
                    continue
                progress.update(task, description=f"{q.category} #{q.question_id} {runner.label}")
                try:
                    record = answer(runner, target, q, gen, opts.chat)
                except AdaspecError as e:  # e.g. a prompt longer than the context: skipped, and said so
                    skipped.append({"question_id": q.question_id, "method": runner.label, "error": str(e)})
                    progress.advance(task)
                    continue
                record.update(backend=runner.where, costs_key=costs_key(spec_of[runner.label], opts.backend),
                              environment=env, tstamp=round(time.time(), 3))
                sink.write(json.dumps(record) + "\n")
                sink.flush()
                progress.advance(task)
    for s in skipped:
        console.print(f"[yellow]skipped[/] #{s['question_id']} {s['method']}: {s['error']}")

    context = cost_context([encode_prompt(target.tokenizer, q.turns[0], opts.chat) for q in questions],
                           gen.max_new_tokens)
    costs = measure_costs(target, drafter, context, specs, opts.backend)
    if engines:  # the batch cost curve each batched engine's rule chose against
        costs["batch_ms"] = {label: {str(n): ms for n, ms in e.costs.ms_by_positions.items()}
                             for label, e in engines.items()}
    (opts.out / COSTS).write_text(json.dumps(costs, indent=2))
    (opts.out / SKIPPED).write_text(json.dumps(skipped, indent=2))
    return rebuild(opts.out, opts.answers)  # summary.json, report.md: from these files alone, as `adaspec report`


def run_batched(opts: BenchOptions, specs: list[MethodSpec], runners: list[Runner], target: LoadedModel,
                questions: list[Question], done: set, records_path: Path, env: dict, console: Console,
                engines: dict[str, BatchEngine]) -> list[dict]:
    """--concurrency N: blocks of BLOCK_PER_SLOT * N questions, each decoded by every method in turn (the order
    rotating per block), N at a time on one batched engine per backend; each record carries the block's wall time,
    from which the summary's aggregate throughput comes."""
    n = opts.concurrency
    skipped: list[dict] = []
    size = BLOCK_PER_SLOT * n
    blocks = [questions[i: i + size] for i in range(0, len(questions), size)]
    with Progress(TextColumn("[bold]bench"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=console) as progress, records_path.open("a") as sink:
        task = progress.add_task("", total=len(blocks) * len(runners))
        for bi, block in enumerate(blocks):
            order = list(zip(specs, runners, strict=True))
            order = order[bi % len(order):] + order[: bi % len(order)]
            for spec, runner in order:
                todo = [q for q in block if (q.question_id, runner.label) not in done]
                progress.update(task, description=f"block {bi + 1}/{len(blocks)} {runner.label}")
                if todo:
                    choice = resolve_backend(target.gguf is not None, backend_choice(spec, opts.backend))
                    # one engine per backend, shared by the methods that run there (they take turns)
                    if choice.label not in engines:
                        engines[choice.label] = batch_engine(target, choice, n)
                    records, failed, wall = answer_batch(engines[choice.label], runner, target, todo, opts.generation,
                                                         opts.chat)
                    skipped += failed
                    for record in records:
                        record.update(backend=engines[choice.label].backend.where,
                                      costs_key=costs_key(spec, opts.backend), environment=env,
                                      tstamp=round(time.time(), 3), concurrency=n, block=bi,
                                      block_wall_s=round(wall, 5))
                        sink.write(json.dumps(record) + "\n")
                    sink.flush()
                progress.advance(task)
    return skipped


def cost_context(prompts: list[list[int]], max_new_tokens: int) -> list[int]:
    """The context the costs are measured on: as long as a typical decoding step's, the median prompt plus half
    the token budget (step costs grow with the context; a prompt's own tokens repeated make up the length)."""
    prompt = sorted(prompts, key=len)[len(prompts) // 2]
    length = len(prompt) + max_new_tokens // 2
    return (prompt * (length // len(prompt) + 1))[:length]


def measure_costs(target: LoadedModel, drafter: DrafterChoice, prompt: list[int],
                  specs: Sequence[MethodSpec] = (), backend: BackendChoice | None = None) -> dict:
    """Measured costs on the run's backend (`backend`, top level; its label under "backend"), and under "backends"
    the same for every backend a method runs on, the run's included, keyed by label: the target's verify costs,
    the run's drafter's cost per token, and under "drafters" the cost of every other drafter a method names with
    drafter= (the analytic bound needs each method's own)."""
    default = backend or BackendChoice()
    choices = {default.label: default}
    for s in specs:
        if isinstance(s.options, Placement):  # a method of ours that may name its backend
            choice = backend_choice(s, default)
            choices.setdefault(choice.label, choice)
    per = {label: backend_costs(target, drafter, prompt, specs, c) for label, c in choices.items()}
    return {**per[default.label], "backend": default.label, "backends": per}


def backend_costs(target: LoadedModel, drafter: DrafterChoice, prompt: list[int], specs: Sequence[MethodSpec],
                  choice: BackendChoice) -> dict:
    """verify costs, the run's drafter's cost and the named drafters' costs (see measure_costs) on one backend."""
    backend = target_backend(target, choice)
    costs = verify_costs(backend, prompt)
    if choice.kind == "llamacpp":
        costs["weights"] = backend.llm.weights
    d = make_drafter(parse_method("sd"), drafter, backend, target)
    costs.update(drafter_cost(d, backend, costs["verify_ms"]["1"], prompt))
    named = sorted({s.options.drafter for s in specs
                    if not s.method.peer and isinstance(s.options, DrafterOption) and s.options.drafter})
    if named:
        costs["drafters"] = {
            name: drafter_cost(make_drafter(parse_method("sd", options={"drafter": name}), drafter, backend, target),
                               backend, costs["verify_ms"]["1"], prompt)
            for name in named}
    return costs
