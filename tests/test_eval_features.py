"""FID/KID and bits/dim inside a training run: the feature net is built once, cached, and recorded."""
import json

import pandas as pd
import pytest

from adaptive_sched import config as cfg
from adaptive_sched.errors import UsageError
from adaptive_sched.train import train


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("feature-cache")


def digits_config(**eval_overrides):
    return cfg.from_dict({"data": {"name": "digits"},
                          "model": {"name": "unet", "channels": [8], "emb_dim": 16, "mid_blocks": 0},
                          "train": {"steps": 20, "batch_size": 32, "log_every": 10, "target": "v"},
                          "eval": {"every": 20, "n": 100, "sample_n": 100, "sample_steps": 5, "logsnr_points": 3,
                                   **eval_overrides}})


@pytest.mark.slow
def test_image_runs_log_fid_kid_and_bpd_with_the_feature_net_recorded(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("ADAPTIVE_SCHED_CACHE", str(cache))
    final = train(digits_config(bpd_n=20, bpd_points=2, bpd_bins=17), tmp_path / "run", progress=False)
    for key in ("eval_fid", "eval_kid", "eval_bpd"):
        assert float(final[key]) == float(final[key]) and float(final[key]) > 0, key
    info = json.loads((tmp_path / "run" / "eval_features.json").read_text())
    assert info["kind"] == "classifier" and info["accuracy"] > 0.8 and info["reference_n"] == 100
    # a second run (another seed) reuses the cached network: same key, same reference features
    config = digits_config()
    config.train.seed = 1
    train(config, tmp_path / "other", progress=False)
    assert json.loads((tmp_path / "other" / "eval_features.json").read_text())["key"] == info["key"]
    assert len(list(cache.glob("*.pt"))) == 1


def test_features_none_and_vector_data_skip_fid(tmp_path):
    train(digits_config(features="none", sample_n=10), tmp_path / "none", progress=False)
    metrics = pd.read_csv(tmp_path / "none" / "metrics.csv")
    assert metrics["eval_fid"].isna().all() and metrics["eval_swd"].notna().any()
    assert not (tmp_path / "none" / "eval_features.json").exists()


@pytest.mark.parametrize("overrides,message", [({"features": "resnet"}, "features 'resnet' is not one of"),
                                                ({"features": "torchscript:/nope.pt"}, "nope.pt"),
                                                ({"bpd_bins": 1}, "bpd_bins")])
def test_bad_eval_settings_are_refused_before_training(tmp_path, overrides, message):
    with pytest.raises(UsageError, match=message):
        train(digits_config(**overrides), tmp_path / "run", progress=False)


def test_conditional_runs_score_bits_per_dim_with_the_held_out_labels(tmp_path, monkeypatch):
    from adaptive_sched import likelihood
    seen = []
    real_vlb = likelihood.vlb

    def recording_vlb(model, target, x0, y=None, **kwargs):
        seen.append((len(x0), y))
        return real_vlb(model, target, x0, y, **kwargs)

    monkeypatch.setattr(likelihood, "vlb", recording_vlb)
    config = digits_config(features="none", sample_n=0, bpd_n=12, bpd_points=1, bpd_bins=17)
    config.train.conditional = True
    final = train(config, tmp_path / "cond", progress=False)
    (n, labels), = seen
    from adaptive_sched.data import load
    held_out = load("digits", "test")
    assert n == 12 and labels is not None and labels.tolist() == held_out.y[:12].tolist()   # −log p(x | y)
    assert float(final["eval_bpd"]) > 0
