"""report.md and plots/ from a summary and its records."""

from __future__ import annotations

import json
from pathlib import Path

COLUMNS = [
    ("tokens/s", "tokens_per_s"), ("speedup", "speedup_vs_ar"), ("mean acc.", "mean_accepted"),
    ("acc. rate", "acceptance_rate"), ("draft len", "mean_draft_len"), ("exact", "exact_match"),
    ("align.", "alignment"), ("BLEU", "bleu"), ("R-1", "rouge1"), ("R-2", "rouge2"), ("R-L", "rougeL"),
    ("GSM8K", "gsm8k_acc"),
]


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def acceptance_plot(records: list[dict], path: Path) -> str | None:
    """Histogram of tokens emitted per target forward for each method with visible steps; None if no matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    emitted: dict[str, list[int]] = {}
    for r in records:
        if r.get("steps"):
            emitted.setdefault(r["method"], []).extend(s["accepted"] + 1 for s in r["steps"])
    fig, ax = plt.subplots(figsize=(7, 4))
    top = max((max(v) for v in emitted.values()), default=1)
    bins = [b - 0.5 for b in range(1, top + 2)]
    for name, values in emitted.items():
        ax.hist(values, bins=bins, alpha=0.5, density=True, label=name)
    ax.set_xlabel("tokens emitted per target forward (accepted + 1)")
    ax.set_ylabel("share of steps")
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path.name


def write_report(summary: dict, records: list[dict], out_dir: Path) -> Path:
    methods = summary["methods"]
    lines = ["# adaspec bench report", "", "## Configuration", "", "```json",
             json.dumps(summary.get("config", {}), indent=1), "```", "", "## Methods", ""]
    lines += _table(["method"] + [c for c, _ in COLUMNS],
                    [[name] + [_fmt(m.get(k)) for _, k in COLUMNS] for name, m in methods.items()])
    categories = sorted({c for m in methods.values() for c in m.get("per_category", {})})
    lines += ["", "## Speedup vs ar per category", ""]
    lines += _table(["method"] + categories,
                    [[name] + [_fmt(m["per_category"].get(c, {}).get("speedup_vs_ar")) for c in categories]
                     for name, m in methods.items()])
    costs = summary.get("costs")
    if costs:
        sizes = list(costs["verify_ms"])
        lines += ["", f"## Measured costs (context {costs['context_tokens']} tokens)", ""]
        lines += _table(["positions scored"] + sizes,
                        [["ms"] + [_fmt(costs["verify_ms"][n]) for n in sizes],
                         ["ratio to 1"] + [_fmt(costs["verify_ratio"][n]) for n in sizes]])
        if "drafter_cost_ratio" in costs:
            lines += ["", f"Drafter: {costs['drafter_step_ms']} ms per drafted token = "
                          f"{costs['drafter_cost_ratio']} of a target step."]
    plot = acceptance_plot(records, out_dir / "plots" / "acceptance_hist.png")
    lines += ["", "## Acceptance", ""]
    lines.append(f"![acceptance histogram](plots/{plot})" if plot else "(matplotlib not installed: no plot)")
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
