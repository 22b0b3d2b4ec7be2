"""Continuous batching: one thread runs the batched engine (core/batch.py) for every request whose method can decode
batched, admitting queued requests into the running batch between steps (up to `max_batch`), prefilling long
prompts in chunks while the others step, and handing each job its steps as they land (text deltas, stop strings,
aborts: serve/worker.py's `Job`). Greedy answers do not depend on what else is in the batch (core/batch.py).

A request whose method cannot run batched (the transformers peers, R-Stitch, SpecBound, a model or EAGLE drafter,
a backend other than the engine's) or that does not fit a batch slot's context runs alone between batches: while one
waits, the engine admits nothing new, and it runs once the batch has emptied; requests run in the order they came.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace

from adaspec.core.batch import BatchEngine, Request, Sequence
from adaspec.core.decode import GenerationResult, Step
from adaspec.core.errors import AdaspecError
from adaspec.methods import Runner
from adaspec.serve.errors import Aborted
from adaspec.serve.text import TextStream
from adaspec.serve.worker import DONE, START, Finished, Job, Jobs

log = logging.getLogger("adaspec.serve")


class Batched:
    """A job's state while the engine decodes it: its text stream, its steps, why it must end early."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.text = TextStream(job.decode, job.config.stop)
        self.steps: list[Step] = []
        self.t0 = time.perf_counter()
        self.first: float | None = None
        self.stopped = False  # a stop string completed: the engine drops the sequence after this step
        self.sequence: Sequence | None = None

    def on_step(self, step: Step) -> None:
        """Engine thread, inside a step: the step's tokens become text; a stop string ends the job."""
        if self.stopped:
            return
        self.first = self.first or time.perf_counter() - self.t0
        seen = len(self.text.ids)
        delta = self.text.push(step.tokens)
        if self.text.stopped:
            step = replace(step, tokens=step.tokens[: len(self.text.ids) - seen], stop="stop")
            self.stopped = True
        self.steps.append(step)
        if delta:
            self.job.emit(delta)

    def finished(self, result: GenerationResult | None) -> Finished:
        """The job's answer: the engine's result, or (ended by a stop string) one cut at its token."""
        if result is None or self.stopped:
            tokens = [t for s in self.steps for t in s.tokens]
            result = GenerationResult(list(self.job.prompt_ids), tokens, self.steps, time.perf_counter() - self.t0,
                                      "stop" if self.stopped else "length", self.first)
        else:
            result = replace(result, steps=self.steps)
        if rest := self.text.push([], final=True):
            self.job.emit(rest)
        return Finished(result, self.text.text)


class BatchWorker(Jobs):
    """The generation thread of a server that batches: `submit(job)` gives a future of the job's `Finished`, as
    serve/worker.py's `Worker` does. `engine_for(runner, job)` is the engine a job joins, or None to run it alone."""

    def __init__(self, engine_for: Callable[[Runner, Job], BatchEngine | None]) -> None:
        super().__init__()
        self.engine_for = engine_for
        self.inbox: queue.Queue = queue.Queue()
        self.alone: deque[Job] = deque()  # waiting to run alone, in order
        self.waiting: deque[tuple[Job, BatchEngine]] = deque()  # waiting for the engine while a lone job waits
        self.batched: dict[Job, Batched] = {}
        self.engines: list[BatchEngine] = []
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="adaspec-generate", daemon=True)
        self.thread.start()

    # -- event loop side

    def submit(self, job: Job) -> asyncio.Future:
        fut = job.loop.create_future()
        self.jobs[job] = fut
        fut.add_done_callback(lambda f: self._done(job, f))
        self.inbox.put(job)
        return fut

    def close(self) -> None:
        self.closed = True
        self.inbox.put(None)

    @property
    def batch_size(self) -> int:
        return sum(len(e.running) for e in self.engines)

    # -- the generation thread

    def _resolve(self, job: Job, value: object = None, error: BaseException | None = None, done: bool = True) -> None:
        """Settle the job's future; `done`: tell its event queue too (a lone job's run does that itself)."""
        fut = self.jobs.get(job)
        if fut is None:
            return

        def settle() -> None:
            if not fut.done():
                if error is not None:
                    fut.set_exception(error)
                else:
                    fut.set_result(value)

        if done:
            job.emit(DONE)
        try:
            job.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop is closed
            pass

    def _loop(self) -> None:
        while not self.closed:
            busy = bool(self.batched or self.alone or self.waiting)
            try:  # idle: sleep until a job comes; busy: take what came and go on
                job = self.inbox.get(block=not busy)
                while job is not None:
                    self._take(job)
                    job = self.inbox.get_nowait()
            except queue.Empty:
                pass
            if self.closed:
                break
            try:
                self._turn()
            except Exception as e:  # a bug in a step: every job it held fails, the thread goes on
                log.error("a batched step failed", exc_info=e)
                for j, b in list(self.batched.items()):
                    self._drop(j, b)
                    self._resolve(j, error=e)

    def _take(self, job: Job) -> None:
        try:
            engine = self.engine_for(job.runner, job)
        except AdaspecError as e:
            log.info("request runs alone: %s", e)
            engine = None
        if engine is None:
            self.alone.append(job)
        else:
            self.waiting.append((job, engine))

    def _turn(self) -> None:
        """One scheduling turn: aborts first, then admissions, then one engine step or one lone job."""
        for job, b in list(self.batched.items()):
            try:
                job.check()
            except Aborted as e:
                self._drop(job, b)
                self._resolve(job, error=e)
        if not self.alone:  # a lone job waits: nothing new joins the batch until it has run
            while self.waiting:
                self._admit(*self.waiting.popleft())
        stepping = [e for e in self.engines if not e.idle]
        if stepping:
            for engine in stepping:
                for s in engine.step():
                    self._ended(s)
            self._stopped()
        elif self.alone:
            job = self.alone.popleft()
            try:
                self._resolve(job, job.run(), done=False)  # its run emits START, the deltas and DONE itself
            except BaseException as e:
                self._resolve(job, error=e, done=False)

    def _admit(self, job: Job, engine: BatchEngine) -> None:
        try:
            job.check()
        except Aborted as e:
            self._resolve(job, error=e)
            return
        if engine not in self.engines:
            self.engines.append(engine)
        b = Batched(job)

        def start():  # the engine admits the job: its first step comes next
            job.emit(START)
            b.t0 = time.perf_counter()
            return job.runner.decoding(job.prompt_ids, job.config, engine.backend.max_context)

        b.sequence = engine.submit(Request(job.prompt_ids, start, b.on_step, tag=job))
        self.batched[job] = b

    def _ended(self, s: Sequence) -> None:
        job = s.request.tag
        b = self.batched.pop(job, None)
        if b is None:
            return
        if s.error is not None:
            self._resolve(job, error=s.error)
        else:
            self._resolve(job, b.finished(s.result))

    def _drop(self, job: Job, b: Batched) -> None:
        """Take a job's sequence out of its engine (aborted, or ended by a stop string)."""
        self.batched.pop(job, None)
        if b.sequence is not None:
            for engine in self.engines:
                engine.cancel(b.sequence)

    def _stopped(self) -> None:
        """Jobs that a stop string ended in the last step leave the batch with their answer."""
        for job, b in list(self.batched.items()):
            if b.stopped:
                self._drop(job, b)
                self._resolve(job, b.finished(None))
