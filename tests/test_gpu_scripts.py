"""experiments/gpu_next.sh and gpu_unpack.sh on the CPU: a comparison runs within its budget, grid-eval scores the
runs trained in the call, the results come back packed without checkpoints, unpack into another checkout, and
the next call there skips what is finished."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]

TINY = """
[data]
name = "digits"
[model]
name = "unet"
channels = [8]
emb_dim = 16
mid_blocks = 0
[train]
steps = 20
batch_size = 32
log_every = 10
checkpoint_every = 10
[eval]
every = 10
n = 40
sample_n = 24
sample_steps = 3
[compare]
seeds = [0]
metric = "eval_fid"
samples = 4
schedules = [{ name = "cosine" }, { name = "cauchy" }]   # grid-eval scores cosine (and laplace_b=0.5)
"""


def checkout(path: Path) -> Path:
    """A minimal project tree: the three scripts, the bench's config and a tiny experiments/fashion_mnist.toml."""
    (path / "experiments").mkdir(parents=True)
    for name in ("gpu_next.sh", "gpu_steps.sh", "gpu_unpack.sh", "bench_fashion.toml"):
        shutil.copy(ROOT / "experiments" / name, path / "experiments" / name)
    (path / "experiments" / "fashion_mnist.toml").write_text(TINY)
    return path


CHEAP_AYS = "--ays-samples 8 --ays-sweeps 1 --ays-candidates 4 --ays-data 32"   # grid-eval's AYS, cut to a smoke test


