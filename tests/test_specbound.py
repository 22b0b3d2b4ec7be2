"""SpecBound: the target drafts with its own early exits and verifies by finishing the layers above them.

Tiny Llamas whose deep layers are damped (their residual updates scaled down) make the early exits agree with
the final layer often but not always, so drafts are accepted, cut short by a rejection, and stopped at the
bound, and every path of the layer-wise bookkeeping runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import damped_llama, full_logits, naive_greedy, random_prompt, tiny_llama

from adaspec.bench.runner import step_record
from adaspec.bench.summary import method_fields
from adaspec.core.backends import TorchBackend
from adaspec.core.backends.layered import LayeredBackend
from adaspec.core.confidence import annealed_confidence, annealed_temperature
from adaspec.core.config import GenerationConfig, SamplingConfig
from adaspec.core.decode import VERIFY, StopCriteria, generate
from adaspec.core.drafters.early_exit import EarlyExitDrafter, ExitArtifact, ExitHeads, is_exits_dir
from adaspec.core.errors import AdaspecError
from adaspec.core.models import LoadedModel
from adaspec.core.policies import ExitBound
from adaspec.methods import build_runner, parse_method, split_specs

LAYERS = 6


def specbound(model, exits=(1, 2, 4), threshold=0.35, a=1.0, d_max=4, artifact=None, lean=None):
    backend = LayeredBackend(model, lean=lean)
    bound = ExitBound(tuple(exits), LAYERS, threshold, a, d_max)
    return backend, EarlyExitDrafter(backend, bound, artifact), bound


def _context(ids, k_max=4):
    from adaspec.core.drafters.base import DraftContext

    return DraftContext(list(ids), k_max, SamplingConfig(), torch.Generator().manual_seed(0))


def ar_tokens(model, prompt, n, eos=frozenset()):
    return generate(TorchBackend(model), prompt, GenerationConfig(max_new_tokens=n), stop=StopCriteria(eos)).token_ids


@pytest.mark.parametrize(
    ("seed", "damp", "exits", "threshold", "d_max"),
    [(0, 0.2, (1, 2, 4), 0.2, 4), (1, 0.5, (1, 2, 4), 0.35, 3), (2, 1.0, (1, 2, 4), 0.35, 6),
     (3, 0.5, (2,), 0.3, 2), (4, 0.5, (1, 3, 5), 0.3, 5), (5, 1.0, (1, 2, 3, 4, 5), 0.2, 3)],
)
def test_greedy_specbound_equals_ar_token_for_token(seed, damp, exits, threshold, d_max):
    model = damped_llama(seed, damp)
    prompt = random_prompt(seed, 9)
    backend, drafter, bound = specbound(model, exits, threshold, d_max=d_max)
    result = generate(backend, prompt, GenerationConfig(max_new_tokens=40), drafter, bound)
    assert result.token_ids == ar_tokens(model, prompt, 40)
    steps = [s for s in result.steps if s.draft_stop is not None]
    assert any(s.accepted < s.drafted for s in steps), "no rejection: rollback was not exercised"
    assert any(s.accepted == s.drafted > 0 for s in steps), "no fully accepted draft"
    assert all(len(s.exit_layers) == s.drafted and set(s.exit_layers) <= set(exits) for s in steps)


@pytest.mark.parametrize("lean", [True, False])
def test_both_layer_implementations_give_ar_and_the_same_steps(lean):
    model = damped_llama(1, 0.5)
    prompt = random_prompt(1, 9)
    backend, drafter, bound = specbound(model, threshold=0.3, d_max=3, lean=lean)
    assert (backend.lean is not None) == lean  # a tiny Llama: the lean layers unless told otherwise
    result = generate(backend, prompt, GenerationConfig(max_new_tokens=40), drafter, bound)
    assert result.token_ids == ar_tokens(model, prompt, 40) == naive_greedy(model, prompt, 40)
    assert any(s.accepted < s.drafted for s in result.steps) and any(s.accepted > 0 for s in result.steps)
    other = specbound(model, threshold=0.3, d_max=3, lean=not lean)
    again = generate(other[0], prompt, GenerationConfig(max_new_tokens=40), other[1], other[2])
    assert [(s.drafted, s.accepted, s.exit_layers) for s in again.steps] == [
        (s.drafted, s.accepted, s.exit_layers) for s in result.steps]


def test_greedy_specbound_equals_the_cache_free_reference_under_random_thresholds():
    gen = torch.Generator().manual_seed(7)
    model = damped_llama(11, 0.4)
    for trial in range(4):
        prompt = random_prompt(20 + trial, 5 + trial)
        threshold = float(torch.rand((), generator=gen)) * 0.6
        backend, drafter, bound = specbound(model, threshold=threshold, d_max=2 + trial)
        result = generate(backend, prompt, GenerationConfig(max_new_tokens=24), drafter, bound)
        assert result.token_ids == naive_greedy(model, prompt, 24), threshold


def test_specbound_stops_at_eos_like_ar():
    model = damped_llama(3, 0.3)
    prompt = random_prompt(3, 9)
    eos = frozenset({ar_tokens(model, prompt, 30)[17]})  # a token ar emits: generation stops there
    backend, drafter, bound = specbound(model, threshold=0.25)
    result = generate(backend, prompt, GenerationConfig(max_new_tokens=30), drafter, bound, stop=StopCriteria(eos))
    assert result.token_ids == ar_tokens(model, prompt, 30, eos) and result.stop_reason == "eos"


def test_kv_cache_after_rollback_equals_a_cache_free_forward():
    model = damped_llama(2, 1.0)
    prompt = random_prompt(2, 9)
    backend, drafter, bound = specbound(model, threshold=0.3, d_max=5)
    result = generate(backend, prompt, GenerationConfig(max_new_tokens=30), drafter, bound)
    assert any(s.accepted < s.drafted for s in result.steps)
    ids = prompt + result.token_ids[:-1]  # the loop leaves every token but the last one in the cache
    assert backend.tokens == ids and not len(backend.pending)
    fresh = TorchBackend(model, lean=False)  # transformers' DynamicCache, laid out as the layered backend's
    fresh.extend(ids)
    for j in range(LAYERS):
        (keys, values), ref = backend.layer_kv(j), fresh.cache.layers[j]
        assert backend.cached(j) == len(ids)
        torch.testing.assert_close(keys, ref.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(values, ref.values, atol=1e-5, rtol=1e-4)
    # and the next position scores as in a fresh forward of everything
    want = full_logits(model, prompt + result.token_ids)[-1:]
    torch.testing.assert_close(backend.extend(result.token_ids[-1:]), want, atol=1e-4, rtol=1e-4)


def test_partial_positions_roll_back_layer_by_layer():
    model = damped_llama(4)
    backend = LayeredBackend(model)
    ids = random_prompt(4, 12)
    backend.extend(ids[:6])
    for token, depth in zip(ids[6:10], (5, 2, 3, 1), strict=True):
        backend.push([token])
        backend.advance(depth)
    # later positions are caught up to where earlier ones wait: depths never increase along the sequence
    assert backend.pending.depth == [5, 3, 3, 1]
    assert [backend.cached(j) for j in range(LAYERS)] == [10, 9, 9, 7, 7, 6]
    backend.rollback(8)  # keep two of the four partial positions
    assert [backend.cached(j) for j in range(LAYERS)] == [8, 8, 8, 7, 7, 6]
    logits = backend.sync(ids, keep=6)  # finishes the partial positions, computes the rest
    torch.testing.assert_close(logits, full_logits(model, ids)[6:], atol=1e-4, rtol=1e-4)
    backend.rollback(3)
    assert [backend.cached(j) for j in range(LAYERS)] == [3] * LAYERS


def test_verification_runs_only_the_layers_above_the_drafted_depths():
    model = damped_llama(5, 1.0)
    backend, drafter, bound = specbound(model, exits=(2, 4), threshold=1.0)  # nothing exits: drafts stop at 4
    prompt = random_prompt(5, 8)
    backend.extend(prompt[:-1])
    draft = drafter.propose(_context(prompt))
    assert draft.tokens == [] and draft.stop == "bound" and backend.pending.depth == [4]
    runs = backend.layer_runs
    logits = backend.sync(prompt, keep=1)
    assert backend.layer_runs - runs == LAYERS - 4  # one batched pass over the two layers above the bound
    torch.testing.assert_close(logits, full_logits(model, prompt)[-1:], atol=1e-4, rtol=1e-4)


def test_the_bound_stops_drafts():
    model = damped_llama(6, 0.3)
    prompt = random_prompt(6, 9)
    config = GenerationConfig(max_new_tokens=20)
    backend, drafter, bound = specbound(model, threshold=1.0)  # no confidence reaches 1: no token ever exits
    result = generate(backend, prompt, config, drafter, bound)
    drafting = [s for s in result.steps if s.draft_stop is not None]
    assert drafting and all(s.drafted == 0 and s.draft_stop == "bound" for s in drafting)
    backend, drafter, bound = specbound(model, threshold=0.0, d_max=3)  # every token exits at the first exit
    result = generate(backend, prompt, config, drafter, bound)
    drafting = [s for s in result.steps if s.draft_stop is not None]
    assert all(s.exit_layers == [1] * s.drafted for s in drafting)
    assert all(s.drafted == 3 and s.draft_stop == "d_max" for s in drafting if s.draft_stop != "budget")
    assert result.token_ids == ar_tokens(model, prompt, 20)


def test_annealed_temperature_softens_shallow_exits():
    assert annealed_temperature(30, 30, 1.0) == 1.0
    assert annealed_temperature(0, 30, 2.0) == 3.0
    assert math.isclose(annealed_temperature(12, 30, 0.5), 1 + 0.5 * (1 - 12 / 30))
    z = torch.tensor([2.0, 1.0, 0.0, -1.0])
    for layer in (3, 10, 24):
        t = 1 + 0.7 * (1 - layer / 30)
        assert math.isclose(float(annealed_confidence(z, layer, 30, 0.7)), float(torch.softmax(z / t, -1).max()),
                            rel_tol=1e-6)
    # a shallower exit needs a larger margin for the same confidence
    assert annealed_confidence(z, 6, 30, 1.0) < annealed_confidence(z, 24, 30, 1.0)
    bound = ExitBound((6, 24), 30, 0.5, 1.0, 4)
    assert bound.bound == 24 and bound.confidence(z, 6) == pytest.approx(float(annealed_confidence(z, 6, 30, 1.0)))


def test_exit_adapters_round_trip_and_zero_adapters_are_the_raw_exit(tmp_path: Path):
    model = damped_llama(7)
    heads = ExitHeads(32, [1, 4], rank=0)
    prompt = random_prompt(7, 9)
    raw = generate(*_run(model, prompt, None))
    zero = generate(*_run(model, prompt, ExitArtifact(heads, None, LAYERS)))
    assert zero.token_ids == raw.token_ids and [s.exit_layers for s in zero.steps] == [s.exit_layers for s in raw.steps]
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.05)
    low = ExitHeads(32, [2], rank=3)
    for h, vocab in ((heads, list(range(0, 64, 2))), (low, None)):
        path = ExitArtifact(h, vocab, LAYERS, {"note": "test"}).save(tmp_path / f"a{h.rank}", dtype=torch.float32)
        assert is_exits_dir(path)
        loaded = ExitArtifact.load(path)
        assert loaded.vocab == vocab and loaded.heads.layers == h.layers and loaded.card == {"note": "test"}
        x = torch.randn(3, 32)
        for layer in h.layers:
            torch.testing.assert_close(loaded.heads.adapt(x, layer), h.adapt(x, layer))
        assert torch.equal(loaded.heads.adapt(x, 3), x)  # no adapter at that layer: the raw exit
    # trained adapters, a reduced head: drafts change, the output does not
    adapted = generate(*_run(model, prompt, ExitArtifact.load(tmp_path / "a0")))
    assert adapted.token_ids == raw.token_ids
    assert all(t % 2 == 0 for s in adapted.steps for t in s.tokens[: s.accepted])  # drafts come from the reduced head
    with pytest.raises(AdaspecError, match="trained for a target"):
        other = LayeredBackend(tiny_llama(0, layers=3))
        EarlyExitDrafter(other, ExitBound((1,), 3), ExitArtifact.load(tmp_path / "a0"))


def _run(model, prompt, artifact):
    backend, drafter, bound = specbound(model, exits=(1, 2, 4), threshold=0.3, artifact=artifact)
    return backend, prompt, GenerationConfig(max_new_tokens=24), drafter, bound


def tiny_corpus(model, path: Path, rows: int = 40) -> Path:
    """A distill-data work directory: the tiny target's greedy completions of random prompts."""
    path.mkdir(parents=True, exist_ok=True)
    with (path / "direct.jsonl").open("w") as f:
        for i in range(rows):
            prompt = random_prompt(100 + i, 6)
            f.write(json.dumps({"kind": "direct", "prompt": str(prompt), "prompt_ids": prompt,
                                "completion_ids": ar_tokens(model, prompt, 10)}) + "\n")
    return path


