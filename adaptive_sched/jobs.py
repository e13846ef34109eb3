"""Run several CLI jobs at once as separate processes (one GPU or the CPU), without oversubscribing threads.

Each job is an argv for `python -m adaptive_sched ...`; its stdout/stderr go to a log file, appended to under a
header line per attempt (a retried job keeps the failed attempt's traceback above). With K jobs on
C cores every process gets max(1, C // K) intra-op threads (OMP/MKL env), since torch's default of all
cores per process makes concurrent CPU runs several times slower each. Ctrl-C terminates the children;
their runs are resumable, so nothing is lost.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from adaptive_sched.errors import UsageError


@dataclass
class Job:
    """One process: a name for messages, its arguments after `python -m adaptive_sched`, and its log file."""

    name: str
    args: list[str]
    log: Path


def threads_per_job(jobs: int, cores: int | None = None) -> int:
    """Intra-op threads per process when `jobs` run at once on `cores` cores (default: the cores we may use)."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, jobs))


def child_env(threads: int | None = None) -> dict[str, str]:
    """The environment of a child `python -m adaptive_sched...`: this checkout first on PYTHONPATH, and
    OMP/MKL/OpenBLAS limited to `threads` when given."""
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    if threads is not None:
        env.update({name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    return env


def deadline_after(seconds: float | None, clock=time.monotonic) -> float | None:
    """clock() + seconds, the moment after which no new run or trial starts (None: no time budget)."""
    if seconds is None:
        return None
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= 0:
        raise UsageError(f"--time-budget must be a number of seconds >= 0, got {seconds!r}")
    return clock() + seconds


def run_jobs(jobs: list[Job], parallel: int, progress: bool = True, poll_s: float = 0.2,
             deadline: float | None = None) -> tuple[list[tuple[Job, int]], list[Job]]:
    """Run `jobs`, at most `parallel` at a time, none starting after `deadline` (time.monotonic()); return the
    (job, exit status) of those that failed and the jobs never started."""
    env = child_env(threads_per_job(max(1, min(parallel, len(jobs)))))     # 1 run left of --jobs 2: all cores
    pending, running, failed, started = list(jobs), [], [], []
    from tqdm.auto import tqdm
    bar = tqdm(total=len(jobs), disable=not progress, unit="run", desc=f"{parallel} at a time")
    with stop_signals_raise():                  # SIGTERM/SIGHUP end the loop through `finally`, too
        try:
            while pending or running:
                if pending and deadline is not None and time.monotonic() >= deadline:
                    pending, bar.total = [], len(started)        # the time budget is spent: start nothing more
                    if not running:
                        break
                while pending and len(running) < parallel:
                    job = pending.pop(0)
                    started.append(job)
                    handle = open_log(job)
                    proc = subprocess.Popen([sys.executable, "-m", "adaptive_sched", *job.args], stdout=handle,
                                            stderr=subprocess.STDOUT, env=env)
                    running.append((job, proc, handle))
                time.sleep(poll_s)
                for item in [r for r in running if r[1].poll() is not None]:
                    job, proc, handle = item
                    handle.close()
                    running.remove(item)
                    bar.update(1)
                    if proc.returncode != 0:
                        failed.append((job, proc.returncode))
                        bar.write(f"{job.name}: failed with exit status {proc.returncode} ({last_line(job.log)}); "
                                  f"log: {job.log}")
                    else:
                        bar.write(f"{job.name}: done")
        finally:
            for job, proc, handle in running:            # interrupted: stop the children, keep their checkpoints
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                handle.close()
            bar.close()
    return failed, [job for job in jobs if job not in started]


@contextlib.contextmanager
def stop_signals_raise():
    """While inside, SIGTERM and SIGHUP raise SystemExit(128 + signal) (Python's default ends the process without
    running `finally` blocks, so run_jobs' children outlived it); the previous handlers come back on leaving.
    Signals can only be handled in the main thread: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    def stop(signum, frame):
        raise SystemExit(128 + signum)
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


ATTEMPT_HEADER = "=== attempt "        # how open_log's header lines start (and how attempts are counted)


def open_log(job: Job):
    """job.log opened for appending, after a header line '=== attempt N, <UTC time>: adaptive_sched <args> ===' (N:
    one more than the headers already there), so that a retried job does not overwrite the failed attempt's log."""
    job.log.parent.mkdir(parents=True, exist_ok=True)
    try:
        before = job.log.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        before = []
    attempt = 1 + sum(line.startswith(ATTEMPT_HEADER) for line in before)
    handle = job.log.open("a")
    if handle.tell() and not job.log.read_bytes().endswith(b"\n"):    # a killed attempt's unfinished last line
        handle.write("\n")
    handle.write(f"{ATTEMPT_HEADER}{attempt}, {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}: "
                 f"{' '.join(['adaptive_sched', *job.args])} ===\n")
    handle.flush()                              # before the child writes through its own descriptor
    return handle


def last_line(path: Path) -> str:
    """The last non-empty line of a log file that is not an attempt header ('' if none)."""
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines()
                 if line.strip() and not line.startswith(ATTEMPT_HEADER)]
    except OSError:
        return ""
    return lines[-1][:200] if lines else ""
