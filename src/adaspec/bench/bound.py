"""The analytic bound (Leviathan et al. 2023): the speedup a method should reach given its measured per-token
acceptance and the measured costs (costs.json), its efficiency (measured / expected), and where its time goes.

Under the i.i.d. assumption (each drafted token is accepted with probability alpha once the ones before it
were), a target forward that verifies k drafted tokens emits in expectation

    E(k) = (1 - alpha^(k+1)) / (1 - alpha)            tokens (the correction/bonus token included)

and costs draft(k) + verify(k + 1) target steps, so a method drafting k tokens per forward should reach

    expected speedup = E(k) / (draft(k) + verify(k + 1)).

- alpha: the measured per-token acceptance, accepted / (accepted + rejections), a forward that keeps fewer
  drafted tokens than it verified ending in one rejection (the estimate of alpha under this model; it is above
  accepted / drafted, which also counts drafted tokens left unexamined behind a rejection).
- verify(n): the target's measured time to score n positions over its time for one (costs' verify_ms), linear
  between the measured sizes and beyond the largest.
- draft(k): the drafter's measured first token (one-token proposal) plus k - 1 marginal tokens, over one target
  step (with only the marginal cost measured, as in older runs: k times it). Tokens drafted but cut before
  verification (CM-ASD's paper variant) are paid for here.
- draft lengths that vary (adaptive policies, prompt lookup finding no match): E and the cost are averaged over
  the lengths of the method's recorded forwards, expected speedup = mean E(k_s) / mean cost(k_s). For a fixed
  k this is the formula above; plugging the mean length into it instead would overstate E (concave in k).

The best draft length (core/costmodel.py, `best_draft_length`): for the method's alpha and its backend's costs,
the fixed k in 0..BEST_K_MAX that maximises E(k) / (draft(k) + verify(k + 1)); on a backend whose verify cost grows
steeply with n (llama.cpp on quantized weights) it is short, on one where scoring n positions costs about one step
(torch) it is long.

What the costs allow at all (the report's ceiling table, costmodel's `alpha_needed`): the best expected speedup at
a given alpha, and the least alpha at which some fixed k reaches a given speedup. On a backend whose verify(n) grows
near n, a high speedup needs an alpha near 1 whatever the drafter, which says what a better drafter can and cannot
buy.

Costs are per backend (costs.json "backends", keyed by `BackendChoice.label`; a record's `costs_key` names its
method's, `costs_key` below): each method is modelled with its own backend's, and its measured speedup for the bound
is against `ar` on that same backend in the run (None if the run has none there).

Approximations: the costs are measured at one context length (costs' context_tokens) while contexts grow; real
acceptance is not i.i.d. (compare expected and measured tokens per forward); both speedups count one bare
target forward as the unit, so `ar`'s own per-step overhead (sampling, Python) shows as efficiency != 1.
The measured time per forward (decoding only: each turn's prefill forward, timed as its TTFT, is left out) splits
into draft, verify (both from the costs) and overhead (the rest: acceptance, cache rollback, sampling, Python, and
contexts longer than the costs' one).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from adaspec.core.costmodel import Costs, best_draft_length, expected_tokens
from adaspec.core.decode import ROUTE, VERIFY
from adaspec.core.errors import AdaspecError

if TYPE_CHECKING:
    from adaspec.core.config import BackendChoice
    from adaspec.methods import MethodSpec

DIGITS = 4
CEILING_ALPHAS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)  # the report's "what these costs allow" table
CEILING_SPEEDUPS = (1.3, 1.5, 1.8, 2.0)


def token_acceptance(steps: list[dict]) -> float | None:
    """alpha: accepted / (accepted + rejections) over the forwards that verified drafted tokens; None if none did."""
    drafting = [s for s in steps if s["drafted"]]
    accepted = sum(s["accepted"] for s in drafting)
    examined = accepted + sum(s["accepted"] < s["drafted"] for s in drafting)
    return accepted / examined if examined else None


def expected_speedup(alpha: float | None, lengths: list[tuple[int, int]], costs: Costs) -> tuple[float, float, float]:
    """(mean E, mean cost in target steps, expected speedup) over forwards given as (verified, paid-for drafted)
    token counts."""
    if not lengths:
        raise ValueError("no forwards to average over")
    a = alpha if alpha is not None else 0.0  # alpha is only None when nothing is drafted: E = 1 then
    tokens = sum(expected_tokens(a, k) for k, _ in lengths) / len(lengths)
    cost = sum(costs.draft(paid) + costs.verify(k + 1) for k, paid in lengths) / len(lengths) / costs.step_ms
    return tokens, cost, tokens / cost


def costs_key(spec: MethodSpec, run: BackendChoice) -> str | None:
    """A bench record's `costs_key`: the label of the backend its method ran on (its backend= and format= options
    over the run's), which keys that backend's entry in costs.json "backends", as `runner.measure_costs` measures
    them; None for a method without those options (the peers, SpecBound), whose costs costs.json does not hold."""
    from adaspec.methods import Placement, backend_choice

    return backend_choice(spec, run).label if isinstance(spec.options, Placement) else None


def method_costs(method: str, costs: dict, key: str | None = None) -> Costs | None:
    """The costs that apply to `method` (the methods the registry marks `costs`: ar, sd and the CM-ASD family) on the
    backend its records' `costs_key` names (`key`; None or a backend costs.json lacks: its top-level entries, as
    runs from before per-backend costs hold): its drafter= option's entry in costs["drafters"], else the run's
    drafter. None for the other methods (the peers; SpecBound's early exits and R-Stitch's routing, whose costs
    costs.json does not hold), for a label that does not parse, and when the drafter's cost was not measured."""
    from adaspec.methods import DrafterOption, parse_method

    costs = costs.get("backends", {}).get(key or "", costs)  # the method's own backend
    if "verify_ms" not in costs:
        return None
    try:
        spec = parse_method(method)
    except AdaspecError:
        return None
    if not spec.method.costs:
        return None
    if spec.name == "ar":
        return Costs(costs["verify_ms"])
    option = spec.options.drafter if isinstance(spec.options, DrafterOption) else None
    drafter = costs.get("drafters", {}).get(option) if option else costs
    if not drafter or "drafter_step_ms" not in drafter:
        return None
    return Costs.of(costs["verify_ms"], drafter)


