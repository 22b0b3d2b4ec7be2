"""Load sweep: `adaspec serve` against llama.cpp's own `llama-server` (and its n-gram speculation) on loopback, the
same closed-loop load at each number of concurrent clients, prompts from a Spec-Bench-style JSONL.

    .venv/bin/python scripts/load_sweep.py --out runs/load-sweep                 # 1, 2, 4, 8, 16, 32 clients
    .venv/bin/python scripts/load_sweep.py --servers adaspec --clients 1,16 --requests 32 --out runs/quick

Each (server, clients) point starts its server fresh (same GGUF, threads and slots; no prompt cached from an earlier
point), sends `--requests` greedy chat requests (streamed, `max_tokens` 128 by default) from that many clients, each
sending its next as soon as its last is answered, under `--time-limit` seconds, and stops the server. At each number
of clients the servers run one after another, so that a slow spell of the machine falls on all of them. Per point:
aggregate tokens/s and requests/s, time to first token and latency p50 / p99, time per output token, statuses, 5xx
and lost requests; and whether each answer equals the answer the same server gave that prompt alone (the 1-client
point, or one request per prompt sent alone to a server of its own first when the sweep has no 1-client point).
Writes OUT/results.jsonl, OUT/report.md and OUT/plots/load.png; the last line printed is JSON. Loopback only;
llama-server comes from `scripts/build-llama-server.sh`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
from loopback import adaspec_serve, check_loopback, free_port, percentile, sse_events, start, stop

ROOT = Path(__file__).resolve().parents[1]
SERVERS = ("adaspec", "llama-server", "llama-server-ngram")
NGRAM = ["--spec-type", "ngram-simple"]  # llama-server's n-gram speculation (its defaults otherwise)


def prompts_of(path: Path, n: int) -> list[str]:
    """The first turns of the JSONL's questions, in order, at most n."""
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            out.append(json.loads(line)["turns"][0])
        if len(out) == n:
            break
    return out


def llama_server_binary() -> str:
    found = subprocess.run(["bash", str(ROOT / "scripts/build-llama-server.sh")], capture_output=True, text=True)
    if found.returncode != 0:
        sys.exit(f"load_sweep: could not build llama-server:\n{found.stderr[-2000:]}")
    return found.stdout.strip().splitlines()[-1]


