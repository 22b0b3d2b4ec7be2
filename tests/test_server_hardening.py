"""The server against a hostile but fair client (issue 26): every row of the issue's table as a regression test,
on a tiny random Llama with the bundled tokenizer (real tokenising, templating and runner builds; generation in
milliseconds), plus the runner cache's bounds with fake runners."""

from __future__ import annotations

import builtins
import gc
import io
import json
import os
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import httpx
import pytest
from serving import assert_openai_error, metric, running, tiny_target

from adaspec.core.decode import GenerationResult, Step
from adaspec.core.errors import AdaspecError
from adaspec.methods import parse_method
from adaspec.serve import ApiError, RequestPolicy, ServerOptions, TextStream, create_app
from adaspec.serve.requests import Speculative
from adaspec.serve.runners import resident_bytes

pytestmark = pytest.mark.bundled
MODEL = "tiny"
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def tiny():
    return tiny_target()


@pytest.fixture(scope="module")
def served(tiny):
    with running(create_app(tiny, "ar", options=ServerOptions(runner_cache=3))) as s:
        yield s


def chat(**extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}


def post(base: str, body: dict | bytes, path: str = CHAT, **kwargs) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(f"{base}{path}", content=body, headers={"content-type": "application/json"}, timeout=60,
                          **kwargs)
    return httpx.post(f"{base}{path}", json=body, timeout=60, **kwargs)


def prepare_error(served, body: dict | bytes, chat_route: bool = True) -> ApiError:
    """What the server's validation (run on its parse thread) says about `body`; it must refuse it."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(ApiError) as e:
        served.service.prepare(raw, chat_route)
    assert 400 <= e.value.status < 500
    return e.value


def metrics_of(base: str) -> str:
    return httpx.get(f"{base}/metrics").text


# ------------------------------------------- 1, 2, 10: requests never name server paths (and learn nothing of them)


@contextmanager
def file_access(marker: str) -> Iterator[list[str]]:
    """Every open, stat or listing of a path containing `marker`, by any thread, while inside."""
    seen: list[str] = []

    def watch(fn):
        def watched(path, *args, **kwargs):
            if isinstance(path, str | bytes | os.PathLike) and marker in str(os.fspath(path)):
                seen.append(f"{fn.__name__}({path})")
            return fn(path, *args, **kwargs)
        return watched

    with ExitStack() as stack:
        for module, name in [(builtins, "open"), (io, "open"), (os, "open"), (os, "stat"), (os, "lstat"),
                             (os, "listdir"), (os, "scandir"), (os, "access")]:
            stack.enter_context(mock.patch.object(module, name, watch(getattr(module, name))))
        yield seen


@pytest.fixture(scope="module")
def secrets_dir(tmp_path_factory) -> Path:
    """Files a hostile request would point options at: a router-shaped JSON, a binary file, 100,000 '[', a
    5000-digit number, a directory of 'exit adapters'."""
    root = tmp_path_factory.mktemp("secret-dir")
    (root / "router.json").write_text(json.dumps({"format": "adaspec-router", "features": ["secret"]}))
    (root / "binary").write_bytes(bytes(range(256)) * 4)
    (root / "brackets").write_text("[" * 100_000)
    (root / "digits").write_text("1" * 5000)
    (root / "adapters").mkdir()
    (root / "adapters" / "exits.safetensors").write_bytes(b"\0" * 64)
    return root


PATH_REQUESTS = [
    ("rstitch+:router={}", "router.json", None),
    ("rstitch+:router={}", "binary", None),
    ("rstitch+:router={}", "brackets", None),
    ("rstitch+:router={}", "digits", None),
    ("rstitch+", "router.json", "router"),
    ("specbound:adapters={}", "adapters", None),
    ("specbound", "adapters", "adapters"),
    ("sd:drafter={}", "adapters", None),
    ("cmasd:drafter={}", "router.json", None),
    ("hf-assisted", "adapters", "drafter"),
    ("rstitch:drafter={}", "adapters", None),
]


@pytest.mark.parametrize(("method", "name", "option"), PATH_REQUESTS)
def test_a_request_naming_a_server_path_gets_400_and_opens_nothing(served, secrets_dir, method, name, option):
    """Rows 1, 2 and 10: the path is refused by its option's type before anything reads it, and the answer is the
    same whether the path exists or not."""
    answers = []
    for path in (secrets_dir / name, secrets_dir / "absent" / name):
        speculative = ({"method": method.format(path)} if option is None
                       else {"method": method, "options": {option: str(path)}})
        with file_access("secret-dir") as seen:
            response = post(served.base, chat(speculative=speculative))
        error = assert_openai_error(response, 400)
        assert seen == [], seen
        assert "may not name a file on the server" in error["message"]
        answers.append(response.text.replace(str(path), "PATH"))
    assert answers[0] == answers[1]


def test_an_operator_named_artifact_is_read_and_its_path_never_shown(tiny, secrets_dir):
    """The other side of the test above: a name the operator allowed reaches the file (so the watch sees reads),
    and the error about its content names the artifact, not its path."""
    policy = RequestPolicy(artifacts={"ops-router": secrets_dir / "router.json"})
    service = create_app(tiny, "ar", options=ServerOptions(policy=policy)).state.service
    with file_access("secret-dir") as seen:
        with pytest.raises(ApiError) as e:
            service.prepare(json.dumps(chat(speculative={"method": "rstitch+:router=ops-router"})).encode(), True)
    assert any("router.json" in s for s in seen)
    assert e.value.status == 400 and "ops-router" in e.value.message and "secret-dir" not in e.value.message
    with pytest.raises(AdaspecError, match="artifact name"):
        RequestPolicy(artifacts={"shipped": secrets_dir / "adapters"})  # a name that means something else


def test_a_request_cannot_make_the_server_convert_weights(served):
    """Row 9: format= values that convert are the operator's; nothing is converted on a request's word."""
    with mock.patch("adaspec.core.backends.llamacpp.requantize", side_effect=AssertionError("converted")) as convert:
        for speculative in ({"method": "sd:format=q8_0"}, {"method": "llamacpp:format=f16"},
                            {"method": "ar", "options": {"format": "q4_0"}}):
            error = assert_openai_error(post(served.base, chat(speculative=speculative)), 400)
            assert "may not make the server convert weights" in error["message"]
        convert.assert_not_called()
    allowed = RequestPolicy(formats=("q8_0",)).spec(Speculative(method="sd:format=q8_0"), parse_method("ar"))
    assert allowed.options.format == "q8_0"


# -------------------------------------------------------------------------- 2, 5, 6, 7, 11, 12: no 500 from input


@pytest.mark.parametrize("seed", [2**64, 10**30, -(2**63) - 1, 2**63])
def test_a_seed_beyond_64_bits_gets_400(served, seed):
    """Row 5: OpenAI's seed is a signed 64-bit integer."""
    error = assert_openai_error(post(served.base, chat(seed=seed, temperature=0.7)), 400)
    assert error["param"] == "seed"


