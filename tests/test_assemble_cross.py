"""Histories from another domain's token store (issue 17): a target log of domain B assembled
against a store exported from domain A's log, which has its own feature spec, user ids (joined
directly or through a user map) and label delay. Leakage against a brute-force reference, the
label delay rule, coverage warnings and counts, bad user maps, two processes."""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from iat_torchrec.config import ConfigError
from iat_torchrec.data.log import InstanceLogError, write_log
from iat_torchrec.data.spec import DenseField, FeatureGroup, FeatureSpec, SparseField
from iat_torchrec.distributed.collectives import DistEnv
from iat_torchrec.history import LABEL_PAD, LABEL_UNKNOWN
from iat_torchrec.stages.assemble import (AssembleConfig, UserMapError, assemble_history,
                                          user_partition)
from iat_torchrec.tokens.shards import HistoryShards
from iat_torchrec.tokens.store import TokenStore

D = 4
DELAY_A, DELAY_B = 3600, 60
GRID = 600  # timestamps on a 10-minute grid: ties within and across the two logs
SPEC_A = FeatureSpec(sparse=[SparseField("item_a", 40, 4, FeatureGroup.ITEM)],
                     dense=[DenseField("dwell", FeatureGroup.CONTEXT)],
                     labels=["click"], label_delay_s=DELAY_A)
SPEC_B = FeatureSpec(sparse=[SparseField("ad", 30, 4, FeatureGroup.ITEM),
                             SparseField("slot", 5, 4, FeatureGroup.CONTEXT)],
                     dense=[DenseField("bid", FeatureGroup.ITEM)],
                     labels=["conversion"], label_delay_s=DELAY_B)
MAP_OFFSET = 1000  # with a user map, domain B numbers user u as u + 1000


def domain_a(tmp: Path, rng: np.random.Generator, n: int, users: np.ndarray, steps: int,
             delay: Optional[int] = DELAY_A) -> Tuple[TokenStore, Dict[str, np.ndarray]]:
    """Domain A's log, and a store exported from it (random tokens, A's delay recorded)."""
    cols = {"instance_id": rng.permutation(n) + 10**6, "user_id": rng.choice(users, n),
            "ts": rng.integers(0, steps, n) * GRID, "click": rng.integers(0, 2, n),
            "item_a": rng.integers(0, 40, n), "dwell": rng.random(n, dtype=np.float32)}
    write_log(pa.table(cols), tmp / "log_a", SPEC_A, overwrite=True)
    w = TokenStore.create(tmp / "store_a", kind="iat", token_shape=(D,), dtype="fp16",
                          metadata={} if delay is None else {"label_delay_s": delay},
                          overwrite=True)
    w.append(cols["instance_id"], cols["user_id"], cols["ts"], cols["click"],
             rng.normal(size=(n, D)).astype(np.float32))
    return w.close(), cols


def domain_b(tmp: Path, rng: np.random.Generator, n: int, users: np.ndarray, steps: int
             ) -> Dict[str, np.ndarray]:
    """Domain B's target log, in time order, over several files and row groups. Its instance
    ids overlap domain A's: the two id spaces are unrelated."""
    cols = {"instance_id": rng.permutation(n) + 10**6, "user_id": rng.choice(users, n),
            "ts": np.sort(rng.integers(0, steps, n)) * GRID, "conversion": rng.integers(0, 2, n),
            "ad": rng.integers(0, 30, n), "slot": rng.integers(0, 5, n),
            "bid": rng.random(n, dtype=np.float32)}
    write_log(pa.table(cols), tmp / "log_b", SPEC_B, rows_per_file=70, row_group_size=25,
              overwrite=True)
    return cols


def write_map(path: Path, user_id, store_user_id, types=(pa.int64(), pa.int64())) -> Path:
    pq.write_table(pa.table({"user_id": pa.array(user_id, types[0]),
                             "store_user_id": pa.array(store_user_id, types[1])}), path)
    return path


