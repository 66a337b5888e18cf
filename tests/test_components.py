"""TorchX components: arguments named like the config dataclasses, and a real local run."""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys
from pathlib import Path

from torchx.runner import get_runner
from torchx.specs import AppState

from conftest import REPO_ROOT
import pytest

from iat_torchrec.data.prepare import DataConfig
from iat_torchrec.pipeline.report import EvaluateConfig
from iat_torchrec.stages.compress import CompressConfig
from iat_torchrec.stages.tokenize import TokenizeConfig
from iat_torchrec.stages.train import TrainDownstreamConfig
from iat_torchrec.tokens.assembly import AssembleConfig
from torchx_components import components

RESOURCE_ARGS = {"image", "cpu", "gpu", "memMB", "h", "j"}


@pytest.mark.parametrize("component, config", [
    (components.prepare_data, DataConfig),
    (components.compress, CompressConfig),
    (components.tokenize, TokenizeConfig),
    (components.assemble, AssembleConfig),
    (components.train, TrainDownstreamConfig),
    (components.evaluate, EvaluateConfig),
])
def test_component_arguments_are_the_config_fields(component, config):
    params = inspect.signature(component).parameters
    fields = {f.name: f for f in dataclasses.fields(config)}
    assert set(params) - RESOURCE_ARGS == set(fields)
    for name, field in fields.items():
        default = (field.default_factory() if field.default_factory is not dataclasses.MISSING
                   else field.default)
        given = params[name].default
        if given is inspect.Parameter.empty:  # required in the component
            assert default in ("", None, dataclasses.MISSING), name
        elif given is None and isinstance(default, list):
            continue  # None stands for the dataclass's default list
        else:
            assert given == default or getattr(default, "value", None) == given, name


def test_prepare_data_component_runs_with_local_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    # local_cwd runs "python" from PATH: make it this interpreter.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    app = components.prepare_data(num_users=200, num_items=100, num_instances=3_000,
                                  num_sparse_fields=6, num_dense_fields=2,
                                  data_dir=str(tmp_path))
    with get_runner() as runner:
        handle = runner.run(app, scheduler="local_cwd", cfg={"log_dir": str(tmp_path / "logs")})
        status = runner.wait(handle, wait_interval=0.5)
    assert status.state == AppState.SUCCEEDED, status
    (folder,) = tmp_path.glob("synthetic-*")
    assert sorted(p.name for p in folder.glob("splits-*/*") if p.is_dir()) == [
        "test", "train", "valid"]
