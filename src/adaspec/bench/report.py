"""report.md and plots/ from a summary and its records."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from adaspec.bench import calibration as calib

COLUMNS = [
    ("tokens/s", "tokens_per_s"), ("speedup vs ar", "speedup_vs_ar"), ("mean accepted", "mean_accepted"),
    ("acceptance rate", "acceptance_rate"), ("mean draft len", "mean_draft_len"), ("exact match", "exact_match"),
    ("alignment", "alignment"), ("BLEU", "bleu"), ("ROUGE-1", "rouge1"), ("ROUGE-2", "rouge2"),
    ("ROUGE-L", "rougeL"), ("GSM8K acc", "gsm8k_acc"),
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
    """Per-size entries ({"verify_ms": {"1": 36.1, ...}}) as one table; scalar entries as bullets."""
    tables = {k: v for k, v in costs.items() if isinstance(v, dict)}
    sizes = sorted({n for v in tables.values() for n in v}, key=_key_order)
    lines = ["## Measured costs", ""]
    if tables:
        rows = [[k] + [_fmt(v.get(n)) for n in sizes] for k, v in tables.items()]
        lines += _table(["positions scored"] + sizes, rows) + [""]
    lines += [f"- {k}: {_fmt(v)}" for k, v in costs.items() if k not in tables]
    return lines if lines[-1] else lines[:-1]


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
             json.dumps(summary.get("config", {}), indent=1), "```", "", "## Methods", ""]
    lines += _table(["method"] + [c for c, _ in COLUMNS],
                    [[name] + [_fmt(m.get(k)) for _, k in COLUMNS] for name, m in methods.items()])
    per_category = {name: m.get("per_category", {}) for name, m in methods.items()}
    categories = sorted({c for pc in per_category.values() for c in pc})
    lines += ["", "## Speedup vs ar per category", ""]
    lines += _table(["method"] + categories,
                    [[name] + [_fmt(pc.get(c, {}).get("speedup_vs_ar")) for c in categories]
                     for name, pc in per_category.items()])
    if summary.get("config", {}).get("ablation"):
        lines += [""] + _ablation(summary)
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
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
