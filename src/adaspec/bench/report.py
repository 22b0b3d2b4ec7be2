"""report.md and plots/ from a summary and its records."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from adaspec.bench import calibration as calib
from adaspec.bench.bound import CEILING_ALPHAS, CEILING_SPEEDUPS
from adaspec.bench.summary import APART_S
from adaspec.core.costmodel import Costs, alpha_needed, best_draft_length

COLUMNS = [
    ("tokens/s", "tokens_per_s"), ("speedup vs ar", "speedup_vs_ar"), ("TTFT ms", "ttft_ms"),
    ("decode tokens/s", "decode_tokens_per_s"), ("mean accepted", "mean_accepted"),
    ("acceptance rate", "acceptance_rate"), ("mean draft len", "mean_draft_len"), ("exact match", "exact_match"),
    ("alignment", "alignment"), ("BLEU", "bleu"), ("ROUGE-1", "rouge1"), ("ROUGE-2", "rouge2"),
    ("ROUGE-L", "rougeL"), ("GSM8K acc", "gsm8k_acc"), ("large share", "large_share"),
]
PLOT = Path("plots") / "acceptance_hist.png"
# --ablation: the columns of CM-ASD's Table III, plus what explains the speed
ABLATION_COLUMNS = [
    ("speedup", "speedup_vs_ar"), ("mean accepted", "mean_accepted"), ("mean draft len", "mean_draft_len"),
    ("cut per step", "mean_cut"), ("BLEU", "bleu"), ("ROUGE-1", "rouge1"), ("ROUGE-2", "rouge2"),
    ("ROUGE-L", "rougeL"), ("alignment", "alignment"), ("exact match", "exact_match"),
]


def _fmt(v: object) -> str:
    return "–" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _key_order(key: str) -> tuple[int, float | str]:
    try:
        return (0, float(key))
    except ValueError:
        return (1, key)


def _costs(costs: dict) -> list[str]:
    """The verify-cost curve of every backend the run used (one row per backend: ms to score n positions and the
    ratio to one), then each backend's drafter costs as bullets. Runs from before per-backend costs have only the
    top-level entries, shown the same way under their one backend."""
    entries = _backend_drafters(costs)
    per = {label: c for label, c, _ in entries}
    sizes = sorted({n for c in per.values() for n in c.get("verify_ms", {})}, key=_key_order)
    lines = ["## Measured costs", "",
             f"Time to score n positions on a {costs.get('context_tokens', '?')}-token context (ms), and its ratio to "
             "one position: on a backend where the ratio stays near 1, drafting long pays; where it grows near n, "
             "only drafts the target almost surely accepts do.", ""]
    rows = [[label, c.get("weights", "–"), "ms"] + [_fmt(c["verify_ms"].get(n)) for n in sizes]
            for label, c in per.items() if "verify_ms" in c]
    rows += [[label, c.get("weights", "–"), "ratio"] + [_fmt(c["verify_ratio"].get(n)) for n in sizes]
             for label, c in per.items() if "verify_ratio" in c]
    lines += _table(["backend", "weights", ""] + sizes, sorted(rows, key=lambda r: r[0])) + [""]
    for label, _, drafters in entries:
        lines += [f"- {label}, drafter {name}: first token {_fmt(d.get('drafter_first_ms'))} ms, each further "
                  f"{_fmt(d.get('drafter_step_ms'))} ms ({_fmt(d.get('drafter_cost_ratio'))} of a target step)"
                  for name, d in drafters.items()]
    return (lines if lines[-1] else lines[:-1]) + [""] + _ceiling(entries)


def _backend_drafters(costs: dict) -> list[tuple[str, dict, dict]]:
    """(backend label, its costs, {drafter name: its cost entry}) for every backend in a costs.json; runs from before
    per-backend costs have only the top-level entries, shown under their one backend."""
    per = costs.get("backends") or {costs.get("backend", "torch"): costs}
    out = []
    for label, c in per.items():
        drafters = {c["drafter"]: c} if "drafter" in c else {}
        drafters.update(c.get("drafters") or {})
        out.append((label, c, drafters))
    return out


def _ceiling(entries: list[tuple[str, dict, dict]]) -> list[str]:
    """What the measured costs (`_backend_drafters`) allow any drafter: per backend and drafter, the best expected
    speedup at per-token acceptance alpha (and the fixed k that gives it), and the least alpha each speedup needs."""
    rows = []
    for label, c, drafters in entries:
        if "verify_ms" not in c:
            continue
        for name, d in (drafters or {"free": {}}).items():
            cost = Costs.of(c["verify_ms"], d)
            best = (best_draft_length(a, cost) for a in CEILING_ALPHAS)
            rows.append([label, name, *(f"{s:.2f} (k={k})" for k, s in best),
                         *(_fmt(alpha_needed(s, cost)) for s in CEILING_SPEEDUPS)])
    if not rows:
        return []
    lines = ["## What these costs allow", "",
             "The analytic bound turned around: with these costs, the best expected speedup over one-token decoding "
             "at a per-token acceptance alpha (max over fixed draft lengths within the measured verify sizes, i.i.d. "
             "acceptance), and the least alpha at which some draft length reaches a speedup (– : none does, even "
             "at alpha = 1).", ""]
    return lines + _table(["backend", "drafter", *(f"alpha {a}" for a in CEILING_ALPHAS),
                           *(f"alpha for {s}x" for s in CEILING_SPEEDUPS)], rows)


def acceptance_plot(records: list[dict], path: Path) -> bool:
    """Bar chart of the share of target forwards that emit 1, 2, ... tokens (accepted + 1), one bar group per
    method that drafts (methods whose steps never draft, like `ar`, would only add a bar at 1). False if
    there is nothing to plot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    emitted: dict[str, Counter[int]] = {}
    for r in records:
        if r.get("steps") and any(s["drafted"] for s in r["steps"]):
            emitted.setdefault(r["method"], Counter()).update(s["accepted"] + 1 for s in r["steps"])
    if not emitted:
        return False
    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / len(emitted)
    top = max(max(c) for c in emitted.values())
    for i, (name, counts) in enumerate(emitted.items()):
        total = sum(counts.values())
        xs = range(1, top + 1)
        ax.bar([x - 0.4 + (i + 0.5) * width for x in xs], [counts[x] / total for x in xs], width, label=name)
    ax.set_xticks(range(1, top + 1))
    ax.set_xlabel("tokens emitted per target forward (accepted + 1)")
    ax.set_ylabel("share of target forwards")
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return True


