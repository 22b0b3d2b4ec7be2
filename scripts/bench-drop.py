"""Drop records from an `adaspec bench` run directory so that its resume reruns them:

  python scripts/bench-drop.py RUN [--pauses LOG] [--incomplete] [--apart]

--pauses: records whose time span overlaps a window between `stop` and `cont` in LOG (scripts/bench-pause) measured
a stopped process. --incomplete: records of questions that lack one of the run's methods, so that every question's
methods are measured together (on one machine, when a run is resumed on another); with --pauses, it also drops the
other records of a question that lost one to a pause. --apart: every record of the questions whose records ended
more than 15 minutes apart (`summary.APART_S`: the pairs the report's "Measured apart" table counts). The old file
is kept beside it as records.jsonl.<unix time>.bak; nothing else is touched. Stop the bench first (it appends).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from adaspec.bench.summary import APART_S


def pause_windows(log: Path) -> list[tuple[float, float]]:
    windows, start = [], None
    for line in log.read_text().split("\n"):
        if not line.strip():
            continue
        what, at = line.split()
        if what == "stop":
            start = float(at) if start is None else start
        elif what == "cont" and start is not None:
            windows.append((start, float(at)))
            start = None
    if start is not None:
        windows.append((start, float("inf")))  # still stopped
    return windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--pauses", type=Path)
    parser.add_argument("--incomplete", action="store_true")
    parser.add_argument("--apart", action="store_true")
    args = parser.parse_args()
    path = args.run / "records.jsonl"
    lines = [line for line in path.read_text().split("\n") if line.strip()]
    records = [json.loads(line) for line in lines]
    keep = [True] * len(records)
    if args.pauses:
        windows = pause_windows(args.pauses)
        for i, r in enumerate(records):
            end = r["tstamp"]
            # a batched record (--concurrency) was measured over its whole block; a second of slack for the work
            # around the timed call
            begin = end - r.get("block_wall_s", r["wall_s"]) - 1.0
            if any(begin < b and a < end for a, b in windows):
                keep[i] = False
    if args.apart:
        ends: dict[int | str, list[float]] = {}
        for r in records:
            if r.get("tstamp") is not None:  # records from before `tstamp`: their time is unknown, kept
                ends.setdefault(r["question_id"], []).append(r["tstamp"])
        for i, r in enumerate(records):
            at = ends.get(r["question_id"], [0.0])
            if max(at) - min(at) > APART_S:
                keep[i] = False
    if args.incomplete:
        methods = set(json.loads((args.run / "config.json").read_text())["methods"])
        have: dict[int | str, set[str]] = {}
        for r, k in zip(records, keep, strict=True):
            if k:
                have.setdefault(r["question_id"], set()).add(r["method"])
        for i, r in enumerate(records):
            if not methods <= have.get(r["question_id"], set()):
                keep[i] = False
    dropped = keep.count(False)
    if dropped:
        shutil.copy(path, path.with_name(f"records.jsonl.{int(time.time())}.bak"))
        path.write_text("".join(line + "\n" for line, k in zip(lines, keep, strict=True) if k))
    print(f"{path}: kept {len(records) - dropped}, dropped {dropped}")


if __name__ == "__main__":
    main()
