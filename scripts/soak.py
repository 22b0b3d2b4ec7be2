"""Soak test of `adaspec serve` on loopback: C clients send a mix of valid, malformed and cancelled requests for N
minutes, while /health is polled and the server's resident memory sampled.

    .venv/bin/python scripts/soak.py --spawn --minutes 10
    .venv/bin/python scripts/soak.py --url http://127.0.0.1:8000 --pid 1234 --minutes 1

--spawn starts `adaspec serve` on a free loopback port (with --serve-args; a short --body-timeout so slow uploads
end quickly) and stops it with SIGTERM at the end. The mix: chat and completion requests, streamed or not, over a
few methods and random stop strings; malformed bodies (bad JSON, wrong types, lone surrogates, paths in method
options, conversions, unsupported parameters, unknown models); streams closed after their first chunk and plain
requests given up after 0.3 s; uploads abandoned halfway, uploads too slow, and bodies past the size cap.

Reports status counts, p50/p99 latency of answered generations, /health p99 and max, resident memory over time (and
its growth from the end of warm-up to the end), and whether /metrics counted exactly what was sent. The last line
is JSON. Exits 1 on any 5xx, hang (a request past --client-timeout), /health p99 >= 100 ms, RSS growth >= 10 %, or
a /metrics mismatch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlparse

import httpx
from loopback import adaspec_serve, check_loopback, free_port, percentile, start, stop

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
PROMPTS = ["Write a haiku about rain.", "What is 12 times 7? Answer briefly.", "Name three colours.",
           "Translate to German: the dog plays in the garden."]
METHODS = [None, "ar", "sd", "sd:k=2"]  # None: the server's default; few configurations, so the runners stay cached
STOPS = [None, ".", "\n", ["!", "?"], "the"]
MALFORMED = [  # (path, body: bytes | dict, content type)
    (CHAT, b"{not json", "application/json"),
    (CHAT, b"[]", "application/json"),
    (CHAT, b"model=x&messages=y", "application/x-www-form-urlencoded"),
    (CHAT, b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}', "application/json"),
    (CHAT, {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, None),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "seed": 2**64}, None),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, None),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}, None),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "speculative": {"method": "rstitch+:router=/etc/passwd"}},
     None),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "speculative": {"method": "sd:format=q8_0"}}, None),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "speculative": {"method": "hf-lookup:k=-1"}}, None),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": True}, None),
    (COMPLETIONS, {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, None),
    (COMPLETIONS, {"prompt": "hi", "n": 2}, None),
    (COMPLETIONS, {"prompt": "hi", "frobnicate": 1}, None),
    (COMPLETIONS, {"prompt": [10**9]}, None),
]
KINDS = {  # kind -> weight
    "chat": 20, "chat_stream": 15, "completion": 15, "malformed": 25, "cancel_stream": 6, "cancel_plain": 4,
    "abandoned_upload": 5, "too_large": 5, "slow_upload": 3,
}


@dataclass
class Tally:
    sent: Counter = field(default_factory=Counter)  # kind -> requests
    status: Counter = field(default_factory=Counter)  # (path, status) the server must have counted
    either: Counter = field(default_factory=Counter)  # path -> requests the server counted as 200 or 499 (a race)
    latencies: list[float] = field(default_factory=list)  # s, answered generations
    health_ms: list[float] = field(default_factory=list)
    health_failures: int = 0
    hangs: int = 0
    errors: Counter = field(default_factory=Counter)  # unexpected outcomes, by description
    rss: list[tuple[float, float]] = field(default_factory=list)  # (s since start, MiB)


def rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def metrics_counts(text: str) -> Counter:
    """adaspec_requests_total by (path, status)."""
    out: Counter = Counter()
    for line in text.splitlines():
        if line.startswith("adaspec_requests_total{"):
            labels, value = line.rsplit(" ", 1)
            parts = dict(p.split("=", 1) for p in labels[len("adaspec_requests_total{"):-1].split(","))
            out[(parts["path"].strip('"'), int(parts["status"].strip('"')))] = int(float(value))
    return out


def valid_body(rng: random.Random, model: str, chat: bool, stream: bool) -> dict:
    body: dict = {"model": model, "max_tokens": rng.choice([4, 8, 16]), "temperature": rng.choice([0, 0, 0.7]),
                  "stream": stream}
    if chat:
        body["messages"] = [{"role": "user", "content": rng.choice(PROMPTS)}]
    else:
        body["prompt"] = rng.choice(PROMPTS)
    if (method := rng.choice(METHODS)) is not None:
        body["speculative"] = {"method": method}
    if (stop := rng.choice(STOPS)) is not None:
        body["stop"] = stop
    if stream and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    return body


async def raw(url: str, head: str, body: bytes, then: str, wait_s: float) -> int | None:
    """Send a request head and (part of) a body on a raw connection. then: 'close' (abandon the upload; None),
    'read' (the status answered), or 'stall' (send nothing more, read the status the server gives up with)."""
    u = urlparse(url)
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    try:
        writer.write(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        await writer.drain()
        if then == "close":
            return None
        line = await asyncio.wait_for(reader.readline(), wait_s)
        return int(line.split()[1]) if line.startswith(b"HTTP/1.1") else None
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


async def one(kind: str, rng: random.Random, http: httpx.AsyncClient, url: str, model: str, tally: Tally,
              args: argparse.Namespace) -> None:
    tally.sent[kind] += 1
    if kind in ("chat", "chat_stream", "completion"):
        path = COMPLETIONS if kind == "completion" else CHAT
        stream = kind == "chat_stream" or (kind == "completion" and rng.random() < 0.5)
        body = valid_body(rng, model, path == CHAT, stream)
        t0 = time.perf_counter()
        if stream:
            async with http.stream("POST", path, json=body) as r:
                lines = [line async for line in r.aiter_lines()]
            if r.status_code == 200 and (not lines or lines[-1] != "data: [DONE]" and "data: [DONE]" not in lines):
                tally.errors["stream without [DONE]"] += 1
            if any('"error"' in line for line in lines):
                tally.errors["error event in a stream"] += 1
        else:
            r = await http.post(path, json=body)
        tally.status[(path, r.status_code)] += 1
        if r.status_code == 200:
            tally.latencies.append(time.perf_counter() - t0)
        elif r.status_code != 429:
            tally.errors[f"{kind} got {r.status_code}"] += 1
    elif kind == "malformed":
        path, body, ctype = rng.choice(MALFORMED)
        if isinstance(body, dict):
            body = json.dumps({"model": model, **body} if "model" not in body else body).encode()
        r = await http.post(path, content=body, headers={"content-type": ctype or "application/json"})
        tally.status[(path, r.status_code)] += 1
        if not 400 <= r.status_code < 500:
            tally.errors[f"malformed got {r.status_code}"] += 1
    elif kind == "cancel_stream":
        async with http.stream("POST", CHAT, json=valid_body(rng, model, True, True) | {"max_tokens": 64}) as r:
            async for _ in r.aiter_lines():
                break  # leave after the first chunk
        tally.status[(CHAT, r.status_code)] += 1
    elif kind == "cancel_plain":
        try:
            r = await http.post(CHAT, json=valid_body(rng, model, True, False) | {"max_tokens": 64}, timeout=0.3)
            tally.status[(CHAT, r.status_code)] += 1  # it finished first
        except httpx.TimeoutException:
            tally.either[CHAT] += 1  # the server answers 499, or 200 if it finished as we left
    elif kind == "abandoned_upload":
        await raw(url, f"POST {CHAT} HTTP/1.1\nHost: soak\nContent-Type: application/json\nContent-Length: 1000\n",
                  b'{"model": ', "close", 5)
        tally.status[(CHAT, 499)] += 1
    elif kind == "too_large":
        status = await raw(url, f"POST {COMPLETIONS} HTTP/1.1\nHost: soak\nContent-Type: application/json\n"
                                f"Content-Length: {args.max_body_bytes + 1}\n", b'{"prompt": "', "read", 10)
        tally.status[(COMPLETIONS, status or 0)] += 1
        if status != 413:
            tally.errors[f"too_large got {status}"] += 1
    elif kind == "slow_upload":
        status = await raw(url, f"POST {CHAT} HTTP/1.1\nHost: soak\nContent-Type: application/json\n"
                                "Content-Length: 500\n", b'{"model": ', "stall", args.body_timeout + 10)
        tally.status[(CHAT, status or 0)] += 1
        if status != 408:
            tally.errors[f"slow_upload got {status}"] += 1


async def client(i: int, http: httpx.AsyncClient, url: str, model: str, deadline: float, tally: Tally,
                 args: argparse.Namespace) -> None:
    rng = random.Random(args.seed * 1000 + i)
    kinds, weights = list(KINDS), list(KINDS.values())
    while time.monotonic() < deadline:
        kind = rng.choices(kinds, weights)[0]
        try:
            await asyncio.wait_for(one(kind, rng, http, url, model, tally, args), args.client_timeout)
        except TimeoutError:
            tally.hangs += 1
        except (httpx.TransportError, OSError) as e:
            tally.errors[f"{kind}: {type(e).__name__}"] += 1


async def watch(http: httpx.AsyncClient, pid: int | None, deadline: float, t0: float, tally: Tally,
                args: argparse.Namespace) -> None:
    """/health every 0.2 s; the server's RSS every --rss-every s."""
    next_rss = 0.0
    while time.monotonic() < deadline:
        now = time.monotonic()
        if pid is not None and now >= next_rss:
            if (mib := rss_mib(pid)) is not None:
                tally.rss.append((round(now - t0, 1), round(mib, 1)))
            next_rss = now + args.rss_every
        s = time.perf_counter()
        try:
            r = await http.get("/health", timeout=5)
            tally.health_ms.append(1000 * (time.perf_counter() - s))
            tally.status[("/health", r.status_code)] += 1
        except httpx.TransportError:
            tally.health_failures += 1
        await asyncio.sleep(0.2)


