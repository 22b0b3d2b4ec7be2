"""Continuous batching in the server: concurrent greedy requests get the answers they get alone, whatever joins or
leaves around them (mixed methods, stop strings, streams, a client that leaves), methods that cannot run batched
run alone between batches, and the statistics and metrics say what each request got."""

from __future__ import annotations

import threading

import httpx
import pytest
from serving import running, sse_events_of, tiny_target

from adaspec.serve import ServerOptions, create_app

PROMPTS = ["one two three one two three one", "Write a haiku about rain.", "The capital of France is",
           "a b c d a b c d a b", "List three colours:", "Translate to French: good morning, my friend"]


@pytest.fixture(scope="module")
def target():
    return tiny_target()


def ask(base: str, prompt: str, max_tokens: int = 24, model: str = "tiny", **extra) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    response = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def together(base: str, jobs: list[tuple[str, dict]]) -> list[dict]:
    """Every (prompt, extra) at once, each from its own thread."""
    out: list[dict | None] = [None] * len(jobs)

    def one(i: int) -> None:
        out[i] = ask(base, jobs[i][0], **jobs[i][1])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def test_concurrent_greedy_requests_get_the_answers_they_get_alone(target):
    methods = [{}, {"speculative": {"method": "ar"}}, {"speculative": {"method": "sd", "options": {"k": 3}}},
               {"speculative": {"method": "cmasd-k"}}, {"stop": [" the"]}, {"max_tokens": 5}]
    jobs = [(p, methods[i % len(methods)]) for i, p in enumerate(PROMPTS * 2)]
    with running(create_app(target, "sd", options=ServerOptions(max_batch=4))) as served:
        alone = [ask(served.base, p, **extra) for p, extra in jobs]  # one at a time: a batch of one
        assert all(a["speculative"]["batch"] == 1.0 for a in alone)
        batched = together(served.base, jobs)
        metrics = httpx.get(f"{served.base}/metrics").text
    assert [b["choices"][0]["text"] for b in batched] == [a["choices"][0]["text"] for a in alone]
    assert [b["usage"] for b in batched] == [a["usage"] for a in alone]
    assert max(b["speculative"]["batch"] for b in batched) > 1  # they did share steps
    assert 'adaspec_batch_size_bucket{le="4"}' in metrics and "adaspec_time_to_first_token_seconds_count" in metrics
    assert "adaspec_time_per_output_token_seconds_count" in metrics and "adaspec_running_sequences 0" in metrics


def test_a_stream_in_a_batch_equals_its_whole_answer_and_a_client_that_leaves_frees_its_slot(target):
    with running(create_app(target, "sd", options=ServerOptions(max_batch=2))) as served:
        expected = ask(served.base, PROMPTS[1], 32)["choices"][0]["text"]
        body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 200, "temperature": 0, "stream": True,
                "ignore_eos": True}
        with httpx.stream("POST", f"{served.base}/v1/completions", json=body, timeout=60) as r:  # leaves early
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break
        body = {"model": "tiny", "prompt": PROMPTS[1], "max_tokens": 32, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{served.base}/v1/completions", json=body, timeout=60) as r:
            events = sse_events_of(r.iter_lines())
        assert "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"]) == expected
        assert events[-1] == "[DONE]"
        for _ in range(100):  # the abandoned generation leaves the batch
            if 'adaspec_cancelled_total{reason="disconnect"}' in httpx.get(f"{served.base}/metrics").text:
                break
            threading.Event().wait(0.05)
        metrics = httpx.get(f"{served.base}/metrics").text
        assert 'adaspec_cancelled_total{reason="disconnect"} 1' in metrics and "adaspec_running_sequences 0" in metrics


def test_a_method_that_cannot_run_batched_runs_alone_between_batches(target):
    with running(create_app(target, "sd", options=ServerOptions(max_batch=4))) as served:
        jobs = [(p, {}) for p in PROMPTS[:3]] + [(PROMPTS[3], {"speculative": {"method": "hf"}})]
        out = together(served.base, jobs)
        alone = ask(served.base, PROMPTS[3], speculative={"method": "hf"})
    assert out[3]["choices"][0]["text"] == alone["choices"][0]["text"]
    assert out[3]["speculative"]["steps"] is None  # the transformers peer: no steps seen
    assert all(o["usage"]["completion_tokens"] > 0 for o in out)


def test_max_batch_one_serves_one_at_a_time_and_zero_is_refused(target):
    with pytest.raises(Exception, match="max batch"):
        ServerOptions(max_batch=0)
    with running(create_app(target, "sd", options=ServerOptions(max_batch=1))) as served:
        assert served.service.engine is None
        assert ask(served.base, PROMPTS[2])["speculative"]["batch"] == 1.0


@pytest.mark.bundled
@pytest.mark.parametrize("flash", ["0", "1"])
def test_the_bundled_model_on_llamacpp_batches_and_answers_as_alone(monkeypatch, flash):
    # the server's default backend: the lone loop and the batched engine name their backend apart ('+fa' where
    # flash attention is on), and a request still joins the batch
    from test_llamacpp import _have_llama_cpp

    if not _have_llama_cpp():
        pytest.skip("the llamacpp extra is not installed")
    from adaspec.core.models import load_model

    monkeypatch.setenv("ADASPEC_FLASH_ATTN", flash)
    jobs = [(p, {"max_tokens": 16, "model": "smollm2"}) for p in PROMPTS[:4]]
    with running(create_app(load_model(), "sd", options=ServerOptions(max_batch=4))) as served:
        alone = [ask(served.base, p, **extra) for p, extra in jobs]
        batched = together(served.base, jobs)
    assert [b["choices"][0]["text"] for b in batched] == [a["choices"][0]["text"] for a in alone]
    assert max(b["speculative"]["batch"] for b in batched) > 1
