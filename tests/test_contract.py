"""The README's contract: its two set-up commands, and .ci/run running the test one."""

from __future__ import annotations

import importlib.util
import re

from conftest import REPO_ROOT

MAIN = "python3 apps/bootstrap.py main"
TEST = "python3 apps/bootstrap.py test"


def _bootstrap():
    spec = importlib.util.spec_from_file_location("bootstrap", REPO_ROOT / "apps" / "bootstrap.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_quick_start_is_exactly_the_two_commands():
    readme = (REPO_ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", quick, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == [MAIN, TEST]


def test_ci_runs_the_readme_test_command():
    lines = [line.strip() for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[-1] in (TEST, f"exec {TEST}")


def test_bootstrap_reads_the_pins_from_pyproject():
    requirements = _bootstrap().project_requirements()
    assert requirements["torch"] == "2.13.0" and requirements["torchx"] == "0.7.0"
    assert {"pyarrow", "numpy", "pytest", "tensordict", "iopath"} <= set(requirements)
    assert "torchrec" not in requirements  # installed --no-deps by the bootstrap itself


def test_bootstrap_without_a_command_shows_usage(capsys):
    assert _bootstrap().main([]) == 2
    assert "apps/bootstrap.py test" in capsys.readouterr().out
