"""jobs.run_jobs: concurrent CLI processes; a parent stopped by SIGTERM or SIGHUP stops its children too."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

RUNNER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from adaptive_sched import jobs
    jobs.sys.executable = sys.argv[1]            # a stand-in child: records its pid, then sleeps
    jobs.run_jobs([jobs.Job("sleeper", [], Path(sys.argv[2]))], 1, progress=False)
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_stopped_parent_stops_its_children(tmp_path, sig):
    """Python's default SIGTERM/SIGHUP ends the parent without its `finally`, leaving the training children
    running as orphans (a time limit's SIGTERM on a compare --jobs K)."""
    child = tmp_path / "child.sh"
    pid_file = tmp_path / "pid"
    child.write_text(f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 60\n")
    child.chmod(0o755)
    parent = subprocess.Popen([sys.executable, "-c", RUNNER, str(child), str(tmp_path / "log")],
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
    deadline = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = int(pid_file.read_text())
    parent.send_signal(sig)
    assert parent.wait(timeout=30) != 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the child outlived its parent")


def test_fewer_runs_than_jobs_share_the_cores_among_the_runs(tmp_path, monkeypatch):
    """One run left under --jobs 2 got half the cores (threads were split by --jobs, not by the runs there are)."""
    from pathlib import Path
    from adaptive_sched import jobs
    child = tmp_path / "child.sh"
    child.write_text("#!/bin/sh\necho $OMP_NUM_THREADS\n")
    child.chmod(0o755)
    monkeypatch.setattr(jobs.sys, "executable", str(child))
    monkeypatch.setattr(jobs, "threads_per_job", lambda k: 8 // k)        # as on 8 cores
    for runs, parallel, threads in ((1, 2, "8"), (2, 2, "4"), (3, 2, "4"), (1, 1, "8")):
        logs = [Path(tmp_path / f"{runs}-{parallel}-{i}.log") for i in range(runs)]
        failed, unstarted = jobs.run_jobs([jobs.Job(f"j{i}", [], log) for i, log in enumerate(logs)], parallel,
                                          progress=False, poll_s=0.01)
        assert not failed and not unstarted
        assert {jobs.last_line(log) for log in logs} == {threads}


def test_a_retried_job_appends_to_its_log_under_a_header_per_attempt(tmp_path, monkeypatch):
    """The log was opened with mode "w": a retried run overwrote the failed attempt's traceback."""
    import calendar
    import re
    from pathlib import Path
    from adaptive_sched import jobs
    child = tmp_path / "child.sh"                 # called as child.sh -m adaptive_sched ARG: fails unless ARG is ok
    child.write_text('#!/bin/sh\necho "output of $3"\n[ "$3" = ok ]\n')
    child.chmod(0o755)
    monkeypatch.setattr(jobs.sys, "executable", str(child))
    log = Path(tmp_path / "runs" / "train.log")
    failed, _ = jobs.run_jobs([jobs.Job("j", ["crash"], log)], 1, progress=False, poll_s=0.01)
    assert [status for _, status in failed] == [1]
    failed, _ = jobs.run_jobs([jobs.Job("j", ["ok"], log)], 1, progress=False, poll_s=0.01)
    assert not failed
    lines = log.read_text().splitlines()
    assert len(lines) == 4 and lines[1] == "output of crash" and lines[3] == "output of ok"
    for line, attempt, arg in ((lines[0], 1, "crash"), (lines[2], 2, "ok")):
        stamp = re.fullmatch(rf"=== attempt {attempt}, (\S+Z): adaptive_sched {arg} ===", line).group(1)
        assert abs(calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")) - time.time()) < 600


def test_an_attempt_header_starts_its_own_line_after_a_killed_attempts_partial_line(tmp_path):
    """A child killed mid-write left the log without a final newline: the next header was glued to that line and
    not counted, so the attempt after it was numbered again; and a silent failure's reason read as the header."""
    from adaptive_sched import jobs
    job = jobs.Job("x", ["train"], tmp_path / "train.log")
    handle = jobs.open_log(job)
    handle.write("partial")
    handle.close()
    jobs.open_log(job).close()
    jobs.open_log(job).close()
    lines = job.log.read_text().splitlines()
    assert lines[1] == "partial" and [line.split(",")[0] for line in lines if line.startswith("===")] == [
        "=== attempt 1", "=== attempt 2", "=== attempt 3"]
    assert jobs.last_line(job.log) == "partial"
