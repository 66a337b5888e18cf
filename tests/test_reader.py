"""The reader: values into Batch, the three orders, per-rank partitions, bounded chunks."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np
import pyarrow as pa
import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

from conftest import tiny_columns, tiny_spec
from iat_torchrec.data.batch import InstanceBatch
from iat_torchrec.data.log import InstanceLogError, write_log
from iat_torchrec.data.reader import (InstanceLogReader, ReaderConfig, ReadOrder, hash_ids)


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory) -> Path:
    # Several files and row groups, so batches straddle both.
    return write_log(pa.table(tiny_columns(n=1000, seed=1, users=17)),
                     tmp_path_factory.mktemp("log") / "log", tiny_spec(), rows_per_file=300,
                     row_group_size=70)


def _read(path, order, world_size=1, batch_size=64, **cfg) -> List[List[InstanceBatch]]:
    config = ReaderConfig(batch_size=batch_size, order=ReadOrder(order), **cfg)
    return [list(InstanceLogReader(path, config=config, rank=r, world_size=world_size))
            for r in range(world_size)]


def _ids(batches: List[InstanceBatch]) -> np.ndarray:
    return np.concatenate([b.instance_id.numpy() for b in batches])


def _rows(batches: List[InstanceBatch]) -> Dict[int, dict]:
    """instance_id -> every value the batches hold for it."""
    out = {}
    for b in batches:
        per_key = {k: v.to_dense() for k, v in b.sparse_features.to_dict().items()}
        for i, iid in enumerate(b.instance_id.tolist()):
            out[iid] = {
                "user_id": int(b.user_id[i]), "ts": int(b.ts[i]),
                "labels": b.labels[i].tolist(), "dense": b.dense_features[i].tolist(),
                **{k: per_key[k][i].tolist() for k in per_key},
            }
    return out


@pytest.mark.parametrize("order", list(ReadOrder))
@pytest.mark.parametrize("world_size", [1, 2])
def test_every_row_once_with_its_values(log_dir, order, world_size):
    src = tiny_columns(n=1000, seed=1, users=17)
    per_rank = _read(log_dir, order, world_size)
    ids = np.concatenate([_ids(b) for b in per_rank])
    assert ids.size == 1000 and np.unique(ids).size == 1000
    assert set(ids.tolist()) == set(src["instance_id"].tolist())
    rows = _rows([b for batches in per_rank for b in batches])
    tags = src["tags"].to_pylist()
    cross = hash_ids(src["cross"], 64)
    for j in range(0, 1000, 37):
        r = rows[int(src["instance_id"][j])]
        assert r["user_id"] == src["user_id"][j] and r["ts"] == src["ts"][j]
        assert r["labels"] == [src["click"][j], src["buy"][j]]
        assert r["dense"] == pytest.approx([src["price"][j], src["age"][j]])
        assert r["item"] == [src["item"][j]] and r["device"] == [src["device"][j]]
        assert r["tags"] == tags[j] and r["cross"] == [cross[j]]
    for batches in per_rank:
        b = batches[0]
        assert b.dense_features.dtype == torch.float32 and b.labels.shape == (64, 2)
        assert b.sparse_features.keys() == ["item", "tags", "device", "cross"]


def test_temporal_order_is_global_time_order(log_dir):
    (single,) = _read(log_dir, "temporal")
    ts = np.concatenate([b.ts.numpy() for b in single])
    assert (np.diff(ts) >= 0).all()
    r0, r1 = _read(log_dir, "temporal", world_size=2, partition="steps")
    assert len(r0) == len(r1)
    # The steps partition deals global steps batch by batch: interleaving the ranks restores
    # time order (the row_groups default: tests/test_reader_partition.py).
    merged = np.concatenate([np.r_[a.ts.numpy(), b.ts.numpy()] for a, b in zip(r0, r1)])
    assert (np.diff(merged) >= 0).all()


def test_temporal_order_of_an_unsorted_log(tmp_path):
    cols = tiny_columns(n=800, seed=3)
    perm = np.random.default_rng(0).permutation(800)
    shuffled = pa.table(cols).take(pa.array(perm))
    path = write_log(shuffled, tmp_path / "log", tiny_spec(), row_group_size=64)
    for chunk_rows in (64, 100_000):
        (batches,) = _read(path, "temporal", chunk_rows=chunk_rows)
        ts = np.concatenate([b.ts.numpy() for b in batches])
        ids = _ids(batches)
        assert (np.diff(ts) >= 0).all() and np.unique(ids).size == 800
        key = np.lexsort((cols["instance_id"], cols["ts"]))
        np.testing.assert_array_equal(ids, cols["instance_id"][key])


@pytest.mark.parametrize("world_size", [1, 2])
def test_user_order_keeps_users_whole_and_in_time(log_dir, world_size):
    per_rank = _read(log_dir, "user", world_size)
    owners = {}
    for rank, batches in enumerate(per_rank):
        users = np.concatenate([b.user_id.numpy() for b in batches])
        ts = np.concatenate([b.ts.numpy() for b in batches])
        ids = _ids(batches)
        change = np.flatnonzero(users[1:] != users[:-1]) + 1
        segments = np.split(np.arange(users.size), change)
        assert len(segments) == np.unique(users).size, "a user's instances are not together"
        for seg in segments:
            key = np.lexsort((ids[seg], ts[seg]))
            assert (key == np.arange(seg.size)).all(), "a user's history is not in time order"
            assert owners.setdefault(int(users[seg[0]]), rank) == rank
    if world_size == 2:
        sizes = [sum(len(b) for b in batches) for batches in per_rank]
        assert abs(sizes[0] - sizes[1]) < 0.2 * sum(sizes)


def test_shuffled_order_is_seeded(log_dir):
    a = _ids(_read(log_dir, "shuffled", seed=5)[0])
    b = _ids(_read(log_dir, "shuffled", seed=5)[0])
    c = _ids(_read(log_dir, "shuffled", seed=6)[0])
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and np.unique(a).size == a.size == 1000
    reader = InstanceLogReader(log_dir, config=ReaderConfig(order=ReadOrder.SHUFFLED, seed=5))
    reader.set_epoch(1)
    assert not np.array_equal(_ids(list(reader)), a)


def test_external_shuffle_chunks_are_bounded_and_cleaned(log_dir, tmp_path):
    config = ReaderConfig(batch_size=32, order=ReadOrder.SHUFFLED, chunk_rows=128)
    reader = InstanceLogReader(log_dir, config=config, tmp_dir=tmp_path)
    sizes = [t.num_rows for t in reader._external_shuffle(reader.plan())]
    assert max(sizes) <= 128 and sum(sizes) == 1000
    big = _ids(_read(log_dir, "shuffled", batch_size=32, chunk_rows=100_000)[0])
    np.testing.assert_array_equal(_ids(list(reader)), big)
    assert list(tmp_path.iterdir()) == []


def test_drop_last_gives_equal_full_batches(log_dir):
    r0, r1 = _read(log_dir, "shuffled", world_size=2, batch_size=64, drop_last=True)
    assert len(r0) == len(r1) == 1000 // 128
    assert all(len(b) == 64 for b in r0 + r1)
    reader = InstanceLogReader(log_dir, config=ReaderConfig(batch_size=64), world_size=2)
    assert len(reader) == len(list(reader))


def test_null_ids_become_empty_bags(tmp_path):
    cols = tiny_columns(n=200)
    device = cols["device"].tolist()
    device[5] = None
    cols["device"] = pa.array(device, pa.int64())
    path = write_log(pa.table(cols), tmp_path / "log", tiny_spec())
    (batches,) = _read(path, "temporal", batch_size=50)
    rows = _rows(batches)
    assert rows[int(cols["instance_id"][5])]["device"] == []
    assert rows[int(cols["instance_id"][6])]["device"] == [device[6]]


def test_batches_feed_an_embedding_bag_collection(log_dir):
    spec = tiny_spec()
    ebc = EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name=f"t_{f.name}", embedding_dim=f.embedding_dim,
                           num_embeddings=f.num_embeddings, feature_names=[f.name])
        for f in spec.sparse])
    batch = next(iter(InstanceLogReader(log_dir, config=ReaderConfig(batch_size=16))))
    pooled = ebc(batch.sparse_features)
    assert pooled.values().shape == (16, sum(f.embedding_dim for f in spec.sparse))
    moved = batch.to(torch.device("cpu"))
    assert isinstance(moved, InstanceBatch) and torch.equal(moved.user_id, batch.user_id)


def test_reader_errors(tmp_path, log_dir):
    with pytest.raises(ValueError, match="rank 2 outside"):
        InstanceLogReader(log_dir, rank=2, world_size=2)
    spec = tiny_spec()
    cols = tiny_columns(n=50)
    cols.pop("price")
    import pyarrow.parquet as pq
    pq.write_table(pa.table(cols), tmp_path / "x.parquet")
    with pytest.raises(InstanceLogError, match="column 'price'.*missing column"):
        InstanceLogReader(tmp_path / "x.parquet", spec=spec)


def test_reverse_user_order_keeps_each_history_in_time(log_dir):
    (fwd,) = _read(log_dir, "user")
    (rev,) = _read(log_dir, "user", reverse=True)
    users_f = np.concatenate([b.user_id.numpy() for b in fwd])
    users_r = np.concatenate([b.user_id.numpy() for b in rev])
    first = lambda u: list(dict.fromkeys(u.tolist()))  # noqa: E731
    assert first(users_r) == first(users_f)[::-1]
    ts_r = np.concatenate([b.ts.numpy() for b in rev])
    for u in np.unique(users_r):
        assert (np.diff(ts_r[users_r == u]) >= 0).all()
