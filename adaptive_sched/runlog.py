"""Append-only CSV logs of a run (metrics.csv, eval_profile.csv), whole lines only, truncatable on resume."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from adaptive_sched.atomic import atomic_open

METRIC_COLUMNS = ["step", "loss", "lr", "img_s", "elapsed_s", "skipped", "eval_eps_mse", "eval_excess_mse", "eval_swd",
                  "eval_fid", "eval_kid", "eval_bpd"]
PROFILE_COLUMNS = ["step", "logsnr", "eps_mse", "oracle_eps_mse"]


def header_of(path: Path, default: list[str]) -> list[str]:
    """The column names on a CSV log's first line (`default` for an empty or missing file)."""
    if not path.exists():
        return default
    with path.open(errors="replace") as handle:
        first = handle.readline().strip()
    return first.split(",") if first else default


def _format(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


class CsvLog:
    """A CSV file with fixed columns; each row is written with one write() call and flushed."""

    def __init__(self, path: str | Path, columns: list[str]):
        self.path, self.columns = Path(path), columns
        if not self.path.exists() or self.path.stat().st_size == 0:
            self._rewrite([])

    def append(self, row: dict) -> None:
        """Append one row (missing columns left blank). A torn last line (an earlier write cut short: rows() drops
        it) is cut off first, so the new row starts a line of its own."""
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        with self.path.open("r+b") as handle:
            end = handle.seek(0, io.SEEK_END)
            if end > 0:
                handle.seek(end - 1)
            if end > 0 and handle.read(1) != b"\n":             # torn: keep the file up to its last newline
                end = self.path.read_bytes().rfind(b"\n") + 1
                handle.truncate(end)
                handle.seek(end)
            if end == 0:                                # the header itself was torn
                writer.writerow(self.columns)
            writer.writerow([_format(row.get(c)) for c in self.columns])
            handle.write(buffer.getvalue().encode())
            handle.flush()

    def rows(self) -> list[dict]:
        """All complete rows as dicts of strings keyed by the file's own header (a torn last line is dropped).

        Columns this log has but the file lacks (a run written by an older version) come back as ''.
        """
        text = self.path.read_text()
        lines = text.splitlines(keepends=True)
        if lines and not lines[-1].endswith("\n"):
            lines = lines[:-1]
        reader = csv.DictReader(lines)
        rows = [row for row in reader if None not in row.values() and None not in row]
        return [{c: row.get(c, "") for c in self.columns} for row in rows]

    def truncate_after(self, step: int) -> None:
        """Keep only rows with step <= `step` (used when resuming from a checkpoint at `step`)."""
        self._rewrite([r for r in self.rows() if int(r["step"]) <= step])

    def _rewrite(self, rows: list[dict]) -> None:
        with atomic_open(self.path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(self.columns)
            for row in rows:
                writer.writerow([row.get(c, "") for c in self.columns])
