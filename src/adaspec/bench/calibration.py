"""Confidence calibration from records alone: does the drafter's confidence predict acceptance?

Steps of methods with a confidence estimator (the CM-ASD methods) record, per verified drafted token, each
metric (`metrics`: entropy, margin, softmax), the ensemble C_t (`confidence`) and whether the exact criterion
accepts the token (`exact`: it equals the target's argmax at its position, given the drafted prefix; also past
the first rejection). Per method and metric: 10 equal-width confidence bins on [0, 1] with their count and
empirical acceptance rate, and the Spearman rank correlation between a bin's mean confidence and its
acceptance rate over bins with at least MIN_COUNT tokens (plus the token-level one, for reference).
"""

from __future__ import annotations

from pathlib import Path

from adaspec.core.confidence import METRICS

BINS = 10
MIN_COUNT = 20  # bins with fewer tokens are reported but left out of the bin-level Spearman
ENSEMBLE = "ensemble"
PLOT = Path("plots") / "calibration.png"


def token_pairs(records: list[dict], metric: str) -> list[tuple[float, bool]]:
    """(confidence, exact-accepted) for every recorded drafted token; `metric` is one of METRICS or 'ensemble'."""
    pairs: list[tuple[float, bool]] = []
    for r in records:
        for s in r.get("steps") or []:
            exact = s.get("exact")
            if not exact:
                continue
            values = s["confidence"] if metric == ENSEMBLE else s.get("metrics", {}).get(metric)
            if values is not None:
                pairs += [(float(c), bool(e)) for c, e in zip(values, exact, strict=True)]
    return pairs


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for m in range(i, j + 1):
            out[order[m]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (Pearson's of the ranks); None with fewer than 2 points or a constant side."""
    if len(x) != len(y) or len(x) < 2:
        return None
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    return sxy / (sxx * syy) ** 0.5 if sxx > 0 and syy > 0 else None


def calibrate(pairs: list[tuple[float, bool]], bins: int = BINS, min_count: int = MIN_COUNT) -> dict:
    """Bins of [0, 1] (the last one closed) with count, acceptance rate and mean confidence; Spearman over bins
    with >= min_count tokens, and over tokens."""
    counts, hits, sums = [0] * bins, [0] * bins, [0.0] * bins
    for c, e in pairs:
        b = min(bins - 1, max(0, int(c * bins)))
        counts[b] += 1
        hits[b] += e
        sums[b] += c
    table = [{"lo": round(b / bins, 4), "hi": round((b + 1) / bins, 4), "count": counts[b],
              "acceptance": round(hits[b] / counts[b], 4) if counts[b] else None,
              "mean_confidence": round(sums[b] / counts[b], 4) if counts[b] else None} for b in range(bins)]
    full = [row for row in table if row["count"] >= min_count]
    rho_bins = spearman([row["mean_confidence"] for row in full], [row["acceptance"] for row in full])
    rho_tokens = spearman([c for c, _ in pairs], [float(e) for _, e in pairs])
    return {"tokens": len(pairs), "acceptance": round(sum(e for _, e in pairs) / len(pairs), 4) if pairs else None,
            "bins": table, "min_count": min_count, "spearman": None if rho_bins is None else round(rho_bins, 4),
            "spearman_tokens": None if rho_tokens is None else round(rho_tokens, 4)}


def calibration(records: list[dict]) -> dict:
    """{method: {metric: calibrate(...)}} for every method whose steps record calibration data."""
    by_method: dict[str, list[dict]] = {}
    for r in records:
        by_method.setdefault(r["method"], []).append(r)
    out = {}
    for name, rs in by_method.items():
        if not token_pairs(rs, ENSEMBLE):
            continue
        out[name] = {m: calibrate(token_pairs(rs, m)) for m in (*METRICS, ENSEMBLE)}
    return out


def calibration_plot(calib: dict, path: Path) -> bool:
    """One panel per metric: empirical acceptance rate against mean confidence per bin, a line per method
    (bins with fewer than min_count tokens hollow), and the diagonal. False if there is nothing to plot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not calib:
        return False
    metrics = (*METRICS, ENSEMBLE)
    fig = Figure(figsize=(4 * len(metrics), 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(metrics), sharey=True)
    for ax, metric in zip(axes, metrics, strict=True):
        ax.plot([0, 1], [0, 1], color="0.8", linewidth=1)
        for name, per_metric in calib.items():
            c = per_metric[metric]
            rows = [row for row in c["bins"] if row["count"]]
            xs = [row["mean_confidence"] for row in rows]
            ys = [row["acceptance"] for row in rows]
            (line,) = ax.plot(xs, ys, linewidth=1, label=f"{name} (rho {c['spearman']})")
            ax.scatter(xs, ys, color=line.get_color(), s=18,
                       facecolors=[line.get_color() if row["count"] >= c["min_count"] else "none" for row in rows])
        ax.set_title(metric)
        ax.set_xlabel("confidence (bin mean)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7, loc="upper left")
    axes[0].set_ylabel("exact acceptance rate")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return True