@pytest.mark.parametrize("seed", [2**63 - 1, -(2**63), 0])
def test_seeds_at_the_64_bit_edges_sample(served, seed):
    response = post(served.base, chat(seed=seed, temperature=0.7))
    assert response.status_code == 200, response.text


SURROGATE = "\\ud800"  # as JSON writes a lone surrogate; json.loads turns it into one


@pytest.mark.parametrize(("path", "body", "param"), [
    (CHAT, '{"model": "%s", "messages": [{"role": "user", "content": "hi"}]}', "model"),
    (CHAT, '{"model": "tiny", "messages": [{"role": "user", "content": "a%sb"}]}', "messages.0.content"),
    (CHAT, '{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "%s"}]}]}',
     "messages.0.content.0.text"),
    (CHAT, '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop": ["%s"]}', "stop.0"),
    (CHAT, '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "speculative": {"method": "%s"}}',
     "speculative.method"),
    (CHAT, '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], '
           '"speculative": {"options": {"k": "%s"}}}', None),
    (CHAT, '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "user": "%s"}', "user"),
    ("/v1/completions", '{"model": "tiny", "prompt": "%s"}', None),
    ("/v1/completions", '{"model": "tiny", "prompt": "hi", "stop": "%s"}', "stop"),
])
def test_lone_surrogates_in_any_string_get_400_counted_once(served, path, body, param):
    """Row 6 (and 13's double count): a lone surrogate is not Unicode text; 400, not 404 or 500, counted once."""
    before = metrics_of(served.base)
    response = post(served.base, (body % SURROGATE).encode(), path)
    error = assert_openai_error(response, 400)
    if param is not None:
        assert error["param"] == param
    after = metrics_of(served.base)
    assert metric(after, "adaspec_requests_total", path=path, status="400") == \
        metric(before, "adaspec_requests_total", path=path, status="400") + 1
    assert metric(after, "adaspec_errors_total", type="invalid_request_error") == \
        metric(before, "adaspec_errors_total", type="invalid_request_error") + 1