def config(tmp: Path, store: TokenStore, out: str = "hist", **kw) -> AssembleConfig:
    kw.setdefault("max_len", 8)
    return AssembleConfig(target_log=str(tmp / "log_b"), store=str(store.path),
                          output=str(tmp / out), overwrite=True, **kw)


def materialise(shards: HistoryShards, store: TokenStore, ids: np.ndarray):
    """Histories as the downstream reader materialises them (DownstreamReader.extend)."""
    begin, length, t = shards.lookup(ids)
    return shards.materializer(store, "cpu")(begin, length, t), t


# --------------------------------------------------------------------------- leakage properties
@pytest.mark.filterwarnings("ignore:the store .* ends at:UserWarning")
@pytest.mark.parametrize("mapped", [False, True], ids=["same ids", "user map"])
def test_cross_domain_histories_equal_reference_and_never_leak(tmp_path, mapped):
    for seed in range(20):
        rng = np.random.default_rng(seed)
        a_users = np.arange(8)
        b_users = np.arange(4, 12)  # 4..7 in both; 8..11 only in B
        store, a = domain_a(tmp_path, rng, int(rng.integers(20, 120)), a_users, steps=40)
        offset = MAP_OFFSET if mapped else 0  # with the map, B numbers user u as u + 1000
        b = domain_b(tmp_path, rng, int(rng.integers(20, 150)), b_users + offset, steps=45)
        user_map = ""
        in_map = np.array([0, 1, 2, 3, 4, 6, 7, 8, 9])  # 5 (A knows it), 10 and 11 are not
        if mapped:
            user_map = str(write_map(tmp_path / "map.parquet", in_map + MAP_OFFSET, in_map))
        L = int(rng.integers(1, 7))
        shards = HistoryShards.open(assemble_history(config(
            tmp_path, store, max_len=L, user_map=user_map, allow_unknown_users=True)))
        assert shards.layout.label_delay_s == DELAY_A  # the store's domain, not B's 60 s
        store_users = b["user_id"] - offset
        if mapped:
            store_users = np.where(np.isin(store_users, in_map), store_users, -1)  # -1: unmapped
        m = shards.manifest
        target_users = np.unique(b["user_id"])
        known_users = np.unique(store_users[np.isin(store_users, a_users)])
        assert (m["num_users"], m["num_users_in_store"]) == (target_users.size, known_users.size)
        assert m["user_map"] == (str(Path(user_map).resolve()) if mapped else None)

        h, t = materialise(shards, store, b["instance_id"])
        assert torch.equal(t, torch.from_numpy(b["ts"]))
        row_user, row_ts = store.column("user_id"), store.column("ts")
        row_id, row_label = store.column("instance_id"), store.column("label")
        for i in range(b["instance_id"].size):
            user, ti = int(store_users[i]), int(b["ts"][i])
            earlier = sorted((a["ts"][j], a["instance_id"][j], a["click"][j])
                             for j in range(a["ts"].size) if a["user_id"][j] == user
                             and a["ts"][j] < ti)[-L:]
            k = int(h.length[i])
            rows = h.row_ids[i, :k].numpy()
            assert k == len(earlier), (seed, i)
            assert (row_user[rows] == user).all() and (row_ts[rows] < ti).all()
            assert row_id[rows].tolist() == [int(e[1]) for e in earlier]
            shown = [int(c) if ts + DELAY_A <= ti else LABEL_UNKNOWN for ts, _, c in earlier]
            assert h.label[i, :k].tolist() == shown
            assert np.array_equal(row_label[rows], [e[2] for e in earlier])
            assert h.mask[i, :k].all() and not h.mask[i, k:].any()
            assert (h.row_ids[i, k:] == -1).all() and (h.label[i, k:] == LABEL_PAD).all()


