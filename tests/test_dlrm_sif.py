"""DLRM_SIF: every history source builds and learns on a real batch (tiny log, token stores,
histories by timestamp), the dot reference is TorchRec's DLRM, frozen inputs stay frozen, and the
model runs sharded (EBC on meta, DistributedModelParallel, one TrainPipelineSparseDist step)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from conftest import tiny_columns, tiny_spec
from iat_torchrec.data.log import write_log
from iat_torchrec.data.reader import InstanceLogReader, ReaderConfig
from iat_torchrec.distributed.collectives import init_process_group
from iat_torchrec.distributed.sharding import ShardingConfig, copy_full_state, shard_model
from iat_torchrec.history import DownstreamBatch, HistoryBatch, HistoryLayout
from iat_torchrec.models.dlrm_sif import (DLRM_SIF, DLRM_SIFTrain, DLRMSIFConfig, FrozenLookup,
                                          codebook_sum, embedding_tables)
from iat_torchrec.models.history import BSTConfig, IATBranchConfig
from iat_torchrec.models.hgaq import keyed_columns, subtoken_layout
from iat_torchrec.models.mixer import SIFMixerConfig
from iat_torchrec.models.variants import VARIANTS, HistorySource, Variant, variant
from iat_torchrec.tokens.lookup import InstanceTokenLookup, SampleCodeLookup
from iat_torchrec.tokens.shards import query_history
from iat_torchrec.tokens.store import TokenStore

TOKEN_DIM, M, V, K = 8, 2, 8, 5
LAYOUT = HistoryLayout(max_len=12, label_delay_s=60)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest


def small_config(source: str, interaction: str = "mixer", **kw) -> DLRMSIFConfig:
    return DLRMSIFConfig(
        history_source=HistorySource(source), interaction=interaction, embedding_dim=8,
        dense_arch_layers=[16], over_arch_layers=[32, 16],
        mixer=SIFMixerConfig(d0=8, num_blocks=2, num_heads=2),
        bst=BSTConfig(num_heads=2), iat=IATBranchConfig(adapt_dim=16, side_dim=16, num_heads=2,
                                                        num_layers=1),
        item_feature="item", item_history_len=K, **kw)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny log, an IAT store and a SIF store over all its instances (the SIF one written in
    another row order), and one batch of 64 targets with histories by timestamp."""
    tmp = tmp_path_factory.mktemp("dlrm_sif")
    spec = tiny_spec()
    cols = tiny_columns(n=300, users=5)
    log = write_log(pa.table(cols), tmp / "log", spec)
    batch = next(iter(InstanceLogReader(log, config=ReaderConfig(batch_size=64))))
    rng = np.random.default_rng(0)
    ids, users, ts = (np.asarray(cols[c]) for c in ("instance_id", "user_id", "ts"))
    click = np.asarray(cols["click"])
    w = TokenStore.create(tmp / "iat", kind="iat", token_shape=(TOKEN_DIM,), dtype="fp32")
    w.append(ids, users, ts, click, rng.standard_normal((ids.size, TOKEN_DIM)).astype(np.float32))
    iat = w.close()
    t = len(subtoken_layout(spec, 32))
    rev = np.arange(ids.size)[::-1]
    w = TokenStore.create(tmp / "sif", kind="sif", token_shape=(t, M), dtype="uint8")
    w.append(ids[rev], users[rev], ts[rev], click[rev],
             rng.integers(0, V, (ids.size, t, M)).astype(np.uint8))
    sif = w.close()
    history = query_history(iat, batch.user_id.numpy(), batch.ts.numpy(), LAYOUT)
    rows = history.row_ids.numpy()
    item_of = dict(zip(ids.tolist(), np.asarray(cols["item"]).tolist()))
    inst = iat.column("instance_id", np.maximum(rows, 0))
    step_items = torch.tensor([[item_of[int(i)] for i in r] for r in inst])
    target_codes = torch.from_numpy(sif.tokens(sif.rows_of(batch.instance_id.numpy())))
    down = DownstreamBatch.build(batch, history, step_items, K, target_codes)
    return SimpleNamespace(
        spec=spec, batch=down, iat=iat, sif=sif, num_tokens=t,
        token_lookup=InstanceTokenLookup(iat),
        code_lookup=SampleCodeLookup.from_store(sif, rows_like=iat),
        codebooks=torch.randn(t, M, V, 8, generator=torch.Generator().manual_seed(0)) * 0.3)


