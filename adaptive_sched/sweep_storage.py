"""Where a sweep lives: Optuna storages from URLs (one-line errors), the study's settings, stale trials.

sqlite:///PATH (WAL, a long lock timeout for concurrent workers), journal:PATH (JournalFileBackend),
postgresql://USER[:PW]@HOST:PORT/DB (psycopg or psycopg2). RDB storages record heartbeats, so a trial whose
machine died is failed by the next worker after 3 silent heartbeats; on one host, a trial whose worker process
is gone is failed when the sweep starts.
"""
from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

from adaptive_sched import config as cfg
from adaptive_sched.errors import UsageError
from adaptive_sched.sweep_space import space_to_dict

SURPLUS = "surplus:"        # the error of a trial started past --trials by a concurrent worker (not counted)
HEARTBEAT_S = 60           # RDB storages: a RUNNING trial silent for 3 heartbeats is failed by the next worker
# settings that do not make trials incomparable: where and how fast they run, and how often they log
IGNORED_CHANGES = {("train", "device"), ("train", "log_every"), ("train", "checkpoint_every"), ("train", "compile"),
                   ("train", "channels_last"), ("train", "compile_mode"), ("data", "data_dir")}


def mask(url: str) -> str:
    """The URL with its password replaced by *** (SQLAlchemy's reading of it: a password may hold '/' or '@')."""
    if "://" in url:
        try:
            from sqlalchemy.engine import make_url
            parsed = make_url(url)
        except Exception:  # noqa: BLE001 - not a URL SQLAlchemy reads: the pattern below
            parsed = None
        if parsed is not None:
            return parsed.render_as_string(hide_password=True) if parsed.password is not None else url
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def one_line(err: BaseException) -> str:
    """An exception as one line, without SQLAlchemy's '(Background on this error ...)' tail."""
    text = re.sub(r"^\([\w.]+\) ", "", str(err) or type(err).__name__)
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("(Background")]
    return "; ".join(lines)


def open_storage(url: str):
    """An Optuna storage for sqlite:///PATH, journal:PATH or postgresql://...; failures are one-line UsageErrors."""
    import optuna
    shown = mask(url)
    scheme = url.split("://", 1)[0].split("+")[0] if "://" in url else ""
    try:
        if url.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend, JournalStorage
            path = Path(url[len("journal:"):]).expanduser()
            if not path.parent.is_dir():
                raise UsageError(f"cannot open Optuna storage {shown}: no folder {path.parent}")
            return JournalStorage(JournalFileBackend(str(path)))
        if scheme == "sqlite":
            engine = {"connect_args": {"timeout": 120}}          # concurrent workers wait for the write lock
            path = sqlite_path(url)
            if path in ("", ":memory:"):
                raise UsageError(f"an in-memory SQLite storage ({shown}) is neither kept nor shared with the "
                                 f"workers; use sqlite:///PATH")
            if path:
                import sqlite3
                con = sqlite3.connect(path, timeout=120)
                con.execute("PRAGMA journal_mode=WAL")            # readers do not block the writer
                con.close()
        elif scheme in ("postgresql", "postgres"):
            url = postgres_driver(url)
            engine = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
        elif scheme == "mysql":
            engine = {"pool_pre_ping": True}
        else:
            raise UsageError(f"unknown storage URL {shown!r}; use sqlite:///PATH, journal:PATH or "
                             f"postgresql://USER@HOST:PORT/DB")
        return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S,
                                          grace_period=3 * HEARTBEAT_S)
    except UsageError:
        raise
    except Exception as err:  # noqa: BLE001 - whatever the driver says, the user gets one line
        message = one_line(err)
        server = scheme in ("postgresql", "postgres", "mysql") and "server running" not in message
        hint = "; is the server running and the URL right?" if server else ""
        if isinstance(err, ImportError):        # a missing driver (Optuna's message says to install one)
            hint = "" if "install" in message else "; install the database driver for this URL"
        raise UsageError(f"cannot open Optuna storage {shown}: {message}{hint}") from None


def sqlite_path(url: str) -> str:
    """The file of sqlite[+driver]:///PATH[?query] ('' for sqlite:// and the like, which hold it in memory)."""
    return url.split(":///", 1)[1].split("?", 1)[0] if ":///" in url else ""


def postgres_driver(url: str) -> str:
    """postgresql://... with an installed driver named (SQLAlchemy 2.1 defaults to psycopg 3)."""
    import importlib.util
    url = re.sub(r"^postgres://", "postgresql://", url)
    if not url.startswith("postgresql://"):
        return url                                          # the user named a driver
    for module, scheme in (("psycopg", "postgresql+psycopg://"), ("psycopg2", "postgresql+psycopg2://")):
        if importlib.util.find_spec(module) is not None:
            return scheme + url[len("postgresql://"):]
    raise UsageError("a PostgreSQL storage needs a driver: pip install psycopg2-binary")


def quiet_optuna() -> None:
    """Our own one line per trial replaces Optuna's log; its experimental-feature warnings are silenced."""
    import warnings

    import optuna
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage")


def settings_of(base: cfg.RunConfig, space: dict, metric: str, target: float | None = None,
                pruner: str | None = None) -> dict:
    """What makes trials comparable: stored in the study when created, checked when continued (target None: a
    single-objective study, as a study stored before targets existed reads; pruner None: not recorded)."""
    sections = base.to_dict()
    for section, key in IGNORED_CHANGES:
        sections[section].pop(key, None)
    pruned = {} if pruner is None else {"pruner": pruner}
    return json.loads(json.dumps({"schedule": base.schedule.name, "metric": metric, "target": target,
                                  "space": space_to_dict(space), "base": sections, **pruned}))


