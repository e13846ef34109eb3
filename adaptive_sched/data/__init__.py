"""Dataset registry: `load(spec, split)` for toy, Gaussian-mixture and image datasets; `names()`."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

import torch

from ..errors import UsageError
from . import images
from .dataset import Dataset
from .toy import checkerboard, swissroll

__all__ = ["Dataset", "load", "names", "TEST_SEED_OFFSET"]

TEST_SEED_OFFSET = 1_000_003  # synthetic "test" split = fresh samples with seed + this offset
_TOY_N = 20000
_Opts = SimpleNamespace  # the keyword options of `load`, passed to every loader


def _toy(fn: Callable[[int, torch.Generator], torch.Tensor]) -> Callable[[str, str, _Opts], Dataset]:
    """Loader for a 2-D toy sampler: n points, test split drawn with a shifted seed."""
    def load_toy(arg: str, split: str, o: _Opts) -> Dataset:
        n = _TOY_N if o.n is None else o.n
        seed = o.seed + (TEST_SEED_OFFSET if split == "test" else 0)
        return Dataset(name=fn.__name__, x=fn(n, torch.Generator().manual_seed(seed)))
    return load_toy


def _gmm(arg: str, split: str, o: _Opts) -> Dataset:
    """Gaussian-mixture vectors with their exact mixture as `oracle` (adaptive_sched.data.gmm)."""
    from .gmm import make_gmm_dataset  # lazy: written separately
    kw = {k: v for k, v in (("n", o.n), ("dim", o.dim)) if v is not None}
    return make_gmm_dataset(split=split, seed=o.seed, **kw)


def _split_after(fn: Callable[[], Dataset]) -> Callable[[str, str, _Opts], Dataset]:
    """Loader for a whole image set without an official test set: deterministic 90/10 holdout."""
    return lambda arg, split, o: images.holdout(fn(), split)


# Named datasets -> loader(arg, split, opts). Spec "name" uses arg "", "prefix:PATH" passes PATH.
_NAMED: dict[str, Callable[[str, str, _Opts], Dataset]] = {
    "checkerboard": _toy(checkerboard),
    "swissroll": _toy(swissroll),
    "gmm": _gmm,
    "digits": _split_after(images.digits),
    "mnist5k": _split_after(images.mnist5k),
    "fashion-mnist": lambda arg, split, o: images.fashion_mnist(split, o.data_dir),
}
VECTOR_SETS = ("checkerboard", "swissroll", "gmm")     # the named sets of vectors (every other source: images)
DATA_DIR_SETS = ("fashion-mnist",)                    # the named sets that look for their files in data_dir
_PREFIXED: dict[str, Callable[[str, str, _Opts], Dataset]] = {
    "npz": lambda arg, split, o: images.holdout(images.npz(arg), split),
    "folder": lambda arg, split, o: images.holdout(images.folder(arg, o.resize), split),
    "cifar10": lambda arg, split, o: images.cifar10(arg, split),
}


def names() -> list[str]:
    """Valid dataset specs: registered names, then the PATH-taking forms."""
    return list(_NAMED) + [f"{p}:PATH" for p in _PREFIXED]


def _loader(spec: str) -> tuple[Callable[[str, str, _Opts], Dataset], str]:
    """(loader, its argument) for a dataset spec; UsageError for an unknown name or a prefix without its path."""
    prefix, sep, arg = str(spec).partition(":")
    if sep and prefix in _PREFIXED:
        if not arg:
            raise UsageError(f"{prefix}: needs a path, e.g. {prefix}:/path/to/data")
        return _PREFIXED[prefix], arg
    if not sep and spec in _NAMED:
        return _NAMED[spec], arg
    raise UsageError(f"unknown dataset {spec!r}; valid: {', '.join(names())}")


def check_spec(spec: str) -> None:
    """UsageError unless `spec` names a dataset (checked without loading it)."""
    _loader(spec)


def load(spec: str, split: str = "train", *, data_dir: str | None = None, pad: int = 0,
         resize: int | None = None, n: int | None = None, dim: int | None = None,
         seed: int = 0) -> Dataset:
    """Load dataset `spec` ("name" or "prefix:PATH"), split "train" or "test", images padded/resized."""
    if split not in ("train", "test"):
        raise UsageError(f"unknown split {split!r}; use 'train' or 'test'")
    if n is not None and n < 1:
        raise UsageError(f"n must be a positive number of examples, got {n}")
    loader, arg = _loader(spec)
    if dim is not None and spec != "gmm":
        raise UsageError(f"dim sets the gmm's dimension only; {spec!r} has a fixed shape (drop [data] dim)")
    if n is not None and spec not in VECTOR_SETS:      # (an image set's loader would ignore it: all its images)
        raise UsageError(f"n sets how many examples {', '.join(VECTOR_SETS)} draw; {spec!r} has a fixed set of "
                         f"images (drop [data] n)")
    opts = _Opts(data_dir=data_dir, resize=resize, n=n, dim=dim, seed=seed)
    ds = loader(arg, split, opts)
    if ds.kind == "image":
        return images.transform(ds, pad=pad, resize=resize)
    if pad or resize is not None:
        raise UsageError(f"pad/resize apply to image datasets only; {spec!r} is a vector dataset")
    return ds
