"""Feature networks for FID/KID on our datasets, a disk cache for them, and the FidEvaluator.

Inception-v3 features mean little on 8x8 digits or 28x28 Fashion-MNIST, so by default each dataset gets
its own small network, trained once on its training split and cached on disk:
- labelled images: a small CNN classifier; features = its global-average-pooled last conv layer
  (the layer under the linear classifier, like Inception's pool3); info reports test accuracy.
- unlabelled images: a small autoencoder; features = its bottleneck; info reports test reconstruction MSE.
- vectors (N, D): identity features (nothing to train: FID is then the Fréchet distance of the
  data's Gaussian fits, which is meaningful for the low-dimensional toy and gmm sets).
A user-supplied TorchScript network (e.g. clean-fid's Inception-v3) can be used instead via
`load_torchscript_features`. Metrics themselves are in adaptive_sched.metrics.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adaptive_sched import checkpoint
from adaptive_sched.atomic import atomic_write_json
from adaptive_sched.errors import UsageError
from adaptive_sched.metrics import feature_stats, frechet_distance_from_stats, kernel_inception_distance

FEATURE_VERSION = 1    # bump when architectures or training change: old cache entries are then ignored
DEFAULT_STEPS = 400    # optimiser steps of batch 128 (about 51k examples seen, whatever the set size)
FEATURE_DIM = 128      # classifier feature width (channels of the last conv layer)
BOTTLENECK_DIM = 64    # autoencoder feature width


def default_cache_dir() -> Path:
    """$ADAPTIVE_SCHED_CACHE, else ~/.cache/adaptive_sched/features."""
    env = os.environ.get("ADAPTIVE_SCHED_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "adaptive_sched" / "features"


def _conv(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    """3x3 conv (no bias) + BatchNorm + ReLU."""
    return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class ConvBody(nn.Sequential):
    """Three conv-BN-ReLU layers (32, 64, 128 channels), the last two stride 2 (all three for >= 16 px)."""

    def __init__(self, in_channels: int, size: int):
        first_stride = 2 if size >= 16 else 1
        super().__init__(*_conv(in_channels, 32, first_stride), *_conv(32, 64, 2), *_conv(64, FEATURE_DIM, 2))


class ConvClassifier(nn.Module):
    """Small CNN classifier: logits = W · GAP(ConvBody(x)) + b; `features` = GAP(ConvBody(x)) (N, 128)."""

    def __init__(self, in_channels: int, size: int, num_classes: int):
        super().__init__()
        self.body = ConvBody(in_channels, size)
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled last conv activations, (N, 128)."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits, (N, num_classes)."""
        return self.head(self.features(x))


class ConvAutoencoder(nn.Module):
    """Small autoencoder: z = Linear(pool4(ConvBody(x))) (N, 64); x̂ = tanh(MLP(z)) reshaped to (N, C, H, W)."""

    def __init__(self, in_channels: int, height: int, width: int):
        super().__init__()
        self.shape = (in_channels, height, width)
        self.body = ConvBody(in_channels, min(height, width))
        self.encode = nn.Linear(FEATURE_DIM * 16, BOTTLENECK_DIM)
        self.decode = nn.Sequential(nn.Linear(BOTTLENECK_DIM, 256), nn.ReLU(),
                                    nn.Linear(256, in_channels * height * width), nn.Tanh())

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Bottleneck code z, (N, 64)."""
        return self.encode(F.adaptive_avg_pool2d(self.body(x), 4).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction x̂ in [-1, 1], same shape as x."""
        return self.decode(self.features(x)).view(-1, *self.shape)


class FeatureExtractor(nn.Module):
    """Wraps a trained network so that calling it returns its `features(x)`, (N, F)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features of images x (N, C, H, W) in [-1, 1]."""
        return self.net.features(x)


def _build(arch: dict) -> nn.Module:
    """The untrained network described by `arch` ({kind, channels, height, width, num_classes})."""
    c, h, w = arch["channels"], arch["height"], arch["width"]
    if arch["kind"] == "classifier":
        return ConvClassifier(c, min(h, w), arch["num_classes"])
    return ConvAutoencoder(c, h, w)


