"""compare_config: [compare] values are validated in one line each (booleans are no integers, best is a file)."""
import json

import pytest

from adaptive_sched.compare_config import parse
from adaptive_sched.errors import UsageError
from test_compare import write_config


@pytest.mark.parametrize("line, message", [
    ("jobs = true", "jobs must be an integer >= 1, got True"),
    ("samples = true", "samples must be an integer >= 0, got True"),
    ("samples = false", "samples must be an integer >= 0, got False"),
    ("seeds = [true]", "seeds must be a non-empty list of integers"),
])
def test_a_boolean_where_an_integer_is_expected_is_refused(tmp_path, line, message):
    """TOML's true is Python's bool, an int subclass: `jobs = true` ran as jobs = 1, `samples = true` drew 1 sample."""
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace("seeds = [0]", line if line.startswith("seeds") else
                                                 "seeds = [0]\n" + line))
    with pytest.raises(UsageError, match=message) as info:
        parse(config)
    assert "\n" not in str(info.value)
    plan = parse(write_config(tmp_path, extra="jobs = 2\nsamples = 0"))
    assert (plan.jobs, plan.samples) == (2, 0)


def test_compare_refuses_a_boolean_jobs_argument(tmp_path):
    from adaptive_sched.compare import compare
    with pytest.raises(UsageError, match="--jobs must be an integer >= 1, got True"):
        compare(write_config(tmp_path), tmp_path / "out", progress=False, jobs=True)
    assert not (tmp_path / "out").exists()


def with_best(tmp_path, value: str):
    """The tiny comparison's config with its second entry taken from `best = VALUE` (TOML)."""
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace('{ name = "laplace", b = 1.0 }', f"{{ best = {value} }}"))
    return config


@pytest.mark.parametrize("value, message", [
    ('"/tmp"', r"best = '/tmp' is a folder; expected the path of a sweep's best.json, e.g. best = "),
    ('""', r"best = '': expected the path of a sweep's best.json"),
    ("3", r"best = 3: expected the path of a sweep's best.json"),
    ('"cmp.toml"', r"best = 'cmp.toml' is not a JSON file; expected the path of a sweep's best.json"),
])
def test_a_best_that_is_no_best_json_says_what_is_expected(tmp_path, value, message):
    """best = "/tmp" (a folder) ended in IsADirectoryError's traceback; best = 3 said "no such file"."""
    with pytest.raises(UsageError, match=message) as info:
        parse(with_best(tmp_path, value))
    assert "\n" not in str(info.value)


def test_a_best_naming_the_sweep_folder_points_at_its_best_json(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "best.json").write_text(json.dumps({"compare_entry": {"name": "laplace", "b": 0.3}}))
    with pytest.raises(UsageError, match=r"is a folder; .*\(did you mean 'sweep/best.json'\?\)"):
        parse(with_best(tmp_path, '"sweep"'))
    assert parse(with_best(tmp_path, '"sweep/best.json"')).entries[1] == {"name": "laplace", "b": 0.3}
