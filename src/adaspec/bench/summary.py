"""summary.json from records.jsonl alone: per method and per category, speed, acceptance, agreement
with `ar`, and task quality. A field that does not apply is None (null), never a made-up number.

Records carry their `schema` (RECORD_SCHEMA). `load_records` is the one place that reads older ones: it migrates
them to the current schema, so that everything after it reads what a record says rather than guessing.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from adaspec.bench.bound import costs_key, turn_split
from adaspec.bench.calibration import calibration
from adaspec.bench.metrics import ROUGE_KEYS, corpus_bleu, gsm8k_accuracy, rouge
from adaspec.bench.stats import bootstrap_speedup_ci, paired_speedup
from adaspec.core.config import DEFAULT_LLAMACPP_FORMAT, PEERS, BackendChoice
from adaspec.core.decode import ROUTE, VERIFY
from adaspec.core.errors import AdaspecError

BASELINE = "ar"
REQUIRED = ("question_id", "category", "method", "new_tokens", "wall_s")
# the version of records.jsonl's lines this code writes (`schema`) and reads; 0: records without one. 1: each step
# has its `kind` (decode.STEP_KINDS), and a bench record its `costs_key` (bound.costs_key)
RECORD_SCHEMA = 1
DIGITS = 4  # every float in a summary is rounded to this many decimals
# a question's record and its `ar` record that ended further apart than this were measured in different machine
# states (a resumed run, a method rerun later): the speedup over the questions measured together is given beside
APART_S = 900.0


@dataclass
class MethodFields:
    """The fields of one method (or one method on one category) in summary.json."""

    n: int
    new_tokens: int
    wall_s: float
    tokens_per_s: float | None = None
    # time to first token (prefill and the first step), mean per turn, and the rate after it: (new tokens - turns) /
    # (wall - time to first tokens), on the records that observed it. Speculation speeds up only the second
    ttft_ms: float | None = None
    decode_tokens_per_s: float | None = None
    speedup_vs_ar: float | None = None  # on the questions `ar` also answered
    speedup_ci_lo: float | None = None  # its 95 % bootstrap interval over those questions (bench/stats.py)
    speedup_ci_hi: float | None = None
    measured_apart: int | None = None  # paired questions whose two records ended more than APART_S apart
    speedup_together: float | None = None  # on the other paired questions, where some were apart
    together_ci_lo: float | None = None
    together_ci_hi: float | None = None
    mean_accepted: float | None = None  # tokens emitted per target forward, bonus included
    acceptance_rate: float | None = None  # accepted / drafted
    mean_draft_len: float | None = None  # drafted per target forward
    exact_match: float | None = None  # share of questions whose token_ids equal `ar`'s
    alignment: float | None = None  # corpus BLEU of text against `ar`'s text, 0-100
    bleu: float | None = None  # translation, first turn vs reference
    rouge1: float | None = None  # summarization, first turn vs reference
    rouge2: float | None = None
    rougeL: float | None = None
    gsm8k_acc: float | None = None  # math_reasoning, final number vs reference's
    mean_cut: float | None = None  # drafted but not verified per target forward (CM-ASD's paper variant)
    large_share: float | None = None  # routing methods (R-Stitch): share of tokens the large model produced
    # early-exit drafting (SpecBound): mean layer a drafted token exited after, and the share of drafting steps whose
    # draft ended at a token unsure at the deepest exit (the bound layer), or at d_max drafted tokens
    mean_exit_layer: float | None = None
    bound_stop_share: float | None = None
    d_max_stop_share: float | None = None

    def to_json(self) -> dict:
        return rounded(asdict(self))


def rounded(fields: dict) -> dict:
    """`fields` with every float rounded to DIGITS decimals, as summary.json stores them."""
    return {k: round(v, DIGITS) if isinstance(v, float) else v for k, v in fields.items()}


def load_records(path: str | Path, backend: str | None = None) -> list[dict]:
    """Records from a JSONL file, blank lines skipped, each at RECORD_SCHEMA (older ones migrated, `migrate`);
    AdaspecError naming the file and line of a bad one, or of one written by a newer adaspec. `backend`: the label of
    the backend the run ran on (costs.json's `backend`), from which records of schema 0 get their `costs_key` (None:
    they get none)."""
    path = Path(path)
    if not path.is_file():
        raise AdaspecError(f"{path}: no such records file; run `adaspec bench --out {path.parent}` first")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise AdaspecError(f"{path}:{n}: malformed record ({e.msg}); fix or delete the line") from None
        missing = [k for k in REQUIRED if k not in record] if isinstance(record, dict) else list(REQUIRED)
        if missing:
            raise AdaspecError(f"{path}:{n}: record lacks {', '.join(missing)}; fix or delete the line")
        schema = record.get("schema", 0)
        if type(schema) is not int or schema < 0:
            raise AdaspecError(f"{path}:{n}: record schema {schema!r} is not a version (0, 1, ...); fix or delete "
                               "the line")
        if schema > RECORD_SCHEMA:
            raise AdaspecError(f"{path}:{n}: record schema {schema} is newer than this adaspec reads (up to "
                               f"{RECORD_SCHEMA}); read the run with the adaspec that wrote it, or upgrade adaspec")
        records.append(migrate(record, backend) if schema < RECORD_SCHEMA else record)
    return records


def migrate(record: dict, backend: str | None = None) -> dict:
    """A record of schema 0 at RECORD_SCHEMA: each step's `kind` (a routed token is the only step that records its
    `source`) and, given the label of the run's backend, the record's `costs_key`: its method label's backend over
    the run's (None for a label that does not parse)."""
    out = {**record, "schema": RECORD_SCHEMA}
    if record.get("steps"):
        out["steps"] = [{**s, "kind": ROUTE if "source" in s else VERIFY} for s in record["steps"]]
    if backend is not None:
        from adaspec.methods import parse_method

        kind, _, fmt = backend.partition(":")
        try:
            run = BackendChoice(kind, fmt or DEFAULT_LLAMACPP_FORMAT)
            out["costs_key"] = costs_key(parse_method(record["method"]), run)
        except AdaspecError:
            out["costs_key"] = None
    return out


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def _first_turn(r: dict) -> str:
    return (r.get("turns") or [r["text"]])[0]