def _round(d: dict) -> dict:
    return {k: round(v, DIGITS) if isinstance(v, float) else v for k, v in d.items()}


def turn_split(record: dict) -> list[tuple[float | None, float, int | None, int]]:
    """Per turn of a record: (TTFT, seconds, target forwards, tokens) after the turn's first step. The first step
    is the prefill forward, timed as the TTFT, and emits its token plus any drafted ones it accepts (prompt lookup
    drafts from the prompt already); a peer's (no steps) one token. A turn without a TTFT (none generated, or not
    observed) is (None, whole turn); a record without per-turn fields (older runs) one such turn. Forwards are None
    for a peer."""
    walls, news = record.get("turn_wall_s"), record.get("turn_new_tokens")
    steps = record.get("steps")
    if walls is None or news is None or (steps and record.get("turn_steps") is None):
        return [(None, record["wall_s"], len(steps) if steps else None, record["new_tokens"])]
    ttfts = record.get("turn_ttft_s") or [None] * len(walls)
    counts = record.get("turn_steps") or [None] * len(walls)
    out, at = [], 0
    for ttft, wall, n, count in zip(ttfts, walls, news, counts, strict=True):
        count = count or 0
        forwards = count if steps else None
        if ttft is None or n == 0:
            out.append((None, wall, forwards, n))
        else:
            first = min(steps[at]["accepted"] + 1, n) if steps and count else 1
            out.append((ttft, wall - ttft, forwards - 1 if forwards else forwards, n - first))
        at += count
    return out


def decode_time(records: list[dict]) -> tuple[float, int, int]:
    """(seconds, forwards, tokens) after each turn's first step (`turn_split`): the prefill forward that makes it
    is not a decoding step and would show as overhead. Turns without a TTFT count whole."""
    seconds = forwards = tokens = 0
    for r in records:
        for _, s, f, n in turn_split(r):
            seconds, forwards, tokens = seconds + s, forwards + (f or 0), tokens + n
    return seconds, forwards, tokens