def build(world, config: DLRMSIFConfig, seed: int = 0, token_lookup=None, **kw) -> DLRM_SIF:
    src = config.history_source
    torch.manual_seed(seed)
    return DLRM_SIF(world.spec, config,
                    token_lookup=(token_lookup or world.token_lookup) if src.uses_tokens
                    else None,
                    code_lookup=world.code_lookup if src.uses_codes else None,
                    codebooks=world.codebooks if src.is_sif else None,
                    gap_vocab_size=LAYOUT.gap_vocab_size, **kw)


SOURCES = [("none", "mixer"), ("none", "dot"), ("din", "mixer"), ("din", "dot"),
           ("bst", "mixer"), ("iat", "mixer"), ("iat", "dot"), ("sif_codes", "mixer"),
           ("sif_iat", "mixer"), ("sif_both", "mixer")]


@pytest.mark.parametrize("source,interaction", SOURCES)
def test_every_source_learns_on_a_real_batch(world, source, interaction):
    train = DLRM_SIFTrain(build(world, small_config(source, interaction)))
    opt = torch.optim.Adam(train.parameters(), lr=5e-3)
    losses = []
    for _ in range(20):
        loss, (detached, logits, labels) = train(world.batch)
        assert logits.shape == labels.shape == (64, 2) and torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(detached))
    assert losses[-1] < 0.95 * losses[0], losses


def test_the_variant_table_decides_what_each_source_reads_and_builds(world):
    assert set(VARIANTS) == set(HistorySource)
    needs = {s.value: (v.reads_history, v.uses_tokens, v.uses_codes, v.is_sif)
             for s, v in VARIANTS.items()}
    assert needs == {"none": (False, False, False, False), "pooled": (True, False, False, False),
                     "din": (True, False, False, False),
                     "bst": (True, False, False, False), "iat": (True, True, False, False),
                     "sif_codes": (True, False, True, True), "sif_iat": (True, True, False, True),
                     "sif_both": (True, True, True, True)}
    assert all(s.uses_tokens == v.uses_tokens and s.is_sif == v.is_sif
               for s, v in VARIANTS.items())
    assert [variant(s).item_branch_for("din") for s in ("din", "bst", "iat", "sif_iat")] == \
        ["din", "bst", "din", "none"]
    with pytest.raises(ValueError, match="feature tokens"):
        Variant(item_branch="din", sif_rows=("codes",))
    # The parts follow the table; the lookups stay outside the module tree.
    for source in ("iat", "sif_both"):
        tower = build(world, small_config(source)).tower
        holders = [m for m in tower.modules() if isinstance(getattr(m, "lookup", None),
                                                            FrozenLookup)]
        assert len(holders) == (1 if source == "iat" else 2)
        assert not any(isinstance(m, FrozenLookup) for m in tower.modules())
        assert all(m is not world.token_lookup for m in tower.modules())


def test_item_history_rides_in_the_item_table(world):
    cfg = small_config("bst")
    tables = {t.name: t.feature_names for t in embedding_tables(world.spec, cfg)}
    assert tables["t_item"] == ["item"] + [f"hist_item_{j}" for j in range(K)]
    assert tables["t_tags"] == ["tags"]
    assert "hist_item_0" in world.batch.sparse_features.keys()
    # The features carry the last K real steps' items, -1 (empty bags) past a short history.
    items, mask = world.batch.history_items, world.batch.history.mask
    n = mask.sum(1).clamp(max=K)
    assert torch.equal(items >= 0, torch.arange(K) < n.unsqueeze(1))
    jt = world.batch.sparse_features["hist_item_0"]
    assert torch.equal(jt.lengths(), (items[:, 0] >= 0).to(jt.lengths().dtype))
    assert torch.equal(jt.values(), items[:, 0][items[:, 0] >= 0])


