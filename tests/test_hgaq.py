"""The HGAQ sample tokenizer: grouping, residual VQ (EMA, restarts, straight-through), codes."""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import pyarrow as pa
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from torchrec.sparse.jagged_tensor import KeyedTensor

from conftest import tiny_columns, tiny_spec
from iat_torchrec.data.batch import InstanceBatch
from iat_torchrec.data.log import write_log
from iat_torchrec.data.reader import InstanceLogReader, ReaderConfig
from iat_torchrec.data.spec import DenseField, FeatureGroup, FeatureSpec, SparseField
from iat_torchrec.models.hgaq import (HGAQConfig, SampleTokenizer, SampleTokenizerTrain,
                                      code_dtype, keyed_columns, subtoken_layout,
                                      tokenizer_embedding_bag_collection)
from iat_torchrec.models.quantizer import ResidualVectorQuantizer

SMALL = dict(fields_per_subtoken=2, codebook_size=16, aux_layers=[16])


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> InstanceBatch:
    """One real batch of 256 rows read from a tiny instance log."""
    path = write_log(pa.table(tiny_columns(n=256, seed=2)),
                     tmp_path_factory.mktemp("hgaq") / "log", tiny_spec())
    return next(iter(InstanceLogReader(path, config=ReaderConfig(batch_size=256))))


def _tokenizer(seed: int = 0, **overrides) -> SampleTokenizer:
    torch.manual_seed(seed)
    spec = tiny_spec()
    config = HGAQConfig(**{**SMALL, **overrides})
    return SampleTokenizer(spec, config,
                           tokenizer_embedding_bag_collection(spec, config.field_dim))


def _wide_spec(sizes: dict) -> FeatureSpec:
    """A spec with ``sizes[group]`` fields per group, alternating sparse and dense."""
    sparse, dense = [], []
    for group, n in sizes.items():
        for i in range(n):
            name = f"{group.value}_{i}"
            if i % 2:
                dense.append(DenseField(name, group))
            else:
                sparse.append(SparseField(name, 10, 8, group))
    return FeatureSpec(sparse=sparse, dense=dense, labels=["click"])


# --------------------------------------------------------------------------- grouping
def test_70_fields_in_a_group_give_three_subtokens():
    spec = _wide_spec({FeatureGroup.ITEM: 70, FeatureGroup.USER: 5})
    layout = subtoken_layout(spec, 32)
    assert [(s.group, s.index) for s in layout] == [
        (FeatureGroup.USER, 0), (FeatureGroup.ITEM, 0), (FeatureGroup.ITEM, 1),
        (FeatureGroup.ITEM, 2)]
    item = [s for s in layout if s.group == FeatureGroup.ITEM]
    assert [len(s.fields) for s in item] == [24, 23, 23]
    # Consecutive slices of the group's fields: sparse first, then dense, in spec order.
    assert sum((s.fields for s in item), ()) == tuple(spec.fields_by_group()[FeatureGroup.ITEM])


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 80), min_size=4, max_size=4).filter(any),
       per=st.integers(1, 40))
def test_layout_covers_every_field_once_within_b(sizes, per):
    spec = _wide_spec({g: n for g, n in zip(FeatureGroup, sizes) if n})
    layout = subtoken_layout(spec, per)
    assert len(layout) == sum(math.ceil(n / per) for n in sizes)
    assert all(0 < len(s.fields) <= per for s in layout)
    fields = [f for s in layout for f in s.fields]
    assert sorted(fields) == sorted(spec.sparse_names + spec.dense_names)
    for s in layout:
        assert all(spec.field(f).group == s.group for f in s.fields)


def test_tokenizer_uses_spec_groups_and_dense_fields():
    tok = _tokenizer()
    groups = [(s.group.value, s.fields) for s in tok.layout]
    assert groups == [("user", ("age",)), ("item", ("item", "tags")), ("item", ("price",)),
                      ("context", ("device",)), ("cross", ("cross",))]
    assert tok.num_tokens == 5


@pytest.mark.parametrize("dense_device", ["meta", "cpu"])
def test_constructs_with_the_tables_on_meta(dense_device):
    """The app builds the tables on ``meta`` for DistributedModelParallel to shard."""
    spec = tiny_spec()
    config = HGAQConfig()
    ebc = tokenizer_embedding_bag_collection(spec, config.field_dim, torch.device("meta"))
    tok = SampleTokenizer(spec, config, ebc, device=torch.device(dense_device))
    assert [c.name for c in ebc.embedding_bag_configs()] == ["t_item", "t_tags", "t_device",
                                                             "t_cross"]
    assert tok.quantizer.codebooks.shape == (tok.num_tokens, 3, 256, 16)
    assert tok.quantizer.codebooks.device.type == dense_device
    assert tok.projection_weight.device.type == dense_device


def test_rejects_tables_of_the_wrong_width():
    spec = tiny_spec()
    with pytest.raises(ValueError, match="field_dim"):
        SampleTokenizer(spec, HGAQConfig(), tokenizer_embedding_bag_collection(spec, 4))


