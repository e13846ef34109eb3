"""sample_run: samples from a trained run's EMA weights; samples that are not finite are refused, not written."""
import numpy as np
import pytest

from adaptive_sched import checkpoint, config as cfg, sample_run
from adaptive_sched.errors import UsageError
from adaptive_sched.train import train


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "cond"
    config = cfg.from_dict({"data": {"name": "gmm", "n": 256}, "model": {"name": "mlp", "hidden": 16, "depth": 1},
                            "train": {"steps": 4, "batch_size": 16, "device": "cpu", "log_every": 2,
                                      "conditional": True},
                            "eval": {"every": 4, "n": 32, "sample_n": 0, "logsnr_points": 3}})
    train(config, out, progress=False)
    return out


def test_guided_samples_are_written_finite(conditional_run, tmp_path):
    path = sample_run.sample_run(conditional_run, 8, tmp_path / "s.npz", steps=5, guidance=2.0)
    with np.load(path) as f:
        assert f["x"].shape[0] == 8 and np.isfinite(f["x"]).all() and float(f["guidance"]) == 2.0


def test_a_guidance_scale_that_overflows_writes_nothing(conditional_run, tmp_path):
    # w = 1e30 is finite, so check_guidance takes it; ε̂_u + w(ε̂_c − ε̂_u) overflows float32 to inf, then NaN
    with pytest.raises(UsageError, match=r"8 of 8 samples hold NaN or infinite values \(guidance 1e\+30"):
        sample_run.sample_run(conditional_run, 8, tmp_path / "s.npz", steps=5, guidance=1e30)
    assert list(tmp_path.iterdir()) == []


def test_unconditional_samples_of_a_run_evaluated_with_guidance(tmp_path):
    """--class none draws from the null class: the run's first [eval] guidance scale (2 here) does not apply, and
    an explicit --guidance other than 1 is refused (it was refused as if the model had no classes)."""
    config = cfg.from_dict({"data": {"name": "gmm", "n": 256}, "model": {"name": "mlp", "hidden": 16, "depth": 1},
                            "train": {"steps": 2, "batch_size": 16, "device": "cpu", "log_every": 2,
                                      "conditional": True},
                            "eval": {"every": 2, "n": 32, "sample_n": 0, "logsnr_points": 3, "guidance": [2.0, 1.0]}})
    train(config, tmp_path / "run", progress=False)
    path = sample_run.sample_run(tmp_path / "run", 8, tmp_path / "s.npz", steps=3, label="none")
    with np.load(path) as f:
        assert float(f["guidance"]) == 1.0 and np.isfinite(f["x"]).all()
    with pytest.raises(UsageError, match="--guidance 3 guides class-conditional samples, not --class none"):
        sample_run.sample_run(tmp_path / "run", 8, tmp_path / "t.npz", steps=3, label="none", guidance=3.0)


def test_a_run_that_never_dropped_labels_has_no_unconditional_branch_to_sample(tmp_path):
    """p_uncond = 0 never trains the null class: guidance other than 1 (which mixes in the unconditional branch)
    and --class none sampled an untrained embedding; both are refused, at train time and at sample time."""
    settings = {"data": {"name": "gmm", "n": 256}, "model": {"name": "mlp", "hidden": 16, "depth": 1},
                "train": {"steps": 2, "batch_size": 16, "device": "cpu", "log_every": 2, "conditional": True,
                          "p_uncond": 0.0},
                "eval": {"every": 2, "n": 32, "sample_n": 0, "logsnr_points": 3, "guidance": [1.0, 2.0]}}
    with pytest.raises(UsageError, match=r"p_uncond = 0 never trains"):
        train(cfg.from_dict(settings), tmp_path / "refused", progress=False)
    settings["eval"]["guidance"] = [1.0]
    train(cfg.from_dict(settings), tmp_path / "run", progress=False)
    sample_run.sample_run(tmp_path / "run", 8, tmp_path / "s.npz", steps=3, guidance=1.0)
    with pytest.raises(UsageError, match=r"p_uncond = 0 never trains"):
        sample_run.sample_run(tmp_path / "run", 8, tmp_path / "t.npz", steps=3, guidance=3.0)
    with pytest.raises(UsageError, match=r"--class none samples the unconditional branch, which this run never"):
        sample_run.sample_run(tmp_path / "run", 8, tmp_path / "t.npz", steps=3, label="none")


def test_sample_replaces_its_own_earlier_output_but_no_other_file(conditional_run, tmp_path, capsys):
    """--out naming an existing .npz that holds no samples (say the npz:PATH data a run trains on) overwrote it."""
    from adaptive_sched.cli import main
    data = tmp_path / "data.npz"
    np.savez(data, x=np.zeros((3, 2)), y=np.arange(3))
    before = data.read_bytes()
    assert main(["sample", str(conditional_run), "--n", "4", "--sample-steps", "2", "--out", str(data)]) == 2
    assert capsys.readouterr().err == (f"error: --out {data} already exists and is not an earlier `sample` output "
                                       f"(an .npz of samples, or a picture): remove it or choose another name\n")
    assert data.read_bytes() == before
    picture = tmp_path / "p.png"
    picture.write_text("not a picture")
    with pytest.raises(UsageError, match="is not an earlier `sample` output"):
        sample_run.sample_run(conditional_run, 4, picture, steps=2)
    for n in (8, 4):                                              # an earlier .npz of samples is replaced
        sample_run.sample_run(conditional_run, n, tmp_path / "s.npz", steps=2)
    classes = checkpoint.load_ema_snapshot(conditional_run)["num_classes"]
    with np.load(tmp_path / "s.npz") as f:                        # (balanced labels 0, 1, ..., K-1, 0, ...)
        assert f["x"].shape[0] == 4 and f["y"].tolist() == [k % classes for k in range(4)] and \
            str(f["sampler"]) == "ddim"
    for n in (8, 4):                                              # and an earlier picture
        sample_run.sample_run(conditional_run, n, tmp_path / "s.png", steps=2)
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_sample_count_whose_samples_do_not_fit_in_memory_is_refused_before_sampling(conditional_run, tmp_path,
                                                                                      monkeypatch):
    """The samples are held whole until written: --n 10^8 sampled for hours, then died out of memory."""
    shape = checkpoint.load_ema_snapshot(conditional_run)["data_shape"]
    per_sample = 4 * int(np.prod(shape)) + 8                      # float32 features and an int64 label
    monkeypatch.setattr(sample_run, "available_memory", lambda: 100 * per_sample)
    real = sample_run.generate
    drawn = []

    def counted(model, target, shape, n, *args, **kwargs):
        drawn.append(n)
        return real(model, target, shape, n, *args, **kwargs)
    monkeypatch.setattr(sample_run, "generate", counted)
    with pytest.raises(UsageError, match=r"--n 101: the samples would take .* GiB, more than the .* GiB of memory "
                                         r"available; sample fewer"):
        sample_run.sample_run(conditional_run, 101, tmp_path / "s.npz", steps=2)
    assert drawn == [] and not (tmp_path / "s.npz").exists()
    sample_run.sample_run(conditional_run, 100, tmp_path / "s.npz", steps=2)      # what fits is sampled
    assert drawn == [100]
    with np.load(tmp_path / "s.npz") as f:
        assert f["x"].shape == (100, *shape)