def _ablation(summary: dict) -> list[str]:
    methods = summary["methods"]
    order = [m for m in summary.get("config", {}).get("methods", []) if m in methods]
    lines = ["## Ablation (CM-ASD, cf. the paper's Table III)", "",
             "Speedup vs `ar` in this run; BLEU on translation and ROUGE on summarization against the references; "
             "alignment (BLEU vs `ar`'s text) and exact match against `ar`.", ""]
    return lines + _table(["method"] + [c for c, _ in ABLATION_COLUMNS],
                          [[name] + [_fmt(methods[name].get(k)) for _, k in ABLATION_COLUMNS] for name in order])


SPECBOUND_COLUMNS = [
    ("speedup", "speedup_vs_ar"), ("mean accepted", "mean_accepted"), ("mean draft len", "mean_draft_len"),
    ("mean exit layer", "mean_exit_layer"), ("stopped at the bound layer", "bound_stop_share"),
    ("stopped at d_max", "d_max_stop_share"), ("exact match", "exact_match"),
]


def _specbound(methods: dict) -> list[str]:
    """SpecBound's early exits: where drafted tokens exited and why drafts ended, per method that exits early."""
    rows = [[name] + [_fmt(m.get(k)) for _, k in SPECBOUND_COLUMNS] for name, m in methods.items()
            if m.get("bound_stop_share") is not None]
    return ["## Early exits (SpecBound)", "", "Mean exit layer over drafted tokens; shares of drafting steps whose "
            "draft ended at a token still unsure at the deepest exit, or at d_max tokens.", "",
            *_table(["method"] + [c for c, _ in SPECBOUND_COLUMNS], rows)]


