"""Every bad input named in issue 7, through the CLI: exit status 2, one line `error: ...` naming the problem,
never a traceback, and nothing written. Plus: output paths stay inside the run directory asked for.

Most cases call cli.main in-process (capsys) for speed; those marked SUBPROCESS run
`python -m adaptive_sched.cli` as a user would, which also catches warnings printed to stderr.
"""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from adaptive_sched import cli
from adaptive_sched.compare import run_dir_of

SUBPROCESS, MAIN = "subprocess", "main"
RUN_OPTIONS = ["--data", "gmm", "--model", "mlp", "--model-param", "hidden=16", "--model-param", "depth=1",
               "--steps", "5", "--device", "cpu"]                  # train's and sweep's
TRAIN = ["train", *RUN_OPTIONS, "--quiet", "--out", "{d}/out"]
TRAIN_TOY = [a.replace("gmm", "checkerboard") for a in TRAIN]    # a dataset without labels or a dim
TRAIN_UNET = ["train", "--data", "digits", "--model", "unet", "--steps", "5", "--device", "cpu", "--quiet", "--out",
              "{d}/out"]
SWEEP = ["sweep", *RUN_OPTIONS, "--schedule", "laplace", "--trials", "1", "--out", "{d}/sw"]


def npz(**arrays):
    """A file builder: an .npz archive of `arrays`."""
    def write(path: Path) -> None:
        with open(path, "wb") as handle:
            np.savez(handle, **arrays)
    return write


def truncated_png(path: Path) -> None:
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def torch_file(obj):
    """A file builder: torch.save(obj) (a pickle, as any .pt file is)."""
    return lambda path: torch.save(obj, path)