# --------------------------------------------------------------------------- codes
def test_codes_shape_dtype_range_and_decoding(batch):
    tok = _tokenizer()
    tok(batch.dense_features, batch.sparse_features)  # one training step initialises codebooks
    tok.eval()
    out = tok(batch.dense_features, batch.sparse_features)
    b, t, m = out.codes.shape
    assert (b, t, m) == (256, tok.num_tokens, 3)
    assert out.codes.min() >= 0 and out.codes.max() < 16
    codes = tok.tokenize(batch.dense_features, batch.sparse_features)
    assert codes.dtype == torch.uint8 and torch.equal(codes.long(), out.codes)
    assert code_dtype(256) == torch.uint8 and code_dtype(257) == torch.int16
    torch.testing.assert_close(tok.codes_to_embeddings(codes), out.reconstruction)
    # Histories [B, L, T, M] decode to [B, L, T, d0].
    history = codes.view(4, 64, t, m)
    assert tok.codes_to_embeddings(history).shape == (4, 64, t, 16)


def test_keyed_tensor_in_any_key_order(batch):
    tok = _tokenizer()
    pooled = tok.embedding_bag_collection(batch.sparse_features)
    names = tok.spec.sparse_names
    per_key = pooled.to_dict()
    shuffled = KeyedTensor.from_tensor_list(list(reversed(names)),
                                            [per_key[k] for k in reversed(names)])
    a = tok.field_embeddings(batch.dense_features, pooled)
    b = tok.field_embeddings(batch.dense_features, shuffled)
    assert torch.equal(a, b) and a.shape == (256, 6, 8)
    narrow = keyed_columns(KeyedTensor.from_tensor_list(["x", "y"], [torch.ones(3, 2),
                                                                     torch.ones(3, 4)]),
                           ["y", "x"], 4)
    assert narrow[:, 1].tolist() == [[1.0, 1.0, 0.0, 0.0]] * 3


