"""`adaspec sweep`: CM-ASD hyperparameters over a grid, each point one method spec run through the bench
runner on the same prompts, against `ar` (on the backend the base method runs on: `baseline_spec`) measured once
on those prompts and reused for every point.

Writes into --out: `ar.jsonl` (the baseline's records), `sweep.jsonl` (one line per grid point: its spec,
grid values and the bench fields; a rerun skips points already there), `pareto.json` (the points no other
point beats on both speedup and alignment, and on both speedup and task quality) and `plots/pareto.png`.
`sweep_point` is a pure function of (spec, options, baseline records) so it can run on other workers.

`--ray` runs the baseline and the points as Ray tasks (`run_on_ray`). A local Ray cluster is started by default;
`--ray-address` joins a running one ('auto', or 'ray://host:10001'). Each task loads the models itself and runs the
functions the sequential sweep runs (`run_method` for the baseline, `sweep_point` for a point), so with the same
seeds it produces the same records, timings aside. The driver loads no model: it runs the baseline task first (every
point is measured against it), then submits every grid point and appends each to sweep.jsonl as it finishes, so an
interrupted run resumes as the sequential one does (and either kind of run resumes the other's directory: the
configuration does not name the executor).

On a cluster of several machines, every node needs adaspec installed in the same environment and the data file
and model paths at the same place (a shared filesystem). Tasks on one machine share its cores: give each the
cores it should time with (`--ray-cpus`); the baseline runs in a task of the same size.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from adaspec.bench.data import Question, load_questions
from adaspec.bench.summary import load_records, method_fields
from adaspec.core.config import GenerationConfig
from adaspec.core.errors import AdaspecError
from adaspec.core.models import BUNDLED, LoadedModel, encode_prompt, load_model
from adaspec.methods import DrafterChoice, Placement, build_runner, default_drafter, get, load_drafter, parse_method
from adaspec.methods.options import render

QUALITY = ("bleu", "rougeL", "gsm8k_acc")  # task quality: the mean of those that apply (gsm8k_acc x 100)
PLOT = Path("plots") / "pareto.png"
INSTALL = "pip install 'adaspec\\[ray]'"  # the backslash keeps rich from reading [ray] as markup


@dataclass
class SweepOptions:
    data: Path
    out: Path
    base: str = "cmasd"  # the method spec the grid's options are added to, e.g. cmasd:early_stop=0,beta=3
    grid: dict[str, tuple[float, ...]] = field(default_factory=lambda: get("cmasd").grid)  # the registry's
    categories: list[str] | None = None
    limit: int | None = None
    target: str | None = None
    drafter: str | None = None
    dtype: str = "float32"
    chat: bool = True
    generation: GenerationConfig = field(default_factory=GenerationConfig)


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: start a local cluster; else the address of a running one
    cpus_per_task: int = 1  # cores each task reserves (Ray sets its OMP_NUM_THREADS, hence torch's threads)
    num_cpus: int | None = None  # a local cluster's cores (None: all of them)


@dataclass
class Models:
    target: LoadedModel
    drafter: DrafterChoice


def load_models(opts: SweepOptions) -> Models:
    target = load_model(opts.target, opts.dtype)
    return Models(target, load_drafter(opts.drafter, target, opts.dtype))


def _number(v: float) -> str:
    return f"{v:g}"


def point_specs(base: str, grid: dict[str, tuple[float, ...]]) -> list[tuple[str, dict[str, float]]]:
    """(spec, grid values) for every grid point, specs in one canonical spelling (they key sweep.jsonl)."""
    spec = parse_method(base)
    axes = {k: v for k, v in grid.items() if v}  # an empty axis is left out, so it neither clashes nor must exist
    clash = sorted(set(axes) & set(spec.given))
    if clash:
        raise AdaspecError(f"--base {base} sets {', '.join(clash)}, which the grid sweeps; drop it from one of them")
    options = spec.method.fields
    unknown = [k for k in axes if k not in options]
    if unknown:
        raise AdaspecError(f"method '{spec.name}' has no option {', '.join(unknown)} to sweep; "
                           f"options: {', '.join(options)} (pass '' to leave an axis out)")
    fixed = [f"{k}={render(getattr(spec.options, k))}" for k in spec.given]
    points = []
    for values in itertools.product(*axes.values()):
        point = dict(zip(axes, values, strict=True))
        label = f"{spec.name}:" + ",".join(fixed + [f"{k}={_number(v)}" for k, v in point.items()])
        parse_method(label)  # every point's values must be valid
        points.append((label.rstrip(":"), point))
    return points


def baseline_spec(base: str) -> str:
    """The `ar` a sweep's points are measured against: on the backend the base method runs on (its backend= and
    format= options over the default; a method without them, SpecBound, runs on torch)."""
    options = parse_method(base).options
    if not isinstance(options, Placement):
        return "ar:backend=torch"
    given = [f"{k}={v}" for k, v in (("backend", options.backend), ("format", options.format)) if v is not None]
    return "ar:" + ",".join(given) if given else "ar"


def questions_of(opts: SweepOptions) -> list[Question]:
    questions = load_questions(opts.data, opts.categories, opts.limit)
    if not questions:
        raise AdaspecError("no questions selected")
    return questions


def run_method(spec: str, opts: SweepOptions, models: Models, questions: list[Question],
               progress: Callable[[], None] | None = None) -> Iterator[dict]:
    """Bench records of one method on `questions`, as they finish (after a short warm-up); prompts that fail
    (e.g. beyond the context) are skipped."""
    from adaspec.bench.runner import answer

    if not questions:
        return
    gen = opts.generation
    runner = build_runner(parse_method(spec), models.target, models.drafter, gen)
    warm = encode_prompt(models.target.tokenizer, questions[0].turns[0], opts.chat)[:64]
    runner(warm, GenerationConfig(max_new_tokens=8, sampling=gen.sampling, seed=gen.seed))
    for q in questions:
        try:
            yield answer(runner, models.target, q, gen, opts.chat)
        except AdaspecError:
            pass
        finally:
            if progress is not None:
                progress()


def quality(fields: dict) -> float | None:
    """Task quality of a point: the mean of BLEU, ROUGE-L and GSM8K accuracy x 100 where they apply."""
    values = [fields[k] * (100 if k == "gsm8k_acc" else 1) for k in QUALITY if fields.get(k) is not None]
    return sum(values) / len(values) if values else None


def sweep_point(spec: str, opts: SweepOptions, baseline: list[dict], models: Models | None = None,
                progress: Callable[[], None] | None = None) -> dict:
    """One grid point: run `spec` on the questions `ar` answered in `baseline`; its sweep.jsonl record (the
    bench summary fields against that baseline, and `quality`). Loads the models unless given them."""
    models = models or load_models(opts)
    answered = {r["question_id"] for r in baseline}
    questions = [q for q in questions_of(opts) if q.question_id in answered]
    records = list(run_method(spec, opts, models, questions, progress))
    fields = method_fields(records, {r["question_id"]: r for r in baseline}).to_json()
    parsed = parse_method(spec)
    point = {k: v for k in parsed.given if isinstance(v := getattr(parsed.options, k), int | float)}
    q = quality(fields)
    return {"key": spec, "spec": spec, **point, **fields, "quality": None if q is None else round(q, 4)}


def pareto_front(points: list[dict], x: str, y: str) -> list[dict]:
    """Points that no other point beats on both x and y (>= on both, > on one), by x descending; points
    missing either are left out."""
    scored = [p for p in points if p.get(x) is not None and p.get(y) is not None]
    front = [p for p in scored
             if not any(o[x] >= p[x] and o[y] >= p[y] and (o[x] > p[x] or o[y] > p[y]) for o in scored)]
    return sorted(front, key=lambda p: (-p[x], -p[y]))


def append_line(path: Path, record: dict) -> None:
    """Append one JSON line, first ending a line an interrupted run left unfinished."""
    with path.open("ab+") as f:
        f.seek(0, 2)
        if f.tell():
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write((json.dumps(record) + "\n").encode())


def read_points(path: Path) -> list[dict]:
    """sweep.jsonl's points; a line cut short by an interrupted run is dropped (it reruns)."""
    points = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            point = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(point, dict) and "key" in point:
            points.append(point)
    return points


