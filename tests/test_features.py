"""Tests for adaptive_sched.features: trained feature nets, their cache, TorchScript nets, FidEvaluator."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adaptive_sched import features
from adaptive_sched.data import Dataset, load
from adaptive_sched.errors import UsageError
from adaptive_sched.features import (FidEvaluator, default_cache_dir, extract_features, feature_net,
                                     load_torchscript_features)

CLASSIFIER_STEPS = 200  # half the default, to keep the suite fast; digits is easy (> 0.97 at 200 steps)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One torch and one BLAS thread: these ops are tiny, and on a shared 2-core CPU threads make them 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        import scipy.linalg  # noqa: F401 - load scipy's BLAS first: threadpoolctl limits loaded libraries only
        from threadpoolctl import threadpool_limits  # comes with scikit-learn (test extra)
        limit = threadpool_limits(1)
    except ImportError:
        limit = None
    yield
    torch.set_num_threads(threads)
    if limit is not None:
        limit.restore_original_limits()


@pytest.fixture(scope="module")
def digits():
    """The digits train and test splits (1618 / 179 images, 1x8x8)."""
    return load("digits", "train"), load("digits", "test")


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    """The digits classifier feature net, trained once into a fresh cache dir."""
    cache = tmp_path_factory.mktemp("features")
    net, info = feature_net("digits", *digits, seed=0, cache_dir=cache, steps=CLASSIFIER_STEPS)
    return net, info, cache


def test_classifier_on_digits_is_accurate_and_cached(trained):
    net, info, cache = trained
    assert info["kind"] == "classifier" and not info["cached"]
    assert info["accuracy"] > 0.9, info
    assert info["feature_dim"] == features.FEATURE_DIM and info["train_examples"] == 1618
    weights, sidecar = sorted(cache.glob("*.pt")), sorted(cache.glob("*.json"))
    assert len(weights) == 1 and len(sidecar) == 1 and weights[0].stem == sidecar[0].stem == info["key"]
    assert weights[0].name.startswith("digits-classifier-1x8x8-seed0-")
    side = json.loads(sidecar[0].read_text())
    assert {"kind", "dataset", "seed", "accuracy", "train_examples", "feature_dim"} <= side.keys()
    assert side["accuracy"] == info["accuracy"]
    x = torch.linspace(-1, 1, 3 * 64).reshape(3, 1, 8, 8)
    assert net(x).shape == (3, features.FEATURE_DIM)


def test_second_call_loads_from_cache_without_training(trained, digits, monkeypatch):
    net, info, cache = trained
    weights = cache / f"{info['key']}.pt"
    mtime = weights.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("feature net was retrained despite a cache entry")

    monkeypatch.setattr(features, "_fit", no_training)
    again, info2 = feature_net("digits", *digits, seed=0, cache_dir=cache, steps=CLASSIFIER_STEPS)
    assert info2["cached"] and info2["accuracy"] == info["accuracy"]
    assert weights.stat().st_mtime_ns == mtime
    x = digits[1].x[:20]
    torch.testing.assert_close(again(x), net(x))


def test_fid_of_held_out_digits_is_far_below_fid_of_noise(trained, digits):
    net, _, _ = trained
    train, test = digits
    evaluator = FidEvaluator(net, train.x, kid_subsets=20)
    held_out = evaluator(test.x)
    noise = evaluator(torch.rand(len(test), 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert set(held_out) == {"eval_fid", "eval_kid"}
    # FID is biased upwards by O(D/N) with D = 128 features and N = 179 samples (≈ 2 here, ≈ 30 for noise)
    assert held_out["eval_fid"] * 5 < noise["eval_fid"], (held_out, noise)
    assert held_out["eval_kid"] * 20 < noise["eval_kid"], (held_out, noise)
    assert evaluator(test.x) == held_out  # deterministic: fixed KID seed, eval-mode net


def test_training_is_deterministic_given_the_seed(digits, tmp_path):
    small = Dataset("digits", digits[0].x[:256], digits[0].y[:256], 10)
    nets = [feature_net("digits", small, None, seed=s, cache_dir=tmp_path / d, steps=5)[0]
            for s, d in ((1, "a"), (1, "b"), (2, "c"))]
    x = digits[1].x[:16]
    torch.testing.assert_close(nets[0](x), nets[1](x), rtol=0, atol=0)
    assert not torch.allclose(nets[0](x), nets[2](x))


def test_cache_key_depends_on_name_shape_seed_and_data(digits):
    train = digits[0]
    padded = Dataset("digits", F.pad(train.x, (2, 2, 2, 2), value=-1.0), train.y, 10)
    keys = {features._cache_key("digits", "classifier", train, 0, 400),
            features._cache_key("digits", "classifier", train, 1, 400),
            features._cache_key("digits", "classifier", padded, 0, 400),
            features._cache_key("npz:/a b/c.npz", "classifier", train, 0, 400),
            features._cache_key("digits", "classifier", Dataset("digits", -train.x, train.y, 10), 0, 400)}
    one_changed = train.x.clone()
    one_changed[1, 0, 3, 3] += 0.5                  # one pixel of one image (the key once hashed every 6th image)
    keys.add(features._cache_key("digits", "classifier", Dataset("digits", one_changed, train.y, 10), 0, 400))
    assert len(keys) == 6
    assert features._cache_key("digits", "classifier", padded, 0, 400).startswith("digits-classifier-1x12x12-seed0-")
    assert all("/" not in k and " " not in k for k in keys)


def test_training_a_feature_net_leaves_the_cuda_generators_alone(digits, tmp_path, monkeypatch):
    """Its initial weights are seeded on the CPU generator only (restored after): torch.manual_seed would reseed
    every CUDA generator, and a run's dropout would then depend on whether the cache was warm."""
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded.append)
    small = Dataset("digits", digits[0].x[:128], digits[0].y[:128], 10)
    torch.manual_seed(123)
    reseeded.clear()
    before = torch.random.get_rng_state()
    feature_net("digits", small, None, seed=0, cache_dir=tmp_path, steps=1)
    assert reseeded == [] and torch.equal(torch.random.get_rng_state(), before)


