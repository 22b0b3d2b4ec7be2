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

from adaspec.config import DEFAULT_MAX_NEW_TOKENS, DEFAULT_SEED, GenerationConfig, SamplingConfig
from adaspec.errors import AdaspecError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Adaptive speculative decoding.")
err = Console(stderr=True)

Target = Annotated[str | None, typer.Option(help="'smollm2' (bundled default), a local HF model dir or a .gguf")]
Drafter = Annotated[str | None, typer.Option(help="'lookup' (prompt lookup, default) or a local HF model dir")]
MaxNew = Annotated[int, typer.Option("--max-new-tokens", help="tokens to generate at most")]
Temperature = Annotated[float, typer.Option(help="0 = greedy; > 0 samples (lossless speculative sampling)")]
Dtype = Annotated[str, typer.Option(help="float32 (greedy sd == ar exactly) or bfloat16 (faster)")]


def _generation(max_new_tokens, temperature, top_k, top_p, seed, stop=()) -> GenerationConfig:
    return GenerationConfig(max_new_tokens, SamplingConfig(temperature, top_k, top_p), tuple(stop), seed=seed)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="the user message (or raw text with --no-chat)")],
    method: Annotated[str, typer.Option(help="method spec, e.g. sd, sd:k=4, ar")] = "sd",
    target: Target = None,
    drafter: Drafter = None,
    max_new_tokens: MaxNew = DEFAULT_MAX_NEW_TOKENS,
    temperature: Temperature = 0.0,
    top_k: Annotated[int, typer.Option(help="0 = off")] = 0,
    top_p: Annotated[float, typer.Option(help="1.0 = off")] = 1.0,
    seed: int = DEFAULT_SEED,
    stop: Annotated[list[str] | None, typer.Option(help="stop string (repeatable)")] = None,
    chat: Annotated[bool, typer.Option(help="apply the tokenizer's chat template")] = True,
    compare: Annotated[bool, typer.Option(help="also run plain `ar` decoding and report the speedup")] = True,
    dtype: Dtype = "float32",
) -> None:
    """Generate text, streaming it, then print tokens/s, mean accepted tokens and the speedup over `ar`."""
    from adaspec.methods import build_runner, load_drafter, parse_method
    from adaspec.models import encode_prompt, load_model

    config = _generation(max_new_tokens, temperature, top_k, top_p, seed, stop or ())
    spec = parse_method(method)
    model = load_model(target, dtype)
    draft_model = load_drafter(drafter, model, dtype)
    runner = build_runner(spec, model, draft_model, config)
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
    accepted = f"{result.mean_accepted:.2f}" if result.steps else "–"
    row = [spec.label, str(result.new_tokens), f"{result.tokens_per_s:.1f}", accepted]
    if compare and spec.name != "ar":
        base = build_runner(parse_method("ar"), model, draft_model, config)(ids, config)
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


@app.command()
def bench(
    methods: Annotated[str | None, typer.Option(help="comma-separated method specs (default: ar,sd,hf,"
                                                     "hf-assisted,hf-lookup; hf-assisted needs --drafter)")] = None,
    ablation: Annotated[bool, typer.Option(help="CM-ASD ablation: ar, sd, specdec, cmasd-k, cmasd-tau, cmasd, "
                                                "cmasd's variants (then --methods); its table in report.md")] = False,
    data: Annotated[Path | None, typer.Option(help="JSONL of questions with `turns`")] = None,
    categories: Annotated[str | None, typer.Option(help="comma-separated categories")] = None,
    limit: Annotated[int | None, typer.Option(help="at most N questions per category")] = None,
    max_new_tokens: MaxNew = DEFAULT_MAX_NEW_TOKENS,
    temperature: Temperature = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = DEFAULT_SEED,
    out: Annotated[Path, typer.Option(help="output directory (records.jsonl, summary.json, report.md)")] = Path(
        "runs/bench"),
    target: Target = None,
    drafter: Drafter = None,
    dtype: Dtype = "float32",
    chat: bool = True,
) -> None:
    """Benchmark methods against `ar` and the transformers peers on the same prompts."""
    from adaspec.bench.data import DEFAULT_DATA
    from adaspec.bench.runner import BenchOptions, run_bench
    from adaspec.methods import split_specs

    opts = BenchOptions(
        data=data or DEFAULT_DATA, out=out, methods=split_specs(methods) if methods else None,
        categories=categories.split(",") if categories else None, limit=limit, target=target,
        drafter=drafter, dtype=dtype, chat=chat,
        generation=_generation(max_new_tokens, temperature, top_k, top_p, seed), ablation=ablation,
    )
    summary = run_bench(opts, err)
    table = Table(title=f"adaspec bench -> {out}")
    cols = ("tokens_per_s", "speedup_vs_ar", "mean_accepted", "exact_match", "alignment", "bleu", "rougeL",
            "gsm8k_acc")
    table.add_column("method")
    for c in cols:
        table.add_column(c, justify="right")
    for name, m in summary["methods"].items():
        table.add_row(name, *("–" if m.get(c) is None else f"{m[c]:.3g}" for c in cols))
    Console().print(table)
    costs = summary.get("costs", {})
    if costs:
        ratios = ", ".join(f"{n}: {r}x" for n, r in costs["verify_ratio"].items())
        Console().print(f"target verify cost of n positions vs 1 step: {ratios}")


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise AdaspecError(f"{flag} must be comma-separated numbers, got {text!r}") from None


