"""Files written whole or not at all: a temp file beside the target, fsync, then os.replace onto it."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", newline: str | None = None) -> Iterator[IO]:
    """A handle on a temp file in `path`'s folder (so os.replace is atomic); on leaving the block it is flushed,
    fsynced and replaces `path` (then the folder is fsynced); on any error, interrupt included, it is removed and
    `path` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, mode, newline=newline) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically, so a reader never sees half of it."""
    with atomic_open(path) as handle:
        handle.write(text)


def atomic_write_json(path: str | Path, data: dict, indent: int = 1) -> None:
    """JSON (UTF-8, newline-terminated) written atomically."""
    atomic_write_text(path, json.dumps(data, indent=indent) + "\n")
