"""Measured costs: the target scoring n positions at once relative to one step, and a drafter's cost
per drafted token relative to one target step. These explain every speedup."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from adaspec.backends.base import Backend
from adaspec.bench.bound import Costs, alpha_needed
from adaspec.config import GenerationConfig, SamplingConfig
from adaspec.decode import generate
from adaspec.drafters.base import DraftContext, Drafter
from adaspec.policies import FixedLength

VERIFY_SIZES = (1, 2, 4, 6, 8)


def forward_ms(backend: Backend, context: list[int], n: int, repeats: int = 7) -> float:
    """Median ms for the backend to score n new positions on top of a cached `context`."""
    return forward_ms_by_size(backend, context, (n,), repeats)[n]


def forward_ms_by_size(backend: Backend, context: list[int], sizes, repeats: int = 7) -> dict[int, float]:
    """Median ms to score n new positions on top of a cached `context`, for each n in `sizes`; the sizes take
    turns in every round, so a load that comes and goes weighs on all of them alike."""
    backend.reset()
    backend.extend(context)
    times: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(repeats):
        for n in sizes:
            backend.rollback(len(context))
            t0 = time.perf_counter()
            backend.extend(context[-n:], keep=n)  # any n tokens will do: the cost does not depend on them
            times[n].append(time.perf_counter() - t0)
    backend.reset()
    return {n: 1000 * statistics.median(t) for n, t in times.items()}


def verify_costs(target: Backend, context: list[int], sizes=VERIFY_SIZES, repeats: int = 7) -> dict:
    ms = forward_ms_by_size(target, context, sizes, repeats)
    return {
        "context_tokens": len(context),
        "verify_ms": {str(n): round(v, 3) for n, v in ms.items()},
        "verify_ratio": {str(n): round(v / ms[1], 3) for n, v in ms.items()},
    }


def propose_ms(drafter: Drafter, context: list[int], k: int, repeats: int = 7) -> float:
    """Median ms of one `propose` of exactly k tokens after `context` (the drafter already caught up)."""
    times = []
    for _ in range(repeats):
        ctx = DraftContext(context, k, SamplingConfig())
        t0 = time.perf_counter()
        drafter.propose(ctx, FixedLength(k))
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def drafter_cost(drafter: Drafter, target: Backend, target_step_ms: float, context: list[int], k: int = 5) -> dict:
    """A drafter's cost per drafted token: (propose k tokens - propose 1) / (k - 1), the marginal cost of
    one more drafted token, against one target step. The drafter first follows a 2-token generation on
    `context`, so it holds its cache (and, for an EAGLE head, the target's features) as in decoding."""
    result = generate(target, context, GenerationConfig(max_new_tokens=2), drafter, FixedLength(1))
    ids = context + result.token_ids
    one, many = propose_ms(drafter, ids, 1), propose_ms(drafter, ids, k)
    per_token = max(0.0, (many - one) / (k - 1))
    target.reset()
    return {"drafter": drafter.name, "drafter_first_ms": round(one, 3), "drafter_step_ms": round(per_token, 3),
            "drafter_cost_ratio": round(per_token / target_step_ms, 4)}


def copy_bandwidth_gbs(megabytes: int = 512, repeats: int = 7) -> float:
    """Memory bandwidth in GB/s: bytes read + written per second by a copy of a tensor far larger than the
    caches (median of `repeats`)."""
    src = torch.ones(megabytes << 20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # commit the pages
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() / statistics.median(times) / 1e9


def step_weight_bytes(model: nn.Module) -> int:
    """Bytes of weights one decoding step reads: every parameter once (tied ones once), less the input
    embedding table unless it is the LM head (a step reads only its n rows)."""
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    params = {p.data_ptr(): p for p in model.parameters()}
    if embed.data_ptr() != head.data_ptr():
        params.pop(embed.data_ptr(), None)
    return sum(p.numel() * p.element_size() for p in params.values())


def bandwidth_floor(model: nn.Module, bandwidth_gbs: float | None = None) -> dict:
    """The least time a step can take on this machine: its weight bytes over the memory bandwidth."""
    gbs = bandwidth_gbs or copy_bandwidth_gbs()
    nbytes = step_weight_bytes(model)
    return {"weight_mb": round(nbytes / 1e6, 1), "bandwidth_gbs": round(gbs, 2),
            "floor_ms": round(nbytes / gbs / 1e6, 3)}


NEEDED_SPEEDUPS = (1.3, 1.8)  # `adaspec costs`: the acceptance a free drafter needs for these
COST_TABLE_BACKENDS = ("torch:float32", "torch:bfloat16", "llamacpp:shipped", "llamacpp:q4_0", "llamacpp:q8_0",
                       "llamacpp:f16", "llamacpp:bf16")


def cost_table(target_spec: str | None, backends=COST_TABLE_BACKENDS, context_tokens: int = 400,
               drafters: tuple[str, ...] = ("small",), repeats: int = 9, log=print) -> list[dict]:
    """For each backend (torch:DTYPE or llamacpp:FORMAT): ms to score 1, 2, 4, 6, 8 positions on a cached
    `context_tokens`-token context and the ratio to one, the time to prefill that context, and each named
    drafter's cost per drafted token relative to one target step on the same backend. `adaspec costs` prints it;
    the README's table comes from it."""
    from adaspec.config import DEFAULT_LLAMACPP_FORMAT, BackendChoice
    from adaspec.methods import load_drafter, make_drafter, parse_method, target_backend
    from adaspec.models import load_model

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
    1.3x and a 1.8x expected speedup (bench/bound.alpha_needed; –: not reachable within 8 positions)."""
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
