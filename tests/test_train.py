"""Stage 3 end to end on tiny data: compress -> assemble -> train for the history sources none
(TorchRec's DLRM), din and iat; results JSON; resume; bad inputs refused before training."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
from torchx.runner import get_runner
from torchx.specs import AppState

from conftest import small_splits
from iat_torchrec.config import parse_config
from iat_torchrec.data.log import InstanceLogError, log_files
from iat_torchrec.distributed.plan import PlanConfig, run_plan
from iat_torchrec.stages import train as train_stage
from iat_torchrec.stages.compress import CompressConfig, run_compress
from iat_torchrec.stages.train import TrainDownstreamConfig, TrainInputError, run_train
from iat_torchrec.stages.assemble import AssembleConfig, assemble_history
from iat_torchrec.tokens.shards import HistoryShardsError
from iat_torchrec.train.loop import Trainer, plateau_schedule
from torchx_components import components

SMALL_SOURCE = ["--scheme", "temporal", "--model.token_dim", "8", "--model.dense_arch_layers",
                "16", "8", "--model.decompress_layers", "16", "--model.cross_rank", "4",
                "--model.sit_heads", "2", "--model.sit_context", "4", "--train.log_every", "0",
                "--token_dtype", "fp32", "--train.batch_size", "512"]
SMALL_MODEL = ["--model.embedding_dim", "8", "--model.dense_arch_layers", "16",
               "--model.over_arch_layers", "16", "8", "--model.mixer.d0", "8",
               "--model.mixer.num_blocks", "1", "--model.mixer.num_heads", "2",
               "--model.item_feature", "item_id", "--model.item_history_len", "8",
               "--model.din.attention_layers", "16", "--model.iat.adapt_dim", "8",
               "--model.iat.side_dim", "8", "--model.iat.num_layers", "1", "--model.iat.num_heads",
               "2", "--train.batch_size", "256", "--train.log_every", "0"]
METRICS = ("auc", "gauc", "logloss")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Synthetic splits, an IAT store over all three, and history shards of each split."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the test machine is shared
    root = tmp_path_factory.mktemp("train")
    splits = small_splits(root / "data")
    store = root / "iat"
    run_compress(parse_config(CompressConfig, [
        "--train_log", str(splits["train"]), "--store", str(store), "--export_logs",
        *(str(splits[s]) for s in ("train", "valid", "test")), *SMALL_SOURCE]))
    history = {s: assemble_history(AssembleConfig(target_log=str(splits[s]), store=str(store),
                                                  output=str(root / f"hist_{s}"), max_len=16))
               for s in ("train", "valid", "test")}
    yield {"root": root, "splits": splits, "store": store, "history": history}
    torch.set_num_threads(threads)
    if dist.is_initialized():
        dist.destroy_process_group()


def _args(world, source: str, *extra: str) -> list:
    s, h = world["splits"], world["history"]
    args = ["--train_log", str(s["train"]), "--valid_log", str(s["valid"]), "--test_log",
            str(s["test"]), "--model.history_source", source, *SMALL_MODEL]
    if source != "none":
        args += ["--iat_store", str(world["store"]), "--train_history", str(h["train"]),
                 "--valid_history", str(h["valid"]), "--test_history", str(h["test"])]
    return args + list(extra)


@pytest.mark.parametrize("source, interaction", [("none", "dot"), ("din", "mixer"),
                                                 ("iat", "mixer")])
def test_sources_train_and_report_valid_and_test(world, tmp_path, source, interaction):
    out = tmp_path / "results.json"
    got = run_train(parse_config(TrainDownstreamConfig, _args(
        world, source, "--model.interaction", interaction, "--results", str(out))))
    saved = json.loads(out.read_text())
    assert saved["best_epoch"] == 0 and saved["steps"] == got["steps"] > 0
    for split in ("valid", "test"):
        m = saved[split]["click"]
        assert all(math.isfinite(m[k]) for k in METRICS), m
        assert 0.0 <= m["auc"] <= 1.0 and m["count"] > 0
    assert saved["config"]["model"]["history_source"] == source
    print(f"{source}/{interaction}: valid auc {saved['valid']['click']['auc']:.4f} gauc "
          f"{saved['valid']['click']['gauc']:.4f}  test auc {saved['test']['click']['auc']:.4f} "
          f"gauc {saved['test']['click']['gauc']:.4f} logloss "
          f"{saved['test']['click']['logloss']:.4f}")


def test_a_saved_plan_shards_the_tables_as_planned(world, tmp_path):
    """apps/plan.py's plan of this feature spec (1 CPU process, table-wise) taken by the train
    stage: the same metrics as planning on the live process group; a plan for another world
    size is refused naming the file."""
    plan = tmp_path / "plan.json"
    run_plan(parse_config(PlanConfig, [
        "--model.spec", str(world["splits"]["train"]), "--model.spec_dim", "8",
        "--cluster.hosts", "1", "--cluster.devices_per_host", "1", "--cluster.device", "cpu",
        "--planner.sharding_types", "table_wise", "--out", str(plan)]))
    planned = run_train(parse_config(TrainDownstreamConfig, _args(world, "none")))
    saved = run_train(parse_config(TrainDownstreamConfig, _args(
        world, "none", "--sharding.plan_file", str(plan))))
    assert saved["test"] == planned["test"]
    other = json.loads(plan.read_text())
    other["world_size"] = 2
    (tmp_path / "two.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="two.json: planned for 2 cpu processes"):
        run_train(parse_config(TrainDownstreamConfig, _args(
            world, "none", "--sharding.plan_file", str(tmp_path / "two.json"))))


def test_the_row_groups_partition_reads_the_same_in_one_process(world):
    """--train.partition row_groups (each process decodes only its own row groups), with or
    without --train.shuffle_window, changes nothing for one process."""
    steps = run_train(parse_config(TrainDownstreamConfig, _args(world, "iat")))
    groups = run_train(parse_config(TrainDownstreamConfig, _args(
        world, "iat", "--train.partition", "row_groups")))
    assert groups["test"] == steps["test"]
    assert groups["config"]["train"]["partition"] == "row_groups"
    windows = run_train(parse_config(TrainDownstreamConfig, _args(
        world, "iat", "--train.partition", "row_groups", "--train.shuffle_window", "2")))
    # This train log is one row group: a window holds the whole share, the same permutation.
    assert windows["test"] == steps["test"]


def test_two_processes_through_the_component_match_one(world, tmp_path, monkeypatch):
    """dist.ddp -> torchrun, 2 gloo processes with half the batch each: the same metrics."""
    one = run_train(parse_config(TrainDownstreamConfig, _args(world, "din")))
    s, h = world["splits"], world["history"]
    app = components.train(**{
        "train_log": str(s["train"]), "valid_log": str(s["valid"]), "test_log": str(s["test"]),
        "model.history_source": "din", "iat_store": str(world["store"]),
        "train_history": str(h["train"]), "valid_history": str(h["valid"]),
        "test_history": str(h["test"]), "model.embedding_dim": 8,
        "model.dense_arch_layers": [16], "model.over_arch_layers": [16, 8],
        "model.mixer.d0": 8, "model.mixer.num_blocks": 1, "model.mixer.num_heads": 2,
        "model.item_feature": "item_id", "model.item_history_len": 8,
        "model.din.attention_layers": [16], "train.batch_size": 128, "train.log_every": 0,
        "results": str(tmp_path / "two.json"), "j": "1x2"})
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    with get_runner() as runner:
        handle = runner.run(app, scheduler="local_cwd",
                            cfg={"log_dir": str(tmp_path / "logs"), "prepend_cwd": True})
        status = runner.wait(handle, wait_interval=1)
    assert status.state == AppState.SUCCEEDED, status
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["world_size"] == 2
    for split in ("valid", "test"):
        for k in METRICS:
            assert abs(two[split]["click"][k] - one[split]["click"][k]) < 1e-4, (split, k)


def test_resume_keeps_the_epochs_and_their_selection(world, tmp_path):
    # The mixer without SIF history rows leaves its recency / side embeddings without a
    # gradient (and without optimizer state): the resume must cope with that.
    ck = ["--train.checkpoint_dir", str(tmp_path / "ck"), "--model.interaction", "mixer"]
    first = run_train(parse_config(TrainDownstreamConfig, _args(world, "none", *ck)))
    assert [e["epoch"] for e in first["epochs"]] == [0]
    again = run_train(parse_config(TrainDownstreamConfig,
                                   _args(world, "none", "--train.epochs", "2", *ck)))
    assert [e["epoch"] for e in again["epochs"]] == [0, 1]
    assert again["epochs"][0] == first["epochs"][0]  # restored from the checkpoint
    assert again["steps"] == 2 * first["steps"]


def test_early_stopping_and_plateau_decay_survive_a_resume(world, tmp_path, monkeypatch):
    scales = []
    set_scale = Trainer.set_lr_scale
    monkeypatch.setattr(Trainer, "set_lr_scale",
                        lambda self, scale: (scales.append(scale), set_scale(self, scale))[1])
    args = _args(world, "none", "--train.epochs", "8", "--patience", "2",
                 "--plateau_lr_factor", "0.5", "--sharding.dense_lr", "0.1",
                 "--sharding.sparse_lr", "0.5",
                 "--train.checkpoint_dir", str(tmp_path / "ck"))
    got = run_train(parse_config(TrainDownstreamConfig, args))
    aucs = [e["valid"]["click"]["auc"] for e in got["epochs"]]
    # It stopped where the schedule says, before the last epoch, each epoch at its scale.
    assert 2 < len(aucs) < 8
    assert plateau_schedule(aucs, 2, 0.5) is None
    assert plateau_schedule(aucs[:-1], 2, 0.5) is not None
    assert scales == [plateau_schedule(aucs[:i], 2, 0.5) for i in range(len(aucs))]
    assert min(scales) < 1.0
    # A rerun resumes at the stop and stops again without a step.
    again = run_train(parse_config(TrainDownstreamConfig, args))
    assert again["epochs"] == got["epochs"] and again["steps"] == got["steps"]


def test_bad_inputs_are_refused_before_training(world, tmp_path, monkeypatch):
    s = world["splits"]
    other = tmp_path / "other_store"
    run_compress(parse_config(CompressConfig, [
        "--train_log", str(s["train"]), "--store", str(other), "--export_logs",
        str(s["train"]), str(s["valid"]), *SMALL_SOURCE]))

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built: the bad input was not refused up front")

    monkeypatch.setattr(train_stage, "build_sharded", no_model)
    monkeypatch.setattr(train_stage, "init_process_group", no_model)
    # History shards assembled on another store (its time index differs: no test rows).
    with pytest.raises(HistoryShardsError, match="re-run apps/assemble.py"):
        run_train(parse_config(TrainDownstreamConfig, _args(world, "iat", "--iat_store",
                                                            str(other))))
    # Token width the model does not expect.
    with pytest.raises(TrainInputError, match="8 wide.*--token_dim 16"):
        run_train(parse_config(TrainDownstreamConfig, _args(world, "iat", "--token_dim",
                                                            "16")))
    # A store of the wrong kind.
    with pytest.raises(TrainInputError, match="must be a 'sif' store"):
        run_train(parse_config(TrainDownstreamConfig, _args(world, "sif_codes", "--sif_store",
                                                            str(world["store"]))))
    # A second IAT branch over the item store's tokens without an item store.
    with pytest.raises(TrainInputError, match="item_store_iat reads the item store's tokens"):
        run_train(parse_config(TrainDownstreamConfig, _args(world, "iat",
                                                            "--model.item_store_iat", "true")))
    # A target log without labels.
    nolabel = tmp_path / "nolabel"
    shutil.copytree(s["test"], nolabel)
    for f in log_files(nolabel):
        table = pq.read_table(f)
        pq.write_table(table.drop_columns(["click"]), f)
    with pytest.raises(InstanceLogError, match="missing label column"):
        run_train(parse_config(TrainDownstreamConfig, _args(world, "none", "--test_log",
                                                            str(nolabel))))
    for f in log_files(nolabel):
        table = pq.read_table(f)
        pq.write_table(table.append_column("click", pa.nulls(table.num_rows, pa.int8())), f)
    with pytest.raises(InstanceLogError, match="all null"):
        run_train(parse_config(TrainDownstreamConfig, _args(world, "none", "--test_log",
                                                            str(nolabel))))

