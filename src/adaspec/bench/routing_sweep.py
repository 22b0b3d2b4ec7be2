"""R-Stitch threshold sweep: `adaspec sweep --base rstitch` runs a grid over tau_up (and tau_down) through the
sweep machinery (bench/sweep.py); this module draws the speed / quality / large-model-share curve from its
records alone: `rstitch_report.md` (a table per threshold) and `plots/rstitch_curve.png`."""

from __future__ import annotations

import math
from pathlib import Path

from adaspec.bench.summary import load_records, method_fields
from adaspec.bench.sweep import quality, read_points

CURVE = Path("plots") / "rstitch_curve.png"
REPORT = "rstitch_report.md"
COLUMNS = (("tau_up", "tau_up"), ("tau_down", "tau_down"), ("speedup vs ar", "speedup_vs_ar"),
           ("large share", "large_share"), ("alignment", "alignment"), ("exact match", "exact_match"),
           ("GSM8K acc", "gsm8k_acc"), ("BLEU", "bleu"), ("quality", "quality"))


def threshold_points(points: list[dict]) -> list[dict]:
    """The rstitch points of a sweep, tau_down filled in where it defaulted to tau_up, by (tau_down, tau_up)."""
    out = []
    for p in points:
        if not str(p.get("spec", "")).split(":")[0] == "rstitch" or p.get("tau_up") is None:
            continue
        out.append({**p, "tau_down": p["tau_up"] if p.get("tau_down") is None else p["tau_down"]})
    return sorted(out, key=lambda p: (p["tau_down"] if "tau_down" in p["spec"] else -1, p["tau_up"]))


def _series(points: list[dict]) -> dict[str, list[dict]]:
    """One line per tau_down value swept explicitly; one line ("tau_down = tau_up") otherwise."""
    lines: dict[str, list[dict]] = {}
    for p in points:
        name = f"tau_down = {p['tau_down']:g}" if "tau_down" in p["spec"] else "tau_down = tau_up"
        lines.setdefault(name, []).append(p)
    return lines


def curve_plot(points: list[dict], ar: dict, path: Path) -> bool:
    """Against tau_up: speedup vs ar, task quality and alignment with ar, and the large model's token share."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not points:
        return False
    fig = Figure(figsize=(14, 4))
    FigureCanvasAgg(fig)
    speed, qual, share = fig.subplots(1, 3)
    for i, (name, ps) in enumerate(_series(points).items()):
        xs = [p["tau_up"] for p in ps]
        color = f"C{i}"
        speed.plot(xs, [p.get("speedup_vs_ar") or math.nan for p in ps], "o-", color=color, label=name)
        qual.plot(xs, [p.get("alignment") or math.nan for p in ps], "o-", color=color, label=f"alignment, {name}")
        qual.plot(xs, [p.get("quality") or math.nan for p in ps], "s--", color=color, label=f"quality, {name}")
        share.plot(xs, [p.get("large_share") or math.nan for p in ps], "o-", color=color, label=name)
    speed.axhline(1.0, color="k", lw=0.8, ls=":", label="ar")
    if ar.get("quality") is not None:
        qual.axhline(ar["quality"], color="k", lw=0.8, ls=":", label="ar quality")
    for ax, label in ((speed, "speedup vs ar"), (qual, "BLEU vs ar (alignment) / task quality"),
                      (share, "share of tokens from the large model")):
        ax.set_xlabel("tau_up (normalised entropy)")
        ax.set_ylabel(label)
        if all(p["tau_up"] > 0 for p in points):
            ax.set_xscale("log")
        ax.legend(fontsize=7)
    share.set_ylim(0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return True


def _fmt(v: object) -> str:
    return "–" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)


def write_threshold_report(out: Path) -> Path:
    """out/rstitch_report.md and out/plots/rstitch_curve.png from out/sweep.jsonl and out/ar.jsonl."""
    points = threshold_points(read_points(out / "sweep.jsonl"))
    baseline = load_records(out / "ar.jsonl") if (out / "ar.jsonl").exists() else []
    ar = method_fields(baseline, {r["question_id"]: r for r in baseline}).to_json() if baseline else {}
    ar["quality"] = quality(ar) if ar else None
    lines = ["# R-Stitch threshold sweep", "",
             "Each point is `rstitch` with the thresholds on the normalised entropy shown, on the same questions as "
             "`ar` (measured once in this sweep). Large share: the share of tokens the large model produced. "
             "Quality: the mean of BLEU, ROUGE-L and GSM8K accuracy x 100 where they apply.", ""]
    lines += ["| " + " | ".join(c for c, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(p.get(k)) for _, k in COLUMNS) + " |" for p in points]
    if ar:
        lines.append("| ar | | 1 | 1 | " + " | ".join(_fmt(ar.get(k)) for k in ("alignment", "exact_match",
                                                                             "gsm8k_acc", "bleu", "quality")) + " |")
    lines.append("")
    try:
        plotted = curve_plot(points, ar, out / CURVE)
    except ImportError:
        lines.append("(matplotlib is not installed: no curve; `pip install adaspec[plots]`)")
    else:
        lines.append(f"![speed, quality and large-model share against the threshold]({CURVE.as_posix()})" if plotted
                     else "(no rstitch points yet)")
    path = out / REPORT
    path.write_text("\n".join(lines) + "\n")
    return path
