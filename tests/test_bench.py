"""bench on CPU, tiny configs: every field present and sane, FLOPs counted exactly, JSONL appended, learned-vs-fixed
overhead reported, compile failures fall back to eager, bad input exits 2, concurrent workers aggregate."""
import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from adaptive_sched import bench, config as cfg, train as trainer
from adaptive_sched.models import build_model, count_parameters

DIM, HIDDEN, DEPTH, EMB, FREQS = 8, 32, 2, 16, 64      # FREQS: LogSNREmbedding's sinusoids (2·64 features)
GMM = f"""[data]\nname = "gmm"\nn = 512\ndim = {DIM}\n[model]\nname = "mlp"\nhidden = {HIDDEN}\ndepth = {DEPTH}
emb_dim = {EMB}\n"""
DIGITS = """[data]\nname = "digits"\n[model]\nname = "unet"\nchannels = [8, 16]\nblocks_per_level = 1\nemb_dim = 16\n"""
FAST = ["--device", "cpu", "--steps", "3", "--warmup", "1", "--repeats", "2", "--peak-n", "128", "--quiet"]
SAMPLE = ["--sample-steps", "3"]                  # (refused with --concurrent, which samples nothing)
TRAIN_FIELDS = {"date", "device", "device_type", "torch", "measure", "mode", "data", "shape", "schedule", "batch_size",
                "seed", "model", "params", "flops_per_image", "steps", "warmup", "repeats", "step_ms", "img_s",
                "step_ms_windows", "loss", "skipped_steps", "peak_flops", "mfu", "peak_mem_mb", "mem_kind",
                "compile_failed", "threads"}


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One intra-op thread: on a loaded 2-core machine OpenMP's spinning threads make tiny ops take milliseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")       # for the concurrency workers
    yield
    torch.set_num_threads(threads)


def config_file(tmp_path, text: str) -> str:
    path = tmp_path / "bench.toml"
    path.write_text(text)
    return str(path)


def run_bench(capsys, *args: str) -> tuple[int, list[dict], str]:
    """bench.main in this process; returns (exit status, the JSON lines of stdout, stderr)."""
    status = bench.main(list(args))
    out, err = capsys.readouterr()
    return status, [json.loads(line) for line in out.splitlines() if line.strip()], err


def mlp_train_flops(learned: bool) -> int:
    """FlopCounterMode's count for one MLPDenoiser training step, per example.

    It counts only matmuls (2·in·out per Linear and example; biases, norms, activations, the optimizer and the
    learned schedule's matrix-vector products are not counted). Backward costs 2·in·out for the weight gradient
    and 2·in·out for the input gradient, the latter only where the input needs one: with a fixed schedule the
    sinusoid features of λ and x_λ do not, so the embedding's first layer and `inp` skip it; with the learned
    schedule λ carries gradient to φ, so every layer pays it.
    """
    layers = [(2 * FREQS, EMB, learned), (EMB, EMB, True), (DIM, HIDDEN, learned)]            # embedding, inp
    layers += [(EMB, 2 * HIDDEN, True), (HIDDEN, HIDDEN, True), (HIDDEN, HIDDEN, True)] * DEPTH  # film, fc1, fc2
    layers += [(HIDDEN, DIM, True)]                                                               # out
    return sum(2 * i * o * (2 + needs_grad) for i, o, needs_grad in layers)