async def soak(url: str, pid: int | None, args: argparse.Namespace) -> dict:
    tally = Tally()
    async with httpx.AsyncClient(base_url=url, timeout=args.client_timeout) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]  # counted before the baseline below
        before = metrics_counts((await http.get("/metrics")).text)
        t0 = time.monotonic()
        deadline = t0 + args.minutes * 60
        await asyncio.gather(watch(http, pid, deadline, t0, tally, args),
                             *(client(i, http, url, model, deadline, tally, args) for i in range(args.clients)))
        wall = time.monotonic() - t0
        for _ in range(100):  # let cancelled generations and abandoned uploads finish being counted
            health = (await http.get("/health")).json()
            tally.status[("/health", 200)] += 1
            if health["queue"] == 0:
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(1)
        if pid is not None and (mib := rss_mib(pid)) is not None:
            tally.rss.append((round(time.monotonic() - t0, 1), round(mib, 1)))
        tally.status[("/metrics", 200)] += 1  # the first scrape, counted before the second reads
        after = metrics_counts((await http.get("/metrics")).text)
    counted = after - before
    return report(tally, counted, wall, args)


def compare(tally: Tally, counted: Counter) -> dict:
    """What /metrics counted against what was sent: exact, except that a plain request given up at the moment it
    finished may be either a 200 or a 499."""
    diff = {}
    for key in set(tally.status) | set(counted):
        path, status = key
        if status in (200, 499) and tally.either[path]:
            continue
        if tally.status[key] != counted[key]:
            diff[f"{path} {status}"] = {"sent": tally.status[key], "counted": counted[key]}
    for path, n in tally.either.items():
        sent = tally.status[(path, 200)] + tally.status[(path, 499)] + n
        got = counted[(path, 200)] + counted[(path, 499)]
        if sent != got or not tally.status[(path, 499)] <= counted[(path, 499)] <= tally.status[(path, 499)] + n:
            diff[f"{path} 200+499"] = {"sent": sent, "counted": got}
    return diff