def test_dot_reference_is_torchrecs_dlrm(world):
    cfg = small_config("none", "dot")
    model = build(world, cfg).eval()
    d = cfg.embedding_dim
    reference = DLRM(EmbeddingBagCollection(embedding_tables(world.spec, cfg)),
                     dense_in_features=len(world.spec.dense),
                     dense_arch_layer_sizes=[*cfg.dense_arch_layers, d],
                     over_arch_layer_sizes=[*cfg.over_arch_layers, 2]).eval()
    state = {k.replace("tower.", "", 1): v for k, v in model.state_dict().items()}
    reference.load_state_dict(state)
    b = world.batch
    expected = reference(b.dense_features, b.sparse_features)
    got = model(b.dense_features, b.sparse_features)
    assert got.shape == expected.shape == (64, 2)
    assert torch.allclose(got, expected, atol=1e-6)


class SpyLookup(nn.Module):
    """The real lookup times a trainable scale: a gradient into the lookup would reach it."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.dim = inner, inner.dim
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, row_ids: torch.Tensor) -> torch.Tensor:
        return self.inner(row_ids) * self.scale


@pytest.mark.parametrize("source", ["iat", "sif_both"])
def test_no_gradient_reaches_frozen_lookup_or_codebooks(world, source):
    spy = SpyLookup(world.token_lookup)
    model = build(world, small_config(source), token_lookup=spy)
    train = DLRM_SIFTrain(model)
    opt = torch.optim.Adam(train.parameters(), lr=1e-2)
    codebooks = model.tower.codebooks
    before = None if codebooks is None else codebooks.clone()
    for _ in range(2):
        loss, _ = train(world.batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert spy.scale.grad is None
    if codebooks is not None:
        assert not codebooks.requires_grad and torch.equal(codebooks, before)
        assert all(p is not codebooks for p in train.parameters())
    assert all(p is not spy.scale for p in train.parameters())
    assert not any("lookup" in k for k in train.state_dict())
    tower = model.tower
    branch = tower.history_archs[-1] if source == "iat" else tower.inter_arch.rows[0]
    assert all(p.grad is not None for p in branch.parameters())  # the adapters do learn


def test_alignment_loss_and_row_weights(world):
    model = build(world, small_config("sif_codes"))
    b = world.batch
    logits, align = model.forward_with_alignment(b.dense_features, b.sparse_features,
                                                 b.history, b.target_codes)
    tower = model.tower
    pooled = model.sparse_arch.embedding_bag_collection(b.sparse_features)
    target = tower.inter_arch.target_slots(tower.dense_arch(b.dense_features),
                                           keyed_columns(pooled, tower.sparse_names, 8))
    e = codebook_sum(b.target_codes, world.codebooks)
    assert torch.allclose(align, (tower.inter_arch.mixer.align(target) - e).pow(2).mean((1, 2)),
                          atol=1e-6)
    train = DLRM_SIFTrain(model)
    loss, _ = train(b)
    bce = nn.functional.binary_cross_entropy_with_logits(logits, b.labels)
    assert torch.allclose(loss, bce + 0.25 * align.mean(), atol=1e-6)
    assert float(train(b.as_padding())[0].detach()) == 0.0
    with pytest.raises(ValueError, match="target_codes"):
        train(dataclasses.replace(b, target_codes=None))
    model.eval()
    assert torch.equal(model(b.dense_features, b.sparse_features, b.history), logits)


def _more_padding(history: HistoryBatch, extra: int) -> HistoryBatch:
    b = history.mask.shape[0]

    def grow(x: torch.Tensor, fill: int) -> torch.Tensor:
        return torch.cat([x, torch.full((b, extra), fill, dtype=x.dtype)], dim=1)

    return HistoryBatch(row_ids=grow(history.row_ids, -1), mask=grow(history.mask, False),
                        label=grow(history.label, 3), gap_bucket=grow(history.gap_bucket, 5),
                        length=history.length)


@pytest.mark.parametrize("source", ["pooled", "bst", "iat", "sif_both"])
def test_longer_padding_changes_nothing(world, source):
    model = build(world, small_config(source)).eval()
    b = world.batch
    ref = model(b.dense_features, b.sparse_features, b.history, b.target_codes)
    got = model(b.dense_features, b.sparse_features, _more_padding(b.history, 7), b.target_codes)
    assert torch.allclose(got, ref, atol=1e-5)


def test_missing_inputs_are_refused(world):
    with pytest.raises(ValueError, match="interaction='mixer'"):
        small_config("sif_codes", "dot")
    with pytest.raises(ValueError, match="item_feature"):
        dataclasses.replace(small_config("none"), history_source=HistorySource.DIN,
                            item_feature="")
    with pytest.raises(ValueError, match="token lookup"):
        DLRM_SIF(world.spec, small_config("iat"))
    with pytest.raises(ValueError, match="codebooks"):
        DLRM_SIF(world.spec, small_config("sif_codes"), code_lookup=world.code_lookup)
    with pytest.raises(ValueError, match="T="):
        DLRM_SIF(world.spec, small_config("sif_codes"), code_lookup=world.code_lookup,
                 codebooks=torch.zeros(world.num_tokens + 1, M, V, 8))
    model = build(world, small_config("bst"))
    with pytest.raises(ValueError, match="history"):
        model(world.batch.dense_features, world.batch.sparse_features)


def test_downstream_batch_moves_every_field(world):
    b = world.batch
    moved = b.to(torch.device("cpu"))
    assert isinstance(moved, DownstreamBatch) and isinstance(moved.history, HistoryBatch)
    assert torch.equal(moved.history.row_ids, b.history.row_ids)
    assert torch.equal(moved.target_codes, b.target_codes)
    assert moved.sparse_features.keys() == b.sparse_features.keys()
    bare = DownstreamBatch.build(b).to(torch.device("cpu"))
    assert bare.history is None and bare.history_items is None and bare.target_codes is None
    assert float(b.as_padding().weight.sum()) == 0.0 and b.as_padding().history is b.history


def test_code_lookup_follows_the_token_stores_rows(world):
    rows = torch.tensor([[0, 5, -1], [world.iat.num_rows - 1, -1, -1]])
    codes = world.code_lookup(rows)
    assert codes.shape == (2, 3, world.num_tokens, M)
    inst = world.iat.column("instance_id", np.array([0, 5, world.iat.num_rows - 1]))
    expected = world.sif.tokens(world.sif.rows_of(inst))
    assert np.array_equal(codes[0, :2].numpy(), expected[:2])
    assert np.array_equal(codes[1, 0].numpy(), expected[2])
    assert int(codes[0, 2].abs().sum()) == 0


@pytest.mark.parametrize("source,interaction", [("iat", "mixer"), ("sif_both", "mixer"),
                                                ("pooled", "dcn")])
def test_sharded_on_meta_with_the_train_pipeline(world, source, interaction):
    """EBC on meta, DMP in a one-process gloo group, the unsharded model's weights copied in:
    the same loss; then TrainPipelineSparseDist pipelines the EBC (the tower is a leaf) and
    steps."""
    cfg = small_config(source, interaction)
    full = DLRM_SIFTrain(build(world, cfg))
    env = init_process_group("cpu")
    try:
        sharded = DLRM_SIFTrain(build(world, cfg, table_device="meta"))
        dmp, opt = shard_model(sharded, env, ShardingConfig(), batch_size=64)
        copy_full_state(dmp, full.state_dict())
        b = world.batch
        expected, (_, logits, _) = full(b)
        got, (_, sharded_logits, _) = dmp(b)
        assert torch.allclose(got, expected, atol=1e-5)
        assert torch.allclose(sharded_logits, logits, atol=1e-5)
        pipeline = TrainPipelineSparseDist(dmp, opt, env.device)
        batches = iter([b, b, b])
        first = pipeline.progress(batches)
        second = pipeline.progress(batches)
        assert len(pipeline._pipelined_modules) == 1  # the EBC, fed from batch.sparse_features
        assert torch.isfinite(first[0]) and torch.isfinite(second[0])
        assert float(second[0]) < float(first[0])
    finally:
        dist.destroy_process_group()


def test_table_optimizer_adam_on_cpu_needs_data_parallel_tables(world):
    cfg = small_config("pooled", "concat")
    env = init_process_group("cpu")
    try:
        with pytest.raises(ValueError, match="no fused CPU kernel"):
            shard_model(DLRM_SIFTrain(build(world, cfg, table_device="meta")), env,
                        ShardingConfig(sparse_optimizer="adam"), batch_size=64)
        dmp, opt = shard_model(DLRM_SIFTrain(build(world, cfg)), env, ShardingConfig(
            sparse_optimizer="adam", sparse_lr=0.01, sharding_types=["data_parallel"]),
            batch_size=64)
        tables = {k: v.detach().clone() for k, v in dmp.state_dict().items()
                  if "embedding_bags" in k}
        pipeline = TrainPipelineSparseDist(dmp, opt, env.device)
        batches = iter([world.batch] * 3)
        losses = [float(pipeline.progress(batches)[0]) for _ in range(3)]
        assert losses[-1] < losses[0]
        moved = [k for k, v in dmp.state_dict().items() if k in tables
                 and not torch.equal(v, tables[k])]
        assert moved, "Adam left every table unchanged"
    finally:
        dist.destroy_process_group()


# The ablations' switches (apps/ablate.py): each builds in the tower, learns, ignores padding.
ABLATION_SWITCHES = [("iat", "iat", dict(side_labels=False)), ("iat", "iat", dict(encoder="din")),
                     ("sif_codes", "mixer", dict(structure="flat")),
                     ("sif_codes", "mixer", dict(structure="pooled"))]


@pytest.mark.parametrize("source,part,change", ABLATION_SWITCHES)
def test_ablation_switches_build_learn_and_ignore_padding(world, source, part, change):
    base = small_config(source)
    config = dataclasses.replace(base, **{part: dataclasses.replace(getattr(base, part),
                                                                    **change)})
    model = build(world, config)
    train = DLRM_SIFTrain(model)
    opt = torch.optim.Adam(train.parameters(), lr=5e-3)
    losses = []
    for _ in range(20):
        loss, (detached, _, _) = train(world.batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(detached))
    assert losses[-1] < 0.95 * losses[0], losses
    model.eval()
    b = world.batch
    ref = model(b.dense_features, b.sparse_features, b.history, b.target_codes)
    got = model(b.dense_features, b.sparse_features, _more_padding(b.history, 7), b.target_codes)
    assert torch.allclose(got, ref, atol=1e-5)


def test_item_branch_reads_its_own_history_when_given(world):
    """``item_history`` (the target domain's own, beside another domain's IAT history) feeds
    the item branch only: for ``bst`` the model then equals one given it as its history; for
    ``iat`` the IAT branch still reads ``history``; without it both read ``history``."""
    b = world.batch
    other = HistoryBatch(*(torch.roll(t, 1, dims=0) for t in b.history.tensors()))
    with torch.no_grad():
        bst = build(world, small_config("bst", "dot")).eval()
        want = bst(b.dense_features, b.sparse_features, other)
        got = bst(b.dense_features, b.sparse_features, b.history, item_history=other)
        assert torch.equal(got, want)
        iat = build(world, small_config("iat", "dot")).eval()
        same = iat(b.dense_features, b.sparse_features, b.history)
        assert torch.equal(iat(b.dense_features, b.sparse_features, b.history,
                               item_history=b.history), same)
        moved = iat(b.dense_features, b.sparse_features, b.history, item_history=other)
        assert not torch.allclose(moved, same)
        train = DLRM_SIFTrain(iat)
        _, (_, logits, _) = train(dataclasses.replace(b, item_history=other))
        assert torch.equal(logits, moved)
