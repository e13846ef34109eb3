"""The FID/KID evaluator a run uses: built once from [eval] features, shared by every eval of the run.

features = "auto" trains (or loads from cache) a small classifier on the data's own training split,
keyed by dataset and data seed, so every run of a comparison scores samples with the same network;
"torchscript:PATH" wraps a user's feature network as is; "inception:PATH" takes the Inception-v3 FID
file clean-fid and StyleGAN2-ADA use (inputs in 0..255, 3 channels, return_features=True).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from adaptive_sched.atomic import atomic_write_text
from adaptive_sched.errors import UsageError


def build_evaluator(eval_config, data_config, train_data, eval_data, device: torch.device):
    """(FidEvaluator or None, info dict): None for vector data, features = none, or no samples to score."""
    from adaptive_sched.features import FidEvaluator, feature_net, load_torchscript_features
    spec = eval_config.features
    if spec == "none" or eval_config.sample_n <= 0 or train_data.x.ndim != 4:
        return None, {}
    kind, _, path = spec.partition(":")
    if spec == "auto":
        net, info = feature_net(data_config.name, train_data.to("cpu"), eval_data.to("cpu"), seed=data_config.seed,
                                device=device)
    elif kind == "torchscript" and path:
        net, info = load_torchscript_features(path), {"kind": "torchscript", "path": path}
    elif kind == "inception" and path:
        net = load_torchscript_features(path, input_range=(0.0, 255.0), channels=3,
                                        forward_kwargs={"return_features": True})
        info = {"kind": "inception", "path": path}
    else:
        raise UsageError(f"[eval] features {spec!r} is not one of: auto, none, torchscript:PATH, inception:PATH")
    n = min(eval_config.sample_n, len(eval_data))
    evaluator = FidEvaluator(net.to(device), eval_data.x[:n], kid_subsets=eval_config.kid_subsets,
                             kid_subset_size=n, device=device)
    return evaluator, {**{k: v for k, v in info.items() if k != "cached"}, "reference_n": n}


def write_info(out_dir: Path, info: dict) -> None:
    """eval_features.json: which feature network scored this run's samples (and its accuracy)."""
    if info:
        atomic_write_text(out_dir / "eval_features.json",
                          json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")
