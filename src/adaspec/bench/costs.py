"""`adaspec costs`: the cost table of every backend (the target scoring n positions at once relative to one step,
the prefill, each drafter's cost per drafted token relative to one target step; measured by core/costmodel.py) and
the acceptance a free drafter would need there. These explain every speedup."""

from __future__ import annotations

import time

from adaspec.core.costmodel import Costs, alpha_needed, drafter_cost, verify_costs
from adaspec.methods.drafting import SMALL

NEEDED_SPEEDUPS = (1.3, 1.8)  # `adaspec costs`: the acceptance a free drafter needs for these
COST_TABLE_BACKENDS = ("torch:float32", "torch:bfloat16", "llamacpp:shipped", "llamacpp:q4_0", "llamacpp:q8_0",
                       "llamacpp:f16", "llamacpp:bf16")
COST_TABLE_CONTEXT = 400  # tokens cached before the scored positions
COST_TABLE_DRAFTERS = (SMALL,)  # drafters whose cost per drafted token is measured


def cost_table(target_spec: str | None, backends=COST_TABLE_BACKENDS, context_tokens: int = COST_TABLE_CONTEXT,
               drafters: tuple[str, ...] = COST_TABLE_DRAFTERS, repeats: int = 9, log=print) -> list[dict]:
    """For each backend (torch:DTYPE or llamacpp:FORMAT): ms to score 1, 2, 4, 6, 8 positions on a cached
    `context_tokens`-token context and the ratio to one, the time to prefill that context, and each named
    drafter's cost per drafted token relative to one target step on the same backend. `adaspec costs` prints it;
    benchmarks/README.md's tables come from it."""
    from adaspec.core.config import DEFAULT_LLAMACPP_FORMAT, BackendChoice
    from adaspec.core.models import load_model
    from adaspec.methods import load_drafter, make_drafter, parse_method, target_backend

    rows = []
    models: dict[str, object] = {}
    for label in backends:
        kind, _, variant = label.partition(":")
        dtype = variant if kind == "torch" else "float32"
        if dtype not in models:
            models[dtype] = load_model(target_spec, dtype)
        target = models[dtype]
        fmt = variant if kind == "llamacpp" else DEFAULT_LLAMACPP_FORMAT
        backend = target_backend(target, BackendChoice(kind, fmt))
        context = [(100 + 7919 * i) % backend.vocab_size for i in range(context_tokens)]
        backend.reset()
        t0 = time.perf_counter()
        backend.extend(context)
        prefill = 1000 * (time.perf_counter() - t0)
        row = {"backend": label, **verify_costs(backend, context, repeats=repeats), "prefill_ms": round(prefill, 1)}
        for name in drafters:
            drafter = make_drafter(parse_method("sd", options={"drafter": name}), load_drafter(name, target, dtype),
                                   backend, target)
            row[f"drafter_{name}"] = drafter_cost(drafter, backend, row["verify_ms"]["1"], context)
        log(f"{label}: " + ", ".join(f"{n}: {v} ms" for n, v in row["verify_ms"].items()))
        rows.append(row)
    return rows


def cost_table_markdown(rows: list[dict]) -> str:
    """The rows as a markdown table, with the per-token acceptance a free drafter would need on each backend for a
    1.3x and a 1.8x expected speedup (costmodel.alpha_needed; –: not reachable within 8 positions)."""
    sizes = list(rows[0]["verify_ms"]) if rows else []
    drafters = [k for k in (rows[0] if rows else {}) if k.startswith("drafter_")]
    head = ["backend", *(f"n={n} ms (x1)" for n in sizes), "prefill ms", *(f"{d[8:]} drafter / step" for d in drafters),
            *(f"alpha for {s}x" for s in NEEDED_SPEEDUPS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["backend"]] + [f"{r['verify_ms'][n]:.1f} ({r['verify_ratio'][n]:.2f})" for n in sizes]
        cells += [f"{r['prefill_ms']:.0f}"] + [f"{r[d]['drafter_cost_ratio']:.2f}" for d in drafters]
        needed = (alpha_needed(s, Costs({str(n): v for n, v in r["verify_ms"].items()})) for s in NEEDED_SPEEDUPS)
        cells += ["–" if a is None else f"{a:.2f}" for a in needed]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
