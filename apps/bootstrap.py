#!/usr/bin/env python3
"""Install what is missing, then run the main job or the tests.

    python3 apps/bootstrap.py main [pipeline flags]   # set up, run experiments/main.json
    python3 apps/bootstrap.py test [pytest flags]     # set up, run the test suite
    python3 apps/bootstrap.py install                 # set up only

Outside a virtual environment it creates ``.venv`` in the repository and re-runs itself there.
It installs the pinned, tested triple torch 2.13.0 + fbgemm-gpu 1.8.0 + torchrec 1.8.0: the
``fbgemm-gpu-cpu`` distribution on machines without an NVIDIA GPU, ``fbgemm-gpu`` on machines
with one (override with ``IAT_TORCHREC_VARIANT=cpu|cuda``), and torchrec without its dependency
metadata (which would pull the CUDA fbgemm-gpu), then this project (editable) with its
dependencies. Only packages come from the registries; nothing else is downloaded.
Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv"
MAIN_JOB = ROOT / "experiments" / "main.json"  # the main job's settings (CPU-sized)

TORCH = "2.13.0"
FBGEMM = "1.8.0"
TORCHREC = "1.8.0"


def project_requirements() -> Dict[str, str]:
    """pyproject.toml's dependencies and test extras: distribution -> pinned version or ""."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out = {}
    for req in [*project["dependencies"], *project["optional-dependencies"]["test"]]:
        name = re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0]
        pin = re.search(r"==\s*([^,;\s]+)", req)
        out[name] = pin.group(1) if pin else ""
    return out


def _log(msg: str) -> None:
    print(f"[bootstrap] {msg}", flush=True)


def _in_venv() -> bool:
    return sys.prefix != sys.base_prefix


def _variant() -> str:
    forced = os.environ.get("IAT_TORCHREC_VARIANT")
    if forced in ("cpu", "cuda"):
        return forced
    smi = shutil.which("nvidia-smi")
    if smi and subprocess.run([smi, "-L"], capture_output=True).returncode == 0:
        return "cuda"
    return "cpu"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return ""


def _has(dist: str, version: str) -> bool:
    found = _version(dist)
    return bool(found) and (not version or found.split("+")[0] == version)


def _project_installed() -> bool:
    if not _version("iat-torchrec"):
        return False
    try:  # editable install pointing at this checkout
        import iat_torchrec  # noqa: F401
    except ImportError:
        return False
    return Path(iat_torchrec.__file__).resolve().parents[1] == ROOT


def _pip(args: List[str]) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *args]
    _log(" ".join(cmd[2:]))
    subprocess.run(cmd, check=True)


def install() -> None:
    """Install every missing or mismatched requirement into the current environment."""
    fbgemm = "fbgemm-gpu" if _variant() == "cuda" else "fbgemm-gpu-cpu"
    other = "fbgemm-gpu-cpu" if fbgemm == "fbgemm-gpu" else "fbgemm-gpu"
    if _version(other):
        _pip_uninstall(other)
    if not (_has("torch", TORCH) and _has(fbgemm, FBGEMM)):
        _pip([f"torch=={TORCH}", f"{fbgemm}=={FBGEMM}"])
    if not _has("torchrec", TORCHREC):
        _pip(["--no-deps", f"torchrec=={TORCHREC}"])
    if not (_project_installed() and all(_has(d, v) for d, v in project_requirements().items())):
        _pip(["-e", f"{ROOT}[test]"])


def _pip_uninstall(dist: str) -> None:
    _log(f"removing {dist} (the other fbgemm variant)")
    subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", dist], check=True)


def _run(cmd: List[str]) -> int:
    env = dict(os.environ)
    # torchx's dist.ddp launches torchrun through a shell: this environment's bin must be on PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


def main(argv: List[str]) -> int:
    if not argv or argv[0] not in ("main", "test", "install"):
        print(__doc__)
        return 2
    if not _in_venv():
        if not (VENV / "bin" / "python").exists():
            _log(f"creating the virtual environment {VENV}")
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        os.execv(str(VENV / "bin" / "python"), [str(VENV / "bin" / "python"), __file__, *argv])
    install()
    command, rest = argv[0], argv[1:]
    if command == "install":
        return 0
    if command == "main":
        return _run([sys.executable, str(ROOT / "apps" / "pipeline.py"),
                     "--config", str(MAIN_JOB), *rest])
    code = _run([sys.executable, "-m", "pytest", *rest])
    if code == 5:
        print("[bootstrap] pytest collected no tests: treating that as a failure", flush=True)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