def _calibration(calibration: dict, out_dir: Path) -> list[str]:
    lines = ["## Confidence calibration", "",
             f"Exact acceptance (drafted token == target argmax) per confidence bin; Spearman over bins with >= "
             f"{calib.MIN_COUNT} tokens, and over tokens.", ""]
    rows = [[name, metric, str(c["tokens"]), _fmt(c["acceptance"]), _fmt(c["spearman"]), _fmt(c["spearman_tokens"])]
            for name, per_metric in calibration.items() for metric, c in per_metric.items()]
    lines += _table(["method", "metric", "tokens", "acceptance", "Spearman (bins)", "Spearman (tokens)"], rows)
    bins = next(iter(calibration.values()))[calib.ENSEMBLE]["bins"]
    header = ["ensemble: count / acceptance"] + [f"{b['lo']:.1f}-{b['hi']:.1f}" for b in bins]
    lines += ["", *_table(header, [[name] + [f"{b['count']} / {_fmt(b['acceptance'])}"
                                            for b in per_metric[calib.ENSEMBLE]["bins"]]
                                   for name, per_metric in calibration.items()]), ""]
    try:
        calib.calibration_plot(calibration, out_dir / calib.PLOT)
    except ImportError:
        lines.append("(matplotlib is not installed: no calibration plot; `pip install adaspec[plots]`)")
    else:
        lines.append(f"![calibration]({calib.PLOT.as_posix()})")
    return lines


