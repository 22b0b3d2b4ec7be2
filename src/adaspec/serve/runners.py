"""Runners by configuration: built on their own thread (never on the event loop or the generation worker), kept
in an LRU bounded by count and by memory (each runner's cost is the process's resident-memory growth over its
build), and a failed build is remembered (the same request fails fast) and frees what it took.

Work that may run llama.cpp off the generation thread (a build measures costs and warms up) runs on a thread that
exits when it is done (`on_fresh_thread`), never on a pooled one: llama.cpp computes in OpenMP teams, libgomp keeps
a team of workers per thread that ever computed until that thread exits, and once it manages more threads than the
machine has cores it stops spinning at barriers and sleeps at every one. On 2 cores one idle build thread made the
generation thread decode at 0.6x its speed (measured: 60 vs 100 tokens/s at one client)."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from adaspec.core.errors import AdaspecError
from adaspec.methods import Runner
from adaspec.serve.errors import ApiError

log = logging.getLogger("adaspec.serve")
FAILED_KEPT = 256  # failed configurations remembered


def resident_bytes() -> int:
    """This process's resident memory (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def give_back_memory() -> None:
    """Collect cycles and return freed heap to the OS (glibc keeps it otherwise, and RSS would only grow)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _lower_priority() -> None:
    """Builds run behind generation: the builder thread (and the threads torch starts from it) get a lower CPU
    priority where the OS allows it."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass


def on_fresh_thread(fn: Callable[[], object], name: str, initializer: Callable[[], None] | None = None
                    ) -> asyncio.Future:
    """Run `fn()` on a new thread that ends with it (see the module docstring); a future of its result on the
    running event loop. A one-job executor, shut down at once: its thread exits when `fn` returns."""
    executor = ThreadPoolExecutor(1, thread_name_prefix=name, initializer=initializer)
    try:
        return asyncio.wrap_future(executor.submit(fn), loop=asyncio.get_running_loop())
    finally:
        executor.shutdown(wait=False)


@dataclass
class Entry:
    runner: Runner
    bytes: int


class RunnerCache:
    """`get(key, make)` returns the runner for `key`, building it with `make()` on the builder thread the first
    time. At most `count` runners are kept, and fewer while their measured bytes pass `max_bytes` (the newest is
    always kept); the least recently used go first. At most `max_pending` builds wait at once (429 beyond)."""

    def __init__(self, count: int, max_bytes: int, max_pending: int = 4,
                 redact: Callable[[str], str] = lambda m: m, measure: Callable[[], int] = resident_bytes) -> None:
        if count < 1 or max_bytes < 0:
            raise AdaspecError("the runner cache keeps >= 1 runner and its memory bound is >= 0")
        self.count, self.max_bytes, self.max_pending = count, max_bytes, max_pending
        self.redact, self.measure = redact, measure
        self.lock = threading.Lock()
        self.ready: OrderedDict[Hashable, Entry] = OrderedDict()
        self.failed: OrderedDict[Hashable, ApiError] = OrderedDict()
        self.pending: dict[Hashable, asyncio.Future] = {}
        self.builds = {"ok": 0, "error": 0}
        self.evictions = 0
        self.building = threading.Lock()  # one build at a time: each measures the memory it alone took

    @property
    def bytes(self) -> int:
        with self.lock:
            return sum(e.bytes for e in self.ready.values())

    def __len__(self) -> int:
        with self.lock:
            return len(self.ready)

    async def get(self, key: Hashable, make: Callable[[], Runner], timeout: float | None = None) -> Runner:
        """The runner for `key` (event loop). Raises the build's ApiError, a 429 when too many builds wait, or
        TimeoutError after `timeout` seconds (the build goes on and is kept)."""
        with self.lock:
            entry = self.ready.get(key)
            if entry is not None:
                self.ready.move_to_end(key)
                return entry.runner
            failed = self.failed.get(key)
        if failed is not None:
            raise failed
        fut = self.pending.get(key)
        if fut is None:
            if len(self.pending) >= self.max_pending:
                raise ApiError(429, f"the server is preparing {len(self.pending)} other method configurations; "
                                    "retry later", "rate_limit_error", code="builds_full")
            fut = on_fresh_thread(lambda: self._build(key, make), "adaspec-build", _lower_priority)
            self.pending[key] = fut
            fut.add_done_callback(lambda f: (self.pending.pop(key, None), f.cancelled() or f.exception()))
        return await asyncio.wait_for(asyncio.shield(fut), timeout)

    def _build(self, key: Hashable, make: Callable[[], Runner]) -> Runner:
        """Builder thread: build, measure, insert, evict (one build at a time)."""
        with self.building:
            return self._build_alone(key, make)

    def _build_alone(self, key: Hashable, make: Callable[[], Runner]) -> Runner:
        t0, before = time.monotonic(), self.measure()
        error: ApiError | None = None
        try:
            runner = make()
        except AdaspecError as e:
            error = ApiError(400, self.redact(str(e)), param="speculative", code="invalid_method")
        except Exception as e:  # a bug, not the request's fault: logged, not remembered
            log.error("building a runner failed", exc_info=e)
            error = ApiError(500, "internal server error while preparing the method (the server's log has the "
                                  "details)", "server_error")
        if error is not None:  # the exception and its frames are gone: what the build took can be freed
            give_back_memory()
            with self.lock:
                self.builds["error"] += 1
                if error.status == 400:
                    self.failed[key] = error
                    while len(self.failed) > FAILED_KEPT:
                        self.failed.popitem(last=False)
            raise error
        size = max(0, self.measure() - before)
        log.info("built runner %s in %.1f s (%.0f MiB)", key, time.monotonic() - t0, size / 2**20)
        with self.lock:
            self.builds["ok"] += 1
            self.ready[key] = Entry(runner, size)
            evicted = []
            while len(self.ready) > 1 and (len(self.ready) > self.count
                                           or sum(e.bytes for e in self.ready.values()) > self.max_bytes):
                evicted.append(self.ready.popitem(last=False))
            self.evictions += len(evicted)
        if evicted:
            del evicted
            give_back_memory()  # a runner still generating is freed when its generation ends
        return runner

    def close(self) -> None:
        """Builds still running end on their own (daemon threads; their results are dropped)."""