def decoding_steps(record: dict) -> list[dict]:
    """A record's steps after each turn's first one (the prefill, `turn_split`); [] without per-turn counts."""
    steps, counts = record.get("steps") or [], record.get("turn_steps")
    if not steps or counts is None:
        return []
    out, at = [], 0
    for count in counts:
        out += steps[at + 1: at + (count or 0)]
        at += count or 0
    return out


def forward_ms(records: list[dict]) -> dict[str, dict[str, list]]:
    """{method: {key: [mean ms, steps]}} over the timed decoding steps (`decoding_steps`) of each method: the wall
    time of one step as the run measured it, in situ (its real contexts), by positions the target scored
    (drafted + 1, key "1".."n"), or for a routing method by the model that produced the token ("small", "large").
    The costs table is one context; this is every context the run met, to read beside it."""
    sums: dict[str, dict[str, list]] = {}
    for r in records:
        for s in decoding_steps(r):
            if s.get("ms") is None:
                continue
            key = s["source"] if s["kind"] == ROUTE else str(s["drafted"] + 1)
            cell = sums.setdefault(r["method"], {}).setdefault(key, [0.0, 0])
            cell[0] += s["ms"]
            cell[1] += 1
    return {m: {k: [round(total / n, DIGITS), n] for k, (total, n) in cells.items()} for m, cells in sums.items()}


def method_bound(records: list[dict], costs: Costs, measured_speedup: float | None) -> dict | None:
    """The bound, efficiency and time split of one method's records (those with steps); None without steps
    (the peers) or when its steps are per-token routing decisions rather than target forwards (R-Stitch)."""
    records = [r for r in records if r.get("steps") and r["steps"][0]["kind"] == VERIFY]
    steps = [s for r in records for s in r["steps"]]
    if not steps:
        return None
    alpha = token_acceptance(steps)
    lengths = [(s["drafted"], s["drafted"] + s.get("cut", 0)) for s in steps]
    tokens, cost, expected = expected_speedup(alpha, lengths, costs)
    best_k, best = best_draft_length(alpha, costs)
    decode_s, decode_steps, decode_tokens = decode_time(records)
    ms_per_step = 1000 * decode_s / max(1, decode_steps)
    draft_ms = sum(costs.draft(paid) for _, paid in lengths) / len(lengths)
    verify_ms = sum(costs.verify(k + 1) for k, _ in lengths) / len(lengths)
    return _round({
        "alpha": alpha,
        "mean_draft_len": sum(k for k, _ in lengths) / len(lengths),
        "expected_tokens_per_step": tokens,
        "measured_tokens_per_step": decode_tokens / max(1, decode_steps),
        "expected_step_cost": cost,  # target steps per forward
        "measured_step_cost": ms_per_step / costs.step_ms,
        "expected_speedup": expected,
        "measured_speedup": measured_speedup,
        "efficiency": measured_speedup / expected if measured_speedup is not None else None,
        "best_draft_len": best_k, "best_expected_speedup": best,
        "ms_per_step": ms_per_step, "draft_ms": draft_ms, "verify_ms": verify_ms,
        "overhead_ms": ms_per_step - draft_ms - verify_ms,
    })


def bound(records: list[dict], costs: dict | None, methods: dict) -> dict:
    """{method: method_bound(...)} for every method with recorded steps and measured costs; `methods` is the
    summary's, for the measured speedups. A method's backend is its records' `costs_key` (None where records do not
    say, as a sweep's: the run's top-level costs)."""
    if not costs:
        return {}
    by_method: dict[str, list[dict]] = {}
    for r in records:
        by_method.setdefault(r["method"], []).append(r)
    key = {name: rs[0].get("costs_key") for name, rs in by_method.items()}  # one backend per method label
    ar_speed = {key.get(name): m.get("tokens_per_s") for name, m in methods.items()
                if name.partition(":")[0] == "ar"}  # `ar` per backend
    out = {}
    for name, rs in by_method.items():
        label = key[name]
        c = method_costs(name, costs, label)
        base, speed = ar_speed.get(label), methods.get(name, {}).get("tokens_per_s")
        measured = speed / base if base and speed is not None else None
        result = method_bound(rs, c, measured) if c else None
        if result is not None:
            out[name] = {"backend": label, **result}
    return out