def write_report(summary: dict, records: list[dict], out_dir: Path) -> Path:
    """Write out_dir/report.md (config, method table, speedup per category, the ablation table with
    --ablation, confidence calibration, costs), the acceptance histogram out_dir/plots/acceptance_hist.png and
    the calibration plot out_dir/plots/calibration.png; return the report's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    methods = summary["methods"]
    lines = ["# adaspec bench report", "", "## Configuration", "", "```json",
             json.dumps(summary.get("config", {}), indent=1), "```", ""] + _environment(summary) + ["## Methods", ""]
    lines += _table(["method", "backend"] + [c for c, _ in COLUMNS],
                    [[name, _fmt(m.get("backend"))] + [_fmt(m.get(k)) for _, k in COLUMNS]
                     for name, m in methods.items()])
    per_category = {name: m.get("per_category", {}) for name, m in methods.items()}
    categories = sorted({c for pc in per_category.values() for c in pc})
    lines += ["", "## Speedup vs ar per category", "", "With its 95 % bootstrap interval over prompts (paired with "
              "`ar` per question, fixed seed; none with fewer than 2 questions).", ""]
    lines += _table(["method", "all"] + categories,
                    [[name, speedup_cell(methods[name])] + [speedup_cell(pc.get(c, {})) for c in categories]
                     for name, pc in per_category.items()])
    if any(m.get("measured_apart") for m in methods.values()):
        lines += [""] + _apart(methods)
    lines += [""] + _per_category(methods, categories)
    if any(m.get("vs_backend_ar") for m in methods.values()):
        lines += [""] + _vs_backend_ar(methods)
    if any(m.get("vs_peers") for m in methods.values()):
        lines += [""] + _vs_peers(methods)
    if any(m.get("load") for m in methods.values()):
        lines += [""] + _load(methods, (summary.get("costs") or {}).get("batch_ms") or {})
    if summary.get("bound"):
        lines += [""] + _bound(summary["bound"], summary.get("costs") or {})
    if summary.get("forward_ms"):
        lines += [""] + _forward_ms(summary["forward_ms"], summary.get("costs") or {})
    if summary.get("config", {}).get("ablation"):
        lines += [""] + _ablation(summary)
    if any(m.get("bound_stop_share") is not None for m in methods.values()):
        lines += [""] + _specbound(methods)
    if summary.get("calibration"):
        lines += [""] + _calibration(summary["calibration"], out_dir)
    if summary.get("costs"):
        lines += [""] + _costs(summary["costs"])
    if summary.get("skipped"):
        lines += ["", "## Skipped", ""] + [f"- #{s['question_id']} {s['method']}: {s['error']}"
                                           for s in summary["skipped"]]
    lines += ["", "## Acceptance", ""]
    try:
        plotted = acceptance_plot(records, out_dir / PLOT)
    except ImportError:
        lines.append("(matplotlib is not installed: no acceptance histogram; `pip install adaspec[plots]`)")
    else:
        lines.append(f"![acceptance histogram]({PLOT.as_posix()})" if plotted
                     else "(no method shows drafting steps: no acceptance histogram)")
    if summary.get("histograms"):
        lines += [""] + _histograms(summary["histograms"], out_dir)
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# the report's tables: the analytic bound's columns, then the serving latencies
BOUND_COLUMNS = [
    ("alpha", "alpha"), ("mean draft len", "mean_draft_len"), ("tokens/forward expected", "expected_tokens_per_step"),
    ("tokens/forward measured", "measured_tokens_per_step"), ("cost/forward expected", "expected_step_cost"),
    ("cost/forward measured", "measured_step_cost"), ("speedup expected", "expected_speedup"),
    ("speedup measured", "measured_speedup"), ("efficiency", "efficiency"), ("best k", "best_draft_len"),
    ("speedup at best k", "best_expected_speedup"),
]
HIST_PLOTS = {"emitted": (Path("plots") / "acceptance_by_category.png", "tokens emitted per target forward"),
              "drafted": (Path("plots") / "draft_len_hist.png", "drafted tokens verified per target forward")}


LOAD_COLUMNS = [
    ("N", "concurrency"), ("aggregate tokens/s", "aggregate_tokens_per_s"), ("vs ar", "aggregate_vs_ar"),
    ("latency p50 s", "latency_p50_s"), ("latency p99 s", "latency_p99_s"), ("TTFT p50 ms", "ttft_p50_ms"),
    ("TTFT p99 ms", "ttft_p99_ms"), ("TPOT p50 ms", "tpot_p50_ms"), ("TPOT p99 ms", "tpot_p99_ms"),
    ("sequences per call", "mean_batch"),
]


def _load(methods: dict, batch_ms: dict) -> list[str]:
    """Throughput and latency of a batched run, the draft lengths the cost rule chose by batch size, and the measured
    cost of one call by total positions it was choosing against."""
    lines = ["## Under load", "", "Questions decoded N at a time (`--concurrency N`); a request is one turn. "
             "Aggregate tokens/s: every new token over the wall time of the blocks the method decoded.", ""]
    loaded = {name: m["load"] for name, m in methods.items() if m.get("load")}
    lines += _table(["method"] + [c for c, _ in LOAD_COLUMNS],
                    [[name] + [_fmt(f.get(k)) for _, k in LOAD_COLUMNS] for name, f in loaded.items()])
    sizes = sorted({int(b) for f in loaded.values() for b in f.get("drafted_by_batch", {})})
    if sizes:
        lines += ["", "Mean tokens drafted and verified per sequence, by sequences in the call:", ""]
        lines += _table(["method"] + [str(b) for b in sizes],
                        [[name] + [_fmt(f.get("drafted_by_batch", {}).get(str(b))) for b in sizes]
                         for name, f in loaded.items()])
    for label, table in batch_ms.items():
        sizes = sorted(table, key=int)
        one = table[sizes[0]]
        lines += ["", f"Measured cost of one call on `{label}` by total positions scored (ms, and per position "
                  "relative to one alone):", ""]
        lines += _table(["positions"] + sizes, [["ms"] + [f"{table[n]:.1f}" for n in sizes],
                                                ["per position / one"] + [f"{table[n] / int(n) / one:.2f}"
                                                                          for n in sizes]])
    return lines


def speedup_cell(fields: dict, key: str = "speedup_vs_ar", ci: str = "speedup_ci") -> str:
    """'1.26 [1.10, 1.41]': a speedup (fields[key]) and its 95 % bootstrap interval (fields[ci + '_lo'], '_hi'); '–'
    where it does not apply."""
    s = fields.get(key)
    if s is None:
        return "–"
    lo, hi = fields.get(f"{ci}_lo"), fields.get(f"{ci}_hi")
    return f"{s:.2f}" + (f" [{lo:.2f}, {hi:.2f}]" if lo is not None and hi is not None else "")


def environment_line(env: dict | None) -> str:
    """'AMD EPYC ..., 2 threads, torch 2.13.0+cpu, transformers 5.24.0' ('–' without one)."""
    if not env:
        return "–"
    parts = [env.get("cpu_model") or env.get("cpu"), env.get("torch_threads") and f"{env['torch_threads']} threads",
             env.get("torch") and f"torch {env['torch']}",
             env.get("transformers") and f"transformers {env['transformers']}"]
    return ", ".join(str(p) for p in parts if p)


def _environment(summary: dict) -> list[str]:
    env = summary.get("environment")
    if not env:
        return []
    lines = ["## Environment", "", "Where the numbers come from (recorded with every record).", ""]
    lines += _table(["key", "value"], [[k, _fmt(v)] for k, v in env.items()])
    for e in summary.get("environments") or []:
        lines.append(f"- {e['records']} records: {environment_line(e['environment'])}")
    return lines + [""]


def _apart(methods: dict) -> list[str]:
    """Methods some of whose records ended far from their question's `ar` record, with the speedup over the
    questions measured together beside the one over all."""
    lines = ["## Measured apart", "",
             f"Questions whose record and `ar`'s ended more than {APART_S / 60:.0f} minutes apart (a run resumed on "
             "another day, a method rerun later) compare two states of the machine; the speedup over the questions "
             "measured together is the one to trust where the two differ.", ""]
    rows = [[name, str(m["measured_apart"]), speedup_cell(m), speedup_cell(m, "speedup_together", "together_ci")]
            for name, m in methods.items() if m.get("measured_apart")]
    return lines + _table(["method", "questions apart", "speedup, all", "speedup, measured together"], rows)


def _vs_backend_ar(methods: dict) -> list[str]:
    """Methods that ran on another backend than `ar`, against plain decoding on their own backend."""
    lines = ["## Against `ar` on the method's own backend", "",
             "`speedup vs ar` above compares every method with `ar` on the run's backend; a method that runs elsewhere "
             "(SpecBound and the transformers peers on torch) is here compared with the `ar` variant that ran there.",
             ""]
    rows = [[name, v["backend"], v["baseline"], speedup_cell(v, "speedup"), _fmt(v["exact_match"]),
             _fmt(v["alignment"])]
            for name, m in methods.items() if (v := m.get("vs_backend_ar"))]
    return lines + _table(["method", "backend", "against", "speedup", "exact match", "alignment"], rows)


def _vs_peers(methods: dict) -> list[str]:
    """Every method's speed against each peer that ran (what a user would otherwise run), with its interval."""
    peers = sorted({p for m in methods.values() for p in m.get("vs_peers", {})})
    lines = ["## Against the peers", "",
             "Speedup of each method over each peer measured in the same run (aggregate tokens/s ratio on the "
             "questions both answered, 95 % bootstrap interval): above 1, faster than what a user would otherwise run.",
             ""]
    rows = [[name] + [speedup_cell(m["vs_peers"].get(p, {}), "speedup") for p in peers]
            for name, m in methods.items() if m.get("vs_peers")]
    return lines + _table(["method"] + [f"vs {p}" for p in peers], rows)