def start_server(server: str, args: argparse.Namespace, gguf: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    if server == "adaspec":
        cmd = adaspec_serve(port, "--method", args.method, "--max-batch", str(args.slots), "--threads",
                            str(args.threads), "--queue-size", "256", *args.adaspec_args.split())
    else:
        cmd = [args.llama_server, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-t", str(args.threads),
               "-tb", str(args.threads), "-np", str(args.slots), "-c", str(args.slots * args.context),
               "--no-webui", "--log-disable", *(NGRAM if server == "llama-server-ngram" else [])]
    return start(cmd, port, args.start_timeout, f"load_sweep: {server}", stdout=subprocess.DEVNULL,
                 stderr=subprocess.PIPE, text=True)


def serve_and_drive(server: str, args: argparse.Namespace, prompts: list[str], clients: int, requests: int
                    ) -> tuple[list[tuple[int, dict]], float, int]:
    """Start `server` fresh, drive it with `clients` clients and `requests` requests (`drive`), stop it."""
    proc, url = start_server(server, args, args.gguf)
    try:
        check_loopback(url, "load_sweep")
        return asyncio.run(drive(url, prompts, clients, requests, args))
    finally:
        stop(proc)


async def one(http: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> dict:
    """A streamed greedy chat request: status, latency, time to first content, text, tokens (usage, else chunks)."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    out = {"status": None, "ttft_s": None, "text": "", "tokens": 0, "lost": None}
    chunks = 0
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            out["status"] = r.status_code
            if r.status_code != 200:
                await r.aread()
            else:
                done = False
                async for event in sse_events(r):
                    if event is None:  # data: [DONE]
                        done = True
                        break
                    if "error" in event:
                        out["status"] = 500 if event["error"].get("type") == "server_error" else 400
                        break
                    delta = (event.get("choices") or [{}])[0].get("delta", {}).get("content")
                    if delta:
                        chunks += 1
                        out["text"] += delta
                        out["ttft_s"] = out["ttft_s"] or time.perf_counter() - t0
                    if event.get("usage"):
                        out["tokens"] = event["usage"]["completion_tokens"]
                if not done and out["status"] == 200:
                    out["status"], out["lost"] = None, "stream ended early"
    except (httpx.TransportError, json.JSONDecodeError) as e:
        out["status"], out["lost"] = None, type(e).__name__
    out["latency_s"] = time.perf_counter() - t0
    out["tokens"] = out["tokens"] or chunks
    return out


async def drive(url: str, prompts: list[str], clients: int, requests: int, args: argparse.Namespace
                ) -> tuple[list[tuple[int, dict]], float, int]:
    """`requests` requests (prompt i % len(prompts)) from `clients` closed-loop clients; ([(prompt index, outcome)],
    wall seconds, requests not sent because the time limit passed)."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    todo = list(range(requests))
    done: list[tuple[int, dict]] = []
    deadline = time.monotonic() + args.time_limit
    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout, limits=limits) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]

        async def client() -> None:
            while todo and time.monotonic() < deadline:
                i = todo.pop(0)
                done.append((i % len(prompts), await one(http, model, prompts[i % len(prompts)], args.max_tokens)))

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return done, time.perf_counter() - t0, len(todo)


REFERENCE = """
import json, sys, time
from adaspec.core.config import BackendChoice, GenerationConfig
from adaspec.methods import build_runner, load_drafter, parse_method
from adaspec.core.models import encode_prompt, load_model

method, threads, max_tokens, requests = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
prompts = json.loads(sys.stdin.read())
model = load_model(None)
config = GenerationConfig(max_new_tokens=max_tokens)
runner = build_runner(parse_method(method), model, load_drafter(None, model), config, BackendChoice(threads=threads))
ids = [encode_prompt(model.tokenizer, p, True) for p in prompts]
runner(ids[0], config)  # warm up, as a server is warm
tokens = wall = 0.0
for i in range(requests):
    result = runner(ids[i % len(ids)], config)
    tokens, wall = tokens + len(result.token_ids), wall + result.wall_s
print(json.dumps({"tokens": tokens, "wall_s": wall}))
"""


def generate_reference(args: argparse.Namespace, prompts: list[str]) -> dict:
    """`adaspec generate`'s figure for the server's 1-client point: the same prompts and method decoded one after
    another in one process (the runner `generate` uses, warmed up), tokens over the summed wall time of the
    generations."""
    out = subprocess.run([sys.executable, "-c", REFERENCE, args.method, str(args.threads), str(args.max_tokens),
                          str(args.requests)], input=json.dumps(prompts), capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"load_sweep: the generate reference failed:\n{out.stderr[-2000:]}")
    got = json.loads(out.stdout.strip().splitlines()[-1])
    return {"server": "adaspec generate", "clients": 1, "completion_tokens": got["tokens"],
            "wall_s": round(got["wall_s"], 3), "tokens_per_s": round(got["tokens"] / got["wall_s"], 2)}


