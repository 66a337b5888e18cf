"""TorchX components: a real local run (their arguments: tests/test_config.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from torchx.runner import get_runner
from torchx.specs import AppState

from conftest import REPO_ROOT
from torchx_components import components


def test_prepare_data_component_runs_with_local_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    # local_cwd runs "python" from PATH: make it this interpreter.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    app = components.prepare_data(**{
        "synthetic.num_users": 200, "synthetic.num_items": 100,
        "synthetic.num_instances": 3_000, "synthetic.num_sparse_fields": 6,
        "synthetic.num_dense_fields": 2, "data_dir": str(tmp_path)})
    with get_runner() as runner:
        handle = runner.run(app, scheduler="local_cwd", cfg={"log_dir": str(tmp_path / "logs")})
        status = runner.wait(handle, wait_interval=0.5)
    assert status.state == AppState.SUCCEEDED, status
    (folder,) = tmp_path.glob("synthetic-*")
    assert sorted(p.name for p in folder.glob("splits-*/*") if p.is_dir()) == [
        "test", "train", "valid"]
