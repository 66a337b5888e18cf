"""Sequence assembly: leakage properties against a slow reference, shards, partitioning by user
over two processes, the app and its TorchX component, bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import REPO_ROOT, tiny_columns, tiny_spec
from iat_torchrec.config import parse_config
from iat_torchrec.data.log import InstanceLogError, write_log
from iat_torchrec.data.spec import SpecError
from iat_torchrec.distributed.collectives import DistEnv
from iat_torchrec.history import LABEL_PAD, LABEL_UNKNOWN, HistoryLayout, HistoryMaterializer
from iat_torchrec.stages.assemble import AssembleConfig, assemble_history, user_partition
from iat_torchrec.tokens.shards import HistoryShards, HistoryShardsError, query_history
from iat_torchrec.tokens.store import TokenStore
from iat_torchrec.tokens.time_index import UnknownUserError
from torchx_components import components

D = 4


def build_store(path: Path, ids, users, ts, labels, chunks: int = 2) -> TokenStore:
    n = len(ids)
    w = TokenStore.create(path, kind="iat", token_shape=(D,), dtype="fp32",
                          metadata={"label_delay_s": 60}, overwrite=True)
    for part in np.array_split(np.random.default_rng(n).permutation(n), chunks):
        w.append(np.asarray(ids)[part], np.asarray(users)[part], np.asarray(ts)[part],
                 np.asarray(labels)[part], np.ones((part.size, D), np.float32))
    return w.close()


def reference_history(ids, users, ts, labels, user: int, t: int,
                      layout: HistoryLayout) -> List[Tuple[int, int, int]]:
    """Obviously correct: (instance_id, label side information, gap bucket) per step."""
    earlier = sorted((ts[i], ids[i], i) for i in range(len(ids)) if users[i] == user and ts[i] < t)
    steps = []
    for ts_i, id_i, i in earlier[max(0, len(earlier) - layout.max_len):]:
        label = labels[i] if ts_i + layout.label_delay_s <= t else LABEL_UNKNOWN
        bucket = sum(1 for b in layout.gap_boundaries_s if b <= t - ts_i)
        steps.append((id_i, label, bucket))
    return steps


# --------------------------------------------------------------------------- leakage properties
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_history_equals_reference_and_never_leaks(data):
    n = data.draw(st.integers(1, 50), label="n")
    users = data.draw(st.lists(st.integers(0, 4), min_size=n, max_size=n), label="users")
    ts = data.draw(st.lists(st.integers(0, 30), min_size=n, max_size=n), label="ts")
    labels = data.draw(st.lists(st.integers(0, 1), min_size=n, max_size=n), label="labels")
    ids = [7 * i + 3 for i in data.draw(st.permutations(range(n)), label="id order")]
    layout = HistoryLayout(
        max_len=data.draw(st.integers(1, 8), label="L"),
        label_delay_s=data.draw(st.integers(0, 12), label="delay"),
        gap_boundaries_s=tuple(sorted(data.draw(st.sets(st.integers(1, 30), max_size=4)))))
    q = data.draw(st.integers(1, 20), label="queries")
    q_users = data.draw(st.lists(st.sampled_from(sorted(set(users))), min_size=q, max_size=q))
    q_ts = data.draw(st.lists(st.integers(0, 40), min_size=q, max_size=q))
    with tempfile.TemporaryDirectory() as tmp:
        store = build_store(Path(tmp) / "s", ids, users, ts, labels)
        h = query_history(store, np.array(q_users), np.array(q_ts), layout, method="jagged")
        dense = query_history(store, np.array(q_users), np.array(q_ts), layout, method="dense")
        for a, b in zip(h.tensors(), dense.tensors()):
            assert torch.equal(a, b)
        row_ts, row_id = store.column("ts"), store.column("instance_id")
        row_label = store.column("label")
    L = layout.max_len
    assert h.row_ids.shape == h.mask.shape == h.label.shape == h.gap_bucket.shape == (q, L)
    for i, (user, t) in enumerate(zip(q_users, q_ts)):
        want = reference_history(ids, users, ts, labels, user, t, layout)
        k = int(h.length[i])
        assert k == len(want) <= L
        rows = h.row_ids[i, :k].numpy()
        # Equal to the slow reference.
        assert [(int(row_id[r]), int(h.label[i, j]), int(h.gap_bucket[i, j]))
                for j, r in enumerate(rows)] == want
        # And the properties, checked directly: strictly before t, oldest first (ties by id),
        # labels only once matured, everything after the history padded and masked.
        assert (row_ts[rows] < t).all()
        assert sorted(zip(row_ts[rows], row_id[rows])) == list(zip(row_ts[rows], row_id[rows]))
        matured = row_ts[rows] + layout.label_delay_s <= t
        assert np.array_equal(h.label[i, :k].numpy() != LABEL_UNKNOWN, matured)
        assert np.array_equal(h.label[i, :k].numpy()[matured], row_label[rows][matured])
        assert h.mask[i, :k].all() and not h.mask[i, k:].any()
        assert (h.row_ids[i, k:] == -1).all() and (h.label[i, k:] == LABEL_PAD).all()
        assert (h.gap_bucket[i, k:] == layout.gap_pad).all()


def test_no_history_and_unknown_users(tmp_path):
    store = build_store(tmp_path / "s", [1, 2, 3], [5, 5, 6], [100, 100, 50], [1, 0, 1])
    layout = HistoryLayout(max_len=4, label_delay_s=10)
    h = query_history(store, np.array([5, 5, 5, 6]), np.array([100, 101, 0, 51]), layout)
    assert h.length.tolist() == [0, 2, 0, 1]  # ties at t=100 are not "before"
    for method in ("jagged", "dense"):  # a batch without any history at all
        empty = query_history(store, np.array([5, 6]), np.array([100, 50]), layout, method=method)
        assert empty.row_ids.shape == (2, 4) and not empty.mask.any()
        assert (empty.row_ids == -1).all() and (empty.label == LABEL_PAD).all()
    assert not h.mask[0].any() and (h.row_ids[0] == -1).all()
    assert h.label[1, :2].tolist() == [LABEL_UNKNOWN, LABEL_UNKNOWN]  # 100 + 10 > 101
    with pytest.raises(UnknownUserError, match=r"user_id 9 \(first at sample 1\)"):
        query_history(store, np.array([5, 9]), np.array([200, 200]), layout)
    h = query_history(store, np.array([5, 9]), np.array([200, 200]), layout,
                      allow_unknown_users=True)
    assert h.length.tolist() == [2, 0] and not h.mask[1].any()


# --------------------------------------------------------------------------- shards end to end
@pytest.fixture
def log_and_store(tmp_path) -> Tuple[Path, TokenStore, Dict[str, np.ndarray]]:
    cols = tiny_columns(600, seed=4)
    cols["ts"] = cols["ts"] // 500 * 500  # ties
    log = tmp_path / "log"
    write_log(pa.table(cols), log, tiny_spec(), rows_per_file=250, row_group_size=100)
    store = build_store(tmp_path / "store", cols["instance_id"], cols["user_id"], cols["ts"],
                        cols["click"], chunks=3)
    return log, store, cols


def assemble_config(log: Path, store: TokenStore, out: Path, **kw) -> AssembleConfig:
    return AssembleConfig(target_log=str(log), store=str(store.path), output=str(out),
                          max_len=16, **kw)


def test_shards_give_every_sample_its_history(tmp_path, log_and_store):
    log, store, cols = log_and_store
    out = assemble_history(assemble_config(log, store, tmp_path / "hist"))
    shards = HistoryShards.open(out)
    m = shards.manifest
    assert m["num_samples"] == 600 and m["label_delay_s"] == tiny_spec().label_delay_s
    assert m["store"]["version"] == store.version and len(m["parts"]) == 1
    ids = cols["instance_id"][::-1]
    begin, length, t = shards.lookup(ids)
    got = shards.materializer(store)(begin, length, t)
    want = query_history(store, cols["user_id"][::-1], cols["ts"][::-1], shards.layout)
    for a, b in zip(got.tensors(), want.tensors()):
        assert torch.equal(a, b)
    assert int(got.length.max()) == 16 and int((got.length == 0).sum()) > 0
    # Shards cut for L = 16, read with L = 5: the newest 5 steps, as if assembled with L = 5.
    short = HistoryLayout(5, shards.layout.label_delay_s, shards.layout.gap_boundaries_s)
    want5 = query_history(store, cols["user_id"][::-1], cols["ts"][::-1], short)
    for method in ("jagged", "dense"):
        got5 = HistoryMaterializer(store.time_index, short)(begin, length, t, method=method)
        for a, b in zip(got5.tensors(), want5.tensors()):
            assert torch.equal(a, b)
    with pytest.raises(HistoryShardsError, match=r"1 instance id\(s\) have no history"):
        shards.lookup(np.array([ids[0], -5]))


def test_stale_or_corrupted_shards_are_refused(tmp_path, log_and_store):
    log, store, cols = log_and_store
    out = assemble_history(assemble_config(log, store, tmp_path / "hist"))
    with store.appender() as a:
        a.append(np.array([-1]), np.array([0]), np.array([1]), np.array([0]), np.ones((1, D)))
    with pytest.raises(HistoryShardsError, match="version 1 .* is version 2 .* re-run"):
        HistoryShards.open(out).materializer(TokenStore.open(store.path))
    part = out / "part-00000.parquet"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(HistoryShardsError, match="checksum mismatch"):
        HistoryShards.open(out)
    part.write_bytes(bytes(data[:-10]))
    with pytest.raises(HistoryShardsError, match="truncated"):
        HistoryShards.open(out)


def test_unknown_users_in_the_target_log_are_an_error(tmp_path, log_and_store):
    log, _, cols = log_and_store
    keep = cols["user_id"] != 3
    store = build_store(tmp_path / "partial", cols["instance_id"][keep], cols["user_id"][keep],
                        cols["ts"][keep], cols["click"][keep])
    first = int(np.flatnonzero(~keep)[0])
    with pytest.raises(InstanceLogError, match=rf"part-00000.parquet, column 'user_id', row "
                                               rf"{first}: user_id 3 has no rows in the token "
                                               r"store"):
        assemble_history(assemble_config(log, store, tmp_path / "hist"))
    assert not (tmp_path / "hist").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    out = assemble_history(assemble_config(log, store, tmp_path / "hist",
                                           allow_unknown_users=True))
    _, length, _ = HistoryShards.open(out).lookup(cols["instance_id"][~keep])
    assert (length == 0).all()


def test_label_delay_comes_from_the_store_then_the_spec_unless_given(tmp_path, log_and_store):
    """The store's recorded delay (60: its own domain's), else the target spec's; a longer
    one may be given (cross-domain cases: tests/test_assemble_cross.py)."""
    log, store, cols = log_and_store
    out = assemble_history(assemble_config(log, store, tmp_path / "h1", label_delay_s=90))
    assert HistoryShards.open(out).layout.label_delay_s == 90
    (log / "feature_spec.json").unlink()
    out = assemble_history(assemble_config(log, store, tmp_path / "h2"))
    assert HistoryShards.open(out).layout.label_delay_s == 60
    bare = TokenStore.create(tmp_path / "bare", kind="iat", token_shape=(D,), dtype="fp32")
    bare.append(cols["instance_id"], cols["user_id"], cols["ts"], cols["click"],
                np.ones((len(cols["ts"]), D), np.float32))
    with pytest.raises(SpecError, match="pass --label_delay_s"):
        assemble_history(assemble_config(log, bare.close(), tmp_path / "h3"))
    assert not (tmp_path / "h3").exists()


# --------------------------------------------------------------------------- two processes
def _assemble_worker(rank: int, world: int, tmp: str, config: AssembleConfig) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdzv", rank=rank,
                            world_size=world)
    env = DistEnv(rank, world, rank, torch.device("cpu"))
    try:
        assemble_history(config, env)
        bad = dataclasses.replace(config, output=f"{tmp}/bad", store=f"{tmp}/partial")
        with pytest.raises((InstanceLogError, HistoryShardsError), match="user_id 3|rank"):
            assemble_history(bad, env)
    finally:
        dist.destroy_process_group()


def test_partitioned_by_user_over_two_processes_equals_one(tmp_path, log_and_store):
    log, store, cols = log_and_store
    keep = cols["user_id"] != 3
    build_store(tmp_path / "partial", cols["instance_id"][keep], cols["user_id"][keep],
                cols["ts"][keep], cols["click"][keep])
    one = HistoryShards.open(assemble_history(assemble_config(log, store, tmp_path / "one")))
    config = assemble_config(log, store, tmp_path / "two")
    mp.spawn(_assemble_worker, args=(2, str(tmp_path), config), nprocs=2)
    two = HistoryShards.open(tmp_path / "two")
    assert [p["name"] for p in two.manifest["parts"]] == ["part-00000.parquet",
                                                          "part-00001.parquet"]
    for a, b in ((one.instance_id, two.instance_id), (one.begin, two.begin),
                 (one.length, two.length), (one.ts, two.ts)):
        assert np.array_equal(a, b)
    # Each part holds whole users, the ones user_partition gives its rank.
    for r, p in enumerate(two.manifest["parts"]):
        users = pa.parquet.read_table(tmp_path / "two" / p["name"])["user_id"].to_numpy()
        assert (user_partition(users, 2) == r).all()
    assert not (tmp_path / "bad").exists()


# --------------------------------------------------------------------------- app and component
def test_app_runs_and_its_component_launches_it(tmp_path, log_and_store, capsys):
    """The app and its component (the component's arguments: tests/test_config.py)."""
    from apps import assemble as app

    log, store, _ = log_and_store
    assert app.main(["--target_log", str(log), "--store", str(store.path), "--output",
                     str(tmp_path / "h"), "--max_len", "8", "--gap_boundaries_s", "60",
                     "3600"]) == 0
    assert "samples 600" in capsys.readouterr().out
    shards = HistoryShards.open(tmp_path / "h")
    assert shards.layout == HistoryLayout(8, tiny_spec().label_delay_s, (60, 3600))
    assert parse_config(AssembleConfig, ["--target_log", "a", "--store", "b", "--output", "c"]) \
        == AssembleConfig("a", "b", "c")
    app_def = components.assemble(target_log=str(log), store=str(store.path),
                                  output=str(tmp_path / "x"), j="1x2")
    cmd = " ".join(app_def.roles[0].args)
    assert "--nproc_per_node 2" in cmd and "apps/assemble.py" in cmd
    assert f"--gap_boundaries_s {' '.join(map(str, AssembleConfig('', '', '').gap_boundaries_s))}" \
        in cmd


def test_shard_manifest_is_json_and_records_provenance(tmp_path, log_and_store):
    log, store, _ = log_and_store
    out = assemble_history(assemble_config(log, store, tmp_path / "h"))
    m = json.loads((out / "manifest.json").read_text())
    assert m["store"]["index_checksum"] == store.index_checksum
    assert m["target_log"] == str(log.resolve()) and m["max_len"] == 16


def test_component_runs_partitioned_with_torchx_local_cwd(tmp_path, log_and_store, monkeypatch):
    from torchx.runner import get_runner
    from torchx.specs import AppState

    log, store, _ = log_and_store
    monkeypatch.chdir(REPO_ROOT)
    # local_cwd runs torchrun / python from PATH: make them this environment's.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    app = components.assemble(target_log=str(log), store=str(store.path),
                              output=str(tmp_path / "h"), max_len=16, j="1x2")
    with get_runner() as runner:
        handle = runner.run(app, scheduler="local_cwd", cfg={"log_dir": str(tmp_path / "logs")})
        status = runner.wait(handle, wait_interval=0.5)
    assert status.state == AppState.SUCCEEDED, status
    two = HistoryShards.open(tmp_path / "h")
    assert two.manifest["world_size"] == 2 and two.num_samples == 600
    one = HistoryShards.open(assemble_history(assemble_config(log, store, tmp_path / "one")))
    assert np.array_equal(one.begin, two.begin) and np.array_equal(one.length, two.length)
