"""The app: routes, and the way a generation request goes through the server, each stage bounded.

1. Its body is read on the event loop, at most `max_body_bytes` (413) within `body_timeout_s` (408).
2. It is admitted while fewer than queue_size + 1 requests are in flight (429).
3. It is parsed, validated and tokenised on a parse thread (400, 404): serve/intake.py (with requests.py and
   policy.py).
4. Its runner comes from the runner cache, built on the builder thread the first time: serve/runners.py.
5. The generation worker runs it, one at a time, under the request's deadline (408); text deltas come back as the
   steps arrive, and a client that leaves cancels it at the next target forward: serve/worker.py.
The event loop only moves bytes and events, so /health answers while all of this happens. The answer's bodies, whole
or streamed, are OpenAI's: serve/responses.py.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adaspec.api import batch_engine
from adaspec.core.batch import BatchEngine
from adaspec.core.config import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_METHOD,
    SERVE_BODY_TIMEOUT_S,
    SERVE_DRAIN_S,
    SERVE_HOST,
    SERVE_LOG_LEVEL,
    SERVE_MAX_BODY_BYTES,
    SERVE_PORT,
    SERVE_QUEUE_SIZE,
    SERVE_RUNNER_CACHE,
    SERVE_RUNNER_CACHE_MIB,
    SERVE_TIMEOUT_S,
    BackendChoice,
    GenerationConfig,
)
from adaspec.core.errors import AdaspecError
from adaspec.core.models import LoadedModel
from adaspec.methods import MethodSpec, Runner, build_runner
from adaspec.serve.errors import Aborted, ApiError, api_error
from adaspec.serve.intake import Intake, Prepared, read_body
from adaspec.serve.metrics import CountRequests, Metrics
from adaspec.serve.policy import RequestPolicy, runner_key, server_paths
from adaspec.serve.responses import SSE_DONE, Chunks, completion, json_response, sse
from adaspec.serve.runners import RunnerCache, on_fresh_thread, resident_bytes
from adaspec.serve.scheduler import BatchWorker
from adaspec.serve.worker import DONE, Finished, Job, Worker

log = logging.getLogger("adaspec.serve")
POLL_S = 0.2  # how often a waiting non-streaming request checks whether its client is still there
PARSE_THREADS = 2


@dataclass(frozen=True)
class ServerOptions:
    queue_size: int = SERVE_QUEUE_SIZE  # requests waiting behind the running one; more get 429
    timeout_s: float = SERVE_TIMEOUT_S  # per request, from admission: parsing, a runner build and the queue included
    max_tokens: int = DEFAULT_MAX_NEW_TOKENS  # when a request names none (capped by the context)
    drain_s: float = SERVE_DRAIN_S  # on shutdown, how long in-flight requests may run before they are ended
    runner_cache: int = SERVE_RUNNER_CACHE  # runners kept, one per configuration (method, options, ignore_eos)
    runner_cache_mib: float = SERVE_RUNNER_CACHE_MIB  # fewer runners kept while the memory they took passes this (MiB)
    max_body_bytes: int = SERVE_MAX_BODY_BYTES  # a larger request body gets 413
    body_timeout_s: float = SERVE_BODY_TIMEOUT_S  # a body not read in full by then gets 408 (slow uploads)
    backend: BackendChoice = field(default_factory=BackendChoice)  # where methods run unless their spec says
    policy: RequestPolicy = field(default_factory=RequestPolicy)  # what requests may choose
    # sequences decoded together (continuous batching, serve/scheduler.py); 1: one generation at a time
    max_batch: int = DEFAULT_MAX_BATCH

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise AdaspecError(f"server options: max batch >= 1, got {self.max_batch}")
        if (self.queue_size < 0 or self.timeout_s <= 0 or self.max_tokens < 1 or self.drain_s < 0
                or self.runner_cache < 1 or self.runner_cache_mib < 0 or self.max_body_bytes < 1
                or self.body_timeout_s <= 0):
            raise AdaspecError("server options: queue size >= 0, timeout > 0, max tokens >= 1, drain >= 0, runner "
                               "cache >= 1 (memory >= 0), max body bytes >= 1, body timeout > 0")


class Slot:
    """A request's place among those in flight, given back once."""

    def __init__(self, service: Service) -> None:
        self.service = service
        service.inflight += 1

    def release(self) -> None:
        if self.service is not None:
            self.service.inflight -= 1
            self.service = None