def test_damaged_cache_entry_is_retrained(digits, tmp_path):
    small = Dataset("digits", digits[0].x[:128], digits[0].y[:128], 10)
    _, info = feature_net("digits", small, None, seed=0, cache_dir=tmp_path, steps=2)
    (tmp_path / f"{info['key']}.pt").write_bytes(b"not a checkpoint")
    net, again = feature_net("digits", small, None, seed=0, cache_dir=tmp_path, steps=2)
    assert not again["cached"] and net(small.x[:4]).shape == (4, features.FEATURE_DIM)
    (tmp_path / f"{info['key']}.json").write_text("[1, 2]")              # valid JSON, but not the sidecar's table
    assert not feature_net("digits", small, None, seed=0, cache_dir=tmp_path, steps=2)[1]["cached"]


def test_unlabelled_images_get_an_autoencoder(digits, tmp_path):
    train, test = (Dataset("digits-unlabelled", d.x) for d in digits)
    net, info = feature_net(train.name, train, test, seed=0, cache_dir=tmp_path, steps=60)
    assert info["kind"] == "autoencoder" and info["feature_dim"] == features.BOTTLENECK_DIM
    # predicting the per-pixel training mean would score the pixel variance (≈ 0.3); the net must beat it
    assert info["recon_mse"] < 0.5 * float(test.x.var(dim=0).mean()), info
    assert net(test.x[:5]).shape == (5, features.BOTTLENECK_DIM)


def test_vectors_get_identity_features(tmp_path):
    train = Dataset("gmm", torch.randn(50, 3))
    net, info = feature_net("gmm", train, None, seed=0, cache_dir=tmp_path)
    assert info["kind"] == "identity" and info["feature_dim"] == 3
    torch.testing.assert_close(net(train.x), train.x)
    assert not any(tmp_path.iterdir())