def _per_category(methods: dict, categories: list[str]) -> list[str]:
    lines = ["## Per category"]
    for c in categories:
        cells = {name: m["per_category"][c] for name, m in methods.items() if c in m.get("per_category", {})}
        rows = [[name] + [speedup_cell(f) if k == "speedup_vs_ar" else _fmt(f.get(k)) for _, k in COLUMNS]
                for name, f in cells.items()]
        lines += ["", f"### {c}", ""] + _table(["method"] + [col for col, _ in COLUMNS], rows)
    return lines


def _bound(bounds: dict, costs: dict) -> list[str]:
    context = f" at a {costs['context_tokens']}-token context" if "context_tokens" in costs else ""
    lines = ["## Analytic bound and where the time goes", "",
             "Expected speedup (Leviathan et al.) from each method's measured per-token acceptance alpha and the "
             f"measured costs{context}: a forward verifying k drafted tokens emits E = (1 - alpha^(k+1)) / (1 - alpha) "
             "tokens and costs draft(k) + verify(k+1) target steps; E and the cost are averaged over the method's "
             "recorded draft lengths (i.i.d. acceptance assumed; see `adaspec/bench/bound.py`). Each method is "
             "modelled on its own backend's costs, and measured against `ar` on that backend. Efficiency = measured / "
             "expected. Best k: the fixed draft length the costs and alpha favour, and the speedup it implies.", ""]
    lines += _table(["method", "backend"] + [c for c, _ in BOUND_COLUMNS],
                    [[name, b.get("backend") or "torch"] + [_fmt(b.get(k)) for _, k in BOUND_COLUMNS]
                     for name, b in bounds.items()])
    lines += ["", "Time per target forward while decoding (ms; each turn's prefill left out): draft and verify from "
              "the measured costs, overhead the rest (acceptance, rollback, sampling, Python, and contexts longer "
              "than the costs' one).", ""]

    def share(b: dict, k: str) -> str:
        return f"{b[k]:.2f} ({100 * b[k] / b['ms_per_step']:.0f} %)" if b["ms_per_step"] else _fmt(b[k])

    lines += _table(["method", "ms per forward", "draft", "verify", "overhead"],
                    [[name, f"{b['ms_per_step']:.2f}", *(share(b, k) for k in ("draft_ms", "verify_ms", "overhead_ms"))]
                     for name, b in bounds.items()])
    return lines