def _with_reference(records: list[dict], category: str) -> tuple[list[str], list[str]]:
    chosen = [r for r in records if r["category"] == category and r.get("reference")]
    return [_first_turn(r) for r in chosen], [r["reference"][0] for r in chosen]


def method_fields(records: list[dict], baseline: dict[object, dict]) -> MethodFields:
    """Fields for one method's records; `baseline` maps question_id -> the `ar` record (empty: no `ar`)."""
    new_tokens = sum(r["new_tokens"] for r in records)
    wall = sum(r["wall_s"] for r in records)
    # routing methods record one step per token and which model produced it, never a target forward that
    # verifies drafts: their drafting fields are null, `large_share` says how much the target did
    routed = [s for r in records for s in r.get("steps") or [] if s["kind"] == ROUTE]
    with_steps = [r for r in records if r.get("steps") and r["steps"][0]["kind"] == VERIFY]
    steps = [s for r in with_steps for s in r["steps"]]
    drafted = sum(s["drafted"] for s in steps)
    fields = MethodFields(
        n=len(records), new_tokens=new_tokens, wall_s=wall, tokens_per_s=_ratio(new_tokens, wall),
        mean_accepted=_ratio(sum(r["new_tokens"] for r in with_steps), len(steps)),
        acceptance_rate=_ratio(sum(s["accepted"] for s in steps), drafted),
        mean_draft_len=_ratio(drafted, len(steps)),
        mean_cut=_ratio(sum(s.get("cut", 0) for s in steps), len(steps)),
        large_share=_ratio(sum(s["source"] == "large" for s in routed), len(routed)),
    )
    timed = [(t, s, n) for r in records for t, s, _, n in turn_split(r) if t is not None]
    if timed:
        fields.ttft_ms = 1000 * sum(t for t, _, _ in timed) / len(timed)
        fields.decode_tokens_per_s = _ratio(sum(n for _, _, n in timed), sum(s for _, s, _ in timed))
    exits = [layer for s in steps for layer in s.get("exit_layers", [])]
    stops = [s["draft_stop"] for s in steps if s.get("draft_stop") is not None]
    fields.mean_exit_layer = _ratio(sum(exits), len(exits))
    fields.bound_stop_share = _ratio(sum(x == "bound" for x in stops), len(stops))
    fields.d_max_stop_share = _ratio(sum(x == "d_max" for x in stops), len(stops))
    paired = [(r, baseline[r["question_id"]]) for r in records if r["question_id"] in baseline]
    if paired:
        fields.speedup_vs_ar, fields.speedup_ci_lo, fields.speedup_ci_hi = _speedup(paired)
        _together(fields, paired)
        fields.exact_match = sum(r["token_ids"] == b["token_ids"] for r, b in paired) / len(paired)
        fields.alignment = corpus_bleu([r["text"] for r, _ in paired], [b["text"] for _, b in paired])
    fields.bleu = corpus_bleu(*_with_reference(records, "translation"))
    scores = rouge(*_with_reference(records, "summarization")) or {}
    fields.rouge1, fields.rouge2, fields.rougeL = (scores.get(k) for k in ROUGE_KEYS)
    fields.gsm8k_acc = gsm8k_accuracy(*_with_reference(records, "math_reasoning"))
    return fields


