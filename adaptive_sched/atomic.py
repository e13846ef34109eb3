"""Files written whole or not at all: a temp file beside the target, fsync, then os.replace onto it."""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import threading
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", newline: str | None = None) -> Iterator[IO]:
    """A handle ("w": UTF-8 text, or "wb") on a new temp file in `path`'s folder, so os.replace is atomic; on leaving
    the block it is flushed, fsynced and replaces `path` (a symlink's target, not the link); on any error, interrupt
    included, it is removed and `path` is left as it was."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes a whole file: mode 'w' or 'wb', not {mode!r}")
    path = Path(os.path.realpath(path))
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}-{secrets.token_hex(4)}.tmp")
    text = {} if "b" in mode else {"encoding": "utf-8", "newline": newline}
    try:
        with open(tmp, mode.replace("w", "x"), **text) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):        # make the rename durable where the filesystem allows a folder fsync
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a UTF-8 text file atomically, so a reader never sees half of it."""
    with atomic_open(path) as handle:
        handle.write(text)


def atomic_write_json(path: str | Path, data: dict, indent: int = 1) -> None:
    """JSON (UTF-8, newline-terminated) written atomically."""
    atomic_write_text(path, json.dumps(data, indent=indent) + "\n")
