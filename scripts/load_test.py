"""Bounded load test of `adaspec serve` on loopback: C concurrent clients x R requests each, under a time limit.

    .venv/bin/python scripts/load_test.py --spawn --clients 16 --requests 20 --max-tokens 16
    .venv/bin/python scripts/load_test.py --url http://127.0.0.1:8000 --clients 4 --requests 5

--spawn starts `adaspec serve` on a free loopback port, runs the load, then stops it with SIGTERM (a graceful
drain). Clients alternate streaming and plain chat requests (--stream mix). Reports latency p50/p99, time to
first token of streams, throughput, responses by status, and `lost` requests (sent but never answered in
full: a connection error, a client timeout, or a stream without `data: [DONE]`). The last line is JSON.
Exits 1 if any request was lost or got a 5xx.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
from loopback import adaspec_serve, check_loopback, free_port, percentile, sse_events, start, stop

PROMPTS = [
    "Translate German to English: Der Hund spielt im Garten mit dem Ball.",
    "Summarize in one sentence: The river flooded the town. The council said the river will be dredged.",
    "Write a haiku about rain.",
    "What is 12 times 7? Answer briefly.",
]

STREAM_ERROR_STATUS = {"invalid_request_error": 400, "timeout_error": 408, "rate_limit_error": 429}


@dataclass
class Outcome:
    status: int | None  # None: no HTTP response (lost)
    latency_s: float
    ttft_s: float | None = None  # streams: time to the first content
    tokens: int = 0
    lost: str | None = None  # why the request was lost


@dataclass
class Run:
    outcomes: list[Outcome] = field(default_factory=list)
    not_sent: int = 0  # requests skipped because the time limit had passed


async def one_request(http: httpx.AsyncClient, body: dict) -> Outcome:
    t0 = time.perf_counter()
    try:
        if not body.get("stream"):
            r = await http.post("/v1/chat/completions", json=body)
            tokens = r.json().get("usage", {}).get("completion_tokens", 0) if r.status_code == 200 else 0
            return Outcome(r.status_code, time.perf_counter() - t0, tokens=tokens)
        ttft, tokens, done = None, 0, False
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return Outcome(r.status_code, time.perf_counter() - t0)
            async for event in sse_events(r):
                if event is None:  # data: [DONE]
                    done = True
                    break
                if "error" in event:  # an error after the headers: counted under the status it stands for
                    return Outcome(STREAM_ERROR_STATUS.get(event["error"].get("type"), 500), time.perf_counter() - t0)
                if ttft is None and event["choices"] and event["choices"][0]["delta"].get("content"):
                    ttft = time.perf_counter() - t0
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
        latency = time.perf_counter() - t0
        return Outcome(200, latency, ttft, tokens) if done else Outcome(None, latency, lost="stream ended early")
    except (httpx.TransportError, json.JSONDecodeError) as e:
        return Outcome(None, time.perf_counter() - t0, lost=type(e).__name__)


async def client(i: int, http: httpx.AsyncClient, args: argparse.Namespace, model: str, deadline: float,
                 run: Run) -> None:
    for j in range(args.requests):
        if time.monotonic() > deadline:
            run.not_sent += args.requests - j
            return
        stream = {"on": True, "off": False, "mix": (i + j) % 2 == 1}[args.stream]
        body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[(i + j) % len(PROMPTS)]}],
                "max_tokens": args.max_tokens, "temperature": 0, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        if args.method:
            body["speculative"] = {"method": args.method}
        run.outcomes.append(await one_request(http, body))


async def load(url: str, args: argparse.Namespace) -> tuple[Run, float]:
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout, limits=limits) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]
        run = Run()
        t0 = time.perf_counter()
        deadline = time.monotonic() + args.time_limit
        await asyncio.gather(*(client(i, http, args, model, deadline, run) for i in range(args.clients)))
        return run, time.perf_counter() - t0


def report(run: Run, wall_s: float, args: argparse.Namespace) -> dict:
    ok = [o for o in run.outcomes if o.status == 200]
    statuses = Counter(str(o.status) for o in run.outcomes if o.status is not None)
    lat = [o.latency_s for o in ok]
    ttft = [o.ttft_s for o in ok if o.ttft_s is not None]
    tokens = sum(o.tokens for o in ok)

    def r(x: float | None) -> float | None:
        return None if x is None else round(x, 3)

    return {
        "clients": args.clients, "requests_per_client": args.requests, "max_tokens": args.max_tokens,
        "stream": args.stream, "method": args.method, "planned": args.clients * args.requests,
        "sent": len(run.outcomes), "not_sent": run.not_sent, "ok": len(ok), "statuses": dict(statuses),
        "4xx": sum(1 for o in run.outcomes if o.status and 400 <= o.status < 500),
        "5xx": sum(1 for o in run.outcomes if o.status and o.status >= 500),
        "lost": sum(1 for o in run.outcomes if o.status is None),
        "lost_reasons": dict(Counter(o.lost for o in run.outcomes if o.lost)),
        "latency_p50_s": r(percentile(lat, 50)), "latency_p99_s": r(percentile(lat, 99)),
        "ttft_p50_s": r(percentile(ttft, 50)), "ttft_p99_s": r(percentile(ttft, 99)),
        "wall_s": r(wall_s), "requests_per_s": r(len(ok) / wall_s), "tokens_per_s": r(tokens / wall_s),
        "completion_tokens": tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="a running server (loopback only)")
    parser.add_argument("--spawn", action="store_true", help="start `adaspec serve` on a free loopback port")
    parser.add_argument("--serve-args", default="", help="extra `adaspec serve` options with --spawn")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=20, help="per client, one after another")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--stream", choices=("mix", "on", "off"), default="mix")
    parser.add_argument("--method", default=None, help="a `speculative.method` for every request")
    parser.add_argument("--time-limit", type=float, default=900, help="seconds; no request starts after it")
    parser.add_argument("--request-timeout", type=float, default=600, help="client-side, seconds")
    parser.add_argument("--start-timeout", type=float, default=180, help="seconds for --spawn to be ready")
    args = parser.parse_args()

    proc, server_rc = None, None
    url = args.url
    if args.spawn:
        port = free_port()
        proc, url = start(adaspec_serve(port, *args.serve_args.split()), port, args.start_timeout,
                          "load_test: the server")
    check_loopback(url, "load_test")
    try:
        run, wall = asyncio.run(load(url, args))
    finally:
        if proc is not None:
            server_rc = stop(proc)
    summary = report(run, wall, args)
    if proc is not None:
        summary["server_exit_code"] = server_rc  # -15: uvicorn re-raises SIGTERM once its graceful shutdown is done
    print(f"{summary['sent']} sent ({summary['not_sent']} not sent), {summary['ok']} ok, "
          f"statuses {summary['statuses']}, 4xx {summary['4xx']}, 5xx {summary['5xx']}, lost {summary['lost']}")
    print(f"latency p50 {summary['latency_p50_s']} s, p99 {summary['latency_p99_s']} s; time to first token "
          f"p50 {summary['ttft_p50_s']} s, p99 {summary['ttft_p99_s']} s")
    print(f"throughput {summary['requests_per_s']} requests/s, {summary['tokens_per_s']} tokens/s over "
          f"{summary['wall_s']} s")
    print(json.dumps(summary))
    sys.exit(1 if summary["lost"] or summary["5xx"] else 0)


if __name__ == "__main__":
    main()