def check_settings(saved: dict, current: dict, study: str) -> None:
    """A continued study must have been created with the same schedule, metric, target, space and base config; a
    base key the stored settings lack (stored before the key existed) counts as that key's default."""
    old, new = saved.get("target"), current["target"]
    if old != new:
        raise UsageError(f"study {study!r} was created {target_text(old)}, now {target_text(new)}; use the same "
                         f"settings, or another --study")
    pairs = [(k, saved.get(k), current[k]) for k in ("schedule", "metric", "space")]
    if "pruner" in saved and "pruner" in current:      # (studies stored before 2026-11-28 did not record it)
        pairs.append(("the pruner", saved["pruner"], current["pruner"]))
    base = cfg.with_defaults(saved.get("base", {}))
    for section in sorted(set(base) | set(current["base"])):
        old, new = base.get(section, {}), current["base"].get(section, {})
        pairs += [(f"[{section}] {k}", old.get(k), new.get(k))
                  for k in sorted(set(old) | set(new)) if (section, k) not in IGNORED_CHANGES]
    for what, old, new in pairs:
        if old != new:
            raise UsageError(f"study {study!r} was created with {what} = {old!r}, now {new!r}; use the same "
                             f"settings, or another --study")


def target_text(target: float | None) -> str:
    """'with target = 0.05', or 'without a target (single-objective)'."""
    return "without a target (single-objective)" if target is None else f"with target = {target!r}"


def counted(study) -> list:
    """The trials that count towards --trials: finished (complete, pruned, failed by their own settings) or
    running; a trial failed by Ctrl-C, a signal or a dead worker says nothing about its settings and is redone."""
    from optuna.trial import TrialState
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                                TrialState.FAIL, TrialState.RUNNING))
            if not stopped_from_outside(t)]


def stopped_from_outside(trial) -> bool:
    """A trial failed by Ctrl-C, a signal, a killed worker or as a surplus past --trials (sweep_trials.beyond_quota),
    not by its own settings (it says nothing about them)."""
    from optuna.trial import TrialState
    error = str(trial.user_attrs.get("error", ""))
    return trial.state == TrialState.FAIL and (error == "interrupted" or error.startswith(("stale:", SURPLUS)))


def fail_dead_trials(study, storage) -> int:
    """Mark FAIL the RUNNING trials whose worker process on this host is gone (killed, not interrupted)."""
    from optuna.trial import TrialState
    host, failed = socket.gethostname(), 0
    study_id = storage.get_study_id_from_name(study.study_name)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") != host or not isinstance(pid, int) or pid_alive(pid):
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        storage.set_trial_user_attr(trial_id, "error", f"stale: its worker (pid {pid}) died")
        study.tell(t.number, state=TrialState.FAIL)
        failed += 1
    return failed


def pid_alive(pid: int) -> bool:
    """True when a process with this id exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_out_dir(out: Path, study: str, storage: str | None = None) -> None:
    """Refuse a DIR whose sweep.json names another study, or the same study name in another storage (trial folders
    are numbered per study: the other study's would be overwritten)."""
    path = out / "sweep.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("study") != study:
            raise UsageError(f"{out} holds the sweep of study {old.get('study')!r}; pass --study "
                             f"{old.get('study')} to continue it, or choose another --out")
        recorded = mask(absolute_storage(recorded_storage(out, old)))
        if storage is not None and mask(absolute_storage(storage)) != recorded:
            raise UsageError(f"{out} holds study {study!r} of the storage {recorded}, not {mask(storage)}; pass that "
                             f"--storage to continue it, or choose another --out")


def absolute_storage(url: str) -> str:
    """A file storage's URL with its path made absolute and symlinks resolved, as default_storage's (journal:PATH,
    sqlite:///PATH), so that sweep.json names the same file from any folder; other URLs as given."""
    if url.startswith("journal:"):
        return "journal:" + os.path.realpath(os.path.expanduser(url[len("journal:"):]))
    head, sep, rest = url.partition(":///")
    path, mark, query = rest.partition("?")
    if sep and head.split("+")[0] == "sqlite" and path and path != ":memory:":
        return f"{head}:///{os.path.realpath(os.path.expanduser(path))}{mark}{query}"
    return url


def claim_out_dir(out: Path, study: str, storage: str, schedule: str, metric: str,
                  target: float | None = None) -> None:
    """DIR/sweep.json names the study DIR belongs to, its storage (left out when it is DIR/study.db, so the folder
    can move or be cloned), metric and target (when it has one)."""
    from adaptive_sched.atomic import atomic_write_text
    check_out_dir(out, study, storage)
    out.mkdir(parents=True, exist_ok=True)
    claim = {"study": study, "schedule": schedule, "metric": metric}
    if storage != default_storage(out):
        claim["storage"] = mask(storage)
    if target is not None:
        claim["target"] = target
    atomic_write_text(out / "sweep.json", json.dumps(claim, indent=2) + "\n")


def default_storage(out: Path) -> str:
    """sqlite:////abs/DIR/study.db."""
    return f"sqlite:///{(out / 'study.db').resolve()}"


def recorded_storage(out: Path, meta: dict) -> str:
    """The storage DIR/sweep.json names; DIR/study.db when it names none, or names the default storage of a folder
    of DIR's name (older sweep.json files hold that absolute path, which names the original after a move or clone)."""
    storage = meta.get("storage")
    if not storage:
        return default_storage(out)
    recorded = Path(storage[len("sqlite:///"):]) if storage.startswith("sqlite:///") else None
    if recorded is not None and recorded.name == "study.db" and recorded.parent.name == out.resolve().name \
            and (out / "study.db").exists():
        return default_storage(out)
    return storage