@pytest.mark.parametrize(("extra", "message"), [
    ({"speculative": {"method": "hf-lookup:k=-1"}}, "integer >= 1"),  # row 7
    ({"speculative": {"method": "hf-lookup", "options": {"ngram": 0}}}, "integer >= 1"),
    ({"speculative": {"method": "hf-assisted:k=-5"}}, "integer >= 1"),  # row 12
    ({"speculative": {"method": ""}}, "is empty"),
    ({"speculative": {"method": "sd:k=2", "options": {"k": 3}}}, "given twice"),
    ({"speculative": {"method": "cmasd:alpha=nan"}}, "finite"),
    ({"speculative": {"method": "specbound:exits=-1"}}, "exits must be layer numbers >= 1"),  # row 13
    ({"max_tokens": True}, "valid integer"),
    ({"temperature": True}, "valid number"),
    ({"stream": "yes"}, "valid boolean"),
    ({"max_tokens": 4.0}, "valid integer"),
])
def test_option_and_parameter_ranges_get_400(served, extra, message):
    """Rows 7 and 12: out-of-range method options and wrongly typed parameters are refused up front."""
    error = assert_openai_error(post(served.base, chat(**extra)), 400)
    assert message in error["message"], error


def test_hf_lookup_with_negative_k_never_reaches_transformers(served):
    with mock.patch("adaspec.methods.peers.HFRunner", side_effect=AssertionError("built")):
        assert_openai_error(post(served.base, chat(speculative={"method": "hf-lookup:k=-1"})), 400)


@pytest.mark.parametrize(("param", "value"), [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("tool_choice", "required"),
    ("response_format", {"type": "json_object"}),
    ("top_logprobs", 3),
    ("logprobs", True),
    ("logit_bias", {"50256": -100}),
    ("functions", [{"name": "f"}]),
    ("function_call", "auto"),
    ("frequency_penalty", 0.5),
    ("presence_penalty", 1),
    ("n", 2),
    ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "x"}),
])
def test_unsupported_openai_parameters_get_400_naming_them(served, param, value):
    """Row 11: a parameter that would change the answer is refused by name, not ignored."""
    error = assert_openai_error(post(served.base, chat(**{param: value})), 400)
    assert error["param"] == param and error["code"] == "unsupported_parameter" and param in error["message"]


def test_unknown_parameters_get_400_and_do_nothing_values_are_accepted(served):
    error = assert_openai_error(post(served.base, chat(frobnicate=1)), 400)
    assert error["param"] == "frobnicate" and error["code"] == "unknown_parameter"
    quiet = chat(tool_choice="none", tools=[], response_format={"type": "text"}, logprobs=False, n=1,
                 frequency_penalty=0, presence_penalty=0.0, logit_bias={}, user="u1", parallel_tool_calls=True,
                 store=False, metadata={"a": "b"}, stream_options=None)
    response = post(served.base, quiet)
    assert response.status_code == 200, response.text
    error = assert_openai_error(post(served.base, {"model": MODEL, "prompt": "hi", "echo": True}, "/v1/completions"),
                                400)
    assert error["param"] == "echo"


# ------------------------------------------------------------------ 3, 4, 13: bounded bodies, stop strings, uploads