# --------------------------------------------------------------------------- label delay
def test_label_delay_is_the_stores_unless_longer_is_given(tmp_path):
    rng = np.random.default_rng(0)
    store, _ = domain_a(tmp_path, rng, 50, np.arange(5), steps=20)
    domain_b(tmp_path, rng, 40, np.arange(5), steps=20)
    m = HistoryShards.open(assemble_history(config(tmp_path, store))).manifest
    assert (m["label_delay_s"], m["label_delay_source"]) == (DELAY_A, "store")
    with pytest.raises(ConfigError) as e:
        assemble_history(config(tmp_path, store, out="short", label_delay_s=DELAY_B))
    assert "\n" not in str(e.value)
    assert f"--label_delay_s {DELAY_B} is shorter than the label delay {DELAY_A} s recorded by " \
           f"the token store {store.path}: labels would be shown before they mature" in str(e.value)
    assert not (tmp_path / "short").exists()
    longer = HistoryShards.open(assemble_history(config(tmp_path, store, label_delay_s=7200)))
    assert (longer.layout.label_delay_s, longer.manifest["label_delay_source"]) == (7200, "given")
    # A store that records no delay: the target log's spec gives it.
    bare, _ = domain_a(tmp_path, rng, 50, np.arange(5), steps=20, delay=None)
    m = HistoryShards.open(assemble_history(config(tmp_path, bare))).manifest
    assert (m["label_delay_s"], m["label_delay_source"]) == (DELAY_B, "spec")


# --------------------------------------------------------------------------- coverage
def test_no_user_in_common_warns_and_gives_empty_histories(tmp_path):
    rng = np.random.default_rng(1)
    store, _ = domain_a(tmp_path, rng, 60, np.arange(5), steps=20)
    b = domain_b(tmp_path, rng, 50, np.arange(100, 105), steps=20)
    with pytest.raises(InstanceLogError, match=r"log_b/part-00000.parquet, column 'user_id', "
                                               r"row 0: user_id \d+ has no rows in the token "
                                               r"store .*; 5 of 5 target users are unknown"):
        assemble_history(config(tmp_path, store))
    path = re.escape(str(store.path.resolve()))
    with pytest.warns(UserWarning, match=rf"^0 of 5 target users have rows in the store {path}: "
                                         "every history is empty$"):
        out = assemble_history(config(tmp_path, store, allow_unknown_users=True))
    shards = HistoryShards.open(out)
    assert shards.num_samples == 50 and (shards.length == 0).all()
    assert (shards.manifest["num_users"], shards.manifest["num_users_in_store"]) == (5, 0)
    h, _ = materialise(shards, store, b["instance_id"])
    assert not h.mask.any() and (h.label == LABEL_PAD).all()


def test_partial_overlap_counts_and_unknown_users_error(tmp_path):
    rng = np.random.default_rng(2)
    store, _ = domain_a(tmp_path, rng, 80, np.arange(6), steps=20)
    b = domain_b(tmp_path, rng, 120, np.arange(3, 10), steps=15)  # 3, 4, 5 known; 6..9 not
    first = int(np.flatnonzero(b["user_id"] >= 6)[0])
    with pytest.raises(InstanceLogError, match=rf"log_b/part-0000{first // 70}.parquet, column "
                                               rf"'user_id', row {first % 70}: user_id "
                                               rf"{b['user_id'][first]} has no rows .*; 4 of 7 "
                                               "target users are unknown to the store"):
        assemble_history(config(tmp_path, store))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # some users known, store long enough
        m = HistoryShards.open(assemble_history(config(tmp_path, store,
                                                       allow_unknown_users=True))).manifest
    assert (m["num_users"], m["num_users_in_store"], m["user_map"]) == (7, 3, None)
    assert sum(p["users"] for p in m["parts"]) == 7
    on_disk = json.loads((tmp_path / "hist" / "manifest.json").read_text())
    assert on_disk["num_users_in_store"] == 3
    assert on_disk["store_ts_max"] == store.manifest["ts_max"]


