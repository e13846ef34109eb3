"""Tests for adaptive_sched.data: registry, toy sets, image loaders, transforms, bad input."""
from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from adaptive_sched.data import Dataset, images, load, names
from adaptive_sched.errors import UsageError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def test_names_and_unknown_name_lists_them():
    assert names() == ["checkerboard", "swissroll", "gmm", "digits", "mnist5k", "fashion-mnist",
                       "npz:PATH", "folder:PATH", "cifar10:PATH"]
    for spec in ["nope", "npz", "zip:/tmp/x", "Digits"]:
        with pytest.raises(UsageError, match=r"unknown dataset.*: checkerboard, swissroll, .*, cifar10:PATH$"):
            load(spec)


@pytest.mark.parametrize("spec, kw, match", [
    ("checkerboard", {"split": "val"}, "split"), ("checkerboard", {"n": 0}, "n must be"),
    ("npz:", {}, "needs a path"), ("swissroll", {"n": 10, "pad": 2}, "image datasets only"),
    ("digits", {"resize": 2}, "resize must be"), ("digits", {"pad": -1}, "pad must be")])
def test_bad_arguments(spec, kw, match):
    with pytest.raises(UsageError, match=match):
        load(spec, **kw)


def test_dataset_properties():
    ds = Dataset("v", torch.zeros(5, 3), torch.arange(5), 5)
    assert ds.kind == "vector" and ds.shape == (3,) and len(ds) == 5
    img = Dataset("i", torch.zeros(4, 1, 8, 8))
    assert img.kind == "image" and img.shape == (1, 8, 8) and len(img) == 4
    moved = ds.to("cpu")
    assert moved is not ds and moved.num_classes == 5 and torch.equal(moved.y, ds.y) and img.to("cpu").y is None


@pytest.mark.parametrize("name", ["checkerboard", "swissroll"])
def test_toy_shape_determinism_and_scale(name):
    a = load(name, seed=3)
    assert a.x.shape == (20000, 2) and a.x.dtype == torch.float32 and a.y is None and a.kind == "vector"
    assert torch.equal(a.x, load(name, seed=3).x) and not torch.equal(a.x, load(name, seed=4).x)
    test = load(name, "test", seed=3)  # same distribution, fresh samples
    assert test.x.shape == (20000, 2) and not torch.equal(a.x, test.x) and a.num_classes == 0
    assert torch.allclose(a.x.std(0), torch.ones(2), atol=0.05) and a.x.mean(0).abs().max() < 0.05
    assert load(name, n=17).x.shape == (17, 2)


def test_checkerboard_on_alternate_squares():
    x = load("checkerboard", n=5000).x.double() * (4 / 12**0.5) + 2  # back to [0, 4]^2
    assert x.min() >= 0 and x.max() <= 4
    cells = x.floor().clamp(max=3).long()
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all() and len(set(map(tuple, cells.tolist()))) == 8


def test_gmm_registered():
    pytest.importorskip("adaptive_sched.data.gmm")
    tr, te = load("gmm", n=64, dim=4), load("gmm", "test", n=64, dim=4)
    assert tr.x.shape == (64, 4) and tr.x.dtype == torch.float32 and tr.oracle is not None
    assert not torch.equal(tr.x, te.x)


def _check_images(ds, shape, classes):
    assert ds.kind == "image" and ds.shape == shape and ds.x.dtype == torch.float32
    assert ds.x.min() >= -1 and ds.x.max() <= 1
    if classes:
        assert ds.y.dtype == torch.int64 and ds.y.shape == (len(ds),) and ds.num_classes == classes
        assert 0 <= ds.y.min() and ds.y.max() < classes


@pytest.mark.parametrize("name, shape, sizes", [
    ("digits", (1, 8, 8), (1618, 179)), ("mnist5k", (1, 28, 28), (4500, 500))])
def test_bundled_sets_fixed_disjoint_split(name, shape, sizes):
    tr, te = load(name), load(name, "test", seed=123)
    _check_images(tr, shape, 10)
    _check_images(te, shape, 10)
    assert (len(tr), len(te)) == sizes and tr.x.min() == -1 and tr.x.max() == 1
    assert torch.equal(te.x, load(name, "test").x)  # split independent of seed
    rows = {tuple(r) for r in tr.x.flatten(1).tolist()}
    assert sum(tuple(r) in rows for r in te.x.flatten(1).tolist()) < 5  # (few duplicate images)


def test_pad_and_resize():
    base, padded = load("digits", "test"), load("digits", "test", pad=2)
    assert padded.shape == (1, 12, 12)
    assert (padded.x[..., :2, :] == -1).all() and (padded.x[..., :, -2:] == -1).all()
    assert torch.equal(padded.x[..., 2:-2, 2:-2], base.x)
    assert load("digits", "test", resize=16).shape == (1, 16, 16)
    _check_images(load("digits", "test", pad=4, resize=4), (1, 4, 4), 10)


