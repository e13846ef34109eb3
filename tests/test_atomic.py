"""atomic_open: the target is replaced whole on success and untouched, with no temp file left, on failure."""
import json

import pytest

from adaptive_sched.atomic import atomic_open, atomic_write_json, atomic_write_text


def test_success_replaces_the_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("old\n")
    with atomic_open(path, "w", newline="") as handle:
        handle.write("a,b\r\n1,2\r\n")
        assert path.read_text() == "old\n"          # readers see the old file until the block ends
    assert path.read_bytes() == b"a,b\r\n1,2\r\n"   # newline="" keeps the csv module's line ends
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failure_keeps_the_old_file_and_removes_the_temp(tmp_path, error):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"previous")
    with pytest.raises(type(error)):
        with atomic_open(path, "wb") as handle:
            handle.write(b"half of it")
            raise error
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    with pytest.raises(RuntimeError):               # a new file that fails is never created
        with atomic_open(tmp_path / "new.txt") as handle:
            raise RuntimeError
    assert not (tmp_path / "new.txt").exists() and len(list(tmp_path.iterdir())) == 1


def test_text_and_json_writers(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "héllo\n")
    atomic_write_json(tmp_path / "b.json", {"x": [1, 2.5]})
    assert (tmp_path / "a.txt").read_text() == "héllo\n"
    assert json.loads((tmp_path / "b.json").read_text()) == {"x": [1, 2.5]}
    assert (tmp_path / "b.json").read_text().endswith("\n")


def test_a_checkpoint_that_fails_to_save_keeps_the_old_one(tmp_path):
    """The writers built on atomic_open: a torch.save that fails (an unpicklable object) keeps the old checkpoint."""
    import torch
    from adaptive_sched import checkpoint
    path = tmp_path / "checkpoint.pt"
    checkpoint.atomic_save({"step": 1}, path)
    with pytest.raises(Exception):
        checkpoint.atomic_save({"step": 2, "bad": lambda: 0}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_threads_writing_one_file_each_replace_it_whole(tmp_path):
    """Each writer has its own temp file (pid, thread, random part): concurrent writers never take each other's."""
    import threading
    path, errors = tmp_path / "sweep.json", []

    def write(k):
        try:
            for _ in range(20):
                atomic_write_json(path, {"writer": k, "pad": "x" * 10000})
        except Exception as err:  # noqa: BLE001 - collected for the assert
            errors.append(err)
    threads = [threading.Thread(target=write, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and json.loads(path.read_text())["writer"] in range(8)
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.json"]


def test_a_symlink_keeps_pointing_at_the_replaced_file_and_append_is_refused(tmp_path):
    target, link = tmp_path / "real.csv", tmp_path / "link.csv"
    target.write_text("old\n")
    link.symlink_to(target)
    atomic_write_text(link, "new\n")
    assert link.is_symlink() and target.read_text() == "new\n"
    with pytest.raises(ValueError, match="mode 'w' or 'wb'"):
        with atomic_open(target, "a"):
            pass
    assert target.read_text() == "new\n"


def test_save_figure_writes_a_png_whole_or_keeps_the_old_one(tmp_path):
    from adaptive_sched.plots import _pyplot, save_figure
    plt = _pyplot()
    path = tmp_path / "curves.png"
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    save_figure(fig, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not plt.fignum_exists(fig.number)
    old = path.read_bytes()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])

    def broken_savefig(handle, **kwargs):
        handle.write(b"\x89PNG half")
        raise OSError("disk full")

    fig.savefig = broken_savefig
    with pytest.raises(OSError):
        save_figure(fig, path)
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["curves.png"]
    assert not plt.fignum_exists(fig.number)          # closed even when writing failed
