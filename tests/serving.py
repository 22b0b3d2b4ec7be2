"""Helpers for the server tests: serve an app on loopback in a thread, a tiny target with the bundled tokenizer,
OpenAI error checks, SSE parsing."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
from conftest import tiny_llama

from adaspec.core.models import LoadedModel, resolve_path
from adaspec.serve import DrainingServer, make_server, run_in_thread


@dataclass
class Served:
    base: str
    server: DrainingServer
    thread: threading.Thread

    @property
    def service(self):
        return self.server.service

    def stop(self) -> None:
        """What SIGTERM does: stop listening, drain, close."""
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "the server did not shut down"


@contextmanager
def running(app) -> Iterator[Served]:
    """Serve `app` on a free loopback port in a background thread; shut it down at the end."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = make_server(app, log_level="warning")
    served = Served(f"http://127.0.0.1:{sock.getsockname()[1]}", server, run_in_thread(server, sock))
    try:
        yield served
    finally:
        served.stop()


def tiny_target(context: int = 512) -> LoadedModel:
    """A tiny random Llama with the bundled model's tokenizer and vocabulary: real tokenising, templating and
    runner builds, generation in milliseconds."""
    from transformers import AutoTokenizer

    _, path = resolve_path(None)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = tiny_llama(0, vocab=len(tokenizer), layers=2, scale=4.0, context=context)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return LoadedModel("tiny", path, model, tokenizer)


def assert_openai_error(response: httpx.Response, status: int | None = None) -> dict:
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    if status is not None:
        assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def sse_events_of(lines) -> list:
    """The data payloads of SSE lines: parsed JSON, and the literal '[DONE]'."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text exposition (0 if absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    key = f"{name}{{{want}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