def _quantile(values: list[float], q: float) -> float | None:
    """The q-quantile of `values` (nearest rank), None without values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def load_fields(records: list[dict], baseline: list[dict]) -> dict | None:
    """Throughput and latency under load, for records of a batched run (`adaspec bench --concurrency N`; None for a
    run decoded one question at a time): aggregate tokens/s (all new tokens over the wall time of the blocks the
    method decoded, each block's questions N at a time) and its ratio to `ar`'s in the same run, and per request (a
    turn) p50 / p99 latency, time to first token and time per output token after it; the mean number of sequences
    per target call, and per batch size the mean tokens drafted (verified) per sequence: what the cost rule chose."""
    if not records or records[0].get("concurrency") is None:
        return None

    def aggregate(rs: list[dict]) -> float | None:
        blocks = {r["block"]: r["block_wall_s"] for r in rs}
        return _ratio(sum(r["new_tokens"] for r in rs), sum(blocks.values()))

    turns = [(w, t, n) for r in records for w, t, n in zip(r["turn_wall_s"], r["turn_ttft_s"], r["turn_new_tokens"],
                                                          strict=True)]
    latency = [w for w, _, _ in turns]
    ttft = [t for _, t, _ in turns if t is not None]
    tpot = [(w - t) / (n - 1) for w, t, n in turns if t is not None and n > 1]
    steps = [s for r in records for s in r.get("steps") or [] if s.get("batch")]
    by_batch: dict[int, list[int]] = defaultdict(list)
    for st in steps:
        by_batch[st["batch"]].append(st["drafted"])
    mine, ar = aggregate(records), aggregate(baseline) if baseline else None
    return rounded({
        "concurrency": records[0]["concurrency"], "aggregate_tokens_per_s": mine,
        "aggregate_vs_ar": _ratio(mine, ar) if mine and ar else None,
        "latency_p50_s": _quantile(latency, 0.5), "latency_p99_s": _quantile(latency, 0.99),
        "ttft_p50_ms": _ms(_quantile(ttft, 0.5)), "ttft_p99_ms": _ms(_quantile(ttft, 0.99)),
        "tpot_p50_ms": _ms(_quantile(tpot, 0.5)), "tpot_p99_ms": _ms(_quantile(tpot, 0.99)),
        "mean_batch": _ratio(sum(s["batch"] for s in steps), len(steps)),
        "drafted_by_batch": {str(b): round(sum(d) / len(d), DIGITS) for b, d in sorted(by_batch.items())},
    })


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000 * seconds


def _speedup(paired: list[tuple[dict, dict]]) -> tuple[float | None, float | None, float | None]:
    """(speedup, interval low, interval high) of records over their paired reference records (bench/stats.py)."""
    pairs = [(r["new_tokens"], r["wall_s"], b["new_tokens"], b["wall_s"]) for r, b in paired]
    lo, hi = bootstrap_speedup_ci(pairs) or (None, None)
    return paired_speedup(pairs), lo, hi


def _together(fields: MethodFields, paired: list[tuple[dict, dict]]) -> None:
    """Set `measured_apart` (None when records carry no `tstamp`) and, where some pairs were apart, the speedup with
    its interval over the pairs measured together."""
    timed = [(r, b) for r, b in paired if r.get("tstamp") is not None and b.get("tstamp") is not None]
    if not timed:
        return
    together = [(r, b) for r, b in timed if abs(r["tstamp"] - b["tstamp"]) <= APART_S]
    fields.measured_apart = len(timed) - len(together)
    if fields.measured_apart and together:
        fields.speedup_together, fields.together_ci_lo, fields.together_ci_hi = _speedup(together)


def _histogram(steps: list[dict]) -> dict[str, dict[str, int]]:
    """{"emitted": {n: target forwards that emitted n tokens (accepted + 1)}, "drafted": {n: forwards that
    verified n drafted tokens}}, keys as strings (JSON), in increasing order."""
    emitted = Counter(s["accepted"] + 1 for s in steps)
    drafted = Counter(s["drafted"] for s in steps)
    return {"emitted": {str(n): emitted[n] for n in sorted(emitted)},
            "drafted": {str(n): drafted[n] for n in sorted(drafted)}}


def histograms(records: list[dict]) -> dict:
    """{method: {"emitted", "drafted", "per_category": {category: {"emitted", "drafted"}}}} for every method
    whose target forwards are recorded (not the peers', nor the per-token steps of routing methods)."""
    by_method: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if r.get("steps") and r["steps"][0]["kind"] == VERIFY:
            by_method[r["method"]].append(r)
    out = {}
    for name, rs in by_method.items():
        out[name] = _histogram([s for r in rs for s in r["steps"]])
        categories = sorted({r["category"] for r in rs})
        out[name]["per_category"] = {c: _histogram([s for r in rs if r["category"] == c for s in r["steps"]])
                                     for c in categories}
    return out


def _backend(records: list[dict]) -> str | None:
    """The backend most of a method's records ran on ('llamacpp:q4_1', 'torch:float32'; None before records had one)."""
    counts = Counter(r["backend"] for r in records if r.get("backend"))
    return counts.most_common(1)[0][0] if counts else None


def same_backend(by_method: dict[str, list[dict]]) -> dict[str, dict]:
    """{method: fields against the `ar` that ran on the method's own backend} for each method whose backend is not
    `ar`'s and where the run has an `ar` variant there (`ar:backend=torch` beside `ar` on llama.cpp): speed and
    agreement of e.g. SpecBound, which runs on torch only, against plain decoding on torch."""
    main = _backend(by_method.get(BASELINE, []))
    plain = {_backend(rs): name for name, rs in by_method.items()
             if name.split(":")[0] == BASELINE and name != BASELINE and _backend(rs) not in (None, main)}
    out = {}
    for name, rs in by_method.items():
        where = _backend(rs)
        if where in plain and name != plain[where]:
            reference = {r["question_id"]: r for r in by_method[plain[where]]}
            fields = method_fields(rs, reference)
            out[name] = rounded({"baseline": plain[where], "backend": where, "speedup": fields.speedup_vs_ar,
                                 "speedup_ci_lo": fields.speedup_ci_lo, "speedup_ci_hi": fields.speedup_ci_hi,
                                 "exact_match": fields.exact_match, "alignment": fields.alignment})
    return out


def vs_peers(by_method: dict[str, list[dict]]) -> dict[str, dict]:
    """{method: {peer: speedup against that peer with its 95 % interval}} for every method and every peer (plain
    llama.cpp, transformers) in the run, paired over the questions both answered, as `speedup_vs_ar` is."""
    peers = [name for name in by_method if name.split(":")[0] in PEERS]
    out: dict[str, dict] = {}
    for peer in peers:
        reference = {r["question_id"]: r for r in by_method[peer]}
        for name, rs in by_method.items():
            if name == peer:
                continue
            speedup, lo, hi = _speedup([(r, reference[r["question_id"]]) for r in rs if r["question_id"] in reference])
            if speedup is None:
                continue
            out.setdefault(name, {})[peer] = rounded({"speedup": speedup, "speedup_ci_lo": lo, "speedup_ci_hi": hi})
    return out


def summarize(records: list[dict], config: dict) -> dict:
    """{"config": config, "methods": {name: fields and "per_category": {category: fields}}, "calibration":
    {name: {metric: bins and Spearman}} (methods that record confidence, see bench/calibration.py),
    "histograms": {name: tokens emitted and drafted per target forward}} from records. A method's `backend` is
    where it ran; `vs_backend_ar` holds its speed and agreement against `ar` on that backend (same_backend);
    `vs_peers` its speed against each peer in the run (vs_peers)."""
    by_method: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_method[r["method"]].append(r)
    baseline = {r["question_id"]: r for r in by_method.get(BASELINE, [])}
    methods = {}
    for name, rs in by_method.items():
        by_category: dict[str, list[dict]] = defaultdict(list)
        for r in rs:
            by_category[r["category"]].append(r)
        methods[name] = method_fields(rs, baseline).to_json()
        if where := _backend(rs):
            methods[name]["backend"] = where
        if (load := load_fields(rs, by_method.get(BASELINE, []))) is not None:
            methods[name]["load"] = load
        methods[name]["per_category"] = {c: method_fields(crs, baseline).to_json()
                                         for c, crs in sorted(by_category.items())}
    for name, fields in same_backend(by_method).items():
        methods[name]["vs_backend_ar"] = fields
    for name, fields in vs_peers(by_method).items():
        methods[name]["vs_peers"] = fields
    return {"config": config, "methods": methods, "calibration": calibration(records),
            "histograms": histograms(records)}
