"""Bad input on the real command lines: one line on stderr, exit code 2; --debug: the traceback."""

import re
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from iat_torchrec.data.errors import INPUT_ERROR_EXIT, is_input_error
from iat_torchrec.data.spec import DenseField, FeatureSpec, SparseField, SpecError

SPEC = FeatureSpec(sparse=[SparseField("product", 100, vocabulary=True)],
                   dense=[DenseField("price")], labels=["click"])
GOOD = "user,time,click,product,price\nu_1,2024-05-01T10:00:00,1,P-78,1.5\n"

# case: (source text, spec, the one-line message's pattern); bad values on line 3
CASES = {
    "missing_policy": (GOOD + "u_2,2024-05-01T11:00:00,0,P-12,\n", SPEC,
                       r"log\.csv, line 3, column 'price': missing value \(empty, null or NaN\), "
                       r"expected a finite number; declare \"missing\": \"mean\""),
    "unknown_column": (GOOD, FeatureSpec(sparse=[*SPEC.sparse, SparseField("colour", 8)],
                                         dense=SPEC.dense, labels=SPEC.labels),
                       r"log\.csv: missing column 'colour' required by the feature spec; the "
                       r"source has columns \['user', 'time', 'click', 'product', 'price'\]"),
    "bad_timestamp": (GOOD + "u_2,yesterday,0,P-12,2\n", SPEC,
                      r"log\.csv, line 3, column 'time': expected a timestamp \(a number of "
                      r"seconds, or ISO-8601 such as 2024-05-01T12:00:00\), got 'yesterday'"),
    "bad_label": (GOOD + "u_2,2024-05-01T11:00:00,2,P-12,2\n", SPEC,
                  r"log\.csv, line 3, column 'click': label 2\.0 is not 0 or 1"),
    "empty_user_ids": ("user,time,click,product,price\n,1,1,P-78,1.5\n,2,0,P-12,2\n", SPEC,
                       r"log\.csv, line 2, column 'user': missing value"),
}


def import_command(tmp_path, case, *extra):
    text, spec, _ = CASES[case]
    (tmp_path / "log.csv").write_text(text)
    spec.save(tmp_path / "spec.json")
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "datasets" / "import_log.py"), "--source",
         str(tmp_path / "log.csv"), "--spec", str(tmp_path / "spec.json"), "--output",
         str(tmp_path / "out"), "--user_column", "user", "--ts_column", "time", *extra],
        capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", list(CASES))
def test_one_line_and_exit_code_2(tmp_path, case):
    done = import_command(tmp_path, case)
    assert done.returncode == INPUT_ERROR_EXIT, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert re.search(CASES[case][2], lines[0]), lines[0]
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback(tmp_path):
    done = import_command(tmp_path, "bad_label", "--debug")
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "SourceFormatError" in done.stderr


def test_a_stage_app_reports_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(REPO_ROOT / "apps" / "prepare_data.py"),
                           "--dataset", str(tmp_path / "nowhere"), "--data_dir",
                           str(tmp_path / "data")], capture_output=True, text=True, timeout=300)
    assert done.returncode == INPUT_ERROR_EXIT
    assert done.stderr.strip() == f"error: {tmp_path / 'nowhere'}: instance log not found"


def test_the_rule():
    assert is_input_error(SpecError("bad spec"))
    assert not is_input_error(ValueError("a bug"))
    assert not is_input_error(KeyError("a bug"))