@app.command()
def sweep(
    out: Annotated[Path, typer.Option(help="output directory (ar.jsonl, sweep.jsonl, pareto.json, plots/)")] = Path(
        "runs/sweep"),
    base: Annotated[str, typer.Option(help="method spec the grid is added to, e.g. cmasd:early_stop=0")] = "cmasd",
    alpha: Annotated[str, typer.Option(help="comma-separated values ('' leaves the axis out)")] = "0.5,0.75,1.0",
    gamma: Annotated[str, typer.Option(help="comma-separated values")] = "0.5,1.0,2.0",
    tau_base: Annotated[str, typer.Option("--tau-base", help="comma-separated values")] = "0.05,0.1,0.2",
    data: Annotated[Path | None, typer.Option(help="JSONL of questions with `turns`")] = None,
    categories: Annotated[str | None, typer.Option(help="comma-separated categories")] = "translation,summarization",
    limit: Annotated[int | None, typer.Option(help="at most N questions per category")] = None,
    max_new_tokens: MaxNew = DEFAULT_MAX_NEW_TOKENS,
    temperature: Temperature = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = DEFAULT_SEED,
    target: Target = None,
    drafter: Drafter = None,
    dtype: Dtype = "float32",
    chat: bool = True,
) -> None:
    """Sweep CM-ASD hyperparameters over a grid against `ar` (measured once): sweep.jsonl (resumable), the Pareto
    fronts of speedup vs alignment and vs task quality (pareto.json) and plots/pareto.png."""
    from adaspec.bench.data import DEFAULT_DATA
    from adaspec.bench.sweep import SweepOptions, run_sweep

    grid = {"alpha": _floats(alpha, "--alpha"), "gamma": _floats(gamma, "--gamma"),
            "tau_base": _floats(tau_base, "--tau-base")}
    opts = SweepOptions(
        data=data or DEFAULT_DATA, out=out, base=base, grid=grid,
        categories=categories.split(",") if categories else None, limit=limit, target=target, drafter=drafter,
        dtype=dtype, chat=chat, generation=_generation(max_new_tokens, temperature, top_k, top_p, seed),
    )
    result = run_sweep(opts, err)
    ar = result["ar"]
    for y in ("alignment", "quality"):
        table = Table(title=f"Pareto front: speedup vs {y} (ar: {ar.get(y) or 0:.3g}) -> {out}/pareto.json")
        for col in ("spec", "speedup_vs_ar", "alignment", "quality", "mean_accepted"):
            table.add_column(col, justify="left" if col == "spec" else "right")
        for p in result[f"front_{y}"]:
            table.add_row(p["spec"], *("–" if p.get(c) is None else f"{p[c]:.3g}"
                                       for c in ("speedup_vs_ar", "alignment", "quality", "mean_accepted")))
        Console().print(table)


@app.command("make-drafter")
def make_drafter(
    out: Annotated[Path, typer.Option(help="directory for the drafter (a Hugging Face model)")],
    layers: Annotated[int, typer.Option(help="decoder layers of the target to keep")] = 4,
    target: Target = None,
) -> None:
    """Write a layer-truncated copy of the target (first N layers + its head) as a standalone drafter."""
    from adaspec.models import load_model
    from adaspec.train.truncate import truncate_model

    path = truncate_model(load_model(target), layers, out)
    Console().print(f"wrote a {layers}-layer drafter to {path}; use it with --drafter {path}")


def default_data_dir(target_name: str) -> Path:
    from adaspec.models import cache_root

    return cache_root() / "train" / target_name


@app.command("distill-data")
def distill_data(
    out: Annotated[Path | None, typer.Option(help="work directory of resumable JSONL files "
                                                   "[default: <cache>/train/<target>]")] = None,
    seed: int = DEFAULT_SEED,
    direct: Annotated[int, typer.Option(help="direct prompts (before removing repeats)")] = 1000,
    passages: Annotated[int, typer.Option(help="passages the target writes for summarization/RAG prompts")] = 120,
    batch_size: int = 32,
    max_new_tokens: MaxNew = 160,
    target: Target = None,
) -> None:
    """Self-distillation data: the target's greedy answers to synthetic (never Spec-Bench) prompts, and its
    hidden states at every position (for the EAGLE-style head)."""
    from adaspec.models import load_model
    from adaspec.train.data import build_corpus, count_lines, fastest_dtype

    model = load_model(target, fastest_dtype())
    paths = build_corpus(model, (out or default_data_dir(model.name)).expanduser(), seed, direct, passages,
                         batch_size, max_new_tokens)
    for p in paths:
        Console().print(f"{p}: {count_lines(p)} rows")