def summarize(server: str, clients: int, done: list[tuple[int, dict]], wall: float, not_sent: int,
              alone: dict[int, str] | None) -> dict:
    ok = [o for _, o in done if o["status"] == 200]
    lat = [o["latency_s"] for o in ok]
    ttft = [o["ttft_s"] for o in ok if o["ttft_s"] is not None]
    tpot = [(o["latency_s"] - o["ttft_s"]) / (o["tokens"] - 1) for o in ok if o["ttft_s"] and o["tokens"] > 1]
    tokens = sum(o["tokens"] for o in ok)
    same = [alone[i] == o["text"] for i, o in done if o["status"] == 200 and alone and i in alone]

    def r(x: float | None, digits: int = 3) -> float | None:
        return None if x is None else round(x, digits)

    return {
        "server": server, "clients": clients, "sent": len(done), "not_sent": not_sent, "ok": len(ok),
        "statuses": dict(Counter(str(o["status"]) for _, o in done)),
        "5xx": sum(1 for _, o in done if o["status"] and o["status"] >= 500),
        "lost": sum(1 for _, o in done if o["status"] is None), "wall_s": r(wall),
        "tokens_per_s": r(tokens / wall, 2), "requests_per_s": r(len(ok) / wall), "completion_tokens": tokens,
        "ttft_p50_s": r(percentile(ttft, 50)), "ttft_p99_s": r(percentile(ttft, 99)),
        "latency_p50_s": r(percentile(lat, 50)), "latency_p99_s": r(percentile(lat, 99)),
        "tpot_p50_ms": r(percentile(tpot, 50) and 1000 * percentile(tpot, 50), 1),
        "tpot_p99_ms": r(percentile(tpot, 99) and 1000 * percentile(tpot, 99), 1),
        "same_as_alone": r(sum(same) / len(same)) if same else None,
    }


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    cols = [("server", "server"), ("clients", "clients"), ("tokens/s", "tokens_per_s"),
            ("requests/s", "requests_per_s"), ("TTFT p50 s", "ttft_p50_s"), ("TTFT p99 s", "ttft_p99_s"),
            ("latency p50 s", "latency_p50_s"), ("latency p99 s", "latency_p99_s"), ("TPOT p50 ms", "tpot_p50_ms"),
            ("TPOT p99 ms", "tpot_p99_ms"), ("ok", "ok"), ("5xx", "5xx"), ("lost", "lost"),
            ("same as alone", "same_as_alone")]
    lines = ["# Load sweep", "", f"`{' '.join(sys.argv)}`", "",
             f"{args.requests} greedy streamed chat requests per point, max_tokens {args.max_tokens}, closed loop; "
             f"{args.slots} slots, {args.threads} threads for every server; adaspec method `{args.method}`.", "",
             "| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join("–" if row.get(k) is None else str(row[k]) for _, k in cols) + " |")
    by = {(r["server"], r["clients"]): r for r in rows}
    ratios = []
    for c in sorted({r["clients"] for r in rows}):
        a, p = by.get(("adaspec", c)), by.get(("llama-server", c))
        keys = ("tokens_per_s", "ttft_p50_s", "latency_p99_s")
        if a and p and all(a[k] for k in keys) and all(p[k] for k in keys):
            ratios.append(f"| {c} | {a['tokens_per_s'] / p['tokens_per_s']:.2f} | "
                          f"{a['ttft_p50_s'] / p['ttft_p50_s']:.2f} | {a['latency_p99_s'] / p['latency_p99_s']:.2f} |")
    ref, one = by.get(("adaspec generate", 1)), by.get(("adaspec", 1))
    if ref and one:
        lines += ["", f"1 client: `adaspec serve` {one['tokens_per_s']} tokens/s, `adaspec generate` (the same prompts "
                  f"and method in one process) {ref['tokens_per_s']} tokens/s: "
                  f"{one['tokens_per_s'] / ref['tokens_per_s']:.3f}x."]
    if ratios:
        lines += ["", "adaspec against llama-server:", "", "| clients | tokens/s | TTFT p50 | latency p99 |",
                  "|---|---|---|---|", *ratios]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    from adaspec.bench.report import load_plot

    rows = [r for r in rows if r.get("latency_p99_s") is not None]  # the served points
    points = {server: [(r["clients"], r["tokens_per_s"], r["latency_p99_s"]) for r in rows if r["server"] == server]
              for server in dict.fromkeys(r["server"] for r in rows)}
    load_plot(points, path, "concurrent clients", "p99 latency (s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--clients", default="1,2,4,8,16,32")
    parser.add_argument("--requests", type=int, default=32, help="requests per point")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/specbench_dev.jsonl")
    parser.add_argument("--prompts", type=int, default=32, help="distinct prompts, the JSONL's first")
    parser.add_argument("--method", default="sd", help="adaspec's method")
    parser.add_argument("--slots", type=int, default=16, help="sequences each server decodes together")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=4096, help="llama-server's context per slot")
    parser.add_argument("--adaspec-args", default="", help="more `adaspec serve` options")
    parser.add_argument("--llama-server", default=None, help="the binary (default: scripts/build-llama-server.sh)")
    parser.add_argument("--gguf", default=None, help="the model file (default: the bundled GGUF)")
    parser.add_argument("--time-limit", type=float, default=600, help="seconds per point; no request starts after")
    parser.add_argument("--request-timeout", type=float, default=600)
    parser.add_argument("--start-timeout", type=float, default=300)
    parser.add_argument("--no-reference", action="store_true", help="skip the `adaspec generate` reference")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    servers = [s for s in args.servers.split(",") if s]
    if unknown := set(servers) - set(SERVERS):
        sys.exit(f"load_sweep: unknown servers {sorted(unknown)}; choose from {', '.join(SERVERS)}")
    levels = sorted({int(c) for c in args.clients.split(",")})
    if any(s != "adaspec" for s in servers):
        args.llama_server = args.llama_server or llama_server_binary()
    if args.gguf is None:
        from adaspec.core.models import bundled_gguf

        args.gguf = str(bundled_gguf())
    prompts = prompts_of(args.data, args.prompts)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    sink = (args.out / "results.jsonl").open("w")
    alones: dict[str, dict[int, str]] = {}  # per server: each prompt's answer sent alone
    for clients in levels:  # the servers one after another at each load: a slow spell of the machine hits both
        for server in servers:
            if server not in alones and clients != 1:  # the reference: each prompt sent alone, on a server of its
                # own (a server that kept the prompts would not prefill them again in the measured run)
                ref, _, _ = serve_and_drive(server, args, prompts, 1, min(args.requests, len(prompts)))
                alones[server] = {i: o["text"] for i, o in ref if o["status"] == 200}
            done, wall, not_sent = serve_and_drive(server, args, prompts, clients, args.requests)
            if clients == 1 and server not in alones:
                alones[server] = {i: o["text"] for i, o in done if o["status"] == 200}
            row = summarize(server, clients, done, wall, not_sent, alones.get(server))
            rows.append(row)
            sink.write(json.dumps(row) + "\n")
            sink.flush()
            print(f"{server} x{clients}: {row['tokens_per_s']} tokens/s, TTFT p50 {row['ttft_p50_s']} s, latency "
                  f"p99 {row['latency_p99_s']} s, same as alone {row['same_as_alone']}, 5xx {row['5xx']}, lost "
                  f"{row['lost']}", flush=True)
        if clients == 1 and "adaspec" in servers and not args.no_reference:  # right after the 1-client points
            row = generate_reference(args, prompts)
            rows.append(row)
            sink.write(json.dumps(row) + "\n")
            print(f"adaspec generate x1: {row['tokens_per_s']} tokens/s", flush=True)
    sink.close()
    (args.out / "report.md").write_text(markdown(rows, args))
    try:
        plot(rows, args.out / "plots" / "load.png")
    except ImportError:
        pass
    served = [r for r in rows if "5xx" in r]  # the reference row served nothing
    print(json.dumps({"rows": len(rows), "5xx": sum(r["5xx"] for r in served), "lost": sum(r["lost"] for r in served)}))
    sys.exit(1 if any(r["5xx"] or r["lost"] for r in served) else 0)


if __name__ == "__main__":
    main()