def run_script(cwd: Path, out: Path, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "DEVICE": "cpu",
            "STEPS": "2", "BUDGET": "900", "RUN_S": "1", "OMP_NUM_THREADS": "1", "GRID_ARGS": CHEAP_AYS, **env}
    return subprocess.run(["bash", "experiments/gpu_next.sh"], cwd=cwd, env=full, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.slow
def test_gpu_next_runs_packs_without_checkpoints_and_the_next_call_continues(tmp_path):
    there = checkout(tmp_path / "gpu")
    done = run_script(there, tmp_path / "out1")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    log = (tmp_path / "out1" / "log").read_text()
    assert "2 of 2 runs finished (all)" in log and "grid-eval results/fashion-mnist/runs/cosine/seed0" in log
    files = (tmp_path / "out1" / "files.txt").read_text().split()
    assert files and not [f for f in files if f.endswith(".pt") and not f.startswith("experiments/feature_cache/")]
    assert any(f.startswith("experiments/feature_cache/") and f.endswith(".pt") for f in files)   # the FID net

    for path in (there / "results").rglob("*"):   # a follow-up call on the warm machine: only ignored files survive
        if path.is_file() and path.suffix != ".pt":
            path.unlink()
    warm = run_script(there, tmp_path / "out5")
    assert warm.returncode == 0, warm.stdout[-2000:] + warm.stderr[-2000:]
    log = (tmp_path / "out5" / "log").read_text()
    assert "restored .gpu_calls/" in log and "retraining" not in log
    assert "== compare" not in log and "== grid-eval" not in log                  # all finished and scored already

    here = checkout(tmp_path / "here")
    unpacked = subprocess.run(["bash", "experiments/gpu_unpack.sh", str(tmp_path / "out1")], cwd=here,
                              capture_output=True, text=True)
    assert unpacked.returncode == 0, unpacked.stderr
    runs = here / "results" / "fashion-mnist" / "runs"
    assert (runs / "cosine" / "seed0" / "finished.json").exists() and not list(runs.rglob("*.pt"))
    summary = pd.read_csv(here / "results" / "fashion-mnist" / "summary.csv")
    assert set(summary["label"]) == {"cosine", "cauchy"}
    grids = pd.read_csv(here / "results" / "fashion-mnist-grids" / "cosine" / "grid_eval.csv")
    assert len(grids) == 4 * 3 and set(grids["steps"]) == {5, 10, 20}
    settings = json.loads((here / "results" / "fashion-mnist-grids" / "cosine" / "grid_eval.json").read_text())
    assert settings["ays"]["ays_samples"] == 8 and settings["ays"]["ays_sweeps"] == 1     # GRID_ARGS reached grid-eval

    again = run_script(here, tmp_path / "out2")                 # the next session: nothing left to train
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    log = (tmp_path / "out2" / "log").read_text()
    assert "== compare" not in log and "== grid-eval" not in log
    assert pd.read_csv(here / "results" / "fashion-mnist" / "summary.csv").equals(summary)

    config = here / "experiments" / "fashion_mnist.toml"                  # a seed more: its grids join seed 0's
    config.write_text(config.read_text().replace("seeds = [0]", "seeds = [0, 1]"))
    more = run_script(here, tmp_path / "out4")
    assert more.returncode == 0, more.stdout[-2000:] + more.stderr[-2000:]
    log = (tmp_path / "out4" / "log").read_text()
    assert "== grid-eval results/fashion-mnist/runs/cosine/seed0 results/fashion-mnist/runs/cosine/seed1" in log
    grids = pd.read_csv(here / "results" / "fashion-mnist-grids" / "cosine" / "grid_eval.csv")
    assert len(grids) == 2 * 4 * 3 and grids["run"].str.endswith("seed0").sum() == 12
    assert "over 2 run(s)" in (here / "results" / "fashion-mnist-grids" / "cosine" / "grid_eval.md").read_text()

    stopped = run_script(checkout(tmp_path / "slow"), tmp_path / "out3", HARD="3")     # the hard stop still packs
    log = (tmp_path / "out3" / "log").read_text()
    assert stopped.returncode == 124 and "== hard stop at 3s" in log and "== packing results" in log
    assert (tmp_path / "out3" / "files.txt").exists()

    empty = subprocess.run(["bash", "experiments/gpu_unpack.sh", str(tmp_path / "nothing")], cwd=here,
                           capture_output=True, text=True)
    assert empty.returncode == 2 and empty.stderr.startswith("error: no results.tgz.part*")


TINY_BENCH = ("--data digits --model-param channels=[8] --model-param emb_dim=16 --model-param mid_blocks=0 "
              "--batch-size 16 --modes eager --warmup 1 --steps 2 --repeats 1 --sample-steps 2 --sample-n 8")


@pytest.mark.slow
def test_the_bench_step_measures_cosine_against_learned_and_comes_back(tmp_path):
    # the first GPU call ran none of it: `timeout` was handed a shell function (no such command)
    done = run_script(checkout(tmp_path / "gpu"), tmp_path / "out", STEPS="1", BENCH_ARGS=TINY_BENCH)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    files = (tmp_path / "out" / "files.txt").read_text().split()
    bench = [f for f in files if f.startswith("results/bench/") and f.endswith("-cpu.jsonl")]
    assert len(bench) == 1
    rows = pd.read_json(tmp_path / "gpu" / bench[0], lines=True)
    train = rows[rows["measure"] == "train"]
    assert list(train["schedule"]) == ["cosine", "learned"] * 2 and (train["img_s"] > 0).all()
    assert train["overhead_pct"].notna().sum() == 2 and (rows["measure"] == "sample").sum() == 1
    assert "overhead_pct=" in (tmp_path / "out" / "log").read_text()      # the table printed last
    assert all(list(shape) == [1, 12, 12] for shape in train["shape"])    # the bench config's pad = 2 (8x8 digits)
    profiles = sorted(f for f in files if f.startswith("results/bench/profile-"))
    assert [Path(f).name for f in profiles] == ["done", "eager-cosine-b16.txt", "eager-learned-b16.txt"]


def test_the_bench_config_is_the_headline_comparisons_model_and_data():
    import tomllib
    bench = tomllib.loads((ROOT / "experiments" / "bench_fashion.toml").read_text())
    compare = tomllib.loads((ROOT / "experiments" / "fashion_mnist.toml").read_text())
    assert bench["data"] == compare["data"] and bench["model"] == compare["model"]
    assert {k: compare["train"][k] for k in bench["train"]} == bench["train"]


def test_a_checkpoint_ahead_of_its_metrics_is_cleared_before_the_steps(tmp_path):
    # a second call on a warm machine: the first call's checkpoints survive there, the files not unpacked here don't
    from adaptive_sched import checkpoint
    there = checkout(tmp_path / "gpu")
    runs = there / "results" / "fashion-mnist" / "runs"
    ghost, behind, kept = (runs / name / "seed0" for name in ("edm", "cauchy", "cosine"))
    for run in (ghost, behind, kept):
        run.mkdir(parents=True)
        checkpoint.save_training_state(run, {"step": 20, "logged_step": 20})
    (behind / "metrics.csv").write_text("step,loss\n10,0.5\n")
    (kept / "metrics.csv").write_text("step,loss\n10,0.5\n20,0.4\n")
    done = run_script(there, tmp_path / "out", STEPS="none")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert not ghost.exists() and not behind.exists() and (kept / "checkpoint.pt").exists()
    log = (tmp_path / "out" / "log").read_text()
    assert "retraining results/fashion-mnist/runs/edm/seed0" in log and "runs/cosine" not in log


def test_gpu_trim_moves_the_cpu_results_aside_and_back(tmp_path):
    repo = tmp_path / "repo"
    (repo / "experiments").mkdir(parents=True)
    shutil.copy(ROOT / "experiments" / "gpu_trim.sh", repo / "experiments" / "gpu_trim.sh")
    for folder in ("digits-cpu", "mnist-cpu-grids", "demo", "fashion-mnist", "bench"):
        (repo / "results" / folder).mkdir(parents=True)
        (repo / "results" / folder / "summary.csv").write_text("x" * 300_000)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q"], cwd=repo, check=True)
    subprocess.run(git + ["add", "."], cwd=repo, check=True)
    subprocess.run(git + ["commit", "-qm", "x"], cwd=repo, check=True)
    env = {**os.environ, "HELD": str(tmp_path / "held")}

    def trim(*args):
        return subprocess.run(["bash", "experiments/gpu_trim.sh", *args], cwd=repo, env=env, capture_output=True,
                              text=True)

    assert "tree 1.4 MiB" in trim("size").stdout                          # five 0.29 MiB files and the script
    aside = trim("aside")
    assert aside.returncode == 0 and "tree 0.6 MiB" in aside.stdout       # what the GPU steps read stays
    assert sorted(p.name for p in (repo / "results").iterdir()) == ["bench", "fashion-mnist"]
    assert sorted(p.name for p in (tmp_path / "held").iterdir()) == ["demo", "digits-cpu", "mnist-cpu-grids"]
    (repo / "results" / "demo").mkdir()                                   # something reappeared: nothing is overwritten
    refused = trim("back")
    assert refused.returncode == 2 and "results/demo is back already" in refused.stderr
    (repo / "results" / "demo").rmdir()
    assert trim("back").returncode == 0 and not list((tmp_path / "held").iterdir())
    status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout
    assert status == ""
    assert trim("nonsense").returncode == 2
    inside = subprocess.run(["bash", "experiments/gpu_trim.sh", "aside"], cwd=repo, capture_output=True, text=True,
                            env={**os.environ, "HELD": "held"})                  # relative: inside the checkout
    assert inside.returncode == 2 and "must be outside the checkout" in inside.stderr
    (tmp_path / "held" / "demo").mkdir()                                   # a collision: nothing moves at all
    assert trim("aside").returncode == 2 and (repo / "results" / "digits-cpu").is_dir()


def test_the_reference_bench_config_is_the_issues_net_on_the_bench_data(monkeypatch):
    import re
    import tomllib
    from adaptive_sched.models import build_model, count_parameters
    from adaptive_sched.models.unet import REFERENCE_LAYOUT
    ref = tomllib.loads((ROOT / "experiments" / "bench_reference.toml").read_text())
    bench = tomllib.loads((ROOT / "experiments" / "bench_fashion.toml").read_text())
    assert ref["data"] == bench["data"] and ref["train"] == bench["train"]
    params = {k: v for k, v in ref["model"].items() if k != "name"}
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()} == REFERENCE_LAYOUT
    # gpu_steps.sh recognises the step as done by the net's parameter count in a bench line
    steps = (ROOT / "experiments" / "gpu_steps.sh").read_text()
    counted = count_parameters(build_model("unet", (1, 32, 32), **params))
    assert re.findall(r'"params": (\d+),', steps) == [str(counted)]
    pattern = re.search(r"grep -qsE '([^']*params[^']*)'", steps).group(1)
    for failed, done in ((False, True), (True, False)):   # a failed compilation (eager numbers) is not done
        line = bench_line("bench_reference.toml", "reduce-overhead", monkeypatch, compile_failed=failed)
        assert (subprocess.run(["grep", "-qE", pattern], input=line, text=True).returncode == 0) == done
    # the learned schedule under CUDA graphs ran on 2026-11-27: its step's pattern still finds that line
    learned = re.search(r"""grep -qsE '("mode": "reduce-overhead".*"learned"[^']*)'""", steps).group(1)
    committed = sorted((ROOT / "results" / "bench").glob("*.jsonl"))
    assert subprocess.run(["grep", "-qsE", learned, *map(str, committed)]).returncode == 0


def bench_line(config_name: str, mode: str, monkeypatch, **fields) -> str:
    """A training line as bench writes it on a GPU (its fields in bench's order) for the config's net."""
    import types
    import torch
    from adaptive_sched import bench, config as cfg
    from adaptive_sched.models import build_model
    config = cfg.from_dict(cfg.read_toml(ROOT / "experiments" / config_name))
    params = {k: v for k, v in cfg.read_toml(ROOT / "experiments" / config_name)["model"].items() if k != "name"}
    run = types.SimpleNamespace(config=config, model=build_model("unet", (1, 32, 32), **params),
                                train_data=torch.zeros(2, 1, 32, 32), device=torch.device("cuda"))
    monkeypatch.setattr(bench, "device_name", lambda device: "NVIDIA H100 80GB HBM3")
    row = bench.common_fields(run, "train", mode)
    return json.dumps({**row, **{k: v for k, v in fields.items() if k in row}, "flops_per_image": 1, "img_s": 1.0})
