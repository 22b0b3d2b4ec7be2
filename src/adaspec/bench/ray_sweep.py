"""`adaspec sweep --ray`: the sweep's `ar` baseline and its grid points as Ray tasks.

A local Ray cluster is started by default; `--ray-address` joins a running one ('auto', or 'ray://host:10001').
Each task loads the models itself and runs the functions the sequential sweep runs (`run_method` for the
baseline, `sweep_point` for a point), so with the same seeds it produces the same records, timings aside. The
driver loads no model: it runs the baseline task first (every point is measured against it), then submits every
grid point and appends each to sweep.jsonl as it finishes, so an interrupted run resumes as the sequential one
does (and either kind of run resumes the other's directory: the configuration does not name the executor).

On a cluster of several machines, every node needs adaspec installed in the same environment and the data file
and model paths at the same place (a shared filesystem). Tasks on one machine share its cores: give each the
cores it should time with (`--ray-cpus`); the baseline runs in a task of the same size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from adaspec.bench.data import Question
from adaspec.bench.summary import load_records
from adaspec.bench.sweep import SweepOptions, append_line, baseline_spec, load_models, run_method, sweep_point
from adaspec.core.errors import AdaspecError

INSTALL = "pip install 'adaspec\\[ray]'"  # the backslash keeps rich from reading [ray] as markup


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: start a local cluster; else the address of a running one
    cpus_per_task: int = 1  # cores each task reserves (Ray sets its OMP_NUM_THREADS, hence torch's threads)
    num_cpus: int | None = None  # a local cluster's cores (None: all of them)


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
