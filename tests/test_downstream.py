"""DownstreamReader: a target log read as DownstreamBatch objects (histories by timestamp from
shards, item-id histories from the exported logs, the targets' own SIF codes), checked against
the slow-path query, the log's own columns and the SIF store; bad combinations of inputs; and a
DLRM_SIF consuming its batches."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import tiny_columns, tiny_spec
from iat_torchrec.data.log import InstanceLogError, write_log
from iat_torchrec.data.reader import ReaderConfig, ReadOrder
from iat_torchrec.history import (LABEL_UNKNOWN, DownstreamBatch, HistoryLayout,
                                  history_item_features)
from iat_torchrec.models.dlrm_sif import DLRM_SIF, DLRM_SIFTrain, DLRMSIFConfig
from iat_torchrec.models.hgaq import subtoken_layout
from iat_torchrec.models.history import BSTConfig, DINConfig
from iat_torchrec.models.mixer import SIFMixerConfig
from iat_torchrec.models.variants import HistorySource
from iat_torchrec.stages.assemble import AssembleConfig, assemble_history
from iat_torchrec.tokens.downstream import DownstreamDataError, DownstreamReader
from iat_torchrec.tokens.lookup import InstanceTokenLookup, SampleCodeLookup
from iat_torchrec.tokens.shards import HistoryShards, HistoryShardsError, query_history
from iat_torchrec.tokens.store import TokenStore

N, USERS, D, M, V, L, K = 400, 7, 8, 2, 8, 12, 5
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest


def make_store(path: Path, cols, kind: str, rows=None, delay=60, shape=(D,), seed=0):
    rng = np.random.default_rng(seed)
    ids, users, ts, click = (np.asarray(cols[c]) for c in ("instance_id", "user_id", "ts",
                                                           "click"))
    rows = np.arange(ids.size) if rows is None else rows
    meta = {} if delay is None else {"label_delay_s": delay}
    if kind == "iat":
        w = TokenStore.create(path, kind="iat", token_shape=shape, dtype="fp32", metadata=meta)
        tok = rng.standard_normal((rows.size, *shape)).astype(np.float32)
    else:
        w = TokenStore.create(path, kind="sif", token_shape=shape, dtype="uint8", metadata=meta)
        tok = rng.integers(0, V, (rows.size, *shape)).astype(np.uint8)
    w.append(ids[rows], users[rows], ts[rows], click[rows], tok)
    return w.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("downstream")
    spec = tiny_spec()
    cols = tiny_columns(n=N, users=USERS)
    log = write_log(pa.table(cols), tmp / "log", spec, row_group_size=64)
    perm = np.random.default_rng(1).permutation(N)  # store rows in another order than the log
    iat = make_store(tmp / "iat", cols, "iat", rows=perm)
    t = len(subtoken_layout(spec, 32))
    sif = make_store(tmp / "sif", cols, "sif", rows=perm[::-1], shape=(t, M), seed=2)
    shards_path = assemble_history(AssembleConfig(
        target_log=str(log), store=str(iat.path), output=str(tmp / "shards"), max_len=L))
    return SimpleNamespace(tmp=tmp, spec=spec, cols=cols, log=log, iat=iat, sif=sif,
                           shards=HistoryShards.open(shards_path), num_tokens=t,
                           item_of={int(i): int(v) for i, v in zip(cols["instance_id"],
                                                                     cols["item"])})


def reader(world, k=K, order=ReadOrder.SHUFFLED, rank=0, world_size=1, batch_size=37, **kw):
    args = dict(history=world.shards, store=world.iat, item_feature="item", item_history_len=k,
                item_logs=[world.log], code_store=world.sif)
    args.update(kw)
    return DownstreamReader(world.log, world.spec, ReaderConfig(batch_size=batch_size,
                                                                order=order, seed=3),
                            rank, world_size, **args)


# --------------------------------------------------------------------------- content
@pytest.mark.parametrize("order", [ReadOrder.SHUFFLED, ReadOrder.USER])
def test_rows_histories_items_and_codes(world, order):
    layout = HistoryLayout(max_len=L, label_delay_s=world.spec.label_delay_s)
    seen = []
    for rank in range(2):
        r = reader(world, order=order, rank=rank, world_size=2)
        batches = list(r)
        assert len(r) == len(batches)
        for b in batches:
            assert isinstance(b, DownstreamBatch)
            assert torch.equal(b.weight, torch.ones(len(b)))
            seen.append(b.instance_id.numpy())
            # Histories: the slow-path query for (user, ts).
            ref = query_history(world.iat, b.user_id.numpy(), b.ts.numpy(), layout)
            for got, want in zip(b.history.tensors(), ref.tensors()):
                assert torch.equal(got, want)
            # Item history: the log's item of the last K real steps, oldest first, -1 after.
            for i in range(len(b)):
                rows = ref.row_ids[i][ref.mask[i]].numpy()
                ids = world.iat.column("instance_id", rows) if rows.size else []
                want = [world.item_of[int(x)] for x in ids][-K:]
                want = want + [-1] * (K - len(want))
                assert b.history_items[i].tolist() == want
            # ... and the same ids as the sparse features hist_item_0..K-1.
            kjt = b.sparse_features.to_dict()
            for j, name in enumerate(history_item_features(K)):
                real = b.history_items[:, j] >= 0
                assert torch.equal(kjt[name].lengths(), real.long())
                assert torch.equal(kjt[name].values(), b.history_items[real, j])
            # Target codes: the SIF store's codes of each target.
            want_codes = world.sif.tokens(world.sif.rows_of(b.instance_id.numpy()))
            assert b.target_codes.shape == (len(b), world.num_tokens, M)
            assert np.array_equal(b.target_codes.numpy(), want_codes)
    ids = np.concatenate(seen)
    assert ids.size == N and np.array_equal(np.sort(ids), np.sort(world.cols["instance_id"]))
    assert (np.concatenate([b.history.length.numpy() for b in reader(world)]) > 0).any()


def test_items_match_downstream_batch_build(world):
    """The reader's CPU shortcut gives what DownstreamBatch.build computes from the history,
    also when k exceeds the history length L."""
    row_items = reader(world).row_items
    for k in (K, L + 3):
        for b in reader(world, k=k, batch_size=64):
            step_items = torch.from_numpy(row_items)[b.history.row_ids.clamp(min=0)]
            plain = dataclasses.replace(b, sparse_features=b.sparse_features)
            built = DownstreamBatch.build(plain, history=b.history, step_items=step_items,
                                          item_history_len=k)
            assert torch.equal(built.history_items, b.history_items)


def test_without_optional_inputs(world):
    r = DownstreamReader(world.log, world.spec, ReaderConfig(batch_size=100))
    batches = list(r)
    assert len(batches) == len(r) == 4
    b = batches[0]
    assert b.history is None and b.history_items is None and b.target_codes is None
    assert b.sparse_features.keys() == world.spec.sparse_names
    assert torch.equal(b.as_padding().weight, torch.zeros(len(b)))


# --------------------------------------------------------------------------- errors
def test_shards_of_another_store_version(world):
    other = world.tmp / "iat_v2"
    shutil.copytree(world.iat.path, other)
    with TokenStore.open(other).appender() as w:
        w.append(np.array([1]), np.array([999]), np.array([5]), np.array([0]),
                 np.zeros((1, D), np.float32))
    with pytest.raises(HistoryShardsError, match="version"):
        reader(world, store=TokenStore.open(other))


def test_labels_must_mature_in_the_stores_domain(world):
    """Shards may not show labels sooner than the store's recorded delay (its own domain's), or
    the target spec's when the store records none; a longer delay is allowed."""
    slow = make_store(world.tmp / "iat_delay", world.cols, "iat", delay=120)
    slow_shards = HistoryShards.open(assemble_history(AssembleConfig(
        target_log=str(world.log), store=str(slow.path), output=str(world.tmp / "slow_h"),
        max_len=L)))
    assert slow_shards.layout.label_delay_s == 120  # assembly takes the store's delay
    reader(world, history=slow_shards, store=slow)
    quick = make_store(world.tmp / "iat_quick", world.cols, "iat", delay=30)
    reader(world, store=quick, history=HistoryShards.open(assemble_history(AssembleConfig(
        target_log=str(world.log), store=str(quick.path), output=str(world.tmp / "quick_h"),
        max_len=L, label_delay_s=60))))  # 60 >= the store's 30: allowed
    spec = dataclasses.replace(world.spec, label_delay_s=90)
    no_delay = make_store(world.tmp / "iat_nodelay", world.cols, "iat", delay=None)
    with pytest.raises(DownstreamDataError, match="labels would be shown before they mature"):
        DownstreamReader(world.log, spec, history=HistoryShards.open(assemble_history(
            AssembleConfig(target_log=str(world.log), store=str(no_delay.path),
                           output=str(world.tmp / "nodelay_h"), max_len=L))), store=no_delay)


