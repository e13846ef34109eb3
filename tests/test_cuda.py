"""The CUDA paths (bf16 autocast, fused AdamW, foreach EMA, device-resident data, per-step CUDA generators, CFG
sampling, FID features on the GPU), end to end on tiny runs. They skip on a machine without CUDA;
experiments/gpu_next.sh runs them first on the GPU machine, where nothing else can test them."""
import math

import pandas as pd
import pytest
import torch

from adaptive_sched import checkpoint, config as cfg
from adaptive_sched.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def tiny(data="gmm", steps=40, **sections):
    raw = {"data": {"name": data, **({"n": 2000, "dim": 8} if data == "gmm" else {})},
           "model": {"name": "mlp", "hidden": 64, "depth": 2} if data == "gmm" else
                    {"name": "unet", "channels": [8, 16], "emb_dim": 32, "mid_blocks": 1},
           "train": {"steps": steps, "batch_size": 64, "lr": 1e-3, "warmup": 5, "log_every": 10,
                     "checkpoint_every": 20, "target": "v", "device": "cuda"},
           "eval": {"every": 20, "n": 100, "sample_n": 0 if data == "gmm" else 32, "sample_steps": 5,
                    "logsnr_points": 5}}
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return cfg.from_dict(raw)


def final_metrics(run_dir) -> pd.Series:
    return pd.read_csv(run_dir / "metrics.csv").iloc[-1]


def test_training_on_cuda_is_finite_and_resumes_to_the_same_state(tmp_path):
    # (per-step CUDA generators draw other numbers than the CPU ones, so CUDA is compared with itself)
    train(tiny(steps=40), tmp_path / "straight", progress=False)
    train(tiny(steps=20), tmp_path / "resumed", progress=False)
    train(tiny(steps=40), tmp_path / "resumed", resume=True, progress=False)
    a, b = final_metrics(tmp_path / "straight"), final_metrics(tmp_path / "resumed")
    assert math.isfinite(a["loss"]) and a["skipped"] == 0 and a["img_s"] > 0
    assert abs(a["loss"] - b["loss"]) < 1e-4 * max(1.0, abs(a["loss"]))
    sa = checkpoint.load(tmp_path / "straight" / "checkpoint.pt")["model"]
    sb = checkpoint.load(tmp_path / "resumed" / "checkpoint.pt")["model"]
    assert all(torch.allclose(sa[k].float(), sb[k].float(), atol=1e-5) for k in sa)


@pytest.mark.parametrize("objective", ["variance", "adaptive", "cvdm"])
def test_a_learned_schedule_trains_on_cuda(tmp_path, objective):
    config = tiny("digits", steps=20, schedule={"name": "learned"}, learned={"objective": objective})
    train(config, tmp_path / "run", progress=False)
    row = final_metrics(tmp_path / "run")
    assert math.isfinite(row["loss"]) and math.isfinite(row["eval_fid"]) and row["skipped"] == 0
    from adaptive_sched.run_artifacts import final_schedule
    schedule, _, step = final_schedule(tmp_path / "run")
    h = 0.01                 # midpoint rule: p has a sliver of height 1/(ε·40) within ~1e-7 of each window end
    lam = torch.arange(-20 + h / 2, 20, h, dtype=torch.float64)
    with torch.no_grad():
        mass = schedule.density(lam).double().sum() * h
    assert step == 20 and abs(float(mass) - 1) < 1e-2


def test_conditional_training_and_guided_sampling_on_cuda(tmp_path):
    config = tiny("digits", steps=20, train={"conditional": True, "p_uncond": 0.2},
                  eval={"guidance": [1.0, 2.0]})
    train(config, tmp_path / "run", progress=False)
    row = final_metrics(tmp_path / "run")
    assert math.isfinite(row["eval_fid@w1"]) and math.isfinite(row["eval_fid@w2"])
    from adaptive_sched.generate import generate, sampling_grid
    from adaptive_sched.sample_run import load_snapshot
    _, model, snap = load_snapshot(tmp_path / "run", torch.device("cuda"))
    x = generate(model, "v", tuple(snap["data_shape"]), 20, sampling_grid("cosine", 5, -10.0, 10.0), device="cuda",
                 labels=torch.arange(20) % 10, guidance=2.0)
    assert x.shape == (20, 1, 8, 8) and torch.isfinite(x).all()



def test_training_with_cuda_graphs_matches_the_default_compiled_run(tmp_path):
    # compile_mode reduce-overhead replays the same inductor kernels as CUDA graphs: same losses, same weights
    for name, mode in (("default", "default"), ("graphs", "reduce-overhead")):
        train(tiny("digits", steps=20, train={"compile": True, "compile_mode": mode}), tmp_path / name,
              progress=False)
    a, b = (pd.read_csv(tmp_path / name / "metrics.csv") for name in ("default", "graphs"))
    assert list(a["step"]) == list(b["step"]) and b["skipped"].iloc[-1] == 0
    assert b["loss"].to_numpy() == pytest.approx(a["loss"].to_numpy(), rel=2e-2)
    assert math.isfinite(b["eval_fid"].iloc[-1])