def raw_request(base: str, head: str, body: bytes = b"", wait_s: float = 10.0, close: bool = False) -> bytes:
    """Send `head` (request line and headers) and `body` on a raw socket; return what the server answers within
    `wait_s` (or b"" after closing the connection first, when `close`)."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait_s) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        if close:
            return b""
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
                if b"\r\n\r\n" in out and b'"error"' in out or b"}}" in out:
                    break
        except TimeoutError:
            pass
        return out


def test_a_body_past_the_cap_gets_413_before_it_is_read(served):
    """Rows 3 and 4: a 1 MiB stop string or a 20 MiB prompt: 413 as soon as Content-Length says so, or as soon as a
    chunked body passes the cap; the event loop never holds the body."""
    for size in (2**20 + 1, 20 * 2**20):
        t0 = time.monotonic()
        answer = raw_request(served.base, f"POST {CHAT} HTTP/1.1\nHost: x\nContent-Type: application/json\n"
                                          f"Content-Length: {size}\n", b'{"model": "tiny", "stop": "xxxx')
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert time.monotonic() - t0 < 5
    chunk = b"x" * 65536
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(17)) + b"0\r\n\r\n"
    answer = raw_request(served.base, "POST /v1/completions HTTP/1.1\nHost: x\nTransfer-Encoding: chunked\n",
                         chunked)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert metric(metrics_of(served.base), "adaspec_requests_total", path="/v1/completions", status="413") >= 1


def test_stop_strings_are_capped_in_count_and_length(served):
    assert prepare_error(served, chat(stop=["a", "b", "c", "d", "e"])).param == "stop"
    assert prepare_error(served, chat(stop="x" * 513)).param == "stop"
    assert prepare_error(served, chat(stop=[""])).param == "stop"
    served.service.prepare(json.dumps(chat(stop=["x" * 512] * 4)).encode(), True)


def test_stop_matching_takes_time_linear_in_the_text():
    """Row 3: TextStream decodes a few tokens a push and looks for stop strings only where new text can end one."""
    decoded = []

    def decode(ids: list[int]) -> str:
        decoded.append(len(ids))
        return "".join(map(chr, ids))

    stops = ("x" * 511 + "y", "xy" * 256, "q" * 512, "z")
    text = TextStream(decode, stops)
    n = 50_000
    t0 = time.perf_counter()
    shown = sum(len(text.push([ord("x")])) for _ in range(n))
    elapsed = time.perf_counter() - t0
    assert shown + len(text.push([], final=True)) == n and not text.stopped
    assert sum(decoded) <= 4 * n  # each push decodes a window of a token or two, never the whole text
    assert elapsed < 5, f"{n} tokens took {elapsed:.1f} s"
    text = TextStream(decode, stops)
    assert text.push([ord(c) for c in "abzcd"]) == "ab" and text.stopped and len(text.ids) == 3


def test_health_answers_within_100_ms_while_a_large_prompt_is_tokenised(served):
    """Rows 3 and 4: parsing and tokenising a 1 MiB body happen on a parse thread; /health keeps answering."""
    prompt = "hello world, " * ((2**20 - 200) // 13)
    done: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: done.append(post(served.base, {"model": MODEL, "prompt": prompt},
                                                               "/v1/completions")))
    latencies = []
    with httpx.Client(base_url=served.base, timeout=10) as http:
        http.get("/health")
        sender.start()
        while sender.is_alive():
            t0 = time.perf_counter()
            assert http.get("/health").status_code == 200
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.01)
    sender.join()
    error = assert_openai_error(done[0], 400)
    assert error["code"] == "context_length_exceeded"  # it was tokenised: 250k tokens > 512
    assert len(latencies) >= 5, latencies
    assert max(latencies) < 0.1, f"/health took up to {max(latencies) * 1000:.0f} ms"


def test_form_encoded_bodies_are_told_to_send_json(served):
    """Row 13: not 'Input should be a valid dictionary'."""
    error = assert_openai_error(httpx.post(f"{served.base}{CHAT}", data={"model": MODEL}), 400)
    assert "not valid JSON" in error["message"] and "x-www-form-urlencoded" in error["message"]


def test_aborted_and_slow_uploads_are_counted_as_such(tiny):
    """Row 13: an upload the client abandons is a 499 (not a 400), a slow one is cut at the body timeout (408)."""
    with running(create_app(tiny, "ar", options=ServerOptions(body_timeout_s=0.5))) as served:
        head = f"POST {CHAT} HTTP/1.1\nHost: x\nContent-Type: application/json\nContent-Length: 1000\n"
        for _ in range(3):
            raw_request(served.base, head, b'{"model": ', close=True)
        t0 = time.monotonic()
        answer = raw_request(served.base, head, b'{"model": ')
        assert answer.startswith(b"HTTP/1.1 408") and b"body_timeout" in answer, answer[:300]
        assert time.monotonic() - t0 < 5
        deadline = time.monotonic() + 10
        while metric(metrics_of(served.base), "adaspec_requests_total", path=CHAT, status="499") < 3:
            assert time.monotonic() < deadline, metrics_of(served.base)
            time.sleep(0.1)
        text = metrics_of(served.base)
        assert metric(text, "adaspec_requests_total", path=CHAT, status="499") == 3
        assert metric(text, "adaspec_requests_total", path=CHAT, status="408") == 1
        assert metric(text, "adaspec_requests_total", path=CHAT, status="400") == 0


# ------------------------------------------------------------------------------ 8: runners, built off the request


@dataclass
class FakeRunner:
    """Emits a fixed token per step; `ballast` stands for the memory a real runner holds."""

    label: str
    token: int
    ballast: bytes = b""
    where: str = "fake"

    def __call__(self, prompt_ids, config, on_step=None) -> GenerationResult:
        steps = []
        for _ in range(config.max_new_tokens):
            steps.append(Step(0, 0, [self.token]))
            if on_step is not None:
                on_step(steps[-1])
        return GenerationResult(list(prompt_ids), [self.token] * len(steps), steps, 0.0, "length")


class Builds:
    """A fake `build`: records what it built, optionally slow, heavy or failing, and keeps weak references."""

    def __init__(self, token: int, slow: dict[str, float] | None = None, ballast_mib: int = 0,
                 fail: str | None = None) -> None:
        self.token, self.slow, self.ballast, self.fail = token, slow or {}, ballast_mib, fail
        self.built: list[str] = []
        self.threads: list[threading.Thread] = []
        self.refs: list[weakref.ref] = []

    def __call__(self, spec, target, drafter, config, backend):
        self.built.append(spec.label)
        self.threads.append(threading.current_thread())
        time.sleep(self.slow.get(spec.name, 0))
        ballast = b"\1" * (self.ballast * 2**20)
        if self.fail and spec.name == self.fail:
            raise AdaspecError(f"{spec.label}: cannot build (fake)")
        runner = FakeRunner(spec.label, self.token, ballast)
        self.refs.append(weakref.ref(runner))
        return runner


def method_body(method: str, **extra) -> dict:
    return chat(speculative={"method": method}, **extra)


def test_a_slow_build_does_not_hold_up_requests_on_built_runners(tiny):
    builds = Builds(tiny.tokenizer.encode(" hi")[0], slow={"sd": 3.0})
    with running(create_app(tiny, "ar", options=ServerOptions(), build=builds)) as served:
        slow: list[httpx.Response] = []
        sender = threading.Thread(target=lambda: slow.append(post(served.base, method_body("sd"))))
        sender.start()
        deadline = time.monotonic() + 5
        while "sd" not in builds.built:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        t0 = time.monotonic()
        fast = post(served.base, chat())  # ar: built at start-up
        assert fast.status_code == 200 and time.monotonic() - t0 < 1.5 and sender.is_alive()
        sender.join(10)
        assert slow[0].status_code == 200
        assert builds.built == ["ar", "sd"]


def test_every_build_runs_on_a_thread_that_then_ends(tiny):
    """llama.cpp's OpenMP teams live as long as the thread that computed: a pooled build thread that stays made the
    generation thread decode at 0.6x (serve/runners.py). Builds run one at a time, each on a thread of its own."""
    builds = Builds(tiny.tokenizer.encode(" hi")[0])
    with running(create_app(tiny, "ar", options=ServerOptions(), build=builds)) as served:
        for method in ("sd:k=2", "sd:k=3"):
            assert post(served.base, method_body(method)).status_code == 200
        generation = served.service.worker.thread
        for t in builds.threads:
            t.join(5)
        assert len(set(builds.threads)) == 3 and not any(t.is_alive() for t in builds.threads)
        assert generation.is_alive() and generation not in builds.threads


def test_the_runner_cache_keeps_at_most_its_count_and_frees_the_rest(tiny):
    builds = Builds(tiny.tokenizer.encode(" hi")[0])
    with running(create_app(tiny, "ar", options=ServerOptions(runner_cache=2), build=builds)) as served:
        for method in ("sd:k=2", "sd:k=3", "sd:k=4", "sd:k=2", "ar"):
            assert post(served.base, method_body(method)).status_code == 200
        assert len(served.service.runners) == 2
        gc.collect()
        alive = [r() is not None for r in builds.refs]
        assert builds.built == ["ar", "sd:k=2", "sd:k=3", "sd:k=4", "sd:k=2", "ar"]  # evicted ones were rebuilt
        assert alive.count(True) == 2 and alive[-2:] == [True, True]
        text = metrics_of(served.base)
        assert metric(text, "adaspec_runner_builds_total") == 6 and metric(text, "adaspec_runner_evictions_total") == 4


def test_the_runner_cache_is_bounded_by_memory_and_rss_stays_flat(tiny):
    builds = Builds(tiny.tokenizer.encode(" hi")[0], ballast_mib=64)
    options = ServerOptions(runner_cache=10, runner_cache_mib=150)
    with running(create_app(tiny, "ar", options=options, build=builds)) as served:
        assert post(served.base, method_body("sd:k=2")).status_code == 200
        start = resident_bytes()
        for k in range(3, 11):
            assert post(served.base, method_body(f"sd:k={k}")).status_code == 200
        grown = (resident_bytes() - start) / 2**20
        assert len(served.service.runners) <= 2 and served.service.runners.bytes <= 150 * 2**20
        assert grown < 100, f"RSS grew {grown:.0f} MiB over 8 builds of 64 MiB runners"


def test_a_failed_build_frees_what_it_took_and_fails_fast_next_time(tiny):
    builds = Builds(tiny.tokenizer.encode(" hi")[0], ballast_mib=200, fail="sd")
    with running(create_app(tiny, "ar", options=ServerOptions(), build=builds)) as served:
        start = resident_bytes()
        error = assert_openai_error(post(served.base, method_body("sd:k=2")), 400)
        assert "cannot build (fake)" in error["message"]
        assert (resident_bytes() - start) / 2**20 < 50
        t0 = time.monotonic()
        assert_openai_error(post(served.base, method_body("sd:k=2")), 400)
        assert builds.built.count("sd:k=2") == 1 and time.monotonic() - t0 < 1
        assert metric(metrics_of(served.base), "adaspec_runner_build_failures_total") == 1


def test_stop_strings_and_equivalent_specs_share_one_runner(served):
    """Row 8: stop strings are matched by the job, so they make no runner; nor do options at their defaults."""
    before = metric(metrics_of(served.base), "adaspec_runner_builds_total")
    for stop in (None, "a", ["b", "c"], "\n\n"):
        assert post(served.base, chat(stop=stop)).status_code == 200
    for method in ("ar", "ar:backend=torch"):
        assert post(served.base, method_body(method)).status_code == 200
    assert metric(metrics_of(served.base), "adaspec_runner_builds_total") == before + 1  # ar:backend=torch


def test_a_stop_string_ends_the_generation_at_its_token(served, tiny):
    """The job cuts the generation at the token that completes a stop string, streamed or not, and reports it."""
    free = post(served.base, chat(max_tokens=24, temperature=0)).json()
    text = free["choices"][0]["message"]["content"]
    assert len(text) > 4
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = post(served.base, chat(max_tokens=24, temperature=0, stop=stop)).json()
    assert cut["choices"][0]["message"]["content"] == text[: text.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["usage"]["completion_tokens"] < free["usage"]["completion_tokens"]
    with httpx.stream("POST", f"{served.base}{CHAT}", json=chat(max_tokens=24, temperature=0, stop=stop,
                                                                 stream=True), timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == text[: text.index(stop)]
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(("flags", "message"), [
    (["--artifact", "no-equals-sign"], "give NAME=PATH"),
    (["--artifact", "shipped=/tmp"], "artifact name"),
    (["--artifact", "mine=/no/such/path"], "no such file"),
    (["--request-methods", "sd,warp"], "unknown request method"),
    (["--allow-format", "q9_9"], "unknown llama.cpp weight format"),
])
def test_serve_refuses_a_bad_request_policy_before_loading_the_model(flags, message):
    from typer.testing import CliRunner

    from adaspec.cli import app as cli_app

    with mock.patch("adaspec.core.models.load_model", side_effect=AssertionError("loaded")):
        result = CliRunner().invoke(cli_app, ["serve", *flags])
    assert isinstance(result.exception, AdaspecError) and message in str(result.exception), result.output