def own_store(world):
    """The target domain's own store (the even rows of the log, tokens of another width than
    the world's store), its exported log and the log's history shards on it."""
    if not (world.tmp / "own_h").exists():
        even = np.arange(0, N, 2)
        write_log(pa.table({k: np.asarray(v)[even] for k, v in world.cols.items()}),
                  world.tmp / "own_log", world.spec)
        make_store(world.tmp / "own", world.cols, "iat", rows=even, shape=(D + 4,), seed=5)
        assemble_history(AssembleConfig(
            target_log=str(world.log), store=str(world.tmp / "own"),
            output=str(world.tmp / "own_h"), max_len=6, allow_unknown_users=True))
    return (TokenStore.open(world.tmp / "own"), HistoryShards.open(world.tmp / "own_h"),
            world.tmp / "own_log")


def test_item_branch_reads_its_own_store(world):
    """With item shards on another store (the target domain's own, while the tokens' history
    is another domain's), the item history and its ids come from that store, exactly as a
    reader built on it alone gives them; the token history is unchanged."""
    own, own_shards, own_log = own_store(world)
    both = list(reader(world, order=ReadOrder.TEMPORAL, item_shards=own_shards,
                       item_store=own, item_logs=[own_log]))
    alone = list(reader(world, order=ReadOrder.TEMPORAL, history=own_shards, store=own,
                        item_logs=[own_log]))
    plain = list(reader(world, order=ReadOrder.TEMPORAL))
    for b, a, p in zip(both, alone, plain):
        assert torch.equal(b.history_items, a.history_items)
        for got, want in zip(b.item_history.tensors(), a.history.tensors()):
            assert torch.equal(got, want)
        for got, want in zip(b.history.tensors(), p.history.tensors()):
            assert torch.equal(got, want)
        assert not torch.equal(b.history_items, p.history_items)
        assert b.sparse_features.to_dict()["hist_item_0"].values().tolist() == \
            a.sparse_features.to_dict()["hist_item_0"].values().tolist()
    with pytest.raises(DownstreamDataError, match="give both or neither"):
        reader(world, item_shards=own_shards)
    with pytest.raises(DownstreamDataError, match="item_history_len > 0"):
        reader(world, k=0, item_shards=own_shards, item_store=own)