def test_store_ending_before_the_target_log_warns_with_counts(tmp_path):
    rng = np.random.default_rng(3)
    store, a = domain_a(tmp_path, rng, 80, np.arange(5), steps=20)
    end = int(a["ts"].max())
    b = domain_b(tmp_path, rng, 90, np.arange(5), steps=30)
    later = int((b["ts"] > end).sum())
    assert 0 < later < 90
    path = re.escape(str(store.path.resolve()))
    with pytest.warns(UserWarning, match=rf"^the store {path} ends at {end} "
                                         r"\(1970-01-01 0\d:\d\d:00 UTC\), before the target log "
                                         rf".*log_b, which runs to {b['ts'].max()} \(.* UTC\): "
                                         rf"{later} of 90 target samples are later than every "
                                         "store row, so their histories stop at the store's end$"):
        m = HistoryShards.open(assemble_history(config(tmp_path, store))).manifest
    assert (m["store_ts_max"], m["num_samples_after_store"]) == (end, later)
    # One late sample of 90 (a log that went quiet a little sooner): no warning.
    b["ts"] = np.minimum(b["ts"], end)
    b["ts"][-1] = end + GRID
    write_log(pa.table(b), tmp_path / "log_b", SPEC_B, overwrite=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = HistoryShards.open(assemble_history(config(tmp_path, store))).manifest
    assert m["num_samples_after_store"] == 1
    # A store that ends before the target log begins.
    b["ts"] = b["ts"] + end + GRID
    write_log(pa.table(b), tmp_path / "log_b", SPEC_B, overwrite=True)
    with pytest.warns(UserWarning, match=rf"before the target log .*log_b begins at "
                                         rf"{b['ts'].min()} \(.* UTC\): every one of its 90 "
                                         "target samples is later than every store row"):
        assemble_history(config(tmp_path, store))


# --------------------------------------------------------------------------- bad input
def test_bad_user_maps_are_refused_in_one_line(tmp_path):
    rng = np.random.default_rng(4)
    store, _ = domain_a(tmp_path, rng, 40, np.arange(5), steps=20)
    domain_b(tmp_path, rng, 30, np.arange(5), steps=20)
    f = tmp_path / "map.parquet"
    cases = [
        (lambda: pq.write_table(pa.table({"user_id": pa.array([1, 2], pa.int64())}), f),
         r"map.parquet, column 'store_user_id': missing column"),
        (lambda: write_map(f, [1, 2], [1, 2], (pa.int64(), pa.int32())),
         r"map.parquet, column 'store_user_id': wrong type: expected int64, got int32"),
        (lambda: write_map(f, [1, 2, 3], [1, None, 3]),
         r"map.parquet, column 'store_user_id', row 1: null value"),
        (lambda: write_map(f, [4, 1, 2, 1, 1], [0, 1, 2, 3, 4]),
         r"map.parquet, column 'user_id', row 3: user_id 1 is mapped twice \(rows 1 and 3\)"),
        (lambda: f.write_bytes(b"not parquet"), r"map.parquet: unreadable or corrupted Parquet"),
        (lambda: f.unlink(), r"map.parquet: user map not found"),
    ]
    for make, message in cases:
        make()
        with pytest.raises(UserMapError, match=message) as e:
            assemble_history(config(tmp_path, store, user_map=str(f)))
        assert "\n" not in str(e.value)
        assert not (tmp_path / "hist").exists()


def test_target_log_without_user_ids_is_refused(tmp_path):
    store, _ = domain_a(tmp_path, np.random.default_rng(5), 40, np.arange(5), steps=20)
    (tmp_path / "log_b").mkdir()
    pq.write_table(pa.table({"instance_id": np.arange(5), "ts": np.arange(5) * GRID}),
                   tmp_path / "log_b" / "part-00000.parquet")
    with pytest.raises(InstanceLogError, match=r"log_b/part-00000.parquet, column 'user_id': "
                                               r"missing column: every target sample needs "
                                               r"instance_id, user_id, ts \(user_id joins it to "
                                               "its history in the token store\\)"):
        assemble_history(config(tmp_path, store))


@pytest.mark.filterwarnings("ignore:the store .* ends at:UserWarning")
def test_any_int64_user_ids(tmp_path):
    """A store made directly with TokenStore.create, over extreme int64 user ids."""
    users = np.array([np.iinfo(np.int64).min, -5, 0, 2**62, np.iinfo(np.int64).max])
    rng = np.random.default_rng(6)
    store, a = domain_a(tmp_path, rng, 60, users, steps=10)
    b = domain_b(tmp_path, rng, 40, users, steps=12)
    shards = HistoryShards.open(assemble_history(config(tmp_path, store, max_len=100)))
    want = [sum(1 for u, ts in zip(a["user_id"], a["ts"]) if u == user and ts < t)
            for user, t in zip(b["user_id"], b["ts"])]
    _, length, _ = shards.lookup(b["instance_id"])
    assert length.tolist() == want
    assert shards.manifest["num_users_in_store"] == len(set(a["user_id"]) & set(b["user_id"]))


# --------------------------------------------------------------------------- two processes, app
def _worker(rank: int, world: int, tmp: str, cfg: AssembleConfig) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdzv", rank=rank,
                            world_size=world)
    env = DistEnv(rank, world, rank, torch.device("cpu"))
    try:
        assemble_history(cfg, env)
        # Every rank raises the same error, with the users unknown on all ranks counted.
        strict = dataclasses.replace(cfg, output=f"{tmp}/strict", allow_unknown_users=False)
        with pytest.raises(InstanceLogError, match="3 of 10 target users are unknown"):
            assemble_history(strict, env)
    finally:
        dist.destroy_process_group()