def pareto_plot(points: list[dict], fronts: dict[str, list[dict]], ar: dict, path: Path) -> bool:
    """Speedup against alignment and against task quality: every point, its front joined, `ar` marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not points:
        return False
    fig = Figure(figsize=(11, 4.5))
    FigureCanvasAgg(fig)
    for ax, (y, front) in zip(fig.subplots(1, 2), fronts.items(), strict=True):
        scored = [p for p in points if p.get("speedup_vs_ar") is not None and p.get(y) is not None]
        ax.scatter([p["speedup_vs_ar"] for p in scored], [p[y] for p in scored], s=14, color="0.6", label="grid point")
        ax.plot([p["speedup_vs_ar"] for p in front], [p[y] for p in front], "o-", color="C3", label="Pareto front")
        for p in front:
            axes = get(p["spec"].partition(":")[0]).grid
            short = ",".join(f"{k[0]}={_number(p[k])}" for k in axes if p.get(k) is not None)
            ax.annotate(short, (p["speedup_vs_ar"], p[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if ar.get(y) is not None:
            ax.scatter([1.0], [ar[y]], marker="*", s=90, color="k", label="ar")
        ax.set_xlabel("speedup vs ar")
        ax.set_ylabel({"alignment": "alignment with ar (BLEU)", "quality": "task quality (BLEU / ROUGE-L)"}[y])
        ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return True


def sweep_config(opts: SweepOptions, target_name: str) -> dict:
    gen = opts.generation
    return {
        "data": str(opts.data), "categories": opts.categories, "limit": opts.limit, "base": opts.base,
        "grid": {k: list(v) for k, v in opts.grid.items()}, "target": target_name,
        "drafter": opts.drafter or default_drafter(target_name), "dtype": opts.dtype, "chat": opts.chat,
        "max_new_tokens": gen.max_new_tokens, "temperature": gen.sampling.temperature, "top_k": gen.sampling.top_k,
        "top_p": gen.sampling.top_p, "seed": gen.seed, "baseline": baseline_spec(opts.base),
    }


def summarize_sweep(points: list[dict], baseline: list[dict], out: Path) -> dict:
    """pareto.json and plots/pareto.png from the sweep's records alone."""
    ar = method_fields(baseline, {r["question_id"]: r for r in baseline}).to_json() if baseline else {}
    ar["quality"] = quality(ar) if ar else None
    fronts = {"alignment": pareto_front(points, "speedup_vs_ar", "alignment"),
              "quality": pareto_front(points, "speedup_vs_ar", "quality")}
    summary = {"points": len(points), "ar": ar, "front_alignment": fronts["alignment"],
               "front_quality": fronts["quality"]}
    (out / "pareto.json").write_text(json.dumps(summary, indent=1))
    try:
        pareto_plot(points, fronts, ar, out / PLOT)
    except ImportError:
        pass  # matplotlib is an optional extra: pareto.json still says it all
    return summary


