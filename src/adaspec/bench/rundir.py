"""A bench run directory as a whole: summary.json, report.md and plots/ rebuilt from its files
(`adaspec report DIR`), and several runs side by side (`adaspec compare DIR...`).

`adaspec bench --out DIR` leaves the raw material there: records.jsonl (one line per question and method, each
carrying the environment it ran in), config.json (the run's options), costs.json (the measured costs) and
skipped.json (what its last invocation skipped). Everything else is derived from them by `rebuild`, which the
bench itself calls, so `adaspec report DIR` reproduces summary.json and report.md byte for byte. Runs written
before costs.json existed keep their costs, environment and skipped list only in summary.json, read for them.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from adaspec.bench.bound import bound, forward_ms
from adaspec.bench.report import compare_markdown, write_report
from adaspec.bench.specbench import write_answers
from adaspec.bench.summary import load_records, summarize
from adaspec.core.errors import AdaspecError

RECORDS, CONFIG, COSTS, SKIPPED, SUMMARY, REPORT = (
    "records.jsonl", "config.json", "costs.json", "skipped.json", "summary.json", "report.md")


def _read_json(path: Path, default: object = None) -> object:
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AdaspecError(f"{path}: not valid JSON ({e.msg}); fix or delete it") from None


def environments(records: list[dict]) -> list[dict]:
    """The distinct environments the records ran in, most records first: [{"environment", "records"}]."""
    counts = Counter(json.dumps(r["environment"], sort_keys=True) for r in records if r.get("environment"))
    return [{"environment": json.loads(e), "records": n} for e, n in counts.most_common()]


def build_summary(run: Path) -> tuple[dict, list[dict]]:
    """(summary, records) of a run directory, from its files alone; writes nothing."""
    if not (run / RECORDS).is_file():
        raise AdaspecError(f"{run} has no {RECORDS}: a report is built from the records of `adaspec bench --out "
                           f"{run}`")
    legacy = _read_json(run / SUMMARY, {})  # runs from before costs.json
    costs = _read_json(run / COSTS, legacy.get("costs"))
    records = load_records(run / RECORDS, (costs or {}).get("backend", "torch"))  # the run's backend, for older records
    summary = summarize(records, _read_json(run / CONFIG, legacy.get("config", {})))
    summary["costs"] = costs
    envs = environments(records)
    summary["environment"] = envs[0]["environment"] if envs else legacy.get("environment")
    if len(envs) > 1:  # e.g. a run resumed on another machine: every environment, with its record count
        summary["environments"] = envs
    summary["skipped"] = _read_json(run / SKIPPED, legacy.get("skipped", []))
    summary["bound"] = bound(records, summary["costs"], summary["methods"])
    summary["forward_ms"] = forward_ms(records)
    return summary, records


def rebuild(run: Path, answers: bool = False) -> dict:
    """Write run/summary.json, run/report.md and run/plots/ from the run's files (and, with `answers`, the
    Spec-Bench answer files run/model_answer/*.jsonl); return the summary."""
    summary, records = build_summary(run)
    (run / SUMMARY).write_text(json.dumps(summary, indent=2))
    write_report(summary, records, run)
    if answers:
        target = Path(str(summary["config"].get("target") or "model"))  # a name, a directory or a .gguf file
        write_answers(records, target.stem if target.suffix == ".gguf" else target.name, run,
                      (run / RECORDS).stat().st_mtime)
    return summary


def load_summary(run: Path) -> dict:
    """A run's summary: rebuilt from its records (nothing written), or its summary.json when it has no records
    (a published run such as benchmarks/foundation)."""
    if (run / RECORDS).is_file():
        return build_summary(run)[0]
    if (run / SUMMARY).is_file():
        return _read_json(run / SUMMARY)
    raise AdaspecError(f"{run} is not a bench run: it has neither {RECORDS} nor {SUMMARY}")


def compare(runs: list[Path], plot: Path | None = None) -> str:
    """Markdown putting runs side by side (see report.compare_markdown); a run is named as given. Where runs keep
    their records, whether each method's tokens equal the first run's (a batched run against one decoded one
    question at a time); with `plot`, throughput and p99 latency against concurrency drawn there."""
    if not runs:
        raise AdaspecError("name at least one run directory to compare")
    names = [str(r) for r in runs]
    summaries = [load_summary(r) for r in runs]
    tokens = [{(r["question_id"], r["method"]): r["token_ids"] for r in load_records(r / RECORDS)}
              if (r / RECORDS).is_file() else None for r in runs]
    text = compare_markdown(names, summaries, same_tokens(names, tokens))
    if plot is not None:
        from adaspec.bench.report import throughput_plot

        try:
            throughput_plot(names, summaries, plot)
        except ImportError:
            text += "\n(matplotlib is not installed: no throughput plot; `pip install adaspec[plots]`)\n"
        else:
            text += f"\n![throughput and p99 latency against concurrency]({plot.name})\n"
    return text


def same_tokens(names: list[str], tokens: list[dict | None]) -> dict[str, dict[str, float]]:
    """{run: {method: share of the questions both answered whose tokens equal the first run's same method}} for every
    run after the first (runs without records, or sharing no question, are left out)."""
    first = tokens[0]
    out: dict[str, dict[str, float]] = {}
    for name, mine in zip(names[1:], tokens[1:], strict=True):
        if first is None or mine is None:
            continue
        for method in sorted({m for _, m in mine}):
            both = [key for key in mine if key[1] == method and key in first]
            if both:
                out.setdefault(name, {})[method] = sum(mine[k] == first[k] for k in both) / len(both)
    return out
