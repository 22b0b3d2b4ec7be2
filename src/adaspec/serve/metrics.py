"""Counters for /metrics (Prometheus text), and the ASGI wrapper that counts every response once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from adaspec.core.decode import GenerationResult
from adaspec.serve.errors import ApiError

KNOWN_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/models/{model}", "/health", "/metrics")


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
    """Counters for /metrics; updated on the event loop thread only. Labels take values from fixed sets (paths,
    method names, error types), so a client cannot grow them."""

    requests: dict[tuple[str, int], int] = field(default_factory=dict)  # (path, status) -> count
    errors: dict[str, int] = field(default_factory=dict)  # error type -> count
    cancelled: dict[str, int] = field(default_factory=dict)  # abort reason -> count
    generations: dict[str, int] = field(default_factory=dict)  # method name -> finished generations
    prompt_tokens: int = 0
    completion_tokens: int = 0
    forwards: int = 0  # target forwards (steps) of our loop
    step_tokens: int = 0  # tokens those forwards emitted
    drafted: int = 0
    accepted: int = 0
    latency: Histogram = field(default_factory=lambda: Histogram((0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)))
    draft_len: Histogram = field(default_factory=lambda: Histogram((0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 16)))
    ttft: Histogram = field(default_factory=lambda: Histogram((0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)))
    tpot: Histogram = field(default_factory=lambda: Histogram((0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2)))
    batch: Histogram = field(default_factory=lambda: Histogram((1, 2, 4, 8, 16, 32, 64)))

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
        if result.ttft_s is not None:
            self.ttft.observe(result.ttft_s)
            if result.new_tokens > 1:
                self.tpot.observe((result.wall_s - result.ttft_s) / (result.new_tokens - 1))
        for s in result.steps:
            self.batch.observe(s.batch or 1)
            self.forwards += 1
            self.step_tokens += len(s.tokens)
            self.drafted += s.drafted
            self.accepted += s.accepted
            self.draft_len.observe(s.drafted)

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        """The exposition; `gauges`: name -> (help, value) read now (queue, runner cache, memory)."""

        def counter(name: str, help_: str, label: str, values: dict) -> list[str]:
            rows = [f'{name}{{{label}="{k}"}} {v}' for k, v in sorted(values.items())]
            return [f"# HELP {name} {help_}", f"# TYPE {name} counter", *rows]

        def scalar(name: str, kind: str, help_: str, value: float) -> list[str]:
            return [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value:.6g}"]

        name = "adaspec_requests_total"
        lines = [f"# HELP {name} HTTP requests by path and status (499: the client left first)",
                 f"# TYPE {name} counter"]
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
        for name, help_, h in (
                ("adaspec_time_to_first_token_seconds", "from the start of a generation to its first token", self.ttft),
                ("adaspec_time_per_output_token_seconds", "per token after the first, by generation", self.tpot),
                ("adaspec_batch_size", "sequences decoded together, by target forward", self.batch)):
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} histogram", *h.lines(name)]
        lines += ["# HELP adaspec_draft_length tokens drafted per target forward",
                  "# TYPE adaspec_draft_length histogram", *self.draft_len.lines("adaspec_draft_length")]
        for gauge, (help_, value) in gauges.items():
            lines += scalar(gauge, "counter" if gauge.endswith("_total") else "gauge", help_, value)
        return "\n".join(lines) + "\n"


def path_label(path: str) -> str:
    if path.startswith("/v1/models/"):
        path = "/v1/models/{model}"
    return path if path in KNOWN_PATHS else "other"


class CountRequests:
    """ASGI wrapper around the whole app (error middleware included): every HTTP request is counted once, by path
    and the status it was answered with (500 if it was answered with nothing)."""

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
            self.metrics.request(path_label(scope["path"]), status)