def test_labels_must_exist(world, tmp_path):
    cols = dict(world.cols)
    cols["click"] = pa.nulls(N, pa.int8())
    pq.write_table(pa.table(cols), tmp_path / "nolabel.parquet")
    with pytest.raises(InstanceLogError, match="no values"):
        DownstreamReader(tmp_path / "nolabel.parquet", world.spec)
    cols["click"] = pa.array([None] + [1] * (N - 1), pa.int8())
    pq.write_table(pa.table(cols), tmp_path / "somenull.parquet")
    with pytest.raises(InstanceLogError, match="1 null value"):
        DownstreamReader(tmp_path / "somenull.parquet", world.spec)
    spec = dataclasses.replace(world.spec, labels=("click", "buy", "conv"))
    with pytest.raises(InstanceLogError, match="conv"):
        DownstreamReader(world.log, spec)


def test_target_missing_from_code_store(world):
    part = make_store(world.tmp / "sif_part", world.cols, "sif", rows=np.arange(N // 2),
                      shape=(world.num_tokens, M))
    with pytest.raises(DownstreamDataError, match="missing from the code store"):
        list(reader(world, code_store=part, order=ReadOrder.TEMPORAL))
    with pytest.raises(DownstreamDataError, match="SIF store"):
        reader(world, code_store=world.iat)


def test_item_logs_must_cover_the_store(world, tmp_path):
    half = write_log(pa.table(world.cols).slice(0, N // 2), tmp_path / "half", world.spec)
    with pytest.raises(DownstreamDataError, match=r"store row\(s\) have no item"):
        reader(world, item_logs=[half])
    cols = dict(world.cols)
    cols["instance_id"] = np.asarray(cols["instance_id"]) + 10 ** 6
    alien = write_log(pa.table(cols), tmp_path / "alien", world.spec)
    with pytest.raises(DownstreamDataError, match="not in the token store"):
        reader(world, item_logs=[world.log, alien])
    with pytest.raises(DownstreamDataError, match="needs the history"):
        reader(world, history=None, store=None)
    with pytest.raises(DownstreamDataError, match="not a sparse field"):
        reader(world, item_feature="price")


# --------------------------------------------------------------------------- the model
def small_config(source: str) -> DLRMSIFConfig:
    return DLRMSIFConfig(
        history_source=HistorySource(source), embedding_dim=8, dense_arch_layers=[16],
        over_arch_layers=[16], mixer=SIFMixerConfig(d0=8, num_blocks=1, num_heads=2),
        din=DINConfig(), bst=BSTConfig(num_heads=2), item_feature="item", item_history_len=K)


@pytest.mark.parametrize("source", ["din", "sif_codes"])
def test_dlrm_sif_consumes_reader_batches(world, source):
    torch.manual_seed(0)
    cfg = small_config(source)
    kw = {}
    if source == "sif_codes":
        kw = dict(code_lookup=SampleCodeLookup.from_store(world.sif, rows_like=world.iat),
                  codebooks=torch.randn(world.num_tokens, M, V, 8) * 0.3)
    model = DLRM_SIF(world.spec, cfg, **kw)
    b = next(iter(reader(world, k=K if source == "din" else 0, batch_size=64)))
    logits = model(b.dense_features, b.sparse_features, b.history, b.target_codes)
    assert logits.shape == (64, len(world.spec.labels)) and torch.isfinite(logits).all()
    loss, _ = DLRM_SIFTrain(model)(b)
    assert torch.isfinite(loss)
    loss.backward()


def test_own_tokens_beside_another_stores_in_a_second_iat_branch(world):
    """``item_store_iat``: a second IAT branch reads the item store's tokens (the target
    domain's own) over ``item_history``, the first the history store's over ``history``; each
    branch's token is its IATBranch over its own store's rows."""
    torch.manual_seed(0)
    own, own_shards, own_log = own_store(world)
    cfg = dataclasses.replace(small_config("iat"), item_store_iat=True)
    model = DLRM_SIF(world.spec, cfg, token_lookup=InstanceTokenLookup(world.iat),
                     item_token_lookup=InstanceTokenLookup(own)).eval()
    other_arch, own_arch = model.tower.history_archs[1:]
    assert (other_arch.item_history, own_arch.item_history) == (False, True)
    assert own_arch.branch.adapt.in_features == D + 4 != other_arch.branch.adapt.in_features
    b = next(iter(reader(world, batch_size=64, item_shards=own_shards, item_store=own,
                         item_logs=[own_log])))
    logits = model(b.dense_features, b.sparse_features, b.history, item_history=b.item_history)
    assert logits.shape == (64, len(world.spec.labels)) and torch.isfinite(logits).all()
    pooled = model.sparse_arch.embedding_bag_collection(b.sparse_features)
    tower = model.tower
    dense = tower.dense_arch(b.dense_features)
    sparse = torch.stack([pooled[f] for f in tower.sparse_names], 1)
    query = torch.cat([dense, sparse.flatten(1)], 1)
    h = b.item_history
    tokens = torch.from_numpy(own.tokens_fp32(h.row_ids.clamp_min(0).numpy().ravel())
                              ).view(*h.row_ids.shape, D + 4)
    want = own_arch.branch(tokens, h.label, h.gap_bucket, h.mask, query)
    x = SimpleNamespace(item_history=h, dense=dense, sparse=sparse, groups=None)
    assert torch.allclose(own_arch(x)[:, 0], want, atol=1e-5)
    with pytest.raises(ValueError, match="give item_history"):
        model(b.dense_features, b.sparse_features, b.history)
    with pytest.raises(ValueError, match="item token lookup"):
        DLRM_SIF(world.spec, cfg, token_lookup=InstanceTokenLookup(world.iat))
    with pytest.raises(ValueError, match="no IAT branch or no item branch"):
        dataclasses.replace(small_config("bst"), item_store_iat=True)


def test_cross_task_history_carries_the_stores_labels(world):
    """A downstream model of another task (here ``buy``) over a store of a ``click`` source
    model: the targets' labels are the target log's, the history steps' side information the
    store's own labels (the source task's), shown once matured."""
    spec = dataclasses.replace(world.spec, labels=("buy",))
    r = DownstreamReader(world.log, spec, ReaderConfig(batch_size=100, order=ReadOrder.TEMPORAL),
                         history=world.shards, store=world.iat)
    buy = dict(zip(world.cols["instance_id"].tolist(), world.cols["buy"].tolist()))
    click = dict(zip(world.cols["instance_id"].tolist(), world.cols["click"].tolist()))
    ts = dict(zip(world.cols["instance_id"].tolist(), world.cols["ts"].tolist()))
    shown = 0
    for b in r:
        assert b.labels[:, 0].tolist() == [buy[int(i)] for i in b.instance_id]
        h = b.history
        for i in range(len(b)):
            for j in np.flatnonzero(h.mask[i].numpy()):
                iid = int(world.iat.column("instance_id", np.array([int(h.row_ids[i, j])]))[0])
                matured = ts[iid] + spec.label_delay_s <= int(b.ts[i])
                want = click[iid] if matured else LABEL_UNKNOWN
                assert int(h.label[i, j]) == want
                shown += matured
    assert shown > 0
