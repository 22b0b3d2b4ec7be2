"""Property-based tests of the server (issue 26): hypothesis draws request bodies over the request models -- mostly
valid, with hostile values mixed into every field (wrong types, huge numbers, lone surrogates, paths, separators,
random method specs from the registry) -- and the server must answer each with a 2xx or an OpenAI-shaped 4xx,
never a 5xx, a timeout or a hang. On a tiny Llama with the bundled tokenizer, so generation takes milliseconds."""

from __future__ import annotations

import json
import logging

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from serving import running, sse_events_of, tiny_target

from adaspec.methods import get, names
from adaspec.serve import ApiError, ServerOptions, TextStream, create_app

pytestmark = pytest.mark.bundled
FUZZ = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))

NASTY = ["", " ", "\ud800", "\udfff", ",", "=", ":", "a,b=c", "/etc/passwd", "../../../../etc/shadow", "~/.bashrc",
         "/etc", "auto", "none", "shipped", "small", "lookup", "eagle", "q8_0", "f16", "nan", "inf", "-1", "0", "1e309",
         "9" * 5000, "\x00", "é", "日本", "x" * 600, "{}", "[", "torch", "llamacpp", "8/12", "1,2,3"]
strings = st.one_of(st.text(max_size=12), st.sampled_from(NASTY))
ints = st.one_of(st.integers(-3, 40), st.integers(-(2**70), 2**70),
                 st.sampled_from([2**31, 2**32, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30]))
floats = st.one_of(st.floats(allow_nan=False, allow_infinity=False),
                   st.sampled_from([0.0, -0.0, 0.5, 1.0, 2.0, 2.0000001, 1e-300, 1e300]))
scalars = st.one_of(st.none(), st.booleans(), ints, floats, strings)
anything = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(strings, inner,
                                                                                               max_size=3),
                        max_leaves=6)


option_values = st.one_of(ints, floats, strings, st.booleans())
PLAUSIBLE = ["auto", "1", "2", "4", "none", "shipped", "small", "lookup", "eagle", "torch", "llamacpp", "auto",
             "q8_0", "8", "1/2", "1,2", "linear", "exp", "entropy", "margin"]
plausible = {"int": st.integers(-2, 12), "float": st.floats(-0.5, 1.5), "an integer >= 1": st.integers(-2, 12)}


@st.composite
def speculative(draw) -> dict:
    """Mostly a method of the registry with some of its own options at plausible values; sometimes anything."""
    name = draw(st.sampled_from(names()) if draw(st.integers(0, 5)) else strings)
    fields = get(name).fields if name in names() else {}
    keys = draw(st.lists(st.sampled_from(list(fields)), max_size=2, unique=True)) if fields else []
    if draw(st.integers(0, 5)) == 0:
        keys.append(draw(st.one_of(st.just("bogus"), strings)))
    options = {}
    for key in keys:
        what = fields[key].what if key in fields else None  # how the registry reads it: int, float, str, ...
        value = plausible.get(what, st.sampled_from(PLAUSIBLE))
        options[key] = draw(st.one_of(value, value, value, value, value, option_values))
    form = draw(st.sampled_from(["text", "object", "options only", "method only"]))
    if form == "text":
        return {"method": name + (":" + ",".join(f"{k}={v}" for k, v in options.items()) if options else "")}
    if form == "object":
        return {"method": name, "options": options}
    if form == "options only":
        return {"options": options}
    return {"method": name}


words = st.text(max_size=16)  # no lone surrogates: hypothesis leaves them out unless asked
stops = st.one_of(st.text(min_size=1, max_size=4), st.lists(st.text(min_size=1, max_size=4), max_size=4))
SAMPLING = {
    "max_tokens": st.integers(1, 8),
    "temperature": st.one_of(st.just(0), st.floats(0, 2)),
    "top_p": st.floats(0.01, 1),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "stop": stops,
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "ignore_eos": st.booleans(),
    "n": st.just(1),
    "user": words,
    "tool_choice": st.just("none"),
    "response_format": st.just({"type": "text"}),
    "logit_bias": st.just({}),
    "frequency_penalty": st.just(0),
}
content = st.one_of(words, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": words}), max_size=2))
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "developer"]),
                                 "content": content})
chat_body = st.fixed_dictionaries({"model": st.just("tiny"), "messages": st.lists(message, min_size=1, max_size=3),
                                   "speculative": st.one_of(st.none(), speculative(), speculative())},
                                  optional={**SAMPLING, "max_completion_tokens": st.integers(1, 8)})
prompts = st.one_of(words.filter(bool), st.lists(st.integers(0, 49151), min_size=1, max_size=4),
                    st.lists(words.filter(bool), min_size=1, max_size=1),
                    st.lists(st.lists(st.integers(0, 100), min_size=1, max_size=3), min_size=1, max_size=1))
completion_body = st.fixed_dictionaries(
    {"model": st.just("tiny"), "prompt": prompts, "speculative": st.one_of(st.none(), speculative(), speculative())},
    optional={**SAMPLING, "echo": st.just(False), "best_of": st.just(1)})
