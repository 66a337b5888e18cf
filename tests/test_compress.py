"""Stage 1a end to end: 1 vs 2 processes, kill and resume, bad inputs, the TorchX component."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import numpy as np
import pytest
from torchx.runner import get_runner
from torchx.specs import AppState

from conftest import REPO_ROOT, small_splits
from iat_torchrec.data.log import validate_log
from iat_torchrec.data.spec import SpecError
from iat_torchrec.tokens.store import TokenStore
from torchx_components import components

SMALL_MODEL = ["--model.token_dim", "16", "--model.dense_arch_layers", "16", "8",
               "--model.decompress_layers", "32", "16", "--model.cross_rank", "8",
               "--model.sit_heads", "2", "--model.sit_context", "8", "--train.log_every", "0",
               "--token_dtype", "fp32"]
# Tokens of 1 and of 2 processes agree within this (measured: about 4e-6).
PROCESS_COUNT_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    return small_splits(tmp_path_factory.mktemp("data"))


def _env():
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _compress_cmd(splits, store: Path, *extra: str) -> List[str]:
    return [sys.executable, str(REPO_ROOT / "apps" / "compress.py"),
            "--train_log", str(splits["train"]), "--valid_log", str(splits["valid"]),
            "--store", str(store), *SMALL_MODEL, *extra]


def _run(cmd: List[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True)
    return done


def _tokens(store: Path):
    s = TokenStore.open(store)
    ids = np.sort(s.column("instance_id"))
    return ids, s.tokens_fp32(s.rows_of(ids))


def test_one_and_two_processes_give_the_same_tokens(splits, tmp_path):
    one = _run(_compress_cmd(splits, tmp_path / "one", "--scheme", "temporal",
                             "--train.batch_size", "128"))
    assert one.returncode == 0, one.stderr[-3000:]
    # Two processes through the TorchX component (dist.ddp -> torchrun), each half the batch.
    app = components.compress(**{
        "train_log": str(splits["train"]), "valid_log": str(splits["valid"]),
        "store": str(tmp_path / "two"), "scheme": "temporal", "train.batch_size": 64,
        "model.token_dim": 16, "model.dense_arch_layers": [16, 8],
        "model.decompress_layers": [32, 16], "model.cross_rank": 8, "model.sit_heads": 2,
        "model.sit_context": 8, "train.log_every": 0, "token_dtype": "fp32", "j": "1x2"})
    os.environ["PATH"] = _env()["PATH"]
    with get_runner() as runner:
        handle = runner.run(app, scheduler="local_cwd",
                            cfg={"log_dir": str(tmp_path / "logs"), "prepend_cwd": True})
        status = runner.wait(handle, wait_interval=1)
    assert status.state == AppState.SUCCEEDED, status
    ids1, t1 = _tokens(tmp_path / "one")
    ids2, t2 = _tokens(tmp_path / "two")
    np.testing.assert_array_equal(ids1, ids2)
    assert ids1.size == sum(validate_log(splits[k]).rows for k in ("train", "valid"))
    assert np.abs(t1 - t2).max() < PROCESS_COUNT_TOLERANCE
    meta = TokenStore.open(tmp_path / "two").metadata
    assert meta["scheme"] == "temporal" and meta["training_window"]["ts_max"] > 0


def test_killed_and_resumed_run_ends_with_the_same_tokens(splits, tmp_path):
    args = ["--scheme", "user", "--train.batch_size", "64", "--train.epochs", "3",
            "--train.checkpoint_every", "3"]
    whole = _run(_compress_cmd(splits, tmp_path / "whole", *args,
                               "--train.checkpoint_dir", str(tmp_path / "ck_whole")))
    assert whole.returncode == 0, whole.stderr[-3000:]
    cmd = _compress_cmd(splits, tmp_path / "resumed", *args,
                        "--train.checkpoint_dir", str(tmp_path / "ck"))
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "ck" / "latest").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "resumed").exists()
    again = _run(cmd)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout
    ids_a, a = _tokens(tmp_path / "whole")
    ids_b, b = _tokens(tmp_path / "resumed")
    np.testing.assert_array_equal(ids_a, ids_b)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_resume_from_another_configuration_is_refused(splits, tmp_path):
    base = ["--scheme", "temporal", "--train.batch_size", "256", "--train.checkpoint_dir",
            str(tmp_path / "ck")]
    assert _run(_compress_cmd(splits, tmp_path / "a", *base)).returncode == 0
    cmd = _compress_cmd(splits, tmp_path / "b", *base)
    cmd[cmd.index("--model.token_dim") + 1] = "32"
    done = _run(cmd)
    assert done.returncode == 2  # an input error: one line, no traceback
    assert "differs in ['model.token_dim']" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "b").exists()


def test_bad_inputs_are_refused_before_any_work(splits, tmp_path):
    from iat_torchrec.config import parse_config
    from iat_torchrec.atomic import OutputExistsError
    from iat_torchrec.stages.compress import CompressConfig, run_compress

    store = tmp_path / "store"
    store.mkdir()
    (store / "keep.txt").write_text("mine")
    cfg = parse_config(CompressConfig, ["--train_log", str(splits["train"]), "--store",
                                        str(store)])
    with pytest.raises(OutputExistsError, match="already exists"):
        run_compress(cfg)
    assert [p.name for p in store.iterdir()] == ["keep.txt"]
    from conftest import tiny_columns, tiny_spec
    import pyarrow as pa
    from iat_torchrec.data.log import write_log
    other = write_log(pa.table(tiny_columns(n=50)), tmp_path / "other", tiny_spec())
    cfg = parse_config(CompressConfig, ["--train_log", str(splits["train"]), "--store",
                                        str(tmp_path / "new"), "--export_logs", str(other)])
    with pytest.raises(SpecError, match="does not match the model's"):
        run_compress(cfg)
    assert not (tmp_path / "new").exists()


def test_post_sit_export_stores_the_sits_outputs_over_every_log_in_user_order(splits, tmp_path,
                                                                               monkeypatch):
    """--export_token post_sit: each instance's SIT output, all export logs read as one in user
    order from an empty context (a valid / test instance sees the user's earlier train rows),
    batch size free; pre_sit (the default) stores z of the same training."""
    import torch

    from iat_torchrec.config import parse_config
    from iat_torchrec.data.reader import InstanceLogReader, ReaderConfig, ReadOrder
    from iat_torchrec.stages import compress

    models = []
    original = compress.compress_post_sit

    def spy(model, *args):
        models.append(model)
        return original(model, *args)

    monkeypatch.setattr(compress, "compress_post_sit", spy)
    logs = [str(splits[k]) for k in ("train", "valid", "test")]
    argv = ["--train_log", logs[0], "--export_logs", *logs, "--scheme", "user",
            "--train.batch_size", "64", *SMALL_MODEL]
    compress.run_compress(parse_config(compress.CompressConfig, [
        *argv, "--store", str(tmp_path / "post"), "--export_token", "post_sit"]))
    compress.run_compress(parse_config(compress.CompressConfig, [
        *argv, "--store", str(tmp_path / "pre")]))
    ids, post = _tokens(tmp_path / "post")
    ids_pre, pre = _tokens(tmp_path / "pre")
    np.testing.assert_array_equal(ids, ids_pre)
    assert ids.size == sum(validate_log(p).rows for p in logs)
    assert TokenStore.open(tmp_path / "post").metadata["export_token"] == "post_sit"
    assert TokenStore.open(tmp_path / "pre").metadata["export_token"] == "pre_sit"

    source = models[0].module
    source.objective.cache.clear()
    reader = InstanceLogReader(logs, config=ReaderConfig(batch_size=1000, order=ReadOrder.USER))
    got_ids, got, z = [], [], []
    with torch.no_grad():
        for b in reader:
            got_ids.append(b.instance_id.numpy())
            got.append(source.sit_tokens(b).numpy())
            z.append(source.tokens(b.sparse_features, b.dense_features).numpy())
    order = np.argsort(np.concatenate(got_ids))
    np.testing.assert_allclose(np.concatenate(got)[order], post, atol=1e-5)
    np.testing.assert_allclose(np.concatenate(z)[order], pre, atol=1e-6)  # same training
    assert np.abs(post - pre).max() > 0.1


def test_post_sit_needs_the_user_scheme():
    from iat_torchrec.stages.compress import CompressConfig

    with pytest.raises(ValueError, match="user scheme"):
        CompressConfig(train_log="x", store="y", scheme="temporal",
                       export_token="post_sit").check()
    with pytest.raises(ValueError, match="export_token"):
        CompressConfig(train_log="x", store="y", export_token="both").check()
