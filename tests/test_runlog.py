"""runlog.CsvLog: whole rows only; a row appended after a torn last line starts a line of its own."""
import pandas as pd

from adaptive_sched.runlog import CsvLog

COLUMNS = ["run", "method", "steps", "eval_swd"]


def test_a_row_appended_after_a_torn_line_replaces_the_torn_fragment(tmp_path):
    path = tmp_path / "log.csv"
    log = CsvLog(path, COLUMNS)
    log.append({"run": "a", "method": "cosine", "steps": 3, "eval_swd": 0.25})
    with path.open("a") as handle:                       # a write cut short: no newline
        handle.write("a,karras,3,0.1")
    assert len(log.rows()) == 1                          # the torn row does not count
    log.append({"run": "a", "method": "karras", "steps": 3, "eval_swd": 0.125})
    table = pd.read_csv(path)
    assert table.to_dict("records") == [{"run": "a", "method": "cosine", "steps": 3, "eval_swd": 0.25},
                                        {"run": "a", "method": "karras", "steps": 3, "eval_swd": 0.125}]
    assert [r["method"] for r in log.rows()] == ["cosine", "karras"]


def test_a_torn_header_is_written_again(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("run,meth")
    log = CsvLog(path, COLUMNS)
    log.append({"run": "a", "method": "cosine", "steps": 3, "eval_swd": 0.5})
    assert path.read_text() == "run,method,steps,eval_swd\na,cosine,3,0.5\n"
