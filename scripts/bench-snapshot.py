"""Keep an unfinished `adaspec bench` run in the repository, so that a later session (maybe on another machine)
resumes it, without storing the same records twice:

  python scripts/bench-snapshot.py RUN DEST              # RUN/records.jsonl -> DEST/records-NNN.jsonl.gz parts
  python scripts/bench-snapshot.py --restore DEST RUN    # the parts -> RUN/records.jsonl (+ config, costs)

Parts are gzip files whose concatenation is the run's records.jsonl. A snapshot keeps every part that the run's
file still begins with and writes the rest as one new part: records dropped since (scripts/bench-drop.py) are
near the end, so only the last part or two is ever rewritten. Stop the bench first (it appends to the file).
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import sys
from pathlib import Path

NEWLINE = b"\n"
SIDE_FILES = ("config.json", "costs.json", "skipped.json")


def parts(dest: Path) -> list[Path]:
    return sorted(dest.glob("records-*.jsonl.gz"))


def snapshot(run: Path, dest: Path) -> None:
    data = (run / "records.jsonl").read_bytes()
    dest.mkdir(parents=True, exist_ok=True)
    at, kept = 0, 0
    for part in parts(dest):
        chunk = gzip.decompress(part.read_bytes())
        if data[at: at + len(chunk)] != chunk:
            break
        at += len(chunk)
        kept += 1
    for stale in parts(dest)[kept:]:
        stale.unlink()
    if at < len(data):
        (dest / f"records-{kept + 1:03d}.jsonl.gz").write_bytes(gzip.compress(data[at:], 9))
    for name in SIDE_FILES:
        if (run / name).is_file():
            shutil.copy(run / name, dest / name)
    print(f"{dest}: {data.count(NEWLINE)} records in {len(parts(dest))} parts")


def restore(dest: Path, run: Path) -> None:
    target = run / "records.jsonl"
    if target.is_file() and target.stat().st_size:
        sys.exit(f"bench-snapshot: {target} exists; not overwritten")
    run.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"".join(gzip.decompress(p.read_bytes()) for p in parts(dest)))
    for name in SIDE_FILES:
        if (dest / name).is_file():
            shutil.copy(dest / name, run / name)
    print(f"{target}: {target.read_bytes().count(NEWLINE)} records restored")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--restore", action="store_true", help="parts in the first directory -> the second")
    parser.add_argument("source", type=Path)
    parser.add_argument("dest", type=Path)
    args = parser.parse_args()
    (restore if args.restore else snapshot)(args.source, args.dest)


if __name__ == "__main__":
    main()
