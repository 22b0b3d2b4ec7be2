"""OpenAI-compatible HTTP server: /v1/completions and /v1/chat/completions (JSON or SSE), /v1/models, /health,
/metrics (Prometheus text).

Generation is CPU-bound and models and caches are not thread-safe, so one worker thread runs one generation
at a time. Requests wait in a bounded queue (429 beyond it), each under a deadline (408), and a client that
goes away cancels its generation between two target forwards. Bad input gets a 4xx with OpenAI's error JSON.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from adaspec.config import DEFAULT_MAX_NEW_TOKENS, DEFAULT_SEED, BackendChoice, GenerationConfig, SamplingConfig
from adaspec.decode import GenerationResult, Step
from adaspec.errors import AdaspecError
from adaspec.methods import MethodSpec, Runner, build_runner, parse_method
from adaspec.models import LoadedModel, encode_prompt

REQUEST_DRAFTERS = ("lookup", "eagle", "small")  # drafter= values a request may name (never a path)
POLL_S = 0.2  # how often a waiting non-streaming request checks whether its client is still there
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
log = logging.getLogger("adaspec.server")


@dataclass(frozen=True)
class ServerOptions:
    queue_size: int = 64  # requests waiting behind the running one; more get 429
    timeout_s: float = 300.0  # per request, time in the queue included
    max_tokens: int = DEFAULT_MAX_NEW_TOKENS  # when a request names none (capped by the context)
    drain_s: float = 30.0  # on shutdown, how long in-flight requests may run before they are ended
    runner_cache: int = 16  # runners kept, one per (method, stop strings)
    backend: BackendChoice = field(default_factory=BackendChoice)  # where methods run unless their spec says

    def __post_init__(self) -> None:
        if self.queue_size < 0 or self.timeout_s <= 0 or self.max_tokens < 1 or self.drain_s < 0:
            raise AdaspecError("server options: queue size >= 0, timeout > 0, max tokens >= 1, drain >= 0")


# ---------------------------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An error answered as OpenAI's {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class Aborted(Exception):
    """A generation ended early: reason is 'disconnect', 'timeout' or 'shutdown'."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def api_error(e: Exception) -> ApiError:
    """The HTTP error a failed generation answers with."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, AdaspecError):
        return ApiError(400, str(e))
    if isinstance(e, Aborted):
        if e.reason == "timeout":
            return ApiError(408, "the request ran past the server's timeout", "timeout_error", code="timeout")
        if e.reason == "shutdown":
            return ApiError(503, "the server is shutting down", "server_error", code="shutting_down")
        return ApiError(499, "the client closed the request", code="client_closed")
    log.error("internal error", exc_info=e)
    return ApiError(500, f"internal error: {type(e).__name__}: {e}", "server_error")


# --------------------------------------------------------------------------------------------- metrics


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def observe(self, value: float) -> None:
        if not self.counts:
            self.counts = [0] * len(self.buckets)
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str) -> list[str]:
        counts = self.counts or [0] * len(self.buckets)
        out = [f'{name}_bucket{{le="{b:g}"}} {c}' for b, c in zip(self.buckets, counts, strict=True)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.total:.6g}", f"{name}_count {self.n}"]


@dataclass
class Metrics:
    """Counters for /metrics; updated on the event loop thread only."""

    requests: dict[tuple[str, int], int] = field(default_factory=dict)  # (path, status) -> count
    errors: dict[str, int] = field(default_factory=dict)  # error type -> count
    cancelled: dict[str, int] = field(default_factory=dict)  # abort reason -> count
    generations: dict[str, int] = field(default_factory=dict)  # method -> finished generations
    prompt_tokens: int = 0
    completion_tokens: int = 0
    forwards: int = 0  # target forwards (steps) of our loop
    step_tokens: int = 0  # tokens those forwards emitted
    drafted: int = 0
    accepted: int = 0
    latency: Histogram = field(default_factory=lambda: Histogram((0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)))
    draft_len: Histogram = field(default_factory=lambda: Histogram((0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 16)))

    def request(self, path: str, status: int) -> None:
        self.requests[(path, status)] = self.requests.get((path, status), 0) + 1

    def error(self, e: ApiError) -> None:
        self.errors[e.type] = self.errors.get(e.type, 0) + 1

    def abort(self, reason: str) -> None:
        self.cancelled[reason] = self.cancelled.get(reason, 0) + 1

    def generation(self, method: str, result: GenerationResult, latency_s: float) -> None:
        self.generations[method] = self.generations.get(method, 0) + 1
        self.prompt_tokens += len(result.prompt_ids)
        self.completion_tokens += result.new_tokens
        self.latency.observe(latency_s)
        for s in result.steps:
            self.forwards += 1
            self.step_tokens += len(s.tokens)
            self.drafted += s.drafted
            self.accepted += s.accepted
            self.draft_len.observe(s.drafted)

    def render(self, queue_depth: int, queue_capacity: int) -> str:
        def counter(name: str, help_: str, label: str, values: dict) -> list[str]:
            rows = [f'{name}{{{label}="{k}"}} {v}' for k, v in sorted(values.items())]
            return [f"# HELP {name} {help_}", f"# TYPE {name} counter", *rows]

        def scalar(name: str, kind: str, help_: str, value: float) -> list[str]:
            return [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value:.6g}"]

        name = "adaspec_requests_total"
        lines = [f"# HELP {name} HTTP requests by path and status", f"# TYPE {name} counter"]
        lines += [f'{name}{{path="{p}",status="{s}"}} {v}' for (p, s), v in sorted(self.requests.items())]
        lines += counter("adaspec_errors_total", "error responses and stream errors by type", "type", self.errors)
        lines += counter("adaspec_cancelled_total", "generations ended early by reason", "reason", self.cancelled)
        lines += counter("adaspec_generations_total", "finished generations by method", "method", self.generations)
        lines += scalar("adaspec_prompt_tokens_total", "counter", "prompt tokens of finished generations",
                        self.prompt_tokens)
        lines += scalar("adaspec_completion_tokens_total", "counter", "generated tokens", self.completion_tokens)
        lines += scalar("adaspec_target_forwards_total", "counter", "target forwards (decoding steps)", self.forwards)
        lines += scalar("adaspec_drafted_tokens_total", "counter", "tokens proposed by drafters", self.drafted)
        lines += scalar("adaspec_accepted_tokens_total", "counter", "drafted tokens the target kept", self.accepted)
        lines += scalar("adaspec_acceptance_rate", "gauge", "accepted / drafted tokens since start",
                        self.accepted / self.drafted if self.drafted else 0.0)
        lines += scalar("adaspec_mean_accepted", "gauge", "tokens emitted per target forward, bonus included",
                        self.step_tokens / self.forwards if self.forwards else 0.0)
        lines += ["# HELP adaspec_request_latency_seconds end-to-end latency of finished generations",
                  "# TYPE adaspec_request_latency_seconds histogram",
                  *self.latency.lines("adaspec_request_latency_seconds")]
        lines += ["# HELP adaspec_draft_length tokens drafted per target forward",
                  "# TYPE adaspec_draft_length histogram", *self.draft_len.lines("adaspec_draft_length")]
        lines += scalar("adaspec_queue_depth", "gauge", "requests running or waiting", queue_depth)
        lines += scalar("adaspec_queue_capacity", "gauge", "requests that may run or wait at once", queue_capacity)
        return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ the worker

DONE = object()  # the worker's last event for a job


@dataclass(eq=False)
class Job:
    """One generation. The worker thread runs it; the event loop reads its events and may abort it."""

    prompt_ids: list[int]
    config: GenerationConfig
    spec: MethodSpec
    deadline: float  # time.monotonic()
    events: asyncio.Queue  # "start", then a Step per target forward, then DONE
    loop: asyncio.AbstractEventLoop
    abort_reason: str | None = None  # set by the loop, read by the worker between two steps
    next_poll: float = 0.0  # when the loop next asks whether the client is still there

    def abort(self, reason: str) -> None:
        if self.abort_reason is None:
            self.abort_reason = reason

    def check(self) -> None:
        if self.abort_reason is not None:
            raise Aborted(self.abort_reason)
        if time.monotonic() > self.deadline:
            raise Aborted("timeout")

    def emit(self, item: object) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def run(self, get_runner: Callable[[MethodSpec, GenerationConfig], Runner]) -> GenerationResult:
        try:
            self.check()
            runner = get_runner(self.spec, self.config)
            self.emit("start")

            def on_step(step: Step) -> None:
                self.check()
                self.emit(step)

            return runner(self.prompt_ids, self.config, on_step)
        finally:
            self.emit(DONE)


class Worker:
    """One thread, one generation at a time; at most `capacity` jobs running or waiting."""

    def __init__(self, capacity: int, get_runner: Callable[[MethodSpec, GenerationConfig], Runner]) -> None:
        self.capacity = capacity
        self.get_runner = get_runner
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="adaspec-generate")
        self.jobs: dict[Job, asyncio.Future] = {}

    def submit(self, job: Job) -> asyncio.Future:
        if len(self.jobs) >= self.capacity:
            raise ApiError(429, f"the server is busy: {len(self.jobs)} requests running or queued; retry later",
                           "rate_limit_error", code="queue_full")
        fut = job.loop.run_in_executor(self.executor, job.run, self.get_runner)
        self.jobs[job] = fut
        fut.add_done_callback(lambda f: self._done(job, f))
        return fut  # never cancelled: a job ends through Job.abort, so `jobs` counts what the thread holds

    def _done(self, job: Job, fut: asyncio.Future) -> None:
        self.jobs.pop(job, None)
        if not fut.cancelled():
            fut.exception()  # retrieved: a job whose client left must not log "never retrieved"

    async def drain(self, grace_s: float, hurry: Callable[[], bool] = lambda: False) -> None:
        """Let running and queued jobs finish for up to `grace_s` (or until `hurry()`), then abort the rest."""
        deadline = time.monotonic() + grace_s
        while self.jobs and time.monotonic() < deadline and not hurry():
            await asyncio.sleep(0.05)
        for job in list(self.jobs):
            job.abort("shutdown")
        if self.jobs:
            await asyncio.wait(list(self.jobs.values()), timeout=10)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------------------------------- text out


@dataclass
class TextStream:
    """Token ids -> text deltas. Holds back a partial UTF-8 character and any tail that could begin a stop
    string; the text ends before the first stop string. Streamed and whole answers both come from here."""

    decode: Callable[[list[int]], str]
    stop: tuple[str, ...] = ()
    ids: list[int] = field(default_factory=list)
    sent: int = 0  # characters handed out
    stopped: bool = False

    def push(self, tokens: list[int], final: bool = False) -> str:
        self.ids += tokens
        if self.stopped:
            return ""
        text = self.decode(self.ids)
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            text, self.stopped = text[: min(hits)], True
        elif not final:
            text = text.rstrip("\ufffd")  # wait for the rest of a multi-byte character
            text = text[: len(text) - self._stop_prefix(text)]
        delta = text[self.sent:]
        self.sent = max(self.sent, len(text))
        return delta

    def _stop_prefix(self, text: str) -> int:
        """Length of the longest tail of `text` that begins some stop string."""
        return max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


# ------------------------------------------------------------------------------------- request bodies

OptionValue = StrictInt | StrictFloat | StrictStr | StrictBool


class Speculative(BaseModel):
    """Per request: the method (`sd`, `sd:k=4`, `ar`, ...) and its options ({"k": 4})."""

    model_config = ConfigDict(extra="forbid")
    method: StrictStr | None = None
    options: dict[str, OptionValue] = Field(default_factory=dict)


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingBody(BaseModel):
    model_config = ConfigDict(extra="allow")  # fields of the OpenAI API we do not use are ignored
    model: StrictStr
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    speculative: Speculative | None = None
    ignore_eos: bool | None = None  # vLLM's extension: generate exactly max_tokens


class CompletionBody(SamplingBody):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    echo: bool | None = None
    best_of: int | None = None
    logprobs: int | None = None
    suffix: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatBody(SamplingBody):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None


# ------------------------------------------------------------------------------------------ the service


@dataclass
class Prepared:
    """A validated request, ready to queue."""

    prompt_ids: list[int]
    config: GenerationConfig
    spec: MethodSpec
    chat: bool
    stream: bool
    include_usage: bool


class Service:
    """The state behind the routes: the model, the runner cache, the worker and the metrics."""

    def __init__(self, target: LoadedModel, method: str, drafter: Any, options: ServerOptions,
                 build: Callable[..., Runner]) -> None:
        if target.tokenizer is None:
            raise AdaspecError("the server needs a target with a tokenizer")
        self.target, self.tokenizer, self.drafter = target, target.tokenizer, drafter
        self.options, self.build = options, build
        self.default = parse_method(method)
        self.context = int(getattr(target.model.config, "max_position_embeddings", 1 << 30))
        self.vocab = int(target.model.config.vocab_size)
        self.created = int(time.time())
        self.metrics = Metrics()
        self.runners: OrderedDict[tuple, Runner] = OrderedDict()  # touched by the worker thread only
        self.worker = Worker(options.queue_size + 1, self.runner)
        self.draining = False

    # -- runners (worker thread)

    def runner(self, spec: MethodSpec, config: GenerationConfig) -> Runner:
        key = (spec.name, tuple(sorted(spec.options.items())), config.stop, config.stop_on_eos)
        if key not in self.runners:
            self.runners[key] = self.build(spec, self.target, self.drafter, config, self.options.backend)
            while len(self.runners) > self.options.runner_cache:
                self.runners.popitem(last=False)
        self.runners.move_to_end(key)
        return self.runners[key]

    # -- validation (event loop)

    def check_model(self, name: str) -> None:
        if name != self.target.name:
            raise ApiError(404, f"the model '{name}' does not exist; this server serves '{self.target.name}'",
                           param="model", code="model_not_found")

    def method(self, spec: Speculative | None) -> MethodSpec:
        if spec is None or (spec.method is None and not spec.options):
            return self.default
        text = spec.method or self.default.name
        for key, value in spec.options.items():
            if any(c in f"{key}{value}" for c in ",=:"):
                raise ApiError(400, f"speculative option {key}={value!r} may not contain ',', '=' or ':'",
                               param="speculative.options")
            text += ("," if ":" in text else ":") + f"{key}={value}"
        try:
            parsed = parse_method(text)
        except AdaspecError as e:
            raise ApiError(400, str(e), param="speculative", code="invalid_method") from None
        chosen = parsed.options.get("drafter")
        if chosen is not None and chosen not in REQUEST_DRAFTERS:
            raise ApiError(400, f"drafter={chosen!r}: a request may name only {', '.join(REQUEST_DRAFTERS)}; "
                                "start the server with --drafter for another", param="speculative",
                           code="invalid_method")
        if "router" in parsed.options:  # a file path, like a drafter directory: the server's choice only
            raise ApiError(400, "router=: a request may not name a router file; start the server with "
                                "--method rstitch+:router=PATH", param="speculative", code="invalid_method")
        adapters = parsed.options.get("adapters")  # SpecBound's exit adapters: a directory is the server's choice too
        if adapters is not None and adapters not in ("none", "shipped"):
            raise ApiError(400, f"adapters={adapters!r}: a request may name only none or shipped, never a directory",
                           param="speculative", code="invalid_method")
        return parsed

    def prompt_ids(self, body: CompletionBody | ChatBody) -> list[int]:
        try:
            if isinstance(body, ChatBody):
                messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                            for m in body.messages]
                return encode_prompt(self.tokenizer, messages, chat=True)
            prompt = body.prompt
            if isinstance(prompt, list) and len(prompt) != 1 and not all(isinstance(t, int) for t in prompt):
                raise ApiError(400, "one prompt per request: batches of prompts are not supported", param="prompt")
            if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
                prompt = prompt[0]
            if isinstance(prompt, str):
                return encode_prompt(self.tokenizer, prompt, chat=False)
            bad = [t for t in prompt if not 0 <= t < self.vocab]
            if bad:
                raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{self.vocab - 1})",
                               param="prompt")
            return list(prompt)
        except AdaspecError as e:
            raise ApiError(400, str(e), param="messages" if isinstance(body, ChatBody) else "prompt") from None
        except ApiError:
            raise
        except Exception as e:  # a chat template can raise on input it does not expect
            raise ApiError(400, f"could not build the prompt: {e}", param="messages") from None

    def prepare(self, body: CompletionBody | ChatBody) -> Prepared:
        self.check_model(body.model)
        if self.draining:
            raise ApiError(503, "the server is shutting down", "server_error", code="shutting_down")
        used = {"n": body.n not in (None, 1), "best_of": getattr(body, "best_of", None) not in (None, 1),
                "logprobs": body.logprobs not in (None, False), "echo": bool(getattr(body, "echo", None)),
                "suffix": bool(getattr(body, "suffix", None))}
        if name := next((n for n, on in used.items() if on), None):
            raise ApiError(400, f"'{name}' is not supported (n and best_of must be 1; no logprobs, echo or suffix)",
                           param=name, code="unsupported_parameter")
        spec = self.method(body.speculative)
        ids = self.prompt_ids(body)
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
        room = self.context - len(ids)
        if room < 1 or (asked is not None and asked > room):
            raise ApiError(400, f"the prompt has {len(ids)} tokens and {asked or 1} more were asked for, beyond the "
                                f"model's context of {self.context} tokens; shorten the prompt or lower max_tokens",
                           param="messages" if isinstance(body, ChatBody) else "prompt",
                           code="context_length_exceeded")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if len(stop) > 4 or any(not s for s in stop):
            raise ApiError(400, "stop takes at most 4 non-empty strings", param="stop")
        temperature = 1.0 if body.temperature is None else body.temperature
        seed = body.seed if body.seed is not None else DEFAULT_SEED if temperature == 0 else secrets.randbits(31)
        try:
            sampling = SamplingConfig(temperature, 0, 1.0 if body.top_p is None else body.top_p)
            config = GenerationConfig(asked or min(self.options.max_tokens, room), sampling, stop,
                                      stop_on_eos=not body.ignore_eos, seed=seed)
        except AdaspecError as e:
            raise ApiError(400, str(e)) from None
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return Prepared(ids, config, spec, isinstance(body, ChatBody), bool(body.stream), include_usage)

    # -- running (event loop)

    def submit(self, p: Prepared) -> tuple[Job, asyncio.Future]:
        loop = asyncio.get_running_loop()
        job = Job(p.prompt_ids, p.config, p.spec, time.monotonic() + self.options.timeout_s, asyncio.Queue(), loop)
        return job, self.worker.submit(job)

    async def next_event(self, job: Job, request: Request | None) -> object:
        """The job's next event; raises Aborted at its deadline or when `request`'s client has gone (checked
        every POLL_S; a stream's disconnect is seen by the streaming response instead)."""
        while True:
            now = time.monotonic()
            if request is not None and now >= job.next_poll:
                job.next_poll = now + POLL_S
                if await request.is_disconnected():
                    job.abort("disconnect")
                    raise Aborted("disconnect")
            if now >= job.deadline:
                job.abort("timeout")
                raise Aborted("timeout")
            try:
                return await asyncio.wait_for(job.events.get(), min(job.deadline - now, POLL_S))
            except TimeoutError:
                pass

    async def started(self, job: Job, fut: asyncio.Future, request: Request) -> None:
        """Wait until the job's runner starts; errors before that (a bad method option) raise here."""
        try:
            event = await self.next_event(job, request)
            if event is DONE:
                await fut  # raises what stopped the job
                raise ApiError(500, "the generation ended before it started", "server_error")
        except Aborted as e:
            self.metrics.abort(e.reason)
            raise api_error(e) from None
        except Exception as e:
            raise api_error(e) from None

    async def complete(self, p: Prepared, request: Request) -> JSONResponse:
        t0 = time.monotonic()
        job, fut = self.submit(p)
        await self.started(job, fut, request)
        try:
            while await self.next_event(job, request) is not DONE:
                pass
            result: GenerationResult = await fut
        except Aborted as e:
            self.metrics.abort(e.reason)
            raise api_error(e) from None
        except Exception as e:
            raise api_error(e) from None
        self.metrics.generation(p.spec.label, result, time.monotonic() - t0)
        text = TextStream(self.decode, p.config.stop).push(result.token_ids, final=True)
        reason = FINISH.get(result.stop_reason, "stop")
        choice: dict = {"index": 0, "logprobs": None, "finish_reason": reason}
        if p.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return JSONResponse({
            **self.head(p, "chat.completion" if p.chat else "text_completion"), "choices": [choice],
            "usage": usage(result), "speculative": speculative_stats(p.spec, result),
        })

    async def stream(self, p: Prepared, request: Request) -> StreamingResponse:
        job, fut = self.submit(p)
        await self.started(job, fut, request)
        return StreamingResponse(self.events(p, job, fut), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def events(self, p: Prepared, job: Job, fut: asyncio.Future) -> AsyncIterator[str]:
        """SSE chunks as steps arrive, then `data: [DONE]`. Closing the stream early aborts the job."""
        t0 = time.monotonic()
        head = self.head(p, "chat.completion.chunk" if p.chat else "text_completion")
        text = TextStream(self.decode, p.config.stop)

        def chunk(delta: str | None, finish: str | None = None, **extra: object) -> str:
            choice: dict = {"index": 0, "logprobs": None, "finish_reason": finish}
            if p.chat:
                choice["delta"] = {} if delta is None else {"content": delta}
            else:
                choice["text"] = delta or ""
            return sse({**head, "choices": [choice], **extra})

        try:
            if p.chat:
                yield sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}]})
            while (event := await self.next_event(job, None)) is not DONE:
                if isinstance(event, Step) and (delta := text.push(event.tokens)):
                    yield chunk(delta)
            result: GenerationResult = await fut
            self.metrics.generation(p.spec.label, result, time.monotonic() - t0)
            if not result.steps:  # a peer: no steps were streamed
                text.push(result.token_ids)
            if rest := text.push([], final=True):
                yield chunk(rest)
            yield chunk(None, FINISH.get(result.stop_reason, "stop"), speculative=speculative_stats(p.spec, result))
            if p.include_usage:
                yield sse({**head, "choices": [], "usage": usage(result)})
        except Exception as e:  # headers are out: the error goes in the stream, as OpenAI does
            if isinstance(e, Aborted):
                self.metrics.abort(e.reason)
            err = api_error(e)
            self.metrics.error(err)
            yield sse(err.body())
        finally:
            if not fut.done() and job.abort_reason is None:
                job.abort("disconnect")  # the client went away mid-stream (or the server cancelled us)
                self.metrics.abort("disconnect")
        yield "data: [DONE]\n\n"

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def head(self, p: Prepared, obj: str) -> dict:
        prefix = "chatcmpl" if p.chat else "cmpl"
        return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "object": obj, "created": int(time.time()),
                "model": self.target.name}


