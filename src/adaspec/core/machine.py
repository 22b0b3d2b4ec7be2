"""What machine this is, as records and caches name it."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str | None:
    """The CPU's model name (Linux /proc/cpuinfo, else what platform knows), None if nothing says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None
