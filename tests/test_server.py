"""The OpenAI-compatible server on loopback: the official `openai` client (streamed and not), greedy output equal
to the direct runner and to `adaspec generate`, OpenAI-style 4xx for malformed input, a bounded queue (429),
timeouts, client disconnects that cancel the generation, and a graceful shutdown."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import openai
import pytest
import torch
from serving import Served, assert_openai_error, running, sse_events_of
from typer.testing import CliRunner

from adaspec.cli import app as cli_app
from adaspec.core.config import GenerationConfig
from adaspec.core.decode import GenerationResult, Step
from adaspec.core.models import encode_prompt, load_model
from adaspec.methods import build_runner, parse_method
from adaspec.serve import ServerOptions, TextStream, create_app

pytestmark = pytest.mark.bundled
CHAT = "Write a haiku about rain."
MODEL = "smollm2"


@pytest.fixture(scope="module")
def smollm():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machine is shared: one thread is faster than two contending ones
    yield load_model()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(smollm) -> Iterator[str]:
    with running(create_app(smollm, "sd")) as served:
        yield served.base


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def direct(smollm, ids: list[int], max_tokens: int, method: str = "sd") -> str:
    config = GenerationConfig(max_new_tokens=max_tokens)
    result = build_runner(parse_method(method), smollm, None, config)(ids, config)
    return smollm.tokenizer.decode(result.token_ids, skip_special_tokens=True)


# ------------------------------------------------------------------------------- the bundled model


def test_models_health_and_metrics(base):
    assert [m.id for m in client(base).models.list().data] == [MODEL]
    assert httpx.get(f"{base}/v1/models/{MODEL}").json()["id"] == MODEL
    health = httpx.get(f"{base}/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL and health["method"] == "sd"
    text = httpx.get(f"{base}/metrics").text
    for name in ("adaspec_requests_total", "adaspec_errors_total", "adaspec_completion_tokens_total",
                 "adaspec_request_latency_seconds_bucket", "adaspec_acceptance_rate", "adaspec_draft_length_bucket",
                 "adaspec_queue_depth"):
        assert name in text


def test_chat_greedy_streamed_or_not_equals_the_direct_runner(base, smollm):
    messages = [{"role": "user", "content": CHAT}]
    expected = direct(smollm, encode_prompt(smollm.tokenizer, CHAT), 12)
    c = client(base)
    whole = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert whole.choices[0].message.content == expected
    assert whole.choices[0].finish_reason in ("length", "stop")
    assert whole.usage.completion_tokens <= 12 and whole.usage.prompt_tokens > 0
    stats = whole.model_extra["speculative"]
    assert stats["method"] == "sd" and stats["steps"] >= 1 and stats["accepted"] <= stats["drafted"]
    chunks = list(c.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    metrics = httpx.get(f"{base}/metrics").text
    assert 'adaspec_requests_total{path="/v1/chat/completions",status="200"}' in metrics


def test_completion_greedy_streamed_or_not_equals_the_direct_runner(base, smollm):
    prompt = "The capital of France is"
    expected = direct(smollm, encode_prompt(smollm.tokenizer, prompt, chat=False), 8)
    c = client(base)
    whole = c.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    assert whole.choices[0].text == expected and whole.usage.completion_tokens == 8
    streamed = c.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == expected


def test_chat_greedy_equals_adaspec_generate(base, smollm):
    result = CliRunner().invoke(cli_app, ["generate", CHAT, "--max-new-tokens", "12", "--no-compare"])
    assert result.exit_code == 0, result.output
    answer = client(base).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": CHAT}],
                                                  max_tokens=12, temperature=0).choices[0].message.content
    assert result.output.startswith(answer + "\n")


def test_speculative_object_chooses_method_and_options(base):
    def ask(speculative: dict) -> dict:
        body = {"model": MODEL, "prompt": "One, two, three, four, one, two, three,", "max_tokens": 6,
                "temperature": 0, "speculative": speculative}
        response = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        return response.json()

    ar, sd = ask({"method": "ar"}), ask({"method": "sd", "options": {"k": 3, "ngram": 2}})
    assert ar["choices"][0]["text"] == sd["choices"][0]["text"]
    assert ar["speculative"]["drafted"] == 0 and ar["speculative"]["steps"] == ar["usage"]["completion_tokens"]
    assert sd["speculative"]["method"] == "sd:k=3,ngram=2" and sd["speculative"]["drafted"] > 0


def long_prompt() -> str:
    return "word " * 9000  # beyond SmolLM2's 8192-token context


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v1/completions", b"{not json", 400),
        ("/v1/completions", b"", 400),
        ("/v1/completions", b"[]", 400),
        ("/v1/completions", {"prompt": "hi"}, 400),  # no model
        ("/v1/completions", {"model": MODEL}, 400),  # no prompt
        ("/v1/completions", {"model": MODEL, "prompt": 5}, 400),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": "hot"}, 400),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": -1}, 400),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 0}, 400),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 2}, 400),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 3}, 400),
        ("/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, 400),
        ("/v1/completions", {"model": MODEL, "prompt": ""}, 400),
        ("/v1/completions", {"model": MODEL, "prompt": [10**9]}, 400),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400),
        ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "speculative": {"method": "nope"}}, 400),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "speculative": {"method": "sd:bogus=1"}}, 400),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "speculative": {"method": "sd", "options": {"k": "x"}}},
         400),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "speculative": {"method": "sd", "options": {"k": 0}}},
         400),  # rejected when the runner is built, still before the response starts
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "stream": True,
                             "speculative": {"method": "sd", "options": {"k": 0}}}, 400),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "speculative": {"options": {"drafter": "/etc"}}}, 400),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "speculative": {"method": "sd", "extra": 1}}, 400),
        ("/v1/completions", {"model": MODEL, "prompt": long_prompt()}, 400),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 10**6}, 400),
        ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400),
        ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}, 400),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"content": "hi"}]}, 400),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": long_prompt()}]}, 400),
        ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 3}, 400),
        ("/v1/nothing", {}, 404),
    ],
)
def test_malformed_requests_get_an_openai_style_4xx(base, path, body, status):
    if isinstance(body, bytes):
        response = httpx.post(f"{base}{path}", content=body, headers={"content-type": "application/json"}, timeout=60)
    else:
        response = httpx.post(f"{base}{path}", json=body, timeout=60)
    error = assert_openai_error(response, status)
    if status == 404 and path != "/v1/nothing":
        assert error["code"] == "model_not_found" and error["param"] == "model"
    if not isinstance(body, bytes) and "word word" in json.dumps(body):
        assert error["code"] == "context_length_exceeded"


def test_get_on_a_post_route_is_a_405_in_openai_style(base):
    assert_openai_error(httpx.get(f"{base}/v1/completions"), 405)


def test_openai_client_raises_on_4xx(base):
    with pytest.raises(openai.NotFoundError):
        client(base).completions.create(model="nope", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="unknown method"):
        client(base).completions.create(model=MODEL, prompt="hi", max_tokens=2,
                                        extra_body={"speculative": {"method": "warp"}})


# ----------------------------------------------------------- load and faults, with a fake slow runner


@dataclass
class SlowRunner:
    """Emits one token per `delay` seconds for max_tokens steps; counts the steps it actually ran."""

    label: str
    token: int
    delay: float
    ran: list[int] = field(default_factory=list)

    def __call__(self, prompt_ids, config, on_step=None) -> GenerationResult:
        steps: list[Step] = []
        for _ in range(config.max_new_tokens):
            time.sleep(self.delay)
            steps.append(Step(0, 0, [self.token]))
            self.ran.append(1)
            if on_step is not None:
                on_step(steps[-1])
        return GenerationResult(list(prompt_ids), [self.token] * len(steps), steps, 0.0, "length")


@pytest.fixture
def slow(smollm):
    """A server whose runner is slow and cheap: (base URL, runner)."""

    def make(delay: float = 0.02, **options):
        runner = SlowRunner("slow", smollm.tokenizer.encode(" hi")[0], delay)
        app = create_app(smollm, "ar", options=ServerOptions(**options), build=lambda *a: runner)
        return running(app), runner

    return make


def stream_body(max_tokens: int) -> dict:
    return {"model": MODEL, "prompt": "x", "max_tokens": max_tokens, "stream": True}


def queue_depth(base: str) -> int:
    return httpx.get(f"{base}/health").json()["queue"]


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def test_full_queue_gets_429_and_a_disconnect_frees_the_worker(slow):
    server, runner = slow(queue_size=1)
    with server as served, httpx.Client(base_url=served.base, timeout=30) as http:
        base = served.base
        done: list[httpx.Response] = []
        with http.stream("POST", "/v1/completions", json=stream_body(5000)) as first:
            assert first.status_code == 200
            lines = first.iter_lines()  # kept: a dropped iterator closes the stream
            next(lines)  # the generation is running
            waiting = threading.Thread(target=lambda: done.append(http.post(
                "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 3})))
            waiting.start()
            wait_for(lambda: queue_depth(base) == 2)
            error = assert_openai_error(http.post("/v1/completions", json={"model": MODEL, "prompt": "x"}), 429)
            assert error["code"] == "queue_full"
            with pytest.raises(openai.RateLimitError):
                client(base).completions.create(model=MODEL, prompt="x", max_tokens=2)
        waiting.join(10)  # closing the first stream cancelled it, so the queued request ran
        assert done and done[0].status_code == 200 and done[0].json()["usage"]["completion_tokens"] == 3
        assert len(runner.ran) < 1000
        assert 'adaspec_cancelled_total{reason="disconnect"} 1' in http.get("/metrics").text


def test_client_disconnect_cancels_its_generation(slow):
    server, runner = slow()
    with server as served:
        base = served.base
        stream = client(base).completions.create(model=MODEL, prompt="x", max_tokens=5000, stream=True)
        for _, _chunk in zip(range(3), stream, strict=False):
            pass
        stream.close()
        wait_for(lambda: queue_depth(base) == 0)
        after = len(runner.ran)
        time.sleep(0.2)
        assert len(runner.ran) == after < 1000  # stopped, long before its 5000 tokens
        with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up is cancelled too
            httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 5000},
                       timeout=0.5)
        wait_for(lambda: queue_depth(base) == 0)
        assert 'adaspec_cancelled_total{reason="disconnect"} 2' in httpx.get(f"{base}/metrics").text


def test_request_past_its_timeout_gets_408_or_an_error_event(slow):
    server, _ = slow(timeout_s=0.5)
    with server as served:
        base = served.base
        body = {"model": MODEL, "prompt": "x", "max_tokens": 5000}
        assert_openai_error(httpx.post(f"{base}/v1/completions", json=body, timeout=30), 408)
        with httpx.stream("POST", f"{base}/v1/completions", json=stream_body(5000), timeout=30) as response:
            events = sse_events_of(response.iter_lines())
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "timeout"
        wait_for(lambda: queue_depth(base) == 0)


def stream_through_shutdown(served: Served, max_tokens: int) -> list:
    """Start a stream, shut the server down once it runs, and return the stream's events."""
    with httpx.stream("POST", f"{served.base}/v1/completions", json=stream_body(max_tokens), timeout=30) as r:
        lines = r.iter_lines()
        first = next(lines)
        stopper = threading.Thread(target=served.stop)
        stopper.start()
        events = sse_events_of([first, *lines])
    stopper.join(30)
    return events