class Payload:
    """Unpickling this creates a file: a checkpoint carrying it must not run it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def payload_checkpoint(path: Path) -> None:
    """A .pt that looks like an EMA snapshot and whose unpickling would create PWNED next to it."""
    torch.save({"kind": "ema", "x": Payload(str(path.parent / "PWNED"))}, path)


def toml(text: str) -> dict:
    return {"c.toml": text}


TABLE = {"t.csv": "t,logsnr\n0,5\n0.5,-1\n1,-5\n"}    # a valid table, for the cases that break something else
RANDOM_BYTES = np.random.default_rng(0).bytes(512)

# (id, argv with {d} = a fresh folder, files to create there (text, bytes, a builder, or None for a folder),
#  substrings the error line must contain, how to run it)
CASES = [
    # unknown names: the message lists the valid ones
    ("unknown-schedule", [*TRAIN, "--schedule", "laplase"], {}, ["unknown schedule 'laplase'", "cosine, laplace"],
     SUBPROCESS),
    ("unknown-data", [*TRAIN, "--data", "nosuch"], {}, ["unknown dataset 'nosuch'", "gmm", "npz:PATH"], MAIN),
    ("unknown-target", [*TRAIN, "--target", "score"], {}, ["unknown target 'score'", "eps, x0, v"], MAIN),
    ("unknown-weighting", [*TRAIN, "--weighting", "minsnr"], {}, ["unknown weighting 'minsnr'", "min-snr"], MAIN),
    ("unknown-optimizer", [*TRAIN, "--optimizer", "adamz"], {}, ["unknown optimizer 'adamz'", "adamw"], MAIN),
    ("unknown-model", [*TRAIN, "--model", "resnet"], {}, ["unknown model 'resnet'", "mlp, unet"], MAIN),
    ("unknown-schedule-in-toml", [*TRAIN, "--config", "{d}/c.toml"], toml('[schedule]\nname = "cosin"\n'),
     ["unknown schedule 'cosin'", "did you mean 'cosine'"], MAIN),
    # invalid parameters
    ("laplace-b-zero", [*TRAIN, "--schedule", "laplace", "--schedule-param", "b=0"], {}, ["b must be > 0"], MAIN),
    ("laplace-b-negative", [*TRAIN, "--config", "{d}/c.toml"], toml('[schedule]\nname = "laplace"\nb = -0.5\n'),
     ["b must be > 0", "-0.5"], MAIN),
    ("cauchy-gamma", [*TRAIN, "--schedule", "cauchy", "--schedule-param", "gamma=0"], {}, ["gamma must be > 0"], MAIN),
    ("normal-std", [*TRAIN, "--schedule", "normal", "--schedule-param", "std=-2"], {}, ["std must be > 0"], MAIN),
    ("edm-p-std", [*TRAIN, "--schedule", "edm", "--schedule-param", "p_std=0"], {}, ["p_std must be > 0"], MAIN),
    ("logistic-scale", [*TRAIN, "--schedule", "logistic", "--schedule-param", "scale=0"], {}, ["scale must be > 0"],
     MAIN),
    ("cosine-scale", [*TRAIN, "--schedule", "cosine", "--schedule-param", "scale=-1"], {}, ["scale must be > 0"],
     MAIN),
    ("weighting-gamma", [*TRAIN, "--weighting", "min-snr", "--weighting-param", "gamma=0"], {},
     ["gamma must be > 0"], MAIN),
    ("logsnr-min-equals-max", [*TRAIN, "--schedule-param", "logsnr_min=3", "--schedule-param", "logsnr_max=3"], {},
     ["logsnr_min (3.0) must be < logsnr_max (3.0)"], MAIN),
    ("logsnr-min-above-max", [*TRAIN, "--config", "{d}/c.toml"],
     toml("[schedule]\nlogsnr_min = 5.0\nlogsnr_max = -5.0\n"), ["logsnr_min (5.0) must be < logsnr_max (-5.0)"], MAIN),
    ("logsnr-nan", [*TRAIN, "--schedule-param", "logsnr_min=nan"], {}, ["logsnr_min must be finite"], MAIN),
    ("steps-zero", [*TRAIN, "--steps", "0"], {}, ["steps must be > 0"], MAIN),
    ("steps-huge", [*TRAIN, "--steps", "99999999999999999999"], {}, ["steps must be < 2^32"], MAIN),
    ("mlp-hidden-zero", [*TRAIN, "--model", "mlp", "--model-param", "hidden=0"], {}, ["hidden must be an integer >= 1"],
     MAIN),
    ("mlp-depth-negative", [*TRAIN, "--model", "mlp", "--model-param", "depth=-1"], {}, ["depth an integer >= 0"],
     MAIN),
    ("learned-hidden-fraction", [*TRAIN, "--schedule", "learned", "--schedule-param", "hidden=1.5"], {},
     ["hidden must be a whole number in 1..4096"], MAIN),
    ("learned-hidden-huge", [*TRAIN, "--schedule", "learned", "--schedule-param", "hidden=1e9"], {},
     ["hidden must be a whole number"], MAIN),
    ("binned-bins-huge", [*TRAIN, "--schedule", "adaptive_binned", "--schedule-param", "bins=1e12"], {},
     ["bins must be a whole number in 2..100000"], MAIN),
    ("laplace-b-bool", [*TRAIN, "--schedule", "laplace", "--schedule-param", "b=true"], {}, ["b must be a number"], MAIN),
    ("steps-negative", [*TRAIN, "--steps", "-3"], {}, ["steps must be > 0"], MAIN),
    ("steps-negative-in-toml", ["train", "--config", "{d}/c.toml", "--out", "{d}/out"],
     toml('[data]\nname = "gmm"\n[train]\nsteps = -3\ndevice = "cpu"\n'), ["steps must be > 0, got -3"], MAIN),
    ("batch-larger-than-data", [*TRAIN, "--batch-size", "100000"], {}, ["batch_size must be in 1..", "100000"], MAIN),
    ("batch-larger-than-npz", [*TRAIN, "--data", "npz:{d}/x.npz", "--model", "auto", "--batch-size", "64"],
     {"x.npz": npz(x=np.zeros((20, 8, 8), np.uint8))}, ["batch_size must be in 1..18", "got 64"], MAIN),
    ("adaptive-binned-bins-text", [*TRAIN, "--schedule", "adaptive_binned", "--schedule-param", "bins='many'"], {},
     ["bins must be a number"], MAIN),
    ("model-hidden-negative", [*TRAIN, "--model-param", "hidden=-3"], {}, ["model 'mlp' cannot be built"], MAIN),
    # data files
    ("npz-missing", [*TRAIN, "--data", "npz:/nope.npz"], {}, ["npz file not found: /nope.npz"], MAIN),
    ("folder-missing", [*TRAIN, "--data", "folder:/nope"], {}, ["image folder not found: /nope"], MAIN),
    ("npz-wrong-rank", [*TRAIN, "--data", "npz:{d}/x.npz"], {"x.npz": npz(x=np.zeros(5))},
     ["shape (5,)", "expected N x H x W"], MAIN),
    ("npz-nan", [*TRAIN, "--data", "npz:{d}/x.npz"], {"x.npz": npz(x=np.full((20, 8, 8), np.nan, np.float32))},
     ["contains NaN"], MAIN),
    ("npz-empty", [*TRAIN, "--data", "npz:{d}/x.npz"], {"x.npz": npz(x=np.zeros((0, 8, 8), np.uint8))},
     ["array is empty"], MAIN),
    ("npz-no-arrays", [*TRAIN, "--data", "npz:{d}/x.npz"], {"x.npz": npz()}, ["has no arrays"], MAIN),
    ("npz-not-an-archive", [*TRAIN, "--data", "npz:{d}/x.npz"], {"x.npz": b"hello"}, ["cannot read"], MAIN),
    ("png-garbage", [*TRAIN, "--data", "folder:{d}/img"], {"img/a.png": RANDOM_BYTES}, ["cannot read image"], MAIN),
    ("png-truncated", [*TRAIN, "--data", "folder:{d}/img"], {"img/a.png": truncated_png}, ["cannot read image"],
     MAIN),
    ("folder-without-images", [*TRAIN, "--data", "folder:{d}/img"], {"img/": None}, ["no .png/.jpg/.jpeg"], MAIN),
    # table CSVs
    ("table-not-monotone", [*TRAIN, "--schedule", "table", "--schedule-param", "path='{d}/t.csv'"],
     {"t.csv": "t,logsnr\n0,1\n0.5,2\n1,-1\n"}, ["not monotone"], SUBPROCESS),
    ("table-lacks-column", [*TRAIN, "--schedule", "table", "--schedule-param", "path='{d}/t.csv'"],
     {"t.csv": "t,lambda\n0,1\n1,-1\n"}, ["lacks column(s) logsnr"], MAIN),
    ("table-nan", [*TRAIN, "--schedule", "table", "--schedule-param", "path='{d}/t.csv'"],
     {"t.csv": "t,logsnr\n0,1\n0.5,nan\n1,-1\n"}, ["NaN"], MAIN),
    ("table-text", [*TRAIN, "--schedule", "table", "--schedule-param", "path='{d}/t.csv'"],
     {"t.csv": "t,logsnr\n0,high\n1,low\n"}, ["not a numeric CSV"], MAIN),
    ("table-binary", [*TRAIN, "--schedule", "table", "--schedule-param", "path='{d}/t.csv'"],
     {"t.csv": RANDOM_BYTES}, ["table"], MAIN),
    ("table-missing", [*TRAIN, "--schedule", "table", "--schedule-param", "path='{d}/nope.csv'"], {},
     ["table file not found"], MAIN),
    ("table-window-outside", [*TRAIN, "--config", "{d}/c.toml"],
     {**TABLE, **toml('[schedule]\nname = "table"\npath = "{d}/t.csv"\nlogsnr_min = 10.0\nlogsnr_max = 20.0\n')},
     ["does not overlap"], MAIN),
    # files that are not checkpoints, given to export and sample
    ("export-text-file", ["export", "{d}/notes.txt", "--out", "{d}/x.csv"], {"notes.txt": "hello\n"},
     ["not a readable adaptive_sched checkpoint"], MAIN),
    ("export-random-bytes", ["export", "{d}/x.pt", "--out", "{d}/x.csv"], {"x.pt": RANDOM_BYTES},
     ["not a readable adaptive_sched checkpoint"], SUBPROCESS),
    ("export-empty-run-dir", ["export", "{d}/run", "--out", "{d}/x.csv"], {"run/": None}, ["no EMA snapshot"], MAIN),
    ("export-empty-file", ["export", "{d}/run", "--out", "{d}/x.csv"], {"run/ema.pt": b""},
     ["not a readable adaptive_sched checkpoint"], MAIN),
    ("export-dict-without-kind", ["export", "{d}/x.pt", "--out", "{d}/x.json"], {"x.pt": torch_file({"a": 1})},
     ["no 'kind' entry"], MAIN),
    ("export-incomplete-snapshot", ["export", "{d}/x.pt", "--out", "{d}/x.csv"], {"x.pt": torch_file({"kind": "ema"})},
     ["not a complete EMA snapshot"], MAIN),
    ("export-training-state", ["export", "{d}/x.pt", "--out", "{d}/x.csv"],
     {"x.pt": torch_file({"kind": "training_state", "step": 3})}, ["'training_state' checkpoint"], MAIN),
    ("export-pickle-payload", ["export", "{d}/x.pt", "--out", "{d}/x.csv"],
     {"x.pt": payload_checkpoint}, ["not a readable"], MAIN),
    ("sample-text-file", ["sample", "{d}/notes.txt", "--out", "{d}/x.npz"], {"notes.txt": "hello\n"},
     ["not a readable adaptive_sched checkpoint"], MAIN),
    ("sample-random-bytes", ["sample", "{d}/x.pt", "--out", "{d}/x.npz"], {"x.pt": RANDOM_BYTES},
     ["not a readable adaptive_sched checkpoint"], MAIN),
    ("sample-empty-run-dir", ["sample", "{d}/run", "--out", "{d}/x.npz"], {"run/": None}, ["no EMA snapshot"], MAIN),
    ("sample-incomplete-snapshot", ["sample", "{d}/run", "--out", "{d}/x.npz"],
     {"run/ema.pt": torch_file({"kind": "ema", "step": 1})}, ["not a complete EMA snapshot"], MAIN),
    ("sample-pickle-payload", ["sample", "{d}/run", "--out", "{d}/x.png"],
     {"run/ema.pt": payload_checkpoint}, ["not a readable"], SUBPROCESS),
    # unknown TOML keys: the closest valid key is suggested
    ("checkpoint-text-file-says-why", ["sample", "{d}/notes.txt", "--out", "{d}/x.npz"], {"notes.txt": "hello\n"},
     ["not the zip archive torch.save writes"], MAIN),
    ("data-dim-on-a-fixed-shape-dataset", [*TRAIN_TOY, "--config", "{d}/c.toml"], toml('[data]\ndim = 8\n'), ["dim sets the gmm's dimension only"], MAIN),
    # class conditioning and guidance
    ("conditional-without-labels", [*TRAIN_TOY, "--conditional"], {}, ["needs class labels"], MAIN),
    ("guidance-without-conditional", [*TRAIN, "--config", "{d}/c.toml"], toml("[eval]\nguidance = [1.0, 2.0]\n"),
     ["need a class-conditional model"], MAIN),
    ("guidance-not-numbers", [*TRAIN, "--config", "{d}/c.toml"], toml('[eval]\nguidance = "high"\n'),
     ["must be a list of numbers"], MAIN),
    ("p-uncond-out-of-range", [*TRAIN, "--conditional", "--p-uncond", "1.5"], {}, ["p_uncond must be in [0, 1)"], MAIN),
    ("schedule-condition-unknown", [*TRAIN, "--schedule", "learned", "--schedule-condition", "pixels"], {},
     ["unknown [learned] condition"], MAIN),
    ("schedule-condition-on-a-fixed-schedule", [*TRAIN, "--schedule", "laplace", "--schedule-condition", "class"],
     {}, ["--schedule-condition applies only to a learned schedule"], MAIN),
    ("stats-condition-one-bin", [*TRAIN, "--schedule", "learned", "--schedule-condition", "stats:1"], {},
     ["use stats:K"], MAIN),
    ("toml-train-key", [*TRAIN, "--config", "{d}/c.toml"], toml("[train]\nsetps = 10\n"),
     ["unknown key 'setps' in [train]", "did you mean 'steps'"], SUBPROCESS),
    ("toml-section", [*TRAIN, "--config", "{d}/c.toml"], toml("[trian]\nsteps = 10\n"),
     ["unknown config section [trian]", "did you mean 'train'"], MAIN),
    ("toml-eval-key", [*TRAIN, "--config", "{d}/c.toml"], toml("[eval]\nevry = 10\n"), ["did you mean 'every'"], MAIN),
    ("toml-data-key", [*TRAIN, "--config", "{d}/c.toml"], toml('[data]\nnmae = "gmm"\n'), ["did you mean 'name'"],
     MAIN),
    ("toml-learned-key", [*TRAIN, "--config", "{d}/c.toml"], toml('[learned]\nobjectve = "cvdm"\n'),
     ["did you mean 'objective'"], MAIN),
    ("toml-schedule-key", [*TRAIN, "--config", "{d}/c.toml"], toml("[schedule]\nshfit = 1.0\n"),
     ["no parameter 'shfit'", "did you mean 'shift'"], MAIN),
    ("toml-weighting-key", [*TRAIN, "--config", "{d}/c.toml"], toml('[weighting]\nname = "min-snr"\ngama = 5.0\n'),
     ["no parameter 'gama'", "did you mean 'gamma'"], MAIN),
    ("toml-model-key", [*TRAIN, "--config", "{d}/c.toml"], toml('[model]\nname = "mlp"\nhiden = 32\n'),
     ["unknown option 'hiden'", "did you mean 'hidden'"], MAIN),
    ("toml-compare-key", ["compare", "{d}/c.toml", "--out", "{d}/cmp"],
     toml('[compare]\nschedulez = [{ name = "cosine" }]\n'), ["did you mean 'schedules'"], MAIN),
    ("toml-wrong-type", [*TRAIN, "--config", "{d}/c.toml"], toml('[train]\nsteps = "many"\n'), ["steps must be a int"],
     MAIN),
    ("toml-malformed", [*TRAIN, "--config", "{d}/c.toml"], toml("[train\nsteps = 1\n"), ["not valid TOML"], MAIN),
    ("toml-missing", [*TRAIN, "--config", "{d}/nope.toml"], {}, ["config file not found"], MAIN),
    # an unreachable Optuna storage (the password is not echoed)
    ("sweep-storage-no-folder", [*SWEEP, "--storage", "sqlite:////nope/dir/study.db"], {},
     ["cannot open Optuna storage"], MAIN),
    ("sweep-storage-refused", [*SWEEP, "--storage", "postgresql://user:hunter2@127.0.0.1:1/db"], {}, ["storage"],
     MAIN),
    ("sweep-storage-unknown", [*SWEEP, "--storage", "redis://localhost"], {}, ["unknown storage URL", "sqlite:///PATH"],
     MAIN),
    # out-of-range settings found by fuzzing the CLI (2026-11-27): each refused before any work
    ("warmup-negative", [*TRAIN, "--config", "{d}/c.toml"], toml("[train]\nwarmup = -1\n"), ["warmup must be >= 0"],
     MAIN),
    ("max-nonfinite-negative", [*TRAIN, "--config", "{d}/c.toml"], toml("[train]\nmax_nonfinite = -1\n"),
     ["max_nonfinite >= 1"], MAIN),
    ("eval-window-reversed", [*TRAIN, "--config", "{d}/c.toml"], toml("[eval]\nlogsnr_lo = 10\nlogsnr_hi = -10\n"),
     ["logsnr_lo must be below logsnr_hi"], MAIN),
    ("data-seed-negative", [*TRAIN, "--config", "{d}/c.toml"], toml("[data]\nseed = -1\n"),
     ["[data] seed must be in 0..2^31-1"], MAIN),
    ("learned-lr-nan", [*TRAIN, "--schedule", "learned", "--config", "{d}/c.toml"], toml("[learned]\nlr = nan\n"),
     ["[learned] lr must be a finite number >= 0"], MAIN),
    ("learned-smoothness-negative", [*TRAIN, "--schedule", "learned", "--config", "{d}/c.toml"],
     toml("[learned]\nsmoothness = -1\n"), ["[learned] smoothness"], MAIN),
    ("learned-freeze-negative", [*TRAIN, "--schedule", "learned", "--config", "{d}/c.toml"],
     toml("[learned]\nfreeze_steps = -1\n"), ["[learned] freeze_steps"], MAIN),
    ("mlp-emb-dim-zero", [*TRAIN, "--model-param", "emb_dim=0"], {}, ["emb_dim must be an integer >= 1"], SUBPROCESS),
    ("unet-zero-channels", [*TRAIN_UNET, "--model-param", "channels=[0]"], {}, ["UNet channels must be integers >= 1"], MAIN),
    ("unet-dropout-nan", [*TRAIN_UNET, "--model-param", "dropout=nan"], {}, ["UNet dropout must be in [0, 1)"], MAIN),
    ("unet-groups-zero", [*TRAIN_UNET, "--model-param", "groups=0"], {}, ["UNet groups must be an integer >= 1"], MAIN),
    ("sweep-bad-base-setting", [*SWEEP, "--lr", "nan"], {}, ["lr must be a finite number >= 0"], MAIN),
    ("compare-seed-twice", ["compare", "{d}/c.toml", "--out", "{d}/cmp"],
     toml('[compare]\nseeds = [0, 0]\nschedules = [{ name = "cosine" }]\n'), ["lists a seed twice"], MAIN),
    ("compare-seed-negative", ["compare", "{d}/c.toml", "--out", "{d}/cmp"],
     toml('[compare]\nseeds = [-1]\nschedules = [{ name = "cosine" }]\n'), ["seed must be in 0..2^31-1"], MAIN),
    ("compare-bad-base-setting", ["compare", "{d}/c.toml", "--out", "{d}/cmp"],
     toml('[train]\nsteps = -1\n[compare]\nschedules = [{ name = "cosine" }, { name = "laplace" }]\n'),
     ["steps must be > 0"], MAIN),
    ("compare-learned-key-on-a-fixed-schedule", ["compare", "{d}/c.toml", "--out", "{d}/cmp"],
     toml('[compare]\nschedules = [{ name = "cosine", objective = "cvdm" }]\n'), ["only a learned schedule uses"], MAIN),
    ("compare-blank-label", ["compare", "{d}/c.toml", "--out", "{d}/cmp"],
     toml('[compare]\nschedules = [{ name = "cosine", label = " " }]\n'), ["label must not be blank"], MAIN),
    # options the rest of the settings would ignore are refused, not silently dropped (fuzz leftovers, 2026-11-27)
    ("objective-on-a-fixed-schedule", [*TRAIN, "--schedule", "cosine", "--schedule-objective", "cvdm"], {},
     ["--schedule-objective applies only to a learned schedule, not 'cosine'"], MAIN),
    ("objective-on-adaptive-binned", [*TRAIN, "--schedule", "adaptive_binned", "--schedule-objective", "cvdm"], {},
     ["--schedule-objective applies only to a learned schedule, not 'adaptive_binned'"], MAIN),
    ("compare-objective-on-adaptive-binned", ["compare", "{d}/c.toml", "--out", "{d}/cmp"],
     toml('[compare]\nschedules = [{ name = "adaptive_binned", objective = "cvdm" }]\n'),
     ["sets objective, which only name = \"learned\" takes"], MAIN),
    ("p-uncond-without-conditional", [*TRAIN, "--p-uncond", "0.2"], {},
     ["--p-uncond applies only to a conditional run"], MAIN),
    ("feature-net-on-vector-data", [*TRAIN, "--config", "{d}/c.toml"], toml('[eval]\nfeatures = "torchscript:f.pt"\n'),
     ["[eval] features 'torchscript:f.pt' applies to images; data 'gmm' is 1-D vectors"], MAIN),
    # a discrete decoder over levels the data are not on (digits has 17) would score data it had moved (2026-11-27)
    ("bpd-bins-off-the-data-levels", [*TRAIN_UNET, "--config", "{d}/c.toml"], toml('[eval]\nbpd_n = 8\nbpd_bins = 256\n'),
     ["[eval] bpd_bins = 256: the data are not on 256 levels", "17 for digits"], MAIN),
    ("rho-on-a-cosine-grid", ["sampling-grid", "{d}/run", "--method", "cosine", "--rho", "3", "--out", "{d}/g.csv"],
     {}, ["--rho applies only to karras grids, not cosine"], MAIN),
    ("ays-options-on-a-quantile-grid", ["sampling-grid", "{d}/run", "--method", "quantile", "--ays-data", "9",
                                        "--out", "{d}/g.csv"], {}, ["--ays-data applies only to ays grids"], MAIN),
    ("ays-options-without-ays-in-grid-eval", ["grid-eval", "{d}/run", "--methods", "cosine", "--ays-sweeps", "1",
                                              "--out", "{d}/ge"], {}, ["--ays-sweeps applies only to ays grids"], MAIN),
    ("table-row-with-an-extra-field", [*TRAIN, "--schedule", "table", "--schedule-param", "path={d}/t.csv"],
     {"t.csv": "t,logsnr\n0,5\n0.5,0,9\n1,-5\n"}, ["data row 2 has 3 field(s), the header 2"], MAIN),
    ("sweep-storage-empty", [*SWEEP, "--storage", ""], {}, ["--storage is empty"], MAIN),
    ("sweep-objective-on-a-fixed-schedule", [*SWEEP, "--schedule-objective", "cvdm"], {},
     ["--schedule-objective applies only to a learned schedule, not 'laplace'"], MAIN),
    # every trial failed at its build (2026-11-27 fuzz); train refused it after warning it had no effect
    ("sweep-condition-on-a-fixed-schedule", [*SWEEP, "--schedule-condition", "class"], {},
     ["--schedule-condition applies only to a learned schedule (or a table with a class column), not 'laplace'"],
     MAIN),
    ("condition-on-a-fixed-schedule", [*TRAIN, "--schedule", "cosine", "--schedule-condition", "stats:4"], {},
     ["--schedule-condition applies only to a learned schedule (or a table with a class column), not 'cosine'"],
     MAIN),
    ("bench-peak-n-negative", ["bench", *RUN_OPTIONS, "--peak-n", "-1"], {}, ["--peak-n must be >= 0"], MAIN),
    # options another option makes unused (2026-11-27 fuzz): each was accepted and dropped
    ("sweep-lr-and-tune-lr", [*SWEEP, "--lr", "0.05", "--tune-lr"], {},
     ["--lr 0.05 is never used: the sweep tunes lr"], MAIN),
    ("sweep-weighting-and-tune-weighting", [*SWEEP, "--weighting", "min-snr", "--tune-weighting"], {},
     ["--weighting min-snr is never used: the sweep tunes weighting"], MAIN),
    ("sweep-report-with-training-options", ["sweep", "--report", "{d}/sw", "--trials", "50", "--schedule", "cauchy"],
     {}, ["sweep --report re-renders a study from its storage; --trials, --schedule would not be used"], MAIN),
    ("bench-schedule-outside-the-compared-ones", ["bench", *RUN_OPTIONS, "--schedule", "cauchy",
                                                  "--compare-schedules", "laplace"], {},
     ["--schedule cauchy is not among --compare-schedules laplace"], MAIN),
    ("data-dir-on-a-set-that-does-not-read-it", [*TRAIN, "--data-dir", "/nonexistent"], {},
     ["data_dir applies to fashion-mnist only (where to find its files); 'gmm' does not read it"], MAIN),
    ("learned-num-classes-by-hand", [*TRAIN, "--schedule", "learned", "--schedule-param", "num_classes=3"], {},
     ["a learned schedule's classes come from [learned] condition"], MAIN),
    ("config-that-is-a-folder", [*TRAIN, "--config", "{d}"], {}, ["is a folder; give a .toml file"], MAIN),
    ("compare-best-that-is-not-json", ["compare", "{d}/c.toml", "--out", "{d}/cmp"],
     {"c.toml": '[compare]\nschedules = [{ best = "b.json" }]\n', "b.json": "{not json"},
     ["best = 'b.json' is not a JSON file"], MAIN),
    ("compare-status-with-jobs", ["compare", "{d}/c.toml", "--out", "{d}/cmp", "--status", "--jobs", "3"],
     toml('[compare]\nschedules = [{ name = "cosine" }]\n'), ["--status only counts finished runs; --jobs would"],
     MAIN),
    ("compare-unknown-model-option", ["compare", "{d}/c.toml", "--out", "{d}/cmp"],
     toml('[model]\nname = "unet"\nhiddn = 3\n[compare]\nschedules = [{ name = "cosine" }]\n'),
     ["unknown option 'hiddn' for model 'unet'"], MAIN),
    ("compare-unknown-dataset", ["compare", "{d}/c.toml", "--out", "{d}/cmp"],
     toml('[data]\nname = "fashion-mnst"\n[compare]\nschedules = [{ name = "cosine" }]\n'),
     ["unknown dataset 'fashion-mnst'"], MAIN),
    # bad compare entries are refused before any run
    ("compare-bad-parameter", ["compare", "{d}/c.toml", "--out", "{d}/cmp"],
     toml('[compare]\nschedules = [{ name = "cosine" }, { name = "laplace", b = -1.0 }]\n'), ["b must be > 0"], MAIN),
]


def create(folder: Path, files: dict) -> None:
    for name, content in files.items():
        path = folder / name
        if content is None:
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if callable(content):
            content(path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content.replace("{d}", str(folder)))


@pytest.mark.parametrize("argv,files,expected,via", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_error_line_and_no_traceback(tmp_path, capsys, argv, files, expected, via):
    create(tmp_path, files)
    argv = [a.replace("{d}", str(tmp_path)) for a in argv]
    before = {p for p in tmp_path.rglob("*")}
    if via == SUBPROCESS:
        result = subprocess.run([sys.executable, "-m", "adaptive_sched.cli", *argv], capture_output=True, text=True,
                                timeout=300)
        status, out, err = result.returncode, result.stdout, result.stderr
    else:
        status = cli.main(argv)
        out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, (status, out, err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and len(lines[0]) > len("error: "), err
    for text in expected:
        assert text.replace("{d}", str(tmp_path)) in lines[0], (text, lines[0])
    assert "hunter2" not in out + err
    # refused up front: nothing written (no run, no export, no samples), and no payload ran
    assert {p for p in tmp_path.rglob("*")} == before
    assert not (tmp_path / "out" / "checkpoint.pt").exists()
    assert not list(tmp_path.rglob("PWNED"))


NASTY_LABELS = ["../../evil", "..", ".", "", "/", "/etc/passwd", "../..", "..\\..", "a/../../b", "~", "$HOME",
                "-rf", "...", ". .", "x/./../y", "\x00", "runs", "../runs/..", "é/../../ü"]


def test_compare_run_dirs_stay_inside_runs_whatever_the_label(tmp_path):
    out = tmp_path / "cmp"
    runs = (out / "runs").resolve()
    seen = set()
    for label in NASTY_LABELS:
        path = run_dir_of(out, {"name": "cosine", "label": label}, 3)
        resolved = path.resolve()
        assert resolved.parent.parent == runs and resolved.name == "seed3", (label, path)
        assert path.relative_to(out / "runs").parts[0] not in ("", ".", ".."), label
        seen.add(resolved)
    assert len(seen) >= len(NASTY_LABELS) - 6          # distinct folders (labels that differ only in / . ~ may merge)


@pytest.mark.slow
def test_compare_with_escaping_labels_writes_only_under_its_out_dir(tmp_path, capsys):
    config = tmp_path / "work" / "cmp.toml"
    config.parent.mkdir()
    config.write_text("""
[data]
name = "gmm"
n = 400
dim = 2
[model]
name = "mlp"
hidden = 16
depth = 1
[train]
steps = 4
batch_size = 32
log_every = 2
checkpoint_every = 2
device = "cpu"
[eval]
every = 4
n = 50
sample_n = 0
logsnr_points = 3
[compare]
seeds = [0]
schedules = [{ name = "cosine", label = "../../evil" }, { name = "laplace", label = ".." },
             { name = "flow", label = "/tmp/evil" }]
""")
    out = tmp_path / "work" / "out"
    assert cli.main(["compare", str(config), "--out", str(out), "--quiet"]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["cmp.toml", "out"]
    assert not (out / "seed0").exists() and not Path("/tmp/evil").exists()
    runs = sorted(p.relative_to(out / "runs").as_posix() for p in (out / "runs").glob("*/seed0"))
    assert runs == [".._.._evil/seed0", "_../seed0", "tmp_evil/seed0"]
    assert all((out / "runs" / r / "metrics.csv").exists() for r in runs)