def _forward_ms(times: dict, costs: dict) -> list[str]:
    keys = sorted({k for cells in times.values() for k in cells}, key=_key_order)
    lines = ["## Measured time per target forward", "",
             "Mean wall ms of one decoding step as the run measured it (drafting, the target forward, acceptance; "
             "each turn's prefill step left out), by positions the target scored (drafted + 1), with the number of "
             "steps; a routing method's steps by the model that produced the token. Every context the run met, "
             "where the costs table below is one.", ""]
    rows = [[name, *(f"{cells[k][0]:.1f} ({cells[k][1]})" if k in cells else "–" for k in keys)]
            for name, cells in times.items()]
    for label, c in (costs.get("backends") or {}).items():  # the costs' verify time, for reference
        rows.append([f"costs: verify ({label})", *(_fmt(c.get("verify_ms", {}).get(k)) if k.isdigit() else "–"
                                                   for k in keys)])
    return lines + _table(["method", *keys], rows)


def histogram_plot(hists: dict, kind: str, path: Path) -> bool:
    """Bars of the share of target forwards per value of `kind` ('emitted' or 'drafted'), one panel for all
    categories and one per category, a bar group per method that drafts. False if there is nothing to plot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    hists = {m: h for m, h in hists.items() if any(n != "0" for n in h.get("drafted", {}))}  # not `ar`
    if not hists:
        return False
    panels = ["all"] + sorted({c for h in hists.values() for c in h.get("per_category", {})})
    fig = Figure(figsize=(4.2 * len(panels), 3.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels, strict=True):
        counts = {m: (h if panel == "all" else h.get("per_category", {}).get(panel, {})).get(kind, {})
                  for m, h in hists.items()}
        counts = {m: c for m, c in counts.items() if c}
        if not counts:
            continue
        xs = sorted({int(x) for c in counts.values() for x in c})
        width = 0.8 / len(counts)
        for i, (m, c) in enumerate(counts.items()):
            total = sum(c.values())
            ax.bar([x - 0.4 + (i + 0.5) * width for x in xs], [c.get(str(x), 0) / total for x in xs], width, label=m)
        ax.set_xticks(xs)
        ax.set_title(panel)
        ax.set_xlabel(HIST_PLOTS[kind][1])
        ax.legend(fontsize=7)
    axes[0].set_ylabel("share of target forwards")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return True


def _histograms(hists: dict, out_dir: Path) -> list[str]:
    lines = ["Per category: tokens emitted per target forward, and the draft length verified per forward."]
    for kind, (path, label) in HIST_PLOTS.items():
        try:
            plotted = histogram_plot(hists, kind, out_dir / path)
        except ImportError:
            return lines + ["(matplotlib is not installed: no histograms per category; `pip install adaspec[plots]`)"]
        if plotted:
            lines += ["", f"![{label}]({path.as_posix()})"]
    return lines


def load_row(fields: dict) -> dict:
    """A method's throughput and latency: its `load` fields in a batched run; one question at a time, the same read
    off the serial run (N = 1, aggregate = tokens/s; latencies per request are not kept apart there)."""
    return fields.get("load") or {"concurrency": 1, "aggregate_tokens_per_s": fields.get("tokens_per_s")}


def throughput_plot(names: list[str], summaries: list[dict], path: Path) -> None:
    """Aggregate tokens/s and p99 latency against concurrency, a line per method over the runs."""
    points: dict[str, list[tuple[int, float, float | None]]] = {}
    for s in summaries:
        for method, fields in s["methods"].items():
            row = load_row(fields)
            if row.get("aggregate_tokens_per_s") is not None:
                points.setdefault(method, []).append((row["concurrency"], row["aggregate_tokens_per_s"],
                                                      row.get("latency_p99_s")))
    load_plot(points, path, "concurrent sequences", "p99 latency per request (s)")


def load_plot(points: dict[str, list[tuple[int, float, float | None]]], path: Path, x_label: str,
              latency_label: str) -> None:
    """Two panels against concurrency on a log2 axis, a line per name: aggregate tokens/s, and p99 latency (the
    points that have one). points: name -> [(concurrency, tokens/s, p99 latency or None)]. Also the load sweep's
    plot (scripts/load_sweep.py). ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name, pts in points.items():
        pts = sorted(pts)
        a.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        lat = [(p[0], p[2]) for p in pts if p[2] is not None]
        if lat:
            b.plot([p[0] for p in lat], [p[1] for p in lat], marker="o", label=name)
    for ax, label in ((a, "aggregate tokens/s"), (b, latency_label)):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(x_label)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    a.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare_markdown(names: list[str], summaries: list[dict], same: dict[str, dict[str, float]] | None = None) -> str:
    """Runs side by side: their configurations (what differs), environments, one row per (method, run) with the
    speedup's interval, the expected speedup and efficiency, and the speedup per category; throughput and latency
    under load where a run was batched, and `same` (rundir.same_tokens): tokens equal to the first run's."""
    configs = [s.get("config") or {} for s in summaries]
    keys = list(dict.fromkeys(k for c in configs for k in c))
    differ = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]
    lines = ["# adaspec compare", "", "## Runs", ""]
    lines += _table(["run", "target", "drafter", "dtype", "questions", "max new tokens", "environment"],
                    [[n, *(_fmt(c.get(k)) for k in ("target", "drafter", "dtype", "questions", "max_new_tokens")),
                      environment_line(s.get("environment"))]
                     for n, c, s in zip(names, configs, summaries, strict=True)])
    if differ and len(names) > 1:
        lines += ["", "Options that differ:", ""]
        lines += _table(["option", *names], [[k, *(json.dumps(c.get(k)) for c in configs)] for k in differ])
    methods = list(dict.fromkeys(m for s in summaries for m in s["methods"]))
    columns = [c for c in COLUMNS if c[1] != "speedup_vs_ar"]
    lines += ["", "## Methods", "", "Speedup vs `ar` of the same run, with its 95 % bootstrap interval over prompts; "
              "expected speedup and efficiency from the analytic bound (see each run's report.md).", ""]
    rows = [[m, n, speedup_cell(s["methods"][m]), *(_fmt(s["methods"][m].get(k)) for _, k in columns),
             *(_fmt((s.get("bound") or {}).get(m, {}).get(k)) for k in ("expected_speedup", "efficiency"))]
            for m in methods for n, s in zip(names, summaries, strict=True) if m in s["methods"]]
    lines += _table(["method", "run", "speedup vs ar [95 % CI]", *(c for c, _ in columns), "expected speedup",
                     "efficiency"], rows)
    categories = sorted({c for s in summaries for f in s["methods"].values() for c in f.get("per_category", {})})
    if categories:
        lines += ["", "## Speedup vs ar per category", ""]
        rows = [[m, n, *(speedup_cell(s["methods"][m].get("per_category", {}).get(c, {})) for c in categories)]
                for m in methods for n, s in zip(names, summaries, strict=True) if m in s["methods"]]
        lines += _table(["method", "run", *categories], rows)
    if any(f.get("load") for s in summaries for f in s["methods"].values()):
        lines += ["", "## Under load", "", "Aggregate tokens/s over every question, decoded N at a time (N = 1: one "
                  "at a time); latencies per request (a turn).", ""]
        rows = [[m, n] + [_fmt(load_row(s["methods"][m]).get(k)) for _, k in LOAD_COLUMNS]
                for m in methods for n, s in zip(names, summaries, strict=True) if m in s["methods"]]
        lines += _table(["method", "run"] + [c for c, _ in LOAD_COLUMNS], rows)
    if same:
        lines += ["", f"## Same tokens as {names[0]}", "", "Share of the questions both runs answered whose tokens "
                  "equal the first run's for the same method.", ""]
        ms = list(dict.fromkeys(m for v in same.values() for m in v))
        lines += _table(["run", *ms], [[n, *(_fmt(v.get(m)) for m in ms)] for n, v in same.items()])
    return "\n".join(lines) + "\n"