def test_shutdown_finishes_in_flight_streams(slow):
    server, _ = slow(drain_s=10)
    with server as served:
        events = stream_through_shutdown(served, 40)
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    assert sum(len(e["choices"][0]["text"]) for e in events[:-1]) == len(" hi" * 40)


def test_shutdown_past_the_grace_ends_streams_cleanly(slow):
    server, _ = slow(drain_s=0.3)
    with server as served:
        events = stream_through_shutdown(served, 5000)
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "shutting_down"


# --------------------------------------------------------------------------------------- the parts


def test_text_stream_ends_before_a_stop_string_and_never_streams_part_of_it():
    text = TextStream(lambda ids: "".join(map(chr, ids)), stop=("END",))
    deltas = [text.push([ord(c)]) for c in "ab EN"]
    assert "".join(deltas) == "ab " and text.push([ord("D"), ord("x")]) == "" and text.stopped
    text = TextStream(lambda ids: "".join(map(chr, ids)), stop=("END",))
    assert "".join([text.push([ord(c)]) for c in "ab EN"] + [text.push([ord("o")]), text.push([], final=True)]) \
        == "ab ENo"


def test_text_stream_waits_for_the_rest_of_a_character():
    text = TextStream(lambda ids: bytes(ids).decode("utf-8", errors="replace"))  # a byte-level tokenizer
    a, e1, e2 = "aé".encode()  # é is two bytes
    assert text.push([a]) == "a" and text.push([e1]) == "" and text.push([e2]) == "é"


def test_serve_without_fastapi_names_the_extra_to_install():
    code = "import sys; sys.modules['fastapi'] = None; from adaspec.cli import main; main()"
    result = subprocess.run([sys.executable, "-c", code, "serve"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "pip install 'adaspec[serve]'" in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr
