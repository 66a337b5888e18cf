"""The IAT source model as modules: tower, bottleneck, SIT causality, streaming context."""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pytest
import torch

from conftest import tiny_columns, tiny_spec
from iat_torchrec.data.log import write_log
from iat_torchrec.data.reader import InstanceLogReader, ReaderConfig, ReadOrder
from iat_torchrec.models.sit import SourceInstanceTransformer, UserContextCache
from iat_torchrec.models.source import Scheme, SourceModelConfig, SourceModelTrain

CONFIG = SourceModelConfig(token_dim=16, dense_arch_layers=[16, 8], decompress_layers=[32, 16],
                           cross_rank=8, sit_heads=2, sit_context=8)


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    path = write_log(pa.table(tiny_columns(n=300, users=5)),
                     tmp_path_factory.mktemp("log") / "log", tiny_spec())
    reader = InstanceLogReader(path, config=ReaderConfig(batch_size=64, order=ReadOrder.USER))
    return next(iter(reader))


def test_tokens_are_the_bottleneck_in_unit_interval(batch):
    torch.manual_seed(0)
    model = SourceModelTrain(tiny_spec(), CONFIG, Scheme.TEMPORAL)
    z = model.tokens(batch.sparse_features, batch.dense_features)
    assert z.shape == (64, 16) and bool(((z > 0) & (z < 1)).all())
    loss, (_, logits, labels) = model(batch)
    assert logits.shape == labels.shape == (64, 2) and loss.requires_grad
    loss.backward()
    assert model.objective.tower.bottleneck.weight.grad.abs().sum() > 0


def test_without_bottleneck_the_tower_passes_h(batch):
    model = SourceModelTrain(tiny_spec(), dataclasses.replace(CONFIG, bottleneck=False),
                             Scheme.TEMPORAL)
    h = model.tokens(batch.sparse_features, batch.dense_features)
    assert h.shape == (64, model.objective.tower.wide_dim) and model.objective.tower.bottleneck \
        is None


def test_sit_is_causal():
    torch.manual_seed(0)
    sit = SourceInstanceTransformer(16, 2, 2, context=4).eval()
    x = torch.randn(3, 10, 16)
    out = sit(x)
    changed = x.clone()
    changed[:, 6:] = torch.randn(3, 4, 16)
    assert torch.allclose(sit(changed)[:, :6], out[:, :6], atol=1e-6)
    assert not torch.allclose(sit(changed)[:, 6:], out[:, 6:])


def test_short_and_long_histories_in_one_batch_stay_finite():
    """A user with one row beside a user with many: long padding after a short row."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(CONFIG, sit_context=2)
    obj = SourceModelTrain(tiny_spec(), cfg, Scheme.USER).objective.eval()
    users = torch.tensor([5] + [6] * 30)
    out = obj._sit_outputs(torch.rand(31, 16), users, torch.ones(31))
    assert torch.isfinite(out).all()


def _objective():
    torch.manual_seed(0)
    return SourceModelTrain(tiny_spec(), CONFIG, Scheme.USER).objective.eval()


def test_streaming_context_equals_one_long_batch():
    """A user's history split over two batches, with the stop-gradient context, gives the same
    SIT outputs as the whole history in one batch (while it fits the context)."""
    z = torch.rand(7, 16)
    users = torch.tensor([4, 4, 4, 4, 4, 4, 4])
    ones = torch.ones(7)
    whole = _objective()
    out_whole = whole._sit_outputs(z, users, ones)
    split = _objective()
    first = split._sit_outputs(z[:4], users[:4], ones[:4])
    second = split._sit_outputs(z[4:], users[4:], ones[4:])
    assert torch.allclose(torch.cat([first, second]), out_whole, atol=1e-5)
    assert split.cache.tokens[4].shape == (7, 16)


def test_streaming_is_exact_for_any_split_with_a_short_window():
    cfg = dataclasses.replace(CONFIG, sit_context=2)
    z = torch.rand(9, 16, generator=torch.Generator().manual_seed(1))
    users, ones = torch.full((9,), 3), torch.ones(9)
    torch.manual_seed(0)
    whole = SourceModelTrain(tiny_spec(), cfg, Scheme.USER).objective.eval()
    expected = whole._sit_outputs(z, users, ones)
    for cut in (1, 4, 8):
        torch.manual_seed(0)
        split = SourceModelTrain(tiny_spec(), cfg, Scheme.USER).objective.eval()
        got = torch.cat([split._sit_outputs(z[:cut], users[:cut], ones[:cut]),
                         split._sit_outputs(z[cut:], users[cut:], ones[cut:])])
        assert torch.allclose(got, expected, atol=1e-5), cut


def test_other_users_do_not_leak_into_a_users_outputs():
    obj = _objective()
    z = torch.rand(6, 16)
    users = torch.tensor([1, 1, 1, 2, 2, 2])
    out = obj._sit_outputs(z, users, torch.ones(6))
    other = z.clone()
    other[3:] = torch.rand(3, 16)
    obj.cache.tokens.clear()
    assert torch.allclose(obj._sit_outputs(other, users, torch.ones(6))[:3], out[:3], atol=1e-6)


def test_padding_batches_leave_no_trace(batch):
    torch.manual_seed(0)
    model = SourceModelTrain(tiny_spec(), CONFIG, Scheme.USER)
    loss, _ = model(batch.as_padding())
    assert float(loss.detach()) == 0.0 and model.objective.cache.tokens == {}
    model(batch)
    assert set(model.objective.cache.tokens) == set(batch.user_id.tolist())


def test_context_cache_keeps_the_last_tokens():
    cache = UserContextCache(3)
    cache.update([7], [torch.arange(10.0).reshape(5, 2)])
    ctx, lengths = cache.context([7, 8], 2, torch.device("cpu"))
    assert lengths.tolist() == [3, 0]
    assert ctx[0].tolist() == [[4.0, 5.0], [6.0, 7.0], [8.0, 9.0]]
    restored = UserContextCache(0)
    restored.load_state_dict(cache.state_dict())
    assert restored.size == 3 and torch.equal(restored.tokens[7], cache.tokens[7])


def test_every_pass_starts_without_context(tmp_path):
    """A second pass must not see the user's later tokens, left from the first, as context."""
    from iat_torchrec.config import parse_config
    from iat_torchrec.stages import compress

    seen = []
    original = compress.Trainer.fit

    def spy(self, after_epoch=None, before_epoch=None):
        def check(epoch):
            before_epoch(epoch)
            seen.append(len(cache_of(self).tokens))
        return original(self, after_epoch=after_epoch, before_epoch=check)

    def cache_of(trainer):
        return trainer.model.module.objective.cache

    path = write_log(pa.table(tiny_columns(n=300, users=5)), tmp_path / "log", tiny_spec())
    cfg = parse_config(compress.CompressConfig, [
        "--train_log", str(path), "--store", str(tmp_path / "store"), "--scheme", "user",
        "--two_pass", "--train.epochs", "2", "--train.batch_size", "64", "--model.token_dim",
        "16", "--model.sit_heads", "2", "--train.log_every", "0"])
    compress.Trainer.fit = spy
    try:
        compress.run_compress(cfg)
    finally:
        compress.Trainer.fit = original
    assert seen == [0, 0]


def test_sit_reads_a_label_only_once_matured_at_the_query():
    """Flipping instance j's label changes exactly the outputs of the queries at whose time it
    had matured (ts_j + delay <= ts_i, ts_j < ts_i): never j's own, never an earlier one."""
    torch.manual_seed(0)
    sit = SourceInstanceTransformer(16, 2, 2, context=8, num_labels=1).eval()
    x = torch.randn(1, 8, 16)
    ts = torch.tensor([[0, 10, 10, 20, 25, 40, 40, 60]])
    labels = torch.zeros(1, 8, 1)
    for delay in (0, 15):
        out = sit(x, labels=labels, ts=ts, label_delay=delay)
        for j in range(8):
            flipped = labels.clone()
            flipped[0, j, 0] = 1.0
            changed = (sit(x, labels=flipped, ts=ts, label_delay=delay) - out).abs().amax(-1)[0]
            matured = (ts[0, j] < ts[0]) & (ts[0, j] + delay <= ts[0])
            assert torch.equal(changed > 1e-6, matured), (delay, j)


def test_streaming_with_labels_equals_one_long_batch():
    cfg = dataclasses.replace(CONFIG, sit_context=3, sit_labels=True)
    g = torch.Generator().manual_seed(2)
    z = torch.rand(9, 16, generator=g)
    labels = torch.randint(0, 2, (9, 2), generator=g).float()
    ts = torch.tensor([1, 2, 2, 5, 6, 6, 7, 9, 12])
    users, ones = torch.full((9,), 3), torch.ones(9)
    torch.manual_seed(0)
    whole = SourceModelTrain(tiny_spec(), cfg, Scheme.USER).objective.eval()
    expected = whole._sit_outputs(z, users, ones, labels, ts)
    for cut in (1, 4, 8):
        torch.manual_seed(0)
        split = SourceModelTrain(tiny_spec(), cfg, Scheme.USER).objective.eval()
        got = torch.cat([split._sit_outputs(z[:cut], users[:cut], ones[:cut], labels[:cut],
                                            ts[:cut]),
                         split._sit_outputs(z[cut:], users[cut:], ones[cut:], labels[cut:],
                                            ts[cut:])])
        assert torch.allclose(got, expected, atol=1e-5), cut


def test_source_model_with_sit_labels_trains(batch):
    torch.manual_seed(0)
    model = SourceModelTrain(tiny_spec(), dataclasses.replace(CONFIG, sit_labels=True),
                             Scheme.USER)
    loss, _ = model(batch)
    loss.backward()
    assert model.objective.sit.label_embedding.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- post-SIT export
def _user_batches(tmp_path, batch_size: int):
    path = write_log(pa.table(tiny_columns(n=300, users=5)), tmp_path / "log", tiny_spec())
    return list(InstanceLogReader(path, config=ReaderConfig(batch_size=batch_size,
                                                            order=ReadOrder.USER)))


@pytest.mark.parametrize("sit_labels", [False, True])
def test_sit_tokens_are_the_training_sit_outputs_streamed(tmp_path, sit_labels):
    """sit_tokens: what the user-order loss reads (the SIT over z with the streamed context),
    the same for any batch size, a padding batch leaving no trace."""
    cfg = dataclasses.replace(CONFIG, sit_labels=sit_labels)
    torch.manual_seed(0)
    model = SourceModelTrain(tiny_spec(), cfg, Scheme.USER).eval()
    whole = _user_batches(tmp_path, 300)
    assert len(whole) == 1
    b = whole[0]
    with torch.no_grad():
        expected = model.sit_tokens(b)
        model.objective.cache.clear()
        z = model.tokens(b.sparse_features, b.dense_features)
        direct = model.objective._sit_outputs(z, b.user_id, b.weight, b.labels, b.ts)
        assert torch.equal(expected, direct) and not torch.allclose(expected, z)
        model.objective.cache.clear()
        parts = []
        for small in _user_batches(tmp_path / "small", 64):
            parts.append(model.sit_tokens(small))
            model.sit_tokens(small.as_padding())  # no trace
        assert torch.allclose(torch.cat(parts), expected, atol=1e-5)


def test_sit_tokens_never_see_a_later_row_or_the_own_label(tmp_path):
    torch.manual_seed(0)
    model = SourceModelTrain(tiny_spec(), dataclasses.replace(CONFIG, sit_labels=True),
                             Scheme.USER).eval()
    b = _user_batches(tmp_path, 300)[0]
    with torch.no_grad():
        out = model.sit_tokens(b)
        flipped = dataclasses.replace(b, labels=1.0 - b.labels)
        dense = b.dense_features.clone()
        dense[150:] += 5.0  # later rows in the user order
        later = dataclasses.replace(b, dense_features=dense)
        for changed in (flipped, later):
            model.objective.cache.clear()
            got = model.sit_tokens(changed)
            first = torch.ones(300, dtype=torch.bool)
            first[1:] = b.user_id[1:] != b.user_id[:-1]  # a user's first row: no earlier label
            keep = first if changed is flipped else torch.arange(300) < 150
            assert torch.equal(got[keep], out[keep])
            assert not torch.allclose(got[~keep], out[~keep])


def test_context_cache_clears_and_snapshots_labels_with_tokens():
    cache = UserContextCache(4)
    cache.update([1], [torch.zeros(2, 3)], [torch.ones(2, 1)], [torch.tensor([5, 6])])
    saved = cache.snapshot()
    cache.update([1, 2], [torch.ones(1, 3), torch.ones(2, 3)],
                 [torch.zeros(1, 1), torch.zeros(2, 1)], [torch.tensor([7]), torch.tensor([1, 2])])
    cache.load_state_dict(saved)
    assert set(cache.tokens) == set(cache.labels) == set(cache.ts) == {1}
    assert cache.tokens[1].shape == (2, 3) and cache.ts[1].tolist() == [5, 6]
    cache.clear()
    assert cache.tokens == cache.labels == cache.ts == {}
