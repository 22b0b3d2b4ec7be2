"""The method registry: a method registered in one module -- here `repeat`, a toy drafter that proposes the last token
again, verified by the exact rule -- runs through the CLI, the server and the exactness checks, no other file
touched; and what the registry says of the shipped methods."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from conftest import random_prompt, save_tiny, tiny_llama
from exactness import (
    PASS,
    T1,
    V,
    assert_both_paths_ran,
    draw_runner,
    exact_joint,
    fit_pvalue,
    greedy_check,
    method_runner,
    tiny_models,
)
from typer.testing import CliRunner

from adaspec.cli import app
from adaspec.core.config import PEERS
from adaspec.core.drafters import Draft, DraftContext
from adaspec.core.errors import AdaspecError
from adaspec.core.policies import FixedLength
from adaspec.methods import (
    BuildContext,
    EngineRunner,
    Method,
    MethodSpec,
    Placement,
    get,
    methods,
    names,
    option,
    parse_method,
    register,
    unregister,
)

# -- the toy method: everything it takes is in these lines


class RepeatDrafter:
    """Proposes the last token k times (deterministic: one-hot draft distributions)."""

    name = "repeat"
    wants_hidden = False

    def reset(self) -> None:
        pass

    def propose(self, ctx: DraftContext) -> Draft:
        return Draft([ctx.ids[-1]] * ctx.k_max, None, [0.5] * ctx.k_max)

    def observe(self, accepted: int, ids: list[int], hidden=None) -> None:
        pass


@dataclass(frozen=True)
class RepeatOptions(Placement):
    """k: how many times the last token is proposed again."""

    k: int = option(2, least=1)


def build_repeat(spec: MethodSpec[RepeatOptions], ctx: BuildContext) -> EngineRunner:
    policy = FixedLength(spec.options.k)
    return EngineRunner(spec.label, ctx.backend_for(spec), ctx.stop, RepeatDrafter(), policy=policy)


REPEAT = Method("repeat", RepeatOptions, build_repeat, "a toy: draft the last token k times, exact verification",
                lossless=True)


@pytest.fixture
def repeat():
    register(REPEAT)
    yield REPEAT
    unregister(REPEAT.name)


# -- through the registry, the exactness checks, the CLI and the server


def test_a_registered_method_parses_and_says_what_is_wrong(repeat):
    assert "repeat" in names() and get("repeat") is repeat
    spec = parse_method("repeat:k=3,backend=torch")
    assert spec.options == RepeatOptions(k=3, backend="torch") and spec.given == ("k", "backend")
    with pytest.raises(AdaspecError, match="option k='0' of 'repeat' must be an integer >= 1"):
        parse_method("repeat:k=0")
    with pytest.raises(AdaspecError, match="method 'repeat' has no option 'alpha'; options: format, backend, k"):
        parse_method("repeat:alpha=1")


def test_a_registered_lossless_method_passes_the_exactness_checks(repeat):
    models = tiny_models()
    runner = method_runner("repeat", models)
    prompts = [random_prompt(seed, length=2 + seed % 9, vocab=V) for seed in range(8)]
    drafted, accepted = greedy_check(runner, models.target.model, prompts)
    assert 0 < accepted < drafted
    draws = draw_runner(runner, 2000)
    assert_both_paths_ran(draws)
    assert fit_pvalue(draws.samples, exact_joint(models.target.model, T1)) > PASS


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny"
    save_tiny(path, tiny_llama(0, scale=8.0))
    return path


def test_a_registered_method_runs_through_the_cli(repeat, tiny_dir):
    listed = CliRunner().invoke(app, ["methods"])
    assert listed.exit_code == 0 and "repeat" in listed.output and "k=2" in listed.output
    result = CliRunner().invoke(app, ["generate", "w1 w2 w3 w1 w2 w3 w1", "--method", "repeat:k=3", "--target",
                                      str(tiny_dir), "--no-chat", "--max-new-tokens", "12"])
    assert result.exit_code == 0, result.output
    assert "repeat:k=3 on tiny" in result.output and "output identical to plain decoding (greedy)" in result.output


def test_a_registered_method_runs_through_the_server(repeat, tiny_dir):
    from fastapi.testclient import TestClient

    from adaspec.core.models import load_model
    from adaspec.serve import ServerOptions, create_app

    app_ = create_app(load_model(str(tiny_dir)), "ar", options=ServerOptions(max_batch=1))

    def complete(speculative: dict) -> dict:
        body = {"model": "tiny", "prompt": "w1 w2 w3 w1 w2 w3 w1", "max_tokens": 10, "temperature": 0,
                "speculative": speculative}
        response = client.post("/v1/completions", content=json.dumps(body))
        return response.json() | {"status": response.status_code}

    with TestClient(app_) as client:
        ar, toy = complete({"method": "ar"}), complete({"method": "repeat", "options": {"k": 3}})
        assert ar["status"] == toy["status"] == 200, toy
        assert toy["choices"][0]["text"] == ar["choices"][0]["text"]
        assert toy["speculative"]["method"] == "repeat:k=3" and toy["speculative"]["drafted"] > 0
        bad = complete({"method": "repeat", "options": {"k": 0}})
        assert bad["status"] == 400 and "must be an integer >= 1" in bad["error"]["message"]


# -- what the registry says of the shipped methods


def test_the_registry_holds_the_documented_methods_and_the_peers():
    assert names() == ["ar", "sd", "specdec", "cmasd", "cmasd-k", "cmasd-tau", "specbound", "rstitch", "rstitch+",
                       *PEERS]
    assert [m.name for m in methods() if m.peer] == list(PEERS)  # the summaries compare with config.PEERS
    assert [m.name for m in methods() if m.lossless] == ["ar", "sd", "cmasd-k", "specbound"]
    assert {m.name for m in methods() if m.costs} == {"ar", "sd", "specdec", "cmasd", "cmasd-k", "cmasd-tau"}


def test_server_side_options_and_sweep_grids_come_from_the_options():
    side = {(m.name, name) for m in methods() for name, f in m.fields.items() if f.server_side is not None}
    assert {("sd", "drafter"), ("sd", "format"), ("rstitch+", "router"), ("specbound", "adapters"),
            ("llamacpp", "format"), ("hf-assisted", "drafter")} <= side
    assert not {name for _, name in side} - {"drafter", "format", "router", "adapters"}
    assert get("cmasd").grid == {"alpha": (0.5, 0.75, 1.0), "gamma": (0.5, 1.0, 2.0), "tau_base": (0.05, 0.1, 0.2)}
    assert list(get("rstitch").grid) == ["tau_up", "tau_down"] and get("rstitch").grid["tau_down"] == ()
    assert list(get("specbound").grid) == ["threshold", "d_max"] and get("sd").grid == {}


def test_request_json_values_are_read_by_the_options_types():
    spec = parse_method("cmasd:alpha=0.8", options={"k_max": 6, "gamma": 1, "tau_mode": "literal"})
    assert spec.label == "cmasd:alpha=0.8,k_max=6,gamma=1,tau_mode=literal"
    assert (spec.options.alpha, spec.options.k_max, spec.options.gamma) == (0.8, 6, 1.0)
    assert isinstance(spec.options.gamma, float) and spec.given == ("alpha", "k_max", "gamma", "tau_mode")
    for options, message in [({"k_max": 6.0}, "k_max='6.0' of 'cmasd' must be int"),
                             ({"alpha": True}, "alpha='True' of 'cmasd' must be float"),
                             ({"ngram": 0}, "ngram='0' of 'cmasd' must be an integer >= 1")]:
        with pytest.raises(AdaspecError, match=message):
            parse_method("cmasd", options=options)