def report(tally: Tally, counted: Counter, wall: float, args: argparse.Namespace) -> dict:
    def r3(x: float | None) -> float | None:
        return None if x is None else round(x, 3)

    statuses = Counter()
    for (_, status), n in tally.status.items():
        statuses[str(status)] += n
    statuses["200|499 (given up)"] = sum(tally.either.values())
    warm = [mib for t, mib in tally.rss if t >= args.warmup * wall] or [mib for _, mib in tally.rss]
    growth = None if len(warm) < 2 else round(100 * (warm[-1] - warm[0]) / warm[0], 2)
    diff = compare(tally, counted)
    five = sum(n for s, n in statuses.items() if s.startswith("5"))
    health_p99 = percentile(tally.health_ms, 99)
    summary = {
        "minutes": round(wall / 60, 2), "clients": args.clients, "requests": sum(tally.sent.values()),
        "sent": dict(tally.sent), "status": dict(sorted(statuses.items())), "5xx": five, "hangs": tally.hangs,
        "unexpected": dict(tally.errors), "latency_p50_s": r3(percentile(tally.latencies, 50)),
        "latency_p99_s": r3(percentile(tally.latencies, 99)), "health_n": len(tally.health_ms),
        "health_p99_ms": r3(health_p99), "health_max_ms": r3(max(tally.health_ms, default=None)),
        "health_failures": tally.health_failures,
        "rss_mib": tally.rss[:: max(1, len(tally.rss) // 20)] + tally.rss[-1:],  # (s, MiB), about 20 samples
        "rss_warm_mib": warm[0] if warm else None, "rss_end_mib": warm[-1] if warm else None,
        "rss_growth_pct": growth, "metrics_agree": not diff, "metrics_diff": diff,
    }
    summary["ok"] = bool(five == 0 and tally.hangs == 0 and not diff and not tally.health_failures
                         and health_p99 is not None and health_p99 < 100 and (growth is None or growth < 10))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server (loopback only)")
    parser.add_argument("--pid", type=int, help="its process id, to sample its memory")
    parser.add_argument("--spawn", action="store_true", help="start `adaspec serve` on a free loopback port")
    parser.add_argument("--serve-args", default="--threads 1", help="extra `adaspec serve` options with --spawn")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--client-timeout", type=float, default=120.0, help="s; a request past it is a hang")
    parser.add_argument("--body-timeout", type=float, default=2.0, help="the server's --body-timeout (--spawn)")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="the server's --max-body-bytes")
    parser.add_argument("--rss-every", type=float, default=5.0, help="s between memory samples")
    parser.add_argument("--warmup", type=float, default=0.1, help="share of the run before RSS growth is measured")
    parser.add_argument("--start-timeout", type=float, default=300.0)
    args = parser.parse_args()
    if args.spawn == bool(args.url):
        sys.exit("soak: give --spawn or --url")
    proc = None
    if args.spawn:
        port = free_port()
        cmd = adaspec_serve(port, "--body-timeout", str(args.body_timeout), "--max-body-bytes",
                            str(args.max_body_bytes), *args.serve_args.split())
        proc, url = start(cmd, port, args.start_timeout, "soak: the server")
        pid = proc.pid
    else:
        url, pid = args.url.rstrip("/"), args.pid
    check_loopback(url, "soak")
    try:
        summary = asyncio.run(soak(url, pid, args))
    finally:
        if proc is not None:
            stop(proc, timeout=60)
    print(json.dumps(summary))
    sys.exit(0 if summary["ok"] else 1)


if __name__ == "__main__":
    main()
