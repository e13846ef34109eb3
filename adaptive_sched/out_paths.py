"""Checks on where a command will write, made before any work: one-line UsageErrors instead of an OSError later."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from adaptive_sched.errors import UsageError


def output_file(path: str | Path, what: str = "--out") -> Path:
    """`path` as a file to (over)write: not a folder, and its folder exists."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{what} {path} is a folder; give a file name")
    if not path.parent.exists():
        raise UsageError(f"output folder does not exist: {path.parent}")
    if not path.parent.is_dir():
        raise UsageError(f"{what} {path}: {path.parent} is a file, not a folder")
    return path


def replaceable(path: str | Path, own: Callable[[Path], bool], kind: str, what: str = "--out") -> Path:
    """`path` as a file (output_file) that may replace only an earlier output of its command (`own(path)`, described
    as `kind`): a run's metrics, a checkpoint or another command's table already there is refused, never replaced."""
    path = output_file(path, what)
    if path.exists() and not own(path):
        raise UsageError(f"{what} {path} already exists and is not {kind}: remove it or choose another name")
    return path


def sidecar_path(path: str | Path) -> Path:
    """PATH.json, the JSON sidecar with the provenance of the table PATH (export, sampling-grid)."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def read_json_dict(path: str | Path) -> dict | None:
    """The JSON object in `path`, or None when it is missing, unreadable or not one (a check, never an error)."""
    try:
        with open(path, "rb") as handle:
            if handle.read(1) != b"{":               # not JSON: no need to read a large binary file whole
                return None
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def output_dir(path: str | Path, what: str = "--out") -> Path:
    """`path` as a folder to create or reuse: not a file, and nothing above it is a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{what} {path} is a file, not a folder")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{what} {path}: {parent} is a file, not a folder")
            break
    return path


def portable_path(path: str | Path) -> str:
    """`path` as provenance records it: relative to the current folder when inside it (so results committed from
    one checkout name the same run in any clone; symlinks are kept as written), else absolute."""
    try:
        here = os.getcwd()
    except OSError:                          # the current folder was removed: nothing to be relative to
        return str(path)
    full = os.path.abspath(path)
    relative = os.path.relpath(full, here)
    if relative == "." or relative == ".." or relative.startswith(".." + os.sep):
        return Path(full).as_posix()
    return Path(relative).as_posix()