def test_two_processes_with_a_user_map_equal_one(tmp_path):
    rng = np.random.default_rng(7)
    store, _ = domain_a(tmp_path, rng, 150, np.arange(8), steps=30)
    b = domain_b(tmp_path, rng, 200, np.arange(10) + MAP_OFFSET, steps=30)
    # Target users 1000..1009; 1008 maps to store user 8 (no rows), 1007 and 1009 are unmapped.
    user_map = str(write_map(tmp_path / "map.parquet", [1000, 1001, 1002, 1003, 1004, 1005,
                                                        1006, 1008], [0, 1, 2, 3, 4, 5, 6, 8]))
    cfg = config(tmp_path, store, out="two", user_map=user_map, allow_unknown_users=True)
    one = HistoryShards.open(assemble_history(dataclasses.replace(cfg, output=str(tmp_path /
                                                                                 "one"))))
    mp.spawn(_worker, args=(2, str(tmp_path), cfg), nprocs=2)
    two = HistoryShards.open(tmp_path / "two")
    for x, y in ((one.instance_id, two.instance_id), (one.begin, two.begin),
                 (one.length, two.length), (one.ts, two.ts)):
        assert np.array_equal(x, y)
    for key in ("num_users", "num_users_in_store", "num_samples_after_store"):
        assert one.manifest[key] == two.manifest[key]
    assert (two.manifest["num_users"], two.manifest["num_users_in_store"]) == (10, 7)
    for r, p in enumerate(two.manifest["parts"]):  # partitioned by the target's own user id
        users = pq.read_table(tmp_path / "two" / p["name"])["user_id"].to_numpy()
        assert (user_partition(users, 2) == r).all() and set(users) <= set(b["user_id"])
    assert not (tmp_path / "strict").exists()


def test_app_summary_names_overlap_and_delay(tmp_path, capsys):
    from apps import assemble as app

    rng = np.random.default_rng(8)
    store, _ = domain_a(tmp_path, rng, 60, np.arange(5), steps=20)
    domain_b(tmp_path, rng, 60, np.arange(2, 10) + MAP_OFFSET, steps=20)
    user_map = write_map(tmp_path / "map.parquet", np.arange(10) + MAP_OFFSET, np.arange(10))
    assert app.main(["--target_log", str(tmp_path / "log_b"), "--store", str(store.path),
                     "--output", str(tmp_path / "h"), "--user_map", str(user_map),
                     "--allow_unknown_users", "true"]) == 0
    out = capsys.readouterr().out
    assert f"users in store 3 of 8 (user map {user_map.resolve()})" in out
    assert f"labels mature after {DELAY_A} s (the store's delay)" in out