def require_ray():
    """The ray module, or an AdaspecError saying how to install it."""
    try:
        import ray
    except ModuleNotFoundError as e:
        if e.name != "ray":
            raise
        raise AdaspecError(f"`adaspec sweep --ray` needs Ray, which is not installed: {INSTALL}") from None
    return ray


def baseline_records(opts: SweepOptions, questions: list[Question]) -> list[dict]:
    """A task: `ar`'s records on `questions`."""
    return list(run_method(baseline_spec(opts.base), opts, load_models(opts), questions))


def point_record(spec: str, opts: SweepOptions, baseline: list[dict]) -> dict:
    """A task: one grid point's sweep.jsonl record."""
    return sweep_point(spec, opts, baseline)


def _get(ray, ref):
    """ray.get, an AdaspecError raised in a task re-raised as itself (the CLI prints it without a traceback)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, AdaspecError):
            raise AdaspecError(str(e.cause)) from None
        raise


def run_on_ray(opts: SweepOptions, ray_opts: RayOptions, todo: list[str], ar_todo: list[Question],
               questions: int, ar_path: Path, sweep_path: Path, console: Console) -> list[dict]:
    """Run the missing baseline questions, then the `todo` points, as Ray tasks, appending to ar.jsonl and
    sweep.jsonl as results come in; return the baseline records. Uses a Ray session already initialised in
    this process (and leaves it running), else starts or joins one and shuts it down at the end."""
    ray = require_ray()
    started = not ray.is_initialized()
    if started:
        local = ray_opts.address is None
        console.print("starting a local Ray cluster" if local else f"joining the Ray cluster at {ray_opts.address}")
        ray.init(address=ray_opts.address, num_cpus=ray_opts.num_cpus if local else None, include_dashboard=False)
    columns = (TextColumn("[bold]sweep (ray)"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.description}"))
    try:
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("", total=(len(todo) + bool(ar_todo)) * questions)
            if ar_todo:
                progress.update(task, description=baseline_spec(opts.base))
                progress.advance(task, questions - len(ar_todo))
                remote = ray.remote(num_cpus=ray_opts.cpus_per_task)(baseline_records)
                for r in _get(ray, remote.remote(opts, ar_todo)):
                    append_line(ar_path, r)
                progress.advance(task, len(ar_todo))
            baseline = load_records(ar_path)
            shared = ray.put(baseline)
            remote = ray.remote(num_cpus=ray_opts.cpus_per_task)(point_record)
            pending = {remote.remote(spec, opts, shared): spec for spec in todo}
            progress.update(task, description=f"{len(pending)} points")
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    spec = pending.pop(ref)
                    append_line(sweep_path, _get(ray, ref))
                    progress.update(task, description=spec)
                    progress.advance(task, questions)
    finally:
        if started:
            ray.shutdown()
    return baseline


def run_sweep(opts: SweepOptions, console: Console | None = None, ray: RayOptions | None = None) -> dict:
    """Run (or resume) the sweep into opts.out; with `ray`, the baseline and the points as Ray tasks
    (`run_on_ray`), writing the same files."""
    console = console or Console(stderr=True)
    specs = point_specs(opts.base, opts.grid)
    questions = questions_of(opts)
    target_name = opts.target or BUNDLED
    config = sweep_config(opts, target_name)
    opts.out.mkdir(parents=True, exist_ok=True)
    config_path, ar_path, sweep_path = opts.out / "config.json", opts.out / "ar.jsonl", opts.out / "sweep.jsonl"
    if config_path.exists() and json.loads(config_path.read_text()) != config:
        raise AdaspecError(f"{opts.out} holds a sweep with another configuration; choose a new --out")
    config_path.write_text(json.dumps(config, indent=2))
    baseline = load_records(ar_path) if ar_path.exists() else []
    done = {p["key"] for p in read_points(sweep_path)}
    todo = [s for s, _ in specs if s not in done]
    ar_todo = [q for q in questions if q.question_id not in {r["question_id"] for r in baseline}]
    console.print(f"sweep: {len(specs)} points ({len(specs) - len(todo)} done) x {len(questions)} questions")
    if (todo or ar_todo) and ray is not None:
        baseline = run_on_ray(opts, ray, todo, ar_todo, len(questions), ar_path, sweep_path, console)
    elif todo or ar_todo:
        console.print(f"loading target {target_name} ({opts.dtype})")
        models = load_models(opts)
        columns = (TextColumn("[bold]sweep"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.description}"))
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("", total=(len(todo) + bool(ar_todo)) * len(questions))
            if ar_todo:
                progress.update(task, description=config["baseline"])
                progress.advance(task, len(questions) - len(ar_todo))
                for r in run_method(config["baseline"], opts, models, ar_todo, lambda: progress.advance(task)):
                    append_line(ar_path, r)
                baseline = load_records(ar_path)
            for spec in todo:
                progress.update(task, description=spec)
                append_line(sweep_path, sweep_point(spec, opts, baseline, models, lambda: progress.advance(task)))
    keys = {s for s, _ in specs}
    points = [p for p in read_points(sweep_path) if p["key"] in keys]
    return summarize_sweep(points, baseline, opts.out)
