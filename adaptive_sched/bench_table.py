"""A table of `adaptive-sched bench` JSON lines: `python -m adaptive_sched.bench_table FILE.jsonl... [--markdown]`.

One row per measurement (training, sampling, concurrency) with the data's shape, the model's training FLOPs per image
(GFLOP: tells apart benches of different nets on the same data), img/s, step time, MFU, peak memory and the notes a row
carries (learned-schedule overhead, compile speed-up or error, workers).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

COLUMNS = ["measure", "mode", "schedule", "batch", "shape", "GFLOP", "img/s", "step ms", "MFU", "peak MiB", "notes"]
NOTES = ("overhead_pct", "speedup", "workers", "img_s_each", "compiled_loss", "compile_error")


def _number(value, digits: int) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def is_json_lines(path: str | Path) -> bool:
    """Whether `path` is empty or begins with a JSON object on a line of its own (bench's --out, appended to)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(1 << 20).split(b"\n")        # (a line longer than 1 MiB is no bench line)
        first = next((line for line in head if line.strip()), b"")
        return not first or isinstance(json.loads(first), dict)
    except (OSError, ValueError):
        return False


def rows_of(paths: list[str | Path]) -> list[list[str]]:
    """The table's cells, one list per JSON line of every file."""
    rows = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            if "measure" not in r:                       # not a bench line
                continue
            img_s = r.get("img_s") if r.get("img_s") is not None else r.get("sample_img_s")
            notes = " ".join(f"{k}={r[k]}" for k in NOTES if r.get(k) is not None)
            shape = "x".join(str(n) for n in r.get("shape", []))
            rows.append([str(r.get("measure", "")), str(r.get("mode", "")), str(r.get("schedule", "")),
                         str(r.get("batch_size", "")), shape,
                         _number(r["flops_per_image"] / 1e9 if r.get("flops_per_image") else None, 2), _number(img_s, 0), _number(r.get("step_ms"), 2),
                         _number(r.get("mfu"), 4), _number(r.get("peak_mem_mb"), 0), notes])
    return rows


def render(rows: list[list[str]], markdown: bool = False) -> str:
    """Aligned plain text, or a markdown table."""
    if markdown:
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(COLUMNS)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in [COLUMNS, *rows])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m adaptive_sched.bench_table", description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+", metavar="FILE.jsonl")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    try:
        print(render(rows_of(args.files), args.markdown))
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