FIELDS = sorted({*SAMPLING, "model", "messages", "prompt", "max_completion_tokens", "tools", "logprobs",
                 "top_logprobs", "echo", "suffix", "best_of", "bogus"})


@st.composite
def requests(draw) -> tuple[str, dict]:
    """A valid request, and three times in seven one to three of its fields (or new ones) set to anything at all."""
    path, body = draw(st.one_of(chat_body.map(lambda b: ("/v1/chat/completions", b)),
                                completion_body.map(lambda b: ("/v1/completions", b))))
    for _ in range(draw(st.sampled_from([0, 0, 0, 0, 1, 2, 3]))):
        body[draw(st.sampled_from(FIELDS) if draw(st.integers(0, 3)) else strings)] = draw(anything)
    return path, body


@pytest.fixture(scope="module")
def tiny():
    return tiny_target()


@pytest.fixture(scope="module")
def service(tiny):
    return create_app(tiny, "ar").state.service


class Logged(logging.Handler):
    """The server's error log records, with their tracebacks."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(logging.Formatter().format(record))


@pytest.fixture(scope="module")
def served(tiny):
    logged = Logged()
    logging.getLogger("adaspec.serve").addHandler(logged)
    with running(create_app(tiny, "ar", options=ServerOptions(runner_cache=4, timeout_s=60))) as s:
        s.logged = logged.records
        yield s
    logging.getLogger("adaspec.serve").removeHandler(logged)


def encode(body: object) -> bytes:
    return json.dumps(body).encode()  # ASCII JSON: a lone surrogate travels as \ud800, as a client would send it


@settings(FUZZ, max_examples=500)
@given(request=requests())
def test_validation_answers_every_body_with_a_request_or_a_4xx(service, request):
    path, body = request
    try:
        prepared = service.prepare(encode(body), path.endswith("chat/completions"))
    except ApiError as e:
        assert 400 <= e.status < 500 and e.message, e.body()
        json.dumps(e.body())
    else:
        assert prepared.prompt_ids and prepared.config.max_new_tokens >= 1


@settings(FUZZ, max_examples=200)
@given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                     anything.map(lambda v: json.dumps(v).encode())))
def test_validation_answers_any_bytes_with_a_request_or_a_4xx(service, raw):
    try:
        service.prepare(raw, True)
    except ApiError as e:
        assert 400 <= e.status < 500


@settings(FUZZ, max_examples=150)
@given(request=requests())
def test_the_server_answers_fuzzed_requests_without_5xx_or_hangs(served, request):
    path, body = request
    with httpx.Client(base_url=served.base, timeout=30) as http:  # a hang fails as a ReadTimeout
        response = http.post(path, content=encode(body), headers={"content-type": "application/json"})
        event(f"status {response.status_code}")
        assert response.status_code < 500 and response.status_code != 408, (response.text, served.logged[-1:])
        if response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["type"] != "server_error"
        elif response.headers["content-type"].startswith("text/event-stream"):
            events = sse_events_of(response.text.splitlines())
            assert events[-1] == "[DONE]"
            assert not any(isinstance(e, dict) and "error" in e for e in events), events[-3:]
        else:
            assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")
        assert http.get("/health").status_code == 200


@pytest.mark.parametrize("method", ["ar", "sd", "cmasd", "hf"])
def test_a_vanishing_temperature_samples_greedily_instead_of_failing(served, method):
    """Found by the fuzzer: float32 logits / 1e-300 were inf and the sampler drew from NaN (a 500)."""
    with httpx.Client(base_url=served.base, timeout=30) as http:
        bodies = [{"model": "tiny", "prompt": "hello", "max_tokens": 6, "temperature": t,
                   "speculative": {"method": method}} for t in (0, 1e-300, 5e-324)]
        texts = {http.post("/v1/completions", json=b).json()["choices"][0]["text"] for b in bodies}
    assert len(texts) == 1


def reference_cut(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """The text before the first stop string to complete (of those ending together, the one that began first)."""
    ends = [text.find(s) + len(s) for s in stops if s in text]
    if not ends:
        return text, False
    end = min(ends)
    return text[: min(text.find(s) for s in stops if s in text[:end])], True


@settings(FUZZ, max_examples=300)
@given(text=st.text(alphabet="abc", max_size=40), stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=4),
                                                                  max_size=4).map(tuple),
       sizes=st.lists(st.integers(1, 4), min_size=40, max_size=40))
def test_text_stream_equals_cutting_the_whole_text(text, stops, sizes):
    """Streamed in any chunks, the deltas add up to the whole text cut before its first stop string, and no delta
    ever shows part of a stop string that then completes."""
    stream = TextStream(lambda ids: "".join(map(chr, ids)), stops)
    shown, i = "", 0
    for n in sizes:
        if i >= len(text) or stream.stopped:
            break
        shown += stream.push([ord(c) for c in text[i:i + n]])
        i += n
    assert (shown + stream.push([], final=True), stream.stopped) == reference_cut(text, stops)