def test_train_exits_end_to_end_raises_exit_agreement_and_keeps_specbound_exact(tmp_path: Path, monkeypatch):
    from typer.testing import CliRunner

    import adaspec.core.models
    from adaspec.cli import app

    model = damped_llama(8, 1.0)
    target = LoadedModel("tiny", tmp_path, model, None)
    monkeypatch.setattr(adaspec.core.models, "load_model", lambda *a, **k: target)
    data = tiny_corpus(model, tmp_path / "data", rows=100)
    out, ship = tmp_path / "run", tmp_path / "shipped" / "exits"
    result = CliRunner().invoke(app, ["train-exits", "--data", str(data), "--out", str(out), "--exits", "1,2,4",
                                      "--vocab", "48", "--epochs", "12", "--batch-size", "64", "--ship", str(ship)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "train_report.json").read_text())
    agreement = {kind: sum(r[kind]["top1"] for r in report["heldout"].values()) / 3 for kind in ("raw", "adapted")}
    assert agreement["adapted"] > agreement["raw"] + 0.05, report["heldout"]
    assert "| exit layer |" in (out / "report.md").read_text()
    assert is_exits_dir(ship) and (ship / "TRAINING.md").is_file()
    # the trained adapters through the method spec: drafts from them, output still ar's
    runner = build_runner(parse_method(f"specbound:exits=1,2,4,threshold=0.3,adapters={ship}"), target, None,
                          GenerationConfig(max_new_tokens=30))
    prompt = random_prompt(9, 9)
    run = runner(prompt, GenerationConfig(max_new_tokens=30))
    assert run.token_ids == ar_tokens(model, prompt, 30) and sum(s.accepted for s in run.steps) > 0
    # --epochs 0: zero adapters over the reduced head (raw exits at an adapted exit's cost), for comparisons
    zero = CliRunner().invoke(app, ["train-exits", "--data", str(data), "--out", str(tmp_path / "run0"), "--exits",
                                    "1,2,4", "--vocab", "48", "--epochs", "0"])
    assert zero.exit_code == 0, zero.output
    raw = ExitArtifact.load(tmp_path / "run0" / "model")
    assert len(raw.vocab) == 48 and not any(p.detach().any() for p in raw.heads.parameters())
    bad = CliRunner().invoke(app, ["train-exits", "--data", str(data), "--exits", "2,1"])
    assert isinstance(bad.exception, AdaspecError) and "increasing" in str(bad.exception)
    missing = CliRunner().invoke(app, ["train-exits", "--data", str(tmp_path / "none"), "--out", str(out)])
    assert isinstance(missing.exception, AdaspecError) and "distill-data" in str(missing.exception)