def usage(result: GenerationResult) -> dict:
    n, m = len(result.prompt_ids), result.new_tokens
    return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}


def speculative_stats(spec: MethodSpec, result: GenerationResult) -> dict:
    """Per-request decoding statistics; a peer (transformers generate) reports no steps, so they are null."""
    if not result.steps:
        return {"method": spec.label, "steps": None, "drafted": None, "accepted": None, "mean_accepted": None,
                "acceptance_rate": None}
    drafted = sum(s.drafted for s in result.steps)
    accepted = sum(s.accepted for s in result.steps)
    return {"method": spec.label, "steps": len(result.steps), "drafted": drafted, "accepted": accepted,
            "mean_accepted": round(result.mean_accepted, 4),
            "acceptance_rate": round(accepted / drafted, 4) if drafted else None}


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


# ----------------------------------------------------------------------------------------------- the app

KNOWN_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class CountRequests:
    """ASGI middleware: count every HTTP response by path and status."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def counted(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            path = scope["path"]
            if path.startswith("/v1/models/"):
                path = "/v1/models/{model}"
            self.metrics.request(path if path in KNOWN_PATHS or path == "/v1/models/{model}" else "other", status)


def create_app(target: LoadedModel, method: str = "sd", drafter: Any = None,
               options: ServerOptions | None = None, build: Callable[..., Runner] = build_runner) -> FastAPI:
    """The server for an already-loaded target. `method` is the default method spec, `drafter` what
    --drafter loaded (None: the method's default); `build` makes a runner (tests pass a fake)."""
    service = Service(target, method, drafter, options or ServerOptions(), build)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await service.worker.drain(0)
        service.worker.close()

    app = FastAPI(title="adaspec", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.add_middleware(CountRequests, metrics=service.metrics)

    def error_response(e: ApiError) -> JSONResponse:
        service.metrics.error(e)
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(ApiError)
    async def on_api_error(_: Request, e: ApiError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        message = first.get("msg", "invalid request body")
        if first.get("type") == "json_invalid":
            message, param = f"the body is not valid JSON: {first.get('ctx', {}).get('error', message)}", None
        return error_response(ApiError(400, f"{param}: {message}" if param else message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error_response(ApiError(e.status_code, str(e.detail), code=code))

    @app.exception_handler(Exception)
    async def on_bug(_: Request, e: Exception) -> JSONResponse:
        return error_response(api_error(e))

    async def generate(body: CompletionBody | ChatBody, request: Request):
        p = service.prepare(body)
        return await (service.stream(p, request) if p.stream else service.complete(p, request))

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        return await generate(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request):
        return await generate(body, request)

    def model_card() -> dict:
        return {"id": target.name, "object": "model", "created": service.created, "owned_by": "adaspec"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name}")
    async def model(name: str) -> dict:
        service.check_model(name)
        return model_card()

    @app.get("/health")
    async def health() -> JSONResponse:
        body = {"status": "draining" if service.draining else "ok", "model": target.name,
                "method": service.default.label, "queue": len(service.worker.jobs),
                "capacity": service.worker.capacity}
        return JSONResponse(body, status_code=503 if service.draining else 200)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        text = service.metrics.render(len(service.worker.jobs), service.worker.capacity)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    return app


class DrainingServer(uvicorn.Server):
    """uvicorn that, on shutdown, stops listening, lets in-flight requests finish for `drain_s` and then
    ends the rest (streams get an error event and `data: [DONE]`) before closing connections."""

    def __init__(self, config: uvicorn.Config, service: Service) -> None:
        super().__init__(config)
        self.service = service

    async def shutdown(self, sockets: list | None = None) -> None:
        for server in self.servers:
            server.close()
        self.service.draining = True
        await self.service.worker.drain(self.service.options.drain_s, lambda: self.force_exit)  # 2nd Ctrl-C
        await super().shutdown(sockets)


def make_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> DrainingServer:
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10,
                            access_log=log_level == "debug")
    return DrainingServer(config, app.state.service)


def run_in_thread(server: DrainingServer, sock: Any) -> threading.Thread:
    """Start `server` on an already-bound socket in a daemon thread and wait until it accepts."""
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    return thread