@contextmanager
def _one_thread(device: torch.device):
    """Run with one torch thread on CPU: these nets are too small to gain from threads, lose badly on a
    busy CPU, and one thread makes training bitwise reproducible whatever the core count."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fit(net: nn.Module, x: torch.Tensor, y: torch.Tensor | None, steps: int, seed: int,
         batch_size: int = 128, lr: float = 3e-3) -> None:
    """Adam, LR decaying linearly to 0, seeded epoch order; cross-entropy with labels, else reconstruction MSE."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    batch_size = min(batch_size, len(x))
    order, pos = torch.randperm(len(x), generator=gen), 0
    net.train()
    for _ in range(steps):
        if pos + batch_size > len(order):  # new epoch: fresh seeded permutation
            order, pos = torch.randperm(len(x), generator=gen), 0
        idx = order[pos:pos + batch_size].to(x.device)
        pos += batch_size
        out = net(x[idx])
        loss = F.cross_entropy(out, y[idx]) if y is not None else F.mse_loss(out, x[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()


@torch.no_grad()
def _score(net: nn.Module, x: torch.Tensor, y: torch.Tensor | None, batch_size: int = 1000) -> float:
    """Test accuracy (labels given) or reconstruction MSE (no labels) of `net` on x."""
    total = 0.0
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size]
        out = net(xb)
        if y is not None:
            total += float((out.argmax(1) == y[start:start + batch_size]).sum())
        else:
            total += float((out - xb).square().mean(dim=(1, 2, 3)).sum())
    return total / len(x)


def _cache_key(dataset_name: str, kind: str, train, seed: int, steps: int) -> str:
    """File stem: slug of the name, kind, CxHxW, seed, and a hash of name, size, version, steps and all the data
    (every example: a file re-exported with some images changed trains a new network, never reuses the old one)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", dataset_name).strip("_")[:48] or "data"
    h = hashlib.sha1(f"{dataset_name}|{len(train)}|{FEATURE_VERSION}|{steps}".encode())
    h.update(train.x.detach().cpu().contiguous().numpy().tobytes())
    if train.y is not None:
        h.update(train.y.cpu().numpy().tobytes())
    shape = "x".join(str(s) for s in train.shape)
    return f"{slug}-{kind}-{shape}-seed{seed}-{h.hexdigest()[:10]}"


def _load_cached(arch: dict, weights: Path, sidecar: Path) -> tuple[nn.Module, dict] | None:
    """The cached net and its sidecar info, or None when either file is missing or damaged."""
    if not (weights.is_file() and sidecar.is_file()):
        return None
    try:
        net = _build(arch)
        net.load_state_dict(checkpoint.load(weights)["state_dict"])  # weights_only=True: runs no code
        info = json.loads(sidecar.read_text())
        return (net, info) if isinstance(info, dict) else None
    except (UsageError, KeyError, RuntimeError, ValueError):
        return None  # damaged entry: the caller retrains and overwrites it


def feature_net(dataset_name: str, train, test, seed: int = 0, cache_dir: Path | str | None = None,
                device: torch.device | str = "cpu", *, steps: int = DEFAULT_STEPS) -> tuple[nn.Module, dict]:
    """Feature network for a dataset (N, C, H, W) or (N, D): trained once per key, then loaded from cache_dir.

    Returns (net, info): net maps (N, ...) in [-1, 1] to features (N, F), in eval mode on `device`; info is
    the JSON sidecar {kind, dataset, seed, accuracy | recon_mse, train_examples, feature_dim, steps, key}
    plus "cached" (whether it was loaded). `test` (may be None) is only used for the reported score.
    """
    device = torch.device(device)
    if train.kind == "vector":
        info = {"kind": "identity", "dataset": dataset_name, "seed": seed, "train_examples": len(train),
                "feature_dim": int(np.prod(train.shape)), "cached": False}
        return nn.Flatten().to(device).eval(), info
    if steps < 1:
        raise UsageError(f"steps must be >= 1, got {steps}")
    num_classes = max(train.num_classes, int(train.y.max()) + 1) if train.y is not None else 0
    kind = "classifier" if num_classes >= 2 else "autoencoder"
    c, h, w = train.shape
    arch = {"kind": kind, "channels": c, "height": h, "width": w, "num_classes": num_classes}
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = _cache_key(dataset_name, kind, train, seed, steps)
    weights, sidecar = cache / f"{key}.pt", cache / f"{key}.json"
    cached = _load_cached(arch, weights, sidecar)
    if cached is not None:
        return FeatureExtractor(cached[0]).to(device).eval(), {**cached[1], "cached": True}
    labels = train.y.to(device) if kind == "classifier" else None
    info = {"kind": kind, "dataset": dataset_name, "seed": seed, "train_examples": len(train),
            "feature_dim": FEATURE_DIM if kind == "classifier" else BOTTLENECK_DIM, "steps": steps, "key": key}
    with _one_thread(device), torch.random.fork_rng(devices=[]):
        # initial weights (built on the CPU): the CPU generator alone, restored by fork_rng; torch.manual_seed would
        # also reseed every CUDA generator, so a run's dropout would depend on whether this cache was warm
        torch.random.default_generator.manual_seed(seed)      # the data order has its own generator
        net = _build(arch).to(device)
        _fit(net, train.x.to(device), labels, steps, seed)
        if test is not None and len(test) and kind == "autoencoder":
            info["recon_mse"] = _score(net, test.x.to(device), None)
        elif test is not None and len(test) and test.y is not None:
            info["accuracy"] = _score(net, test.x.to(device), test.y.to(device))
    cache.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    checkpoint.atomic_save({"kind": "feature_net", "arch": arch, "state_dict": state}, weights)
    atomic_write_json(sidecar, info, indent=2)
    return FeatureExtractor(net).eval(), {**info, "cached": False}


class ScriptedFeatures(nn.Module):
    """A TorchScript feature net behind our image convention: x ∈ [-1, 1] → lo + (x+1)/2·(hi−lo), resized."""

    def __init__(self, net: nn.Module, input_size: tuple[int, int] | None, input_range: tuple[float, float],
                 channels: int | None, forward_kwargs: dict | None):
        super().__init__()
        self.net, self.input_size, self.channels = net, input_size, channels
        self.lo, self.hi = float(input_range[0]), float(input_range[1])
        self.forward_kwargs = dict(forward_kwargs or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features (N, F) of images x (N, C, H, W) in [-1, 1]."""
        if self.channels is not None and x.shape[1] != self.channels:
            if x.shape[1] == 1:
                x = x.repeat(1, self.channels, 1, 1)  # grayscale repeated to the channels the net wants
            else:
                raise UsageError(f"images have {x.shape[1]} channels but the feature net wants {self.channels}")
        if self.input_size is not None and tuple(x.shape[2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False)
        x = self.lo + (x + 1) / 2 * (self.hi - self.lo)
        try:
            out = self.net(x, **self.forward_kwargs)
        except torch.OutOfMemoryError:
            raise                                 # the device's limit, not the network's fault
        except (RuntimeError, torch.jit.Error) as err:      # the user's network failing on our images: a user error
            last = (str(err).strip().splitlines() or [type(err).__name__])[-1]    # TorchScript's own traceback ends
            raise UsageError(f"the feature network failed on images of shape {tuple(x.shape)} "
                             f"({type(err).__name__}): {last[:160]}") from None
        if not isinstance(out, torch.Tensor) or out.ndim < 1 or out.shape[0] != x.shape[0]:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise UsageError(f"the feature network must return (N, F) features for N images; for {x.shape[0]} "
                             f"images it returned {shape}")
        return out.reshape(x.shape[0], -1)


def load_torchscript_features(path: str | Path, input_size: int | tuple[int, int] | None = None,
                              input_range: tuple[float, float] = (-1.0, 1.0), channels: int | None = None,
                              forward_kwargs: dict | None = None) -> nn.Module:
    """A user-supplied TorchScript feature network, wrapped as ScriptedFeatures (see its docstring).

    E.g. the Inception-v3 file clean-fid uses (NVIDIA's inception-2015-12-05.pt): input_range=(0, 255),
    channels=3, forward_kwargs={"return_features": True}; that network resizes to 299 itself, as in
    clean-fid's resize_inside=True / StyleGAN2-ADA mode (not clean-fid's default PIL-bicubic "clean" mode).
    channels=None passes images through; channels=3 repeats 1-channel images to 3.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"feature network not found: {path}; pass the path of a TorchScript (.pt) file")
    try:
        net = torch.jit.load(str(path), map_location="cpu")
    except Exception as err:  # noqa: BLE001 - any parse failure of a user file is the same user error
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UsageError(f"{path} is not a TorchScript file (save it with torch.jit.save): {first[:120]}") from None
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    return ScriptedFeatures(net.eval(), input_size, input_range, channels, forward_kwargs).eval()


@torch.no_grad()
def extract_features(net: nn.Module, x: torch.Tensor, batch_size: int = 500,
                     device: torch.device | str | None = None) -> np.ndarray:
    """Features (N, F) float64 of x (N, ...) in [-1, 1], computed in batches under no_grad."""
    if len(x) == 0:
        raise UsageError("no images to compute features of; pass at least 2 samples")
    if device is None:
        param = next(iter(net.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
    out = [net(x[i:i + batch_size].to(device).float()).reshape(min(batch_size, len(x) - i), -1).double().cpu()
           for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy()


class FidEvaluator:
    """FID and KID of samples against fixed reference images; the reference features/stats are computed once."""

    def __init__(self, net: nn.Module, reference: torch.Tensor, batch_size: int = 500, kid_subsets: int = 100,
                 kid_subset_size: int = 1000, seed: int = 0, device: torch.device | str | None = None):
        self.net, self.batch_size, self.device = net.eval(), batch_size, device
        self.kid = {"subsets": kid_subsets, "subset_size": kid_subset_size, "seed": seed}
        self.reference_features = extract_features(net, reference, batch_size, device)  # (M, F)
        if not np.isfinite(self.reference_features).all():      # now, not at the first eval after training
            raise UsageError("the reference images' features contain NaN or inf; check the data and the feature "
                             "network")
        self.mu, self.sigma = feature_stats(self.reference_features)

    def __call__(self, samples: torch.Tensor) -> dict[str, float]:
        """{"eval_fid": FD(samples, reference), "eval_kid": mean KID over subsets} for samples (N, ...) in [-1, 1]."""
        feats = extract_features(self.net, samples, self.batch_size, self.device)
        fid = frechet_distance_from_stats(*feature_stats(feats), self.mu, self.sigma)
        kid = kernel_inception_distance(feats, self.reference_features, **self.kid)[0]
        return {"eval_fid": fid, "eval_kid": kid}