def _npz(tmp_path, **arrays) -> str:
    p = tmp_path / "d.npz"
    np.savez(p, **arrays)
    return str(p)


def _both_splits(spec):
    """Train and test concatenated, ordered by label (labels are original indices here)."""
    tr, te = load(spec), load(spec, "test")
    x, y = torch.cat([tr.x, te.x]), torch.cat([tr.y, te.y])
    return x[y.argsort()]


def test_npz_uint8_nhw_roundtrip(tmp_path):
    a = np.random.default_rng(1).integers(0, 256, (12, 6, 5), dtype=np.uint8)
    x = _both_splits("npz:" + _npz(tmp_path, x=a, y=np.arange(12)))
    assert x.shape == (12, 1, 6, 5) and x.dtype == torch.float32
    assert np.array_equal(((x + 1) / 2 * 255).round().to(torch.uint8)[:, 0].numpy(), a)


def test_npz_float_nhwc_nchw_rgba_and_labels(tmp_path):
    a = np.random.default_rng(2).random((10, 7, 7, 3), dtype=np.float32)  # [0, 1], channels-last
    x = _both_splits("npz:" + _npz(tmp_path, x=a, y=np.arange(10)))
    assert torch.equal(x, torch.from_numpy(a).permute(0, 3, 1, 2) * 2 - 1)
    b = np.random.default_rng(3).uniform(-1, 1, (10, 3, 9, 9)).astype(np.float32)  # NCHW
    assert torch.equal(_both_splits("npz:" + _npz(tmp_path, x=b, y=np.arange(10))), torch.from_numpy(b))
    a = np.zeros((5, 6, 6, 4), dtype=np.uint8)  # RGBA: alpha dropped; array not named "x" is used
    ds = load("npz:" + _npz(tmp_path, images=a))
    assert ds.shape == (3, 6, 6) and ds.y is None and ds.num_classes == 0 and len(ds) == 4
    ds = load("npz:" + _npz(tmp_path, x=a[..., 0], y=np.array([0, 1, 2, 2, 4])), "test")
    assert len(ds) == 1 and ds.num_classes == 5


@pytest.mark.parametrize("shape", [(6, 1, 4, 4), (6, 3, 4, 4), (6, 1, 8, 8), (6, 3, 4, 9), (6, 3, 16, 4)])
def test_npz_channels_first_at_the_smallest_sizes(tmp_path, shape):
    b = np.random.default_rng(4).uniform(-1, 1, shape).astype(np.float32)   # 4 x 4 images were read as H x W x C
    assert torch.equal(_both_splits("npz:" + _npz(tmp_path, x=b, y=np.arange(6))), torch.from_numpy(b))


@pytest.mark.parametrize("arrays, match", [
    ({"x": np.zeros((4, 8), np.uint8)}, "shape"), ({"x": np.zeros((4, 1, 8, 8, 1))}, "shape"),
    ({"x": np.zeros((4, 5, 8, 7))}, "shape"), ({"x": np.zeros((0, 8, 8), np.uint8)}, "empty"),
    ({"x": np.full((4, 8, 8), np.nan, np.float32)}, "NaN"), ({"x": np.full((4, 8, 8), np.inf)}, "inf"),
    ({"x": np.full((4, 8, 8), 2.0)}, "expected"), ({"x": np.full((4, 8, 8), 300)}, "0..255"),
    ({"x": np.zeros((4, 8, 8), bool)}, "dtype"), ({"x": np.zeros((4, 8, 8)), "y": np.zeros(3, int)}, "labels"),
    ({"x": np.zeros((4, 8, 8)), "y": np.array([0, 1, -1, 0])}, "labels"),
    ({"x": np.zeros((4, 8, 8)), "y": np.zeros(4)}, "labels"), ({"x": np.zeros((1, 8, 8))}, "at least 2"),
    ({"x": np.zeros((4, 2, 2))}, "at least 4x4"), ({}, "no arrays"),
])
def test_npz_malformed(tmp_path, arrays, match):
    with pytest.raises(UsageError, match=match):
        load("npz:" + _npz(tmp_path, **arrays))


@pytest.mark.parametrize("content, match", [
    (b"not a zip", "cannot read"), ("object", "cannot read"), (None, "not found: .*none.npz")])
def test_npz_unreadable_and_missing(tmp_path, content, match):
    p = tmp_path / "none.npz"
    if content == "object":
        np.savez(p, x=np.array([{"a": 1}], dtype=object))
    elif content is not None:
        p.write_bytes(content)
    with pytest.raises(UsageError, match=match):
        load(f"npz:{p}")


def _png(path: Path, value, mode="L", size=(6, 5)):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