class Service:
    """The state behind the routes: the model, the runner cache, the worker and the metrics."""

    def __init__(self, target: LoadedModel, method: str, drafter: Any, options: ServerOptions,
                 build: Callable[..., Runner]) -> None:
        if target.tokenizer is None:
            raise AdaspecError("the server needs a target with a tokenizer")
        self.target, self.tokenizer, self.drafter = target, target.tokenizer, drafter
        self.options, self.build = options, build
        self.created = int(time.time())
        self.metrics = Metrics()
        self.redact = server_paths(target.path, options.policy.artifacts)
        self.intake = Intake(target, method, options.policy, options.max_tokens, self.redact)
        self.runners = RunnerCache(options.runner_cache, int(options.runner_cache_mib * 2**20), redact=self.redact)
        self.engine: BatchEngine | None = None  # made at start-up where max_batch > 1 (make_engine)
        self.worker: Worker | BatchWorker = BatchWorker(self.engine_for) if options.max_batch > 1 else Worker()
        self.parser = ThreadPoolExecutor(PARSE_THREADS, thread_name_prefix="adaspec-parse")
        self.capacity = options.queue_size + 1  # requests in flight: parsed, building, queued or running
        self.inflight = 0
        self.draining = False

    def fail(self, e: BaseException) -> ApiError:
        """The ApiError for `e`, with server paths out of its message."""
        err = api_error(e)
        if err.status < 500:
            err.message = self.redact(err.message)
        return err

    # -- runners

    def maker(self, spec: MethodSpec, stop_on_eos: bool) -> Callable[[], Runner]:
        """Builds `spec`'s runner without stop strings: jobs match those themselves, so one runner serves all."""
        config = GenerationConfig(stop_on_eos=stop_on_eos)
        return lambda: self.build(spec, self.target, self.drafter, config, self.options.backend)

    async def runner(self, p: Prepared, deadline: float) -> Runner:
        try:
            key, make = runner_key(p.spec, p.config.stop_on_eos), self.maker(p.spec, p.config.stop_on_eos)
            return await self.runners.get(key, make, max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            self.metrics.abort("timeout")
            raise api_error(Aborted("timeout")) from None

    # -- continuous batching

    def make_engine(self) -> None:
        """The batched engine on the server's backend (its cost curve measured once per machine, then cached); where
        none can run (a torch target the lean forward cannot run), every request runs alone."""
        try:
            self.engine = batch_engine(self.target, self.options.backend, self.options.max_batch)
        except AdaspecError as e:
            log.warning("continuous batching is off: %s", e)

    def engine_for(self, runner: Runner, job: Job) -> BatchEngine | None:
        """The engine a job joins: where its method decodes batched on the engine's backend and it fits a batch
        slot's context; None: it runs alone between batches."""
        engine = self.engine
        if engine is None or not getattr(runner, "batchable", False):
            return None
        if runner.where.split("+")[0] != engine.backend.where.split("+")[0]:  # '+fa': flash attention, either side
            return None
        if len(job.prompt_ids) + job.config.max_new_tokens > engine.backend.max_context:
            return None
        return engine

    # -- a request

    def prepare(self, raw: bytes, chat: bool, content_type: str | None = None) -> Prepared:
        """Parse thread: the request validated and tokenised (intake.py)."""
        return self.intake.prepare(raw, chat, content_type, self.draining)

    async def handle(self, request: Request, chat: bool) -> Response:
        raw = await read_body(request, self.options.max_body_bytes, self.options.body_timeout_s)
        if self.inflight >= self.capacity:
            raise ApiError(429, f"the server is busy: {self.inflight} requests in flight; retry later",
                           "rate_limit_error", code="queue_full")
        slot = Slot(self)
        deadline = time.monotonic() + self.options.timeout_s
        try:
            loop = asyncio.get_running_loop()
            p = await loop.run_in_executor(self.parser, self.prepare, raw, chat, request.headers.get("content-type"))
            del raw
            runner = await self.runner(p, deadline)
            job = Job(p.prompt_ids, p.config, runner, self.decode, deadline, asyncio.Queue(), loop)
            fut = self.worker.submit(job)
        except BaseException:
            slot.release()
            raise
        fut.add_done_callback(lambda _: slot.release())  # the worker holds the slot until the job really ends
        return await (self.stream(p, job, fut, request) if p.stream else self.complete(p, job, fut, request))

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
        """Wait until the worker starts the job (a stream's headers wait in the queue, so a 408 can still be one)."""
        try:
            if await self.next_event(job, request) is DONE:
                await fut  # raises what stopped the job
                raise ApiError(500, "the generation ended before it started", "server_error")
        except Aborted as e:
            self.metrics.abort(e.reason)
            raise self.fail(e) from None
        except Exception as e:
            raise self.fail(e) from None

    async def complete(self, p: Prepared, job: Job, fut: asyncio.Future, request: Request) -> Response:
        t0 = time.monotonic()
        try:
            while await self.next_event(job, request) is not DONE:
                pass
            finished: Finished = await fut
        except Aborted as e:
            self.metrics.abort(e.reason)
            raise self.fail(e) from None
        except Exception as e:
            raise self.fail(e) from None
        self.metrics.generation(p.spec.name, finished.result, time.monotonic() - t0)
        return json_response(completion(p, self.target.name, finished.text, finished.result))

    async def stream(self, p: Prepared, job: Job, fut: asyncio.Future, request: Request) -> StreamingResponse:
        await self.started(job, fut, request)
        return StreamingResponse(self.events(p, job, fut), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def events(self, p: Prepared, job: Job, fut: asyncio.Future) -> AsyncIterator[str]:
        """SSE chunks as text arrives, then `data: [DONE]`. Closing the stream early aborts the job."""
        t0 = time.monotonic()
        chunks = Chunks(p, self.target.name)
        try:
            for event in chunks.start():
                yield event
            while (event := await self.next_event(job, None)) is not DONE:
                if isinstance(event, str):
                    yield chunks.delta(event)
            finished: Finished = await fut
            self.metrics.generation(p.spec.name, finished.result, time.monotonic() - t0)
            for event in chunks.end(finished.result):
                yield event
        except Exception as e:  # headers are out: the error goes in the stream, as OpenAI does
            if isinstance(e, Aborted):
                self.metrics.abort(e.reason)
            err = self.fail(e)
            self.metrics.error(err)
            yield sse(err.body())
        finally:
            if not fut.done() and job.abort_reason is None:
                job.abort("disconnect")  # the client went away mid-stream (or the server cancelled us)
                self.metrics.abort("disconnect")
        yield SSE_DONE

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def gauges(self) -> dict[str, tuple[str, float]]:
        builds = self.runners.builds
        return {
            "adaspec_queue_depth": ("requests in flight: parsed, awaiting a runner, queued or running", self.inflight),
            "adaspec_queue_capacity": ("requests that may be in flight at once", self.capacity),
            "adaspec_runners_cached": ("runners kept (one per configuration)", len(self.runners)),
            "adaspec_runners_bytes": ("resident memory the kept runners took to build", self.runners.bytes),
            "adaspec_runner_builds_total": ("runners built", builds["ok"]),
            "adaspec_runner_build_failures_total": ("runner builds that failed", builds["error"]),
            "adaspec_runner_evictions_total": ("runners dropped from the cache", self.runners.evictions),
            "adaspec_resident_bytes": ("resident memory of the server process", resident_bytes()),
            "adaspec_running_sequences": ("sequences in the running batch now",
                                   self.worker.batch_size if isinstance(self.worker, BatchWorker) else 0),
            "adaspec_max_batch": ("sequences decoded together at most", self.options.max_batch),
        }

    def close(self) -> None:
        self.worker.close()
        self.runners.close()
        self.parser.shutdown(wait=False, cancel_futures=True)


class App(FastAPI):
    """FastAPI whose whole middleware stack, its error handling included, is inside CountRequests."""

    def build_middleware_stack(self) -> Any:
        return CountRequests(super().build_middleware_stack(), self.state.service.metrics)


def create_app(target: LoadedModel, method: str = DEFAULT_METHOD, drafter: Any = None,
               options: ServerOptions | None = None, build: Callable[..., Runner] = build_runner) -> FastAPI:
    """The server for an already-loaded target. `method` is the default method spec (built at start-up), `drafter`
    what --drafter loaded (None: the method's default); `build` makes a runner (tests pass a fake)."""
    service = Service(target, method, drafter, options or ServerOptions(), build)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        default = service.intake.default
        await service.runners.get(runner_key(default, True), service.maker(default, True))
        if service.options.max_batch > 1:
            await on_fresh_thread(service.make_engine, "adaspec-engine")  # may measure costs: see serve/runners.py
        yield
        await service.worker.drain(0)
        service.close()

    app = App(title="adaspec", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    def error_response(e: ApiError) -> Response:
        service.metrics.error(e)
        return Response(e.json(), e.status, media_type="application/json")

    @app.exception_handler(ApiError)
    async def on_api_error(_: Request, e: ApiError) -> Response:
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_: Request, e: RequestValidationError) -> Response:
        return error_response(ApiError(400, "invalid request"))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_: Request, e: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error_response(ApiError(e.status_code, str(e.detail), code=code))

    @app.exception_handler(Exception)
    async def on_bug(_: Request, e: Exception) -> Response:
        return error_response(service.fail(e))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await service.handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await service.handle(request, chat=True)

    def model_card() -> dict:
        return {"id": target.name, "object": "model", "created": service.created, "owned_by": "adaspec"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name}")
    async def model(name: str) -> dict:
        service.intake.check_model(name)
        return model_card()

    @app.get("/health")
    async def health() -> Response:
        body = {"status": "draining" if service.draining else "ok", "model": target.name,
                "method": service.intake.default.label, "queue": service.inflight, "capacity": service.capacity,
                "runners": len(service.runners)}
        return json_response(body, 503 if service.draining else 200)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(service.metrics.render(service.gauges()), media_type="text/plain; version=0.0.4")

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


def make_server(app: FastAPI, host: str = SERVE_HOST, port: int = SERVE_PORT,
                log_level: str = SERVE_LOG_LEVEL) -> DrainingServer:
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10,
                            access_log=log_level == "debug")
    return DrainingServer(config, app.state.service)


def run_in_thread(server: DrainingServer, sock: Any) -> threading.Thread:
    """Start `server` on an already-bound socket in a daemon thread and wait until it accepts."""
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    return thread