# --------------------------------------------------------------------------- residual VQ
def _mixture(n: int, t: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(8, d, generator=g) * 3
    pick = torch.randint(0, 8, (n, t), generator=g)
    return centres[pick] + torch.randn(n, t, d, generator=g)


def test_reconstruction_improves_with_levels():
    torch.manual_seed(0)
    rvq = ResidualVectorQuantizer(num_slots=2, levels=3, codebook_size=32, dim=8)
    for step in range(20):
        rvq(_mixture(512, 2, 8, seed=step))
    rvq.eval()
    z = _mixture(1024, 2, 8, seed=100)
    codes = rvq(z).codes
    slots = torch.arange(2)
    partial, errors = torch.zeros_like(z), [z.pow(2).mean().item()]
    for m in range(3):
        partial = partial + rvq.codebooks[slots, m][slots, codes[..., m]]
        errors.append((z - partial).pow(2).mean().item())
    assert errors[0] > errors[1] > errors[2] > errors[3], errors
    assert errors[3] < 0.5 * errors[1]


def test_straight_through_gradient_reaches_the_projection(batch):
    tok = _tokenizer(commitment=0.0)
    out = tok(batch.dense_features, batch.sparse_features)
    loss, parts = tok.loss(out, batch.labels)
    assert parts["commitment"] > 0
    loss.backward()  # BCE only: every gradient below came through the quantiser
    assert tok.projection_weight.grad.abs().sum() > 0
    assert tok.dense_weight.grad.abs().sum() > 0
    ebc_grads = [p.grad for p in tok.embedding_bag_collection.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in ebc_grads)
    # The estimator is the identity: d quantized / d z = 1.
    rvq = ResidualVectorQuantizer(3, 2, 8, 4)
    z = torch.randn(16, 3, 4, requires_grad=True)
    w = torch.randn(16, 3, 4)
    (rvq(z).quantized * w).sum().backward()
    assert torch.equal(z.grad, w)


def test_commitment_loss_pulls_inputs_to_codewords():
    rvq = ResidualVectorQuantizer(1, 1, 4, 2, commitment=1.0)
    rvq.eval()
    z = torch.randn(8, 1, 2, requires_grad=True)
    out = rvq(z)
    out.loss.backward()
    q = out.reconstruction
    torch.testing.assert_close(z.grad, 2 * (z - q).detach() / z.numel())


def test_ema_moves_codewords_toward_their_assigned_vectors():
    torch.manual_seed(0)
    rvq = ResidualVectorQuantizer(2, 1, 16, 4, decay=0.5, dead_code_threshold=0.0)
    z = torch.randn(128, 2, 4)
    rvq(z)  # initialises the codebooks from these vectors
    before = rvq.codebooks[:, 0].clone()  # [T, V, d]
    shifted = z + 0.3
    codes = rvq.encode(shifted)[..., 0]  # [B, T]
    rvq(shifted)
    after = rvq.codebooks[:, 0]
    for t in range(2):
        for v in range(16):
            assigned = shifted[codes[:, t] == v, t]
            if len(assigned) == 0:
                torch.testing.assert_close(after[t, v], before[t, v])
                continue
            target = assigned.mean(0)
            assert (after[t, v] - target).norm() < (before[t, v] - target).norm()
    # Codebooks are buffers: no gradient ever reaches them.
    assert not rvq.codebooks.requires_grad and not list(rvq.parameters())


def _usage_after(threshold: float) -> tuple:
    """Used fraction of level 0 on a narrow cluster, before and after 40 training steps."""
    torch.manual_seed(0)
    rvq = ResidualVectorQuantizer(2, 1, 64, 4, decay=0.8, dead_code_threshold=threshold)
    rvq(torch.randn(512, 2, 4))  # codebooks spread over a wide distribution

    def narrow(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return 4.0 + 0.05 * torch.randn(256, 2, 4, generator=g)

    rvq.eval()
    rvq.reset_usage()
    rvq(narrow(0))
    before = rvq.usage()
    rvq.train()
    for step in range(40):
        rvq(narrow(step + 1))
    rvq.eval()
    rvq.reset_usage()
    rvq(narrow(99))
    return before, rvq.usage()


def test_dead_code_restart_revives_unused_codes():
    before, after = _usage_after(threshold=0.1)
    assert before.used_fraction[0] < 0.1
    assert after.used_fraction[0] > 0.5
    assert after.restarts[0] > 0
    assert after.perplexity[0] > 10 * before.perplexity[0]
    # Without restarts the codebook stays collapsed on the same data.
    before0, after0 = _usage_after(threshold=0.0)
    assert after0.used_fraction[0] < 0.1 and after0.restarts[0] == 0


def test_perplexity_per_level_shows_a_collapsed_codebook():
    torch.manual_seed(0)
    rvq = ResidualVectorQuantizer(3, 2, 16, 4)
    out = rvq(torch.randn(256, 3, 4))
    assert out.perplexity.shape == (2,) and (out.perplexity > 4).all()
    rvq.eval()
    rvq.reset_usage()
    same = rvq(torch.ones(1, 3, 4).expand(64, 3, 4))
    torch.testing.assert_close(same.perplexity, torch.ones(2))
    usage = rvq.usage()
    torch.testing.assert_close(usage.used_fraction, torch.full((2,), 1 / 16))
    assert set(usage.to_dict()) == {"used_fraction", "perplexity", "dead_fraction", "restarts"}


def test_entropy_term_has_a_gradient():
    torch.manual_seed(0)
    rvq = ResidualVectorQuantizer(2, 2, 8, 4, entropy_weight=0.1)
    z = torch.randn(64, 2, 4, requires_grad=True)
    out = rvq(z)
    assert out.entropy_loss != 0
    (0.1 * out.entropy_loss).backward()
    assert z.grad.abs().sum() > 0


def test_eval_changes_no_codebook(batch):
    tok = _tokenizer()
    tok(batch.dense_features, batch.sparse_features)
    state = copy.deepcopy(tok.quantizer.state_dict())
    tok.eval()
    tok(batch.dense_features, batch.sparse_features)
    tok.train()
    tok.tokenize(batch.dense_features, batch.sparse_features)
    for k, v in tok.quantizer.state_dict().items():
        assert torch.equal(v, state[k]), k


# --------------------------------------------------------------------------- training
def _train(tok: SampleTokenizer, batch: InstanceBatch, steps: int) -> list:
    model = SampleTokenizerTrain(tok)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss, (detached, logits, labels) = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(detached.item())
    return losses


def test_training_lowers_the_loss(batch):
    losses = _train(_tokenizer(), batch, 40)
    assert losses[-1] < losses[0] - 0.02, losses


def test_deterministic_under_a_seed(batch):
    a, b = _tokenizer(seed=3), _tokenizer(seed=3)
    torch.manual_seed(7)
    la = _train(a, batch, 3)
    torch.manual_seed(7)
    lb = _train(b, batch, 3)
    assert la == lb
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k
    assert torch.equal(a.tokenize(batch.dense_features, batch.sparse_features),
                       b.tokenize(batch.dense_features, batch.sparse_features))


def test_state_dict_round_trip_keeps_codes(batch):
    a = _tokenizer()
    _train(a, batch, 2)
    b = _tokenizer(seed=5)
    b.load_state_dict(a.state_dict())
    b.train()
    assert b.quantizer._is_initialized()
    assert torch.equal(a.tokenize(batch.dense_features, batch.sparse_features),
                       b.tokenize(batch.dense_features, batch.sparse_features))


# --------------------------------------------------------------------------- distributed
def _rank_main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # forked: keep the child out of the parent's thread pool
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    torch.manual_seed(0)  # same initial buffers on every rank
    rvq = ResidualVectorQuantizer(2, 2, 16, 4, decay=0.8, dead_code_threshold=0.2)
    torch.manual_seed(100 + rank)  # different data and restart draws per rank
    for _ in range(5):
        rvq(torch.randn(64, 2, 4) + rank)
    torch.save(rvq.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_codebooks_agree_across_ranks(tmp_path: Path):
    mp.start_processes(_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       start_method="fork")
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert a["restarts"].sum() > 0
