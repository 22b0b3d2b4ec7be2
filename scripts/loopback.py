"""What the load scripts (load_test.py, soak.py, load_sweep.py) share: a server on a free loopback port, started,
waited for until /health answers, and stopped; the loopback check on a URL; the events of a stream; a nearest-rank
percentile.

The scripts import it as a sibling module (`python scripts/X.py` puts scripts/ first on sys.path).
"""

from __future__ import annotations

import ipaddress
import json
import math
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlparse

import httpx


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def check_loopback(url: str, script: str) -> None:
    """Exit (naming `script`) unless the URL's host is a loopback address: these scripts only load a local server."""
    host = urlparse(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        sys.exit(f"{script}: {url} is not a loopback address; this script only loads a local server")


async def sse_events(response: httpx.Response) -> AsyncIterator[dict | None]:
    """The JSON events of a streamed response's `data: ` lines, in order; None for `data: [DONE]`, the last one
    (a stream that ends without it ends without the None). json.JSONDecodeError on a line that is not JSON."""
    async for line in response.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            yield None
            return
        yield json.loads(data)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def adaspec_serve(port: int, *options: str) -> list[str]:
    """The command line of `adaspec serve` on 127.0.0.1:port (warnings only), from this interpreter."""
    return [sys.executable, "-c", "from adaspec.cli import main; main()", "serve", "--host", "127.0.0.1",
            "--port", str(port), "--log-level", "warning", *options]


def start(cmd: list[str], port: int, start_timeout: float, who: str, **popen: Any) -> tuple[subprocess.Popen, str]:
    """Start `cmd` (a server listening on 127.0.0.1:port) and wait until its /health answers 200; (the process, its
    base URL). Exits, naming `who` ("load_test: the server"), if it exits first or is not ready within start_timeout
    seconds (then it is killed). With stderr=subprocess.PIPE in `popen`, an early exit shows the end of its stderr."""
    proc = subprocess.Popen(cmd, **popen)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = f": {proc.stderr.read()[-2000:]}" if proc.stderr is not None else ""
            sys.exit(f"{who} exited with {proc.returncode} before it was ready{tail}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    sys.exit(f"{who} did not become ready in {start_timeout} s")


def stop(proc: subprocess.Popen, timeout: float = 120) -> int:
    """SIGTERM (a graceful drain), then SIGKILL if it has not exited within `timeout` seconds; its exit code (-15:
    uvicorn re-raises SIGTERM once its graceful shutdown is done)."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