def test_default_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ADAPTIVE_SCHED_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("ADAPTIVE_SCHED_CACHE")
    assert default_cache_dir().parts[-3:] == (".cache", "adaptive_sched", "features")


def test_extract_features_batches_equal_one_pass():
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    x = torch.randn(23, 1, 4, 4)
    got = extract_features(net, x, batch_size=5)
    assert got.dtype == np.float64 and got.shape == (23, 4)
    np.testing.assert_allclose(got, net(x).detach().double().numpy(), rtol=1e-6)


class TinyFeatures(nn.Module):
    """A scriptable feature net: mean-pool to 4x4 then a linear map, with an optional `scale` argument."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(48, 5)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.linear(F.adaptive_avg_pool2d(x, 4).flatten(1)) * scale


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
def test_torchscript_round_trip(tmp_path):
    torch.manual_seed(0)
    module = TinyFeatures().eval()
    path = tmp_path / "tiny.pt"
    torch.jit.save(torch.jit.script(module), str(path))
    x = torch.rand(6, 3, 12, 12) * 2 - 1
    same = load_torchscript_features(path)
    with torch.no_grad():
        torch.testing.assert_close(same(x), module(x))
        wrapped = load_torchscript_features(path, input_size=16, input_range=(0, 255), channels=3,
                                            forward_kwargs={"scale": 2.0})
        gray = x[:, :1]
        expected = module(F.interpolate(gray.repeat(1, 3, 1, 1), size=(16, 16), mode="bilinear",
                                        align_corners=False) * 127.5 + 127.5, scale=2.0)
        torch.testing.assert_close(wrapped(gray), expected)
        with pytest.raises(UsageError, match="2 channels"):
            wrapped(torch.zeros(1, 2, 8, 8))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_bad_torchscript_files_raise_one_line_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        load_torchscript_features(tmp_path / "missing.pt")
    pickled = tmp_path / "state.pt"
    torch.save(nn.Linear(2, 2).state_dict(), pickled)
    text = tmp_path / "notes.pt"
    text.write_text("hello\nworld\n")
    for bad in (pickled, text):
        with pytest.raises(UsageError, match="not a TorchScript file") as info:
            load_torchscript_features(bad)
        assert "\n" not in str(info.value)


class ScalarOut(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum()


class BadReshape(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, 5)


class PerImageScore(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3))


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
def test_a_feature_network_that_fails_or_returns_the_wrong_shape_is_one_usage_error(tmp_path):
    x = torch.rand(4, 1, 6, 6) * 2 - 1                               # 144 values: not a multiple of 5
    for module, message in ((ScalarOut(), r"must return \(N, F\) features for N images; for 4 images it returned \(\)"),
                            (BadReshape(), r"failed on images of shape \(4, 1, 6, 6\) \(\w+\): .*shape '\[-1, 5\]' is invalid")):
        path = tmp_path / f"{type(module).__name__}.pt"
        torch.jit.save(torch.jit.script(module), str(path))
        with pytest.raises(UsageError, match=message) as info:
            load_torchscript_features(path)(x)
        assert "\n" not in str(info.value)
    path = tmp_path / "score.pt"                                       # (N,): one feature per image
    torch.jit.save(torch.jit.script(PerImageScore()), str(path))
    assert load_torchscript_features(path)(x).shape == (4, 1)


def test_non_finite_reference_features_are_refused_when_the_evaluator_is_built():
    """Sample features that are not finite score NaN (a diverged model); the reference's must stop the run at once,
    not after eval.every steps of training."""
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    with torch.no_grad():
        net[1].bias.fill_(float("nan"))
    with pytest.raises(UsageError, match="reference images' features contain NaN"):
        FidEvaluator(net, torch.zeros(8, 1, 4, 4))