def test_specbound_sampling_is_lossless():
    """Sampled through specbound (drafts of up to 2 tokens), consecutive pairs of the first four tokens follow the
    exact autoregressive law (chi-square, vocabulary 8)."""
    from scipy.stats import chisquare

    from adaspec.core.sampling import probs_from_logits

    vocab, n, tokens, sampling = 8, 800, 4, SamplingConfig(temperature=1.0)
    model = damped_llama(12, 0.3, scale=12.0, vocab=vocab)
    prompt = [1, 2, 3, 4, 5]
    joint: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(tokens):  # P(t1..t4) by enumerating every prefix
        joint = {seq + (t,): mass * float(p[t]) for seq, mass in joint.items()
                 for p in [probs_from_logits(full_logits(model, prompt + list(seq))[-1], sampling)]
                 for t in range(vocab)}
    backend, drafter, bound = specbound(model, exits=(1, 2), threshold=0.3, d_max=2)
    samples = []
    drafted = accepted = 0
    for seed in range(n):
        config = GenerationConfig(max_new_tokens=tokens, sampling=sampling, seed=seed)
        result = generate(backend, prompt, config, drafter, bound)
        samples.append(tuple(result.token_ids))
        drafted += sum(s.drafted for s in result.steps)
        accepted += sum(s.accepted for s in result.steps)
    assert 0 < accepted < drafted  # drafts were both kept and rejected
    for i in range(tokens - 1):  # the pair (t_i+1, t_i+2)
        law: dict = {}
        for seq, mass in joint.items():
            law[seq[i: i + 2]] = law.get(seq[i: i + 2], 0.0) + mass * n
        counts: dict = {}
        for s in samples:
            counts[s[i: i + 2]] = counts.get(s[i: i + 2], 0) + 1
        cells = [c for c in law if law[c] >= 5]
        rest = [c for c in law if law[c] < 5]
        observed = [counts.get(c, 0) for c in cells] + [sum(counts.get(c, 0) for c in rest)]
        expected = [law[c] for c in cells] + [sum(law[c] for c in rest)]
        assert chisquare(observed, expected, sum_check=False).pvalue > 1e-3, i