def test_mlp_fields_flops_overhead_and_jsonl(tmp_path, capsys):
    out = tmp_path / "results" / "bench.jsonl"
    out.parent.mkdir()
    out.write_text('{"earlier": true}\n')
    status, rows, err = run_bench(capsys, "--config", config_file(tmp_path, GMM), "--batch-size", "64",
                                  "--compare-schedules", "cosine,learned", "--schedule-objective", "cvdm",
                                  "--out", str(out), *FAST, *SAMPLE)
    assert status == 0, err
    assert [(r["measure"], r["schedule"]) for r in rows] == [("train", "cosine"), ("train", "learned"),
                                                             ("sample", "learned")]
    cosine, learned, sample = rows
    assert learned["objective"] == "cvdm" and "objective" not in cosine      # the objective reaches the learned row
    for row in (cosine, learned):
        assert TRAIN_FIELDS <= set(row), TRAIN_FIELDS - set(row)
        assert row["mode"] == "eager" and row["device_type"] == "cpu" and row["torch"] == torch.__version__
        assert row["data"] == "gmm" and row["shape"] == [DIM] and row["model"] == "MLPDenoiser"
        assert row["batch_size"] == 64 and row["skipped_steps"] == 0 and math.isfinite(row["loss"])
        assert row["img_s"] > 0 and row["step_ms"] > 0 and len(row["step_ms_windows"]) == 2
        assert row["img_s"] == pytest.approx(64e3 / row["step_ms"], rel=1e-3)
        assert row["peak_flops"] > 0 and row["mfu"] == pytest.approx(
            row["flops_per_image"] * row["img_s"] / row["peak_flops"], rel=1e-3)
        assert row["peak_mem_mb"] > 10 and row["mem_kind"] == "process_max_rss" and row["compile_failed"] is False
    assert cosine["params"] == learned["params"] == count_parameters(
        build_model("mlp", (DIM,), hidden=HIDDEN, depth=DEPTH, emb_dim=EMB))
    assert cosine["flops_per_image"] == mlp_train_flops(learned=False) == 49152
    assert learned["flops_per_image"] == mlp_train_flops(learned=True)
    assert learned["baseline_schedule"] == "cosine" and math.isfinite(learned["overhead_pct"])
    assert learned["overhead_pct"] == pytest.approx(100 * (learned["step_ms"] / cosine["step_ms"] - 1), abs=0.01)
    assert sample["sample_img_s"] > 0 and sample["sample_steps"] == 3 and sample["sample_n"] == 64
    lines = out.read_text().splitlines()
    assert lines[0] == '{"earlier": true}' and [json.loads(line) for line in lines[1:]] == rows
    from adaptive_sched.bench_table import main as table_main
    assert table_main([str(out), "--markdown"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| measure | mode | schedule | batch | shape | GFLOP | img/s") and len(table) == 2 + 3   # the non-bench line is left out
    gflop = f"{learned['flops_per_image'] / 1e9:.2f}"                                          # 0.00: a tiny MLP
    assert table[3].startswith(f"| train | eager | learned | 64 | {DIM} | {gflop} | ") and f"overhead_pct={learned['overhead_pct']}" in table[3]
    assert f"| {sample['sample_img_s']:.0f} |" in table[4]
    assert table_main([str(tmp_path / "missing.jsonl")]) == 2


def test_tiny_unet_on_digits(tmp_path, capsys):
    status, rows, err = run_bench(capsys, "--config", config_file(tmp_path, DIGITS), "--batch-size", "32",
                                  "--schedule", "laplace", "--schedule-param", "b=1.0", "--modes", "channels_last",
                                  *FAST, *SAMPLE)
    assert status == 0, err
    assert [(r["measure"], r["mode"]) for r in rows] == [("train", "eager"), ("sample", "eager"),
                                                         ("train", "channels_last"), ("sample", "channels_last")]
    eager, channels_last = rows[0], rows[2]
    assert eager["model"] == "UNet" and eager["shape"] == [1, 8, 8] and eager["img_s"] > 0 and eager["mfu"] > 0
    assert channels_last["flops_per_image"] == eager["flops_per_image"] and channels_last["speedup"] > 0
    model = build_model("unet", (1, 8, 8), channels=[8, 16], blocks_per_level=1, emb_dim=16)
    assert eager["params"] == count_parameters(model)
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(32, 1, 8, 8), torch.zeros(32))
    forward = counter.get_total_flops() / 32
    assert 2.5 * forward < eager["flops_per_image"] < 3 * forward    # backward ≈ 2x forward, less conv_in's dx
    assert rows[1]["sample_img_s"] > 0 and rows[3]["sample_img_s"] > 0


class Exploding(torch.nn.Module):
    """What a compiled model that crashes on its first call looks like to the bench."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, *args, **kwargs):
        raise RuntimeError("CUDA error: misaligned address\nCUDA kernel errors might be asynchronously reported")


def test_compile_failure_falls_back_to_eager(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: Exploding(model))
    status, rows, err = run_bench(capsys, "--config", config_file(tmp_path, GMM), "--batch-size", "64", "--compile",
                                  "--no-sample", *FAST)
    assert status == 0, err
    assert "warning: compiled failed, falling back to eager: RuntimeError: CUDA error: misaligned address" in err
    eager, compiled = rows
    assert eager["mode"] == "eager" and eager["compile_failed"] is False and eager["img_s"] > 0
    assert compiled["mode"] == "compiled" and compiled["compile_failed"] is True and compiled["fallback"] == "eager"
    assert compiled["compile_error"] == "RuntimeError: CUDA error: misaligned address"
    assert compiled["img_s"] == eager["img_s"] and compiled["speedup"] == 1.0


def test_compiled_sampling_failure_falls_back_to_eager(tmp_path, capsys, monkeypatch):
    config = cfg.load_toml(config_file(tmp_path, GMM))
    config.train.device = "cpu"
    run = trainer.build(config)
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: Exploding(model))
    row = bench.measure_sample(run, "compiled", SimpleNamespace(sample_steps=2, sample_n=16, repeats=1))
    assert row["compile_failed"] is True and "misaligned address" in row["compile_error"] and row["sample_img_s"] > 0
    assert "compiled sampling failed, falling back to eager" in capsys.readouterr().err


def test_profile_writes_op_tables_and_counts_the_host_ops_of_each_schedule(tmp_path, capsys):
    status, rows, err = run_bench(capsys, "--config", config_file(tmp_path, GMM), "--batch-size", "64", "--no-sample",
                                  "--compare-schedules", "cosine,learned", "--profile", str(tmp_path / "prof"),
                                  "--profile-steps", "2", *FAST)
    assert status == 0, err
    cosine, learned = rows
    for row in rows:
        assert row["profile_steps"] == 2 and row["profile_step_ms"] > 0 and "profile_gpu_busy_ms" not in row
        text = (tmp_path / "prof" / f"eager-{row['schedule']}-b64.txt").read_text()
        assert text.startswith("2 profiled training steps; per step: step_ms ") and "== by CPU time" in text
        assert "aten::addmm" in text and row["profile_file"].endswith(f"eager-{row['schedule']}-b64.txt")
    # the learned schedule's monotone network adds its forward and backward ops to every step
    assert learned["profile_aten_ops"] > cosine["profile_aten_ops"] + 50
    assert "aten::log_sigmoid" in (tmp_path / "prof" / "eager-learned-b64.txt").read_text()


def test_profile_counts_kernels_but_not_the_annotation_ranges_on_the_gpu_timeline():
    from torch.autograd import DeviceType
    from adaptive_sched.bench_profile import is_device_work
    kernel = SimpleNamespace(device_type=DeviceType.CUDA, is_user_annotation=False)
    annotation = SimpleNamespace(device_type=DeviceType.CUDA, is_user_annotation=True)   # e.g. "train_step"
    host = SimpleNamespace(device_type=DeviceType.CPU, is_user_annotation=False)
    assert [is_device_work(e) for e in (kernel, annotation, host)] == [True, False, False]


@pytest.mark.parametrize("args, message", [
    (["--data", "nope"], "unknown dataset"),
    (["--compare-schedules", "cosine,nope"], "unknown schedule 'nope'"),
    (["--batch-size", "100000"], "batch_size must be in 1..512"),
    (["--modes", "eager,turbo"], "unknown mode 'turbo'"),
    (["--steps", "0"], "--steps"),
    (["--profile-steps", "0"], "--profile-steps"),
    (["--profile", "/dev/null/prof"], "--profile /dev/null/prof: cannot make that folder"),
    (["--concurrent", "2,x"], "comma-separated"),
    (["--compare-schedules", "cosine,laplace", "--schedule-objective", "cvdm"],
     "--schedule-objective applies only to a learned schedule, not 'cosine', 'laplace'"),
    # options this bench would not use (each was accepted and dropped)
    (["--profile-steps", "2"], "--profile-steps has no effect without --profile"),
    (["--modes", "eager", "--compile"], "--compile has no effect with --modes (name those modes there)"),
    (["--concurrent", "2", "--compare-schedules", "cosine,learned", "--sample"],
     "--compare-schedules, --sample have no effect with --concurrent (its workers time eager training only)"),
    (["--eval-every", "5", "--log-every", "1"], "--eval-every, --log-every have no effect in bench"),
    (["--compare-schedules", "laplace,learned", "--schedule-param", "b=2"],
     "--schedule-param set schedule 'cosine', which is not among --compare-schedules laplace,learned"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    status, rows, err = run_bench(capsys, "--config", config_file(tmp_path, GMM), *FAST, *args)
    assert status == 2 and rows == [] and message in err and err.startswith("error: ") and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_exits_2(tmp_path, capsys):
    status, rows, err = run_bench(capsys, "--config", config_file(tmp_path, GMM), *FAST, "--device", "cuda")
    assert status == 2 and rows == [] and "no CUDA device" in err


def test_concurrent_workers_aggregate(tmp_path, capsys):
    status, rows, err = run_bench(capsys, "--config", config_file(tmp_path, GMM), "--batch-size", "64",
                                  "--concurrent", "2", *FAST)
    assert status == 0, err
    (row,) = rows
    assert row["measure"] == "concurrent" and row["workers"] == 2 and len(row["img_s_each"]) == 2
    assert row["img_s"] > 0 and all(v > 0 for v in row["img_s_each"]) and row["mfu"] > 0
    assert row["flops_per_image"] == mlp_train_flops(learned=False)


def test_out_is_appended_to_only_when_it_is_json_lines_and_its_folder_exists(tmp_path, capsys):
    """A mistyped folder was made (other commands refuse it), and a file of another kind had JSON lines appended."""
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("step,loss\n1,0.5\n")
    status, rows, err = run_bench(capsys, "--config", config_file(tmp_path, GMM), *FAST, "--no-sample", "--out",
                                  str(metrics))
    assert status == 2 and rows == [] and metrics.read_text() == "step,loss\n1,0.5\n"
    assert err == (f"error: --out {metrics} already exists and is not a file of bench JSON lines (bench appends to "
                   f"one): remove it or choose another name\n")
    status, rows, err = run_bench(capsys, "--config", config_file(tmp_path, GMM), *FAST, "--no-sample", "--out",
                                  str(tmp_path / "reslts" / "b.jsonl"))
    assert status == 2 and rows == [] and err == f"error: output folder does not exist: {tmp_path / 'reslts'}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.toml", "metrics.csv"]


def test_a_channels_last_mode_is_refused_for_vectors_before_any_row(tmp_path, capsys):
    from adaptive_sched.cli import main
    out = tmp_path / "bench.jsonl"
    status = main(["bench", "--data", "gmm", "--model", "mlp", "--device", "cpu", "--modes", "channels_last",
                   "--steps", "1", "--warmup", "0", "--repeats", "1", "--no-sample", "--out", str(out)])
    assert status == 2 and not out.exists()
    assert "channels_last applies to images" in capsys.readouterr().err


def test_bench_table_gives_each_rows_gflop_so_two_nets_are_told_apart(tmp_path):
    from adaptive_sched.bench_table import rows_of
    lines = [{"measure": "train", "mode": "eager", "schedule": "cosine", "batch_size": 512, "shape": [1, 32, 32],
              "flops_per_image": flops, "img_s": 1000.0} for flops in (6840745984, 5086117888)]
    lines.append({"measure": "sample", "mode": "eager", "schedule": "cosine", "batch_size": 512, "sample_img_s": 9.0})
    path = tmp_path / "b.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    assert [row[5] for row in rows_of([path])] == ["6.84", "5.09", ""]