@app.command("train-drafter")
def train_drafter_cmd(
    out: Annotated[Path, typer.Option(help="run directory: eagle/ and small/ (checkpoint, model, report)")] = Path(
        "runs/drafter"),
    data: Annotated[Path | None, typer.Option(help="distill-data work directory, generated or resumed first "
                                                    "[default: <cache>/train/<target>]")] = None,
    kind: Annotated[str, typer.Option(help="eagle (head over the target's hidden states), small (standalone "
                                           "model) or both")] = "both",
    vocab: Annotated[int, typer.Option(help="reduced head size")] = 8192,
    epochs: Annotated[float, typer.Option(help="EAGLE head: passes over the corpus")] = 2.0,
    depth: Annotated[int, typer.Option(help="EAGLE head: drafting steps unrolled in training")] = 3,
    layers: Annotated[str, typer.Option(help="small: target layers to copy, e.g. 0,1 or 0,-1")] = "0,-1",
    steps: Annotated[int, typer.Option(help="small: optimizer steps")] = 150,
    batch_size: int = 8,
    seq_len: int = 512,
    direct: Annotated[int, typer.Option(help="data: direct prompts (before removing repeats)")] = 1000,
    passages: Annotated[int, typer.Option(help="data: passages for summarization/RAG prompts")] = 120,
    seed: int = DEFAULT_SEED,
    target: Target = None,
    ship: Annotated[Path | None, typer.Option(help="also write the compact artifacts to SHIP/<kind>")] = None,
) -> None:
    """Distil drafters from the target on its own outputs: data (resumable), training (checkpointed), report."""
    import time

    from adaspec.drafters.eagle import EagleArtifact
    from adaspec.drafters.shipped import load_standalone, save_standalone
    from adaspec.models import encode_prompt, load_model
    from adaspec.train.data import CORPUS_BATCH, build_corpus, fastest_dtype, load_corpus
    from adaspec.train.drafter import DrafterTrainConfig, split_rows, train_drafter
    from adaspec.train.eagle import EagleTrainConfig, items_from_corpus, train_eagle
    from adaspec.train.report import acceptance_at_k, write_training_report

    kinds = {"both": ("eagle", "small"), "eagle": ("eagle",), "small": ("small",)}.get(kind)
    if kinds is None:
        raise AdaspecError(f"--kind must be eagle, small or both, got {kind!r}")
    try:
        picks = tuple(int(x) for x in layers.split(","))
    except ValueError:
        raise AdaspecError(f"--layers must be comma-separated integers, got {layers!r}") from None
    t0 = time.time()
    generator = load_model(target, fastest_dtype())
    paths = build_corpus(generator, (data or default_data_dir(generator.name)).expanduser(), seed, direct, passages)
    del generator
    rows, feats = load_corpus(paths, CORPUS_BATCH)
    err.print(f"corpus: {len(rows)} rows, {sum(len(r['completion_ids']) for r in rows)} completion tokens "
              f"({(time.time() - t0) / 60:.1f} min so far)")
    model = load_model(target)
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
            trained = load_model(str(run / "model"))
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
            source = run / ("model" if name == "eagle" else "compact")
            shutil.copytree(source, ship / name, dirs_exist_ok=True)
            shutil.copy(run / "report.md", ship / name / "TRAINING.md")
            Console().print(f"shipped {name} to {ship / name}")
    Console().print(f"total {(time.time() - t0) / 60:.1f} min")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: int = 8000,
    method: Annotated[str, typer.Option(help="default method spec; a request's `speculative` overrides it")] = "sd",
    target: Target = None,
    drafter: Drafter = None,
    dtype: Dtype = "float32",
    queue_size: Annotated[int | None, typer.Option(help="waiting requests; more get 429", show_default="64")] = None,
    timeout: Annotated[float | None, typer.Option(help="s per request, queue included", show_default="300")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="when a request gives none", show_default="128")] = None,
    drain: Annotated[float | None, typer.Option(help="shutdown grace for in-flight work, s", show_default="30")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads", show_default="torch's")] = None,
    log_level: str = "info",
) -> None:
    """OpenAI-compatible server: /v1/completions, /v1/chat/completions (SSE too), /v1/models, /health, /metrics."""
    try:
        from adaspec.server import ServerOptions, create_app, make_server
    except ModuleNotFoundError as e:
        if e.name not in ("fastapi", "uvicorn", "starlette", "pydantic"):
            raise
        install = "pip install 'adaspec\\[serve]'"  # the backslash keeps rich from reading [serve] as markup
        raise AdaspecError(f"`adaspec serve` needs {e.name}, which is not installed: {install}") from None
    from adaspec.methods import load_drafter, parse_method
    from adaspec.models import load_model

    parse_method(method)  # a bad spec fails before the model loads
    if threads:
        import torch

        torch.set_num_threads(threads)
    given = dict(queue_size=queue_size, timeout_s=timeout, max_tokens=max_tokens, drain_s=drain)
    options = ServerOptions(**{k: v for k, v in given.items() if v is not None})
    model = load_model(target, dtype)
    server = make_server(create_app(model, method, load_drafter(drafter, model, dtype), options), host, port, log_level)
    err.print(f"serving {model.name} ({method}) on http://{host}:{port}/v1")
    server.run()


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
