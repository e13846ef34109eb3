"""out_paths: where a command writes is checked before the work, and any OSError left is one line, exit 2."""
import pytest
import torch

from adaptive_sched.cli import main
from adaptive_sched.errors import UsageError
from adaptive_sched.out_paths import output_dir, output_file, portable_path

RUN = ["--data", "gmm", "--model", "mlp", "--model-param", "hidden=16", "--model-param", "depth=1", "--steps", "4",
       "--batch-size", "16", "--eval-every", "4", "--device", "cpu", "--quiet"]


def test_output_file_and_dir_refuse_folders_files_and_missing_parents(tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "folder").mkdir()
    assert output_file(tmp_path / "folder" / "a.csv") == tmp_path / "folder" / "a.csv"
    assert output_file(tmp_path / "afile") == tmp_path / "afile"                     # overwriting a file is fine
    with pytest.raises(UsageError, match="is a folder; give a file name"):
        output_file(tmp_path / "folder")
    with pytest.raises(UsageError, match="afile is a file, not a folder"):
        output_file(tmp_path / "afile" / "a.csv")
    with pytest.raises(UsageError, match="output folder does not exist"):
        output_file(tmp_path / "nowhere" / "a.csv")
    assert output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"     # made later, with parents
    assert output_dir(tmp_path / "folder") == tmp_path / "folder"
    with pytest.raises(UsageError, match="is a file, not a folder"):
        output_dir(tmp_path / "afile")
    with pytest.raises(UsageError, match="afile is a file, not a folder"):
        output_dir(tmp_path / "afile" / "sub" / "deeper")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "ok"
    assert main(["train", *RUN, "--schedule", "laplace", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("command", [
    ["train", *RUN, "--schedule", "laplace", "--out", "{file}/sub"],
    ["sample", "{run}", "--n", "8", "--out", "{file}/s.npz"],
    ["sampling-grid", "{run}", "--steps", "5", "--method", "quantile", "--out", "{file}/g.csv"],
    ["export", "{run}", "--out", "{file}/e.csv"],
    ["export", "{run}", "--out", "{folder}"],
    ["grid-eval", "{run}", "--steps", "2", "--methods", "cosine", "--n", "20", "--out", "{file}", "--quiet"],
    ["compare", "{toml}", "--out", "{file}/sub", "--quiet"],
    ["sweep", *RUN[:-1], "--schedule", "laplace", "--trials", "1", "--out", "{file}"],          # (no --quiet)
    ["bench", *RUN[:12], *RUN[14:], "--schedule", "laplace", "--peak-n", "16", "--no-sample", "--warmup", "1",
     "--repeats", "1", "--out", "{folder}"],                     # (not --eval-every: bench refuses it, unused)
], ids=lambda c: c[0] + ("-folder" if "{folder}" in c else ""))
def test_every_command_refuses_an_unwritable_out_in_one_line(tmp_path, run_dir, capsys, command):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "folder").mkdir()
    toml = tmp_path / "c.toml"
    toml.write_text('[data]\nname = "gmm"\n[compare]\nseeds = [0]\nschedules = [{ name = "cosine" }]\n')
    args = [a.format(file=tmp_path / "afile", folder=tmp_path / "folder", run=run_dir, toml=toml) for a in command]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "c.toml", "folder"]   # nothing written, no temp
    assert (tmp_path / "afile").read_text() == "x" and not list((tmp_path / "folder").iterdir())   # file left


def test_an_oserror_the_checks_missed_is_one_line_and_exit_2(monkeypatch, run_dir, tmp_path, capsys):
    from adaptive_sched import export

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "e.csv"))
    monkeypatch.setattr(export, "export", denied)
    assert main(["export", str(run_dir), "--out", str(tmp_path / "e.csv")]) == 2
    assert capsys.readouterr().err == f"error: [Errno 13] Permission denied: '{tmp_path / 'e.csv'}'\n"


def test_portable_path_is_relative_inside_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "repo" / "results" / "run").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "repo")
    assert portable_path("results/run") == "results/run"
    assert portable_path(tmp_path / "repo" / "results" / "run") == "results/run"      # absolute in, relative out
    assert portable_path("results/../results/run/") == "results/run"
    assert portable_path(tmp_path) == str(tmp_path)                                   # outside: absolute
    (tmp_path / "repo" / "linked").symlink_to(tmp_path / "repo" / "results")
    assert portable_path("linked/run") == "linked/run"                                 # a link kept as written


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("[enforce fail at alloc_cpu.cpp:117] . "
                                   "DefaultCPUAllocator: can't allocate memory: you tried to allocate 8000000000000 "
                                   "bytes. Error code 12 (Cannot allocate memory)"),
                                   torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")])
def test_out_of_memory_is_one_line_and_exit_2_and_other_errors_keep_their_traceback(monkeypatch, run_dir, tmp_path,
                                                                                     capsys, error):
    from adaptive_sched import export

    def runs_out(*args, **kwargs):
        raise error
    monkeypatch.setattr(export, "export", runs_out)
    assert main(["export", str(run_dir), "--out", str(tmp_path / "e.csv"), "--points", "1000000000000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: out of memory (") and "ask for less" in err and err.count("\n") == 1

    for text in ("shape mismatch", "expected channels_last memory format"):       # bugs, even when about memory
        def bug(*args, **kwargs):
            raise RuntimeError(text)
        monkeypatch.setattr(export, "export", bug)
        with pytest.raises(RuntimeError, match=text):
            main(["export", str(run_dir), "--out", str(tmp_path / "e.csv")])
