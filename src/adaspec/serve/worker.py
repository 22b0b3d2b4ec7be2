"""The generation worker: one thread runs one generation at a time (models and caches are not thread-safe).
A job turns steps into text deltas on that thread (serve/text.py), ends at a stop string itself, and reads
`abort_reason` between two target forwards, so a client that leaves cancels its generation."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from adaspec.core.config import GenerationConfig
from adaspec.core.decode import GenerationResult, Step
from adaspec.methods import Runner
from adaspec.serve.errors import Aborted
from adaspec.serve.text import TextStream

START, DONE = "start", object()  # a job's first and last events; between them, text deltas (str)


class StopString(Exception):
    """The text reached a stop string: the generation ends at this step."""


@dataclass
class Finished:
    result: GenerationResult  # cut at the stop string's token when one ended it
    text: str  # the answer: what the deltas add up to


@dataclass(eq=False)
class Job:
    """One generation. The worker thread runs it; the event loop reads its events and may abort it."""

    prompt_ids: list[int]
    config: GenerationConfig  # its stop strings are matched here; the runner was built without them
    runner: Runner
    decode: Callable[[list[int]], str]
    deadline: float  # time.monotonic()
    events: asyncio.Queue
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

    def run(self) -> Finished:
        try:
            self.check()
            self.emit(START)
            return self.generate()
        finally:
            self.emit(DONE)

    def generate(self) -> Finished:
        text = TextStream(self.decode, self.config.stop)
        steps: list[Step] = []
        first: list[float] = []
        t0 = time.perf_counter()

        def on_step(step: Step) -> None:
            self.check()
            if not first:
                first.append(time.perf_counter() - t0)
            seen = len(text.ids)
            delta = text.push(step.tokens)
            if text.stopped:
                step = replace(step, tokens=step.tokens[: len(text.ids) - seen], stop="stop")
            steps.append(step)
            if delta:
                self.emit(delta)
            if text.stopped:
                raise StopString

        try:
            result = self.runner(self.prompt_ids, self.config, on_step)
        except StopString:
            tokens = [t for s in steps for t in s.tokens]
            result = GenerationResult(list(self.prompt_ids), tokens, steps, time.perf_counter() - t0, "stop",
                                      first[0] if first else None)
        else:
            if not result.steps and result.token_ids:  # a peer: no steps, its tokens arrive at the end
                if delta := text.push(result.token_ids):
                    self.emit(delta)
                if text.stopped:
                    result = replace(result, token_ids=result.token_ids[: len(text.ids)], stop_reason="stop")
        if rest := text.push([], final=True):
            self.emit(rest)
        return Finished(result, text.text)


class Jobs:
    """The jobs a generation thread holds, by their futures (never cancelled: a job ends through Job.abort), and the
    drain on shutdown; Worker and the batching scheduler (serve/scheduler.py) share it."""

    def __init__(self) -> None:
        self.jobs: dict[Job, asyncio.Future] = {}

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


class Worker(Jobs):
    """One thread, one generation at a time, in the order submitted."""

    def __init__(self) -> None:
        super().__init__()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="adaspec-generate")

    def submit(self, job: Job) -> asyncio.Future:
        fut = job.loop.run_in_executor(self.executor, job.run)
        self.jobs[job] = fut
        fut.add_done_callback(lambda f: self._done(job, f))
        return fut  # never cancelled: a job ends through Job.abort, so `jobs` counts what the thread holds

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