def test_folder_grayscale_with_subfolder_labels(tmp_path):
    for i, cls in enumerate(["cat", "ant", "bee"]):  # sorted: ant=0, bee=1, cat=2
        for j in range(3):
            _png(tmp_path / cls / f"{j}.PNG", 20 * i + j)
    tr, te = load(f"folder:{tmp_path}"), load(f"folder:{tmp_path}", "test")
    _check_images(tr, (1, 5, 6), 3)
    assert (len(tr), len(te)) == (8, 1)
    x, y = torch.cat([tr.x, te.x]), torch.cat([tr.y, te.y])
    values = ((x[:, 0, 0, 0] + 1) / 2 * 255).round().long()  # pixel value 20 * i + j
    assert sorted(values.tolist()) == [0, 1, 2, 20, 21, 22, 40, 41, 42]
    assert ((values // 20 + 2) % 3).tolist() == y.tolist() and (x == x[:, :, :1, :1]).all()


def test_folder_rgb_flat_sizes_resize_and_bad_files(tmp_path):
    with pytest.raises(UsageError, match=f"not found: {tmp_path / 'nope'}"):
        load(f"folder:{tmp_path / 'nope'}")
    with pytest.raises(UsageError, match="no .png"):
        load(f"folder:{tmp_path}")
    _png(tmp_path / "a.png", 10)
    _png(tmp_path / "b.jpg", (255, 0, 0), "RGB")
    _png(tmp_path / "c.jpeg", 30)
    (tmp_path / "notes.txt").write_text("ignored")
    ds = load(f"folder:{tmp_path}")
    assert ds.shape == (3, 5, 6) and ds.y is None and ds.num_classes == 0 and len(ds) == 2
    _png(tmp_path / "d.png", 30, size=(9, 9))
    with pytest.raises(UsageError, match="d.png.*--resize"):
        load(f"folder:{tmp_path}")
    assert load(f"folder:{tmp_path}", resize=8, pad=1).shape == (3, 8, 8)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(UsageError, match="cannot read image .*broken.png"):
        load(f"folder:{tmp_path}")


def _fake_cifar(root: Path, n: int = 2) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = np.full((n, 3072), 10 * i, dtype=np.uint8)
        data[:, 1024:2048] = 200  # green plane
        raw = pickle.dumps({b"batch_label": b"fake", b"data": data, b"labels": [i] * n}, protocol=2)
        if i % 2:  # emulate the original Python-2 era pickles' numpy module path
            raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        (d / name).write_bytes(raw)
    return d


def test_cifar10_fake(tmp_path):
    d = _fake_cifar(tmp_path)
    tr = load(f"cifar10:{tmp_path}")  # parent dir works
    te = load(f"cifar10:{d}", "test")  # the batches dir itself works
    _check_images(tr, (3, 32, 32), 10)
    assert (len(tr), len(te)) == (10, 2) and tr.y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert torch.equal(tr.x[2, 0], torch.full((32, 32), 10 / 255 * 2 - 1))
    assert (tr.x[:, 1] == 200 / 255 * 2 - 1).all() and te.y.tolist() == [5, 5]
    (d / "data_batch_3").unlink()
    with pytest.raises(UsageError, match="missing: .*data_batch_3; download"):
        load(f"cifar10:{d}")


class _Evil:
    """Pickles to a call of os.system that would create a marker file."""
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar10_refuses_code_and_junk(tmp_path):
    d, marker = _fake_cifar(tmp_path), tmp_path / "pwned"
    (d / "test_batch").write_bytes(pickle.dumps({b"data": _Evil(marker), b"labels": []}))
    with pytest.raises(UsageError, match="refusing to load posix.system"):
        load(f"cifar10:{d}", "test")
    assert not marker.exists()
    (d / "test_batch").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(UsageError, match="not a CIFAR-10 batch"):
        load(f"cifar10:{d}", "test")


@pytest.fixture(scope="module")
def fashion():
    if not FASHION_DIR.is_dir():
        pytest.skip(f"{FASHION_DIR} absent (apt-get install dataset-fashion-mnist)")
    return load("fashion-mnist"), load("fashion-mnist", "test")


def test_fashion_mnist_real(fashion):
    tr, te = fashion
    _check_images(tr, (1, 28, 28), 10)
    _check_images(te, (1, 28, 28), 10)
    assert (len(tr), len(te)) == (60000, 10000)
    assert set(tr.y.unique().tolist()) == set(range(10))


def _idx(path: Path, arr: np.ndarray, gz: bool = True):
    raw = bytes([0, 0, 8, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape) + arr.tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def _fake_fashion(d: Path) -> tuple[np.ndarray, np.ndarray]:
    d.mkdir(parents=True, exist_ok=True)
    xs, ys = np.random.default_rng(0).integers(0, 256, (6, 5, 5), np.uint8), np.arange(6, dtype=np.uint8) % 3
    _idx(d / "train-images-idx3-ubyte.gz", xs)
    _idx(d / "train-labels-idx1-ubyte.gz", ys)
    _idx(d / "t10k-images-idx3-ubyte", xs[:2], gz=False)  # uncompressed names accepted too
    _idx(d / "t10k-labels-idx1-ubyte", ys[:2], gz=False)
    return xs, ys


def test_fashion_fake_idx_via_data_dir_and_env(tmp_path, monkeypatch):
    xs, ys = _fake_fashion(tmp_path / "fm")
    tr = load("fashion-mnist", data_dir=str(tmp_path / "fm"))
    assert tr.shape == (1, 5, 5) and tr.y.tolist() == ys.tolist() and tr.num_classes == 3
    assert np.array_equal(((tr.x + 1) / 2 * 255).round().to(torch.uint8)[:, 0].numpy(), xs)
    monkeypatch.setenv("ADAPTIVE_SCHED_DATA", str(tmp_path))  # finds tmp_path/fashion-mnist
    _fake_fashion(tmp_path / "fashion-mnist")
    assert len(load("fashion-mnist", "test")) == 2


@pytest.mark.parametrize("labels, match", [
    (bytes([0, 0, 8, 2, 0, 0, 0, 6, 0, 0, 0, 1]) + bytes(6), "bad magic"),
    (bytes([0, 0, 8, 1, 0, 0, 0, 5]) + bytes(5), "6 images but .* 5 labels"),
    (bytes([0, 0, 8, 1, 0, 0, 0, 9, 1]), "header says"),
    (b"not gzip", "cannot read idx"),
    (None, "not found in: .*sys.*apt-get install dataset-fashion-mnist, or pass --data-dir"),
])
def test_fashion_missing_or_malformed_idx(tmp_path, monkeypatch, labels, match):
    monkeypatch.delenv("ADAPTIVE_SCHED_DATA", raising=False)
    monkeypatch.setattr(images, "FASHION_SYSTEM_DIR", str(tmp_path / "sys"))
    if labels is not None:
        _fake_fashion(tmp_path)
        raw = labels if labels == b"not gzip" else gzip.compress(labels)
        (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(raw)
    with pytest.raises(UsageError, match=match):
        load("fashion-mnist", data_dir=str(tmp_path))


@pytest.mark.parametrize("spec", ["digits", "fashion-mnist"])
def test_n_is_refused_for_image_sets_rather_than_ignored(spec):
    """[data] n = 100 with digits trained on all 1,618 training images (and fashion-mnist on 60,000) without a word."""
    with pytest.raises(UsageError, match=f"n sets how many examples checkerboard, swissroll, gmm draw; '{spec}' has a "
                                         f"fixed set of images"):
        load(spec, n=100)
    assert len(load("gmm", n=100, dim=2)) == 100 and len(load("swissroll", n=100)) == 100


def test_a_damaged_gzip_idx_file_is_a_usage_error(tmp_path, monkeypatch):
    """A .gz whose deflate stream is damaged raised zlib.error (a traceback), not the one-line error."""
    monkeypatch.delenv("ADAPTIVE_SCHED_DATA", raising=False)
    monkeypatch.setattr(images, "FASHION_SYSTEM_DIR", str(tmp_path / "sys"))
    _fake_fashion(tmp_path)
    raw = bytearray(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 6]) + bytes(range(6)) * 50))
    raw[12:20] = b"\xff" * 8                                           # inside the compressed body
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(bytes(raw))
    with pytest.raises(UsageError, match="cannot read idx file .*train-labels-idx1-ubyte.gz"):
        load("fashion-mnist", data_dir=str(tmp_path))


def test_fashion_splits_come_from_one_folder(tmp_path, monkeypatch):
    """A --data-dir holding only the training files got its test split from the next folder searched (here a fake
    system folder of other images): a held-out set that was never this data's."""
    monkeypatch.delenv("ADAPTIVE_SCHED_DATA", raising=False)
    monkeypatch.setattr(images, "FASHION_SYSTEM_DIR", str(tmp_path / "sys"))
    _fake_fashion(tmp_path / "sys")
    mine = tmp_path / "mine"
    _fake_fashion(mine)
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (mine / stem).unlink()
    assert len(load("fashion-mnist", data_dir=str(mine))) == 6
    with pytest.raises(UsageError, match=r"mine holds part of fashion-mnist but not its test split's "
                                         r"t10k-images-idx3-ubyte\(.gz\) and t10k-labels-idx1-ubyte\(.gz\)"):
        load("fashion-mnist", "test", data_dir=str(mine))
    assert len(load("fashion-mnist", "test")) == 2                    # the system folder, whole, still serves