def test_method_specs_keep_exit_lists_and_bad_options_are_errors():
    assert split_specs("ar,specbound:exits=8,12,16,threshold=0.7,d_max=3,sd") == [
        "ar", "specbound:exits=8,12,16,threshold=0.7,d_max=3", "sd"]
    spec = parse_method("specbound:exits=8,12,16,threshold=0.7,d_max=3")
    assert spec.given == ("exits", "threshold", "d_max") and spec.options.exits == (8, 12, 16)
    assert (spec.options.threshold, spec.options.d_max) == (0.7, 3)
    assert parse_method("specbound:exits=1/2/4").options.exits == (1, 2, 4)
    from adaspec.bench.sweep import point_specs
    from adaspec.methods import get

    points = point_specs("specbound:exits=1,2,4", {"threshold": (0.5, 0.7), "d_max": (2.0, 4.0)})
    assert [p for p, _ in points][:2] == ["specbound:exits=1,2,4,threshold=0.5,d_max=2",
                                          "specbound:exits=1,2,4,threshold=0.5,d_max=4"]
    assert all(parse_method(p).options.exits == (1, 2, 4) for p, _ in points) and len(points) == 4
    assert len(point_specs("specbound", get("specbound").grid)) == 20
    for bad, message in [("specbound:threshold=0.5,x", "not key=value"),
                         ("specbound:exits=8,x", "layer numbers"), ("specbound:exits=12,8", "increasing"),
                         ("specbound:exits=0,4", "layer numbers >= 1"), ("specbound:threshold=1.5", "threshold"),
                         ("specbound:d_max=0", "d_max"), ("specbound:a=-1", "slope a"),
                         ("specbound:exits=a/b", "layer numbers"), ("specbound:adapters=/no/such/dir", "adapters"),
                         ("specbound:k=3", "has no option 'k'")]:
        with pytest.raises(AdaspecError, match=message):
            parse_method(bad)
    target = LoadedModel("tiny", Path("."), damped_llama(0), None)
    with pytest.raises(AdaspecError, match="exits must lie in 1..5"):
        build_runner(parse_method("specbound:exits=2,6"), target, None, GenerationConfig())
    with pytest.raises(AdaspecError, match="no exit adapters ship"):
        build_runner(parse_method("specbound:exits=2,4,adapters=shipped"), target, None, GenerationConfig())
    runner = build_runner(parse_method("specbound:exits=2,4"), target, None, GenerationConfig())  # none shipped: raw
    assert runner.drafter.heads is None


def test_steps_record_exit_layers_and_the_summary_averages_them():
    model = damped_llama(1, 0.5)
    prompt = random_prompt(1, 9)
    backend, drafter, bound = specbound(model, threshold=0.35, d_max=3)
    result = generate(backend, prompt, GenerationConfig(max_new_tokens=30), drafter, bound)
    steps = [step_record(s) for s in result.steps]
    record = {"question_id": 1, "category": "x", "method": "specbound", "new_tokens": result.new_tokens,
              "wall_s": 1.0, "token_ids": result.token_ids, "text": "", "steps": steps}
    fields = method_fields([record], {})
    exits = [layer for s in result.steps for layer in s.exit_layers]
    stops = [s.draft_stop for s in result.steps if s.draft_stop is not None]
    assert exits and fields.mean_exit_layer == pytest.approx(sum(exits) / len(exits))
    assert fields.bound_stop_share == pytest.approx(stops.count("bound") / len(stops))
    assert fields.d_max_stop_share == pytest.approx(stops.count("d_max") / len(stops))
    plain = dict(record, steps=[{"kind": VERIFY, "drafted": 0, "accepted": 0, "confidence": []}] * 3)
    other = method_fields([plain], {})
    assert other.mean_exit_layer is None and other.bound_stop_share is None


def test_a_server_request_may_not_name_an_adapter_directory(tmp_path: Path):
    pytest.importorskip("fastapi")

    from adaspec.serve import ApiError, RequestPolicy
    from adaspec.serve.requests import Speculative

    policy, default = RequestPolicy(), parse_method("ar")
    spec = policy.spec(Speculative(method="specbound", options={"exits": "1/2", "adapters": "none"}), default)
    assert spec.given == ("exits", "adapters") and spec.options.exits == (1, 2) and spec.options.adapters == "none"
    path = ExitArtifact(ExitHeads(32, [1]), None, LAYERS).save(tmp_path / "exits")
    with pytest.raises(ApiError, match="may not name a file on the server"):
        policy.spec(Speculative(method="specbound", options={"adapters": str(path)}), default)
