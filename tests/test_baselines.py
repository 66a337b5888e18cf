"""The peer library's baselines (METHOD.md, "How the peer's numbers were made"): the mean pool
of the item history (source ``pooled``, the peer's DNN) against a per-sample loop, and DCNv2
(interaction ``dcn``, TorchRec's ``DLRM_DCN`` cross net) in DLRM_SIF."""

from __future__ import annotations

import pytest
import torch
from torchrec.models.dlrm import InteractionDCNArch, OverArch
from torchrec.modules.crossnet import LowRankCrossNet

import test_dlrm_sif as dlrm
from iat_torchrec.history import LABEL_VOCAB_SIZE
from iat_torchrec.models.dlrm_sif import ConcatInteraction, DLRM_SIFTrain, with_dropout
from iat_torchrec.models.history import MeanPoolHistory

B, L, D = 6, 7, 8
world = dlrm.world  # the tiny log, stores and batch of test_dlrm_sif (a module fixture)
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest


def _history(seed: int = 0):
    """Items [B, L, D] (NaN at padding), labels (out of vocabulary at padding), mask with an
    all-padding sample first and a full one last."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, L, generator=g) < 0.6
    mask[0], mask[-1] = False, True
    items = torch.where(mask.unsqueeze(-1), torch.randn(B, L, D, generator=g), float("nan"))
    label = torch.where(mask, torch.randint(0, LABEL_VOCAB_SIZE, (B, L), generator=g), 99)
    return items, label, mask


def test_mean_pool_is_the_mean_item_and_the_mean_label_of_the_real_steps():
    torch.manual_seed(0)
    pool = MeanPoolHistory(D)
    items, label, mask = _history()
    items.requires_grad_(True)
    out = pool(torch.randn(B, D), items, label, torch.full((B, L), -3), mask)
    table = pool.label_embedding.weight
    expected = torch.stack([
        torch.stack([items[b, mask[b]].mean(0), table[label[b, mask[b]]].mean(0)])
        if mask[b].any() else torch.zeros(2, D) for b in range(B)])
    assert out.shape == (B, 2, D) and torch.isfinite(out).all()
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.equal(out[0], torch.zeros(2, D))
    out.sum().backward()
    count = mask.sum(1, keepdim=True).clamp_min(1)
    assert torch.allclose(items.grad, (mask / count).unsqueeze(-1).expand(B, L, D))
    used = torch.bincount(label[mask], minlength=LABEL_VOCAB_SIZE) > 0
    assert torch.isfinite(table.grad).all() and (table.grad[used].abs().sum(1) > 0).all()
    assert torch.equal(table.grad[~used], torch.zeros_like(table.grad[~used]))


@pytest.mark.parametrize("source,interaction", [("pooled", "dot"), ("pooled", "dcn"),
                                                ("none", "dcn"), ("pooled", "concat")])
def test_pooled_and_dcn_baselines_learn(world, source, interaction):
    cfg = dlrm.small_config(source, interaction)
    model = dlrm.build(world, cfg)
    tower, n = model.tower, len(world.spec.sparse) + 2 * (source == "pooled")  # items, labels
    assert [type(a.encoder) for a in tower.history_archs] == \
        ([MeanPoolHistory] if source == "pooled" else [])
    if interaction == "dcn":
        arch = tower.inter_arch.arch
        assert isinstance(arch, InteractionDCNArch) and isinstance(arch.crossnet, LowRankCrossNet)
        assert tower.inter_arch.output_dim == (n + 1) * cfg.embedding_dim
        assert len(arch.crossnet.W_kernels) == cfg.dcn_layers
        assert arch.crossnet.W_kernels[0].shape == ((n + 1) * cfg.embedding_dim, cfg.dcn_low_rank)
    if interaction == "concat":  # the over arch sees every embedding as it is
        assert isinstance(tower.inter_arch.arch, ConcatInteraction)
        assert tower.over_arch.model[0]._mlp[0]._linear.in_features == (n + 1) * cfg.embedding_dim
    train = DLRM_SIFTrain(model)
    opt = torch.optim.Adam(train.parameters(), lr=5e-3)
    losses = []
    for step in range(20):
        loss, (detached, logits, labels) = train(world.batch)
        assert logits.shape == labels.shape == (64, 2) and torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            grads = {k: p.grad for k, p in train.named_parameters()}
            assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), \
                [k for k, g in grads.items() if g is None or not torch.isfinite(g).all()]
        opt.step()
        losses.append(float(detached))
    assert losses[-1] < 0.95 * losses[0], losses


def test_dcn_settings_are_checked():
    with pytest.raises(ValueError, match="interaction='mixer'"):
        dlrm.small_config("sif_iat", "dcn")
    with pytest.raises(ValueError, match="dcn_layers"):
        dlrm.small_config("none", "dcn", dcn_low_rank=0)


def test_over_arch_dropout_acts_in_training_only_and_keeps_the_weights():
    torch.manual_seed(0)
    plain = OverArch(12, [32, 16, 1])
    assert with_dropout(plain, 0.0) is plain
    torch.manual_seed(0)
    dropped = with_dropout(OverArch(12, [32, 16, 1]), 0.5)
    assert [p.shape for p in dropped.parameters()] == [p.shape for p in plain.parameters()]
    for a, b in zip(dropped.parameters(), plain.parameters()):
        assert torch.equal(a, b)
    x = torch.randn(64, 12)
    dropped.eval()
    torch.testing.assert_close(dropped(x), plain(x), rtol=0, atol=0)
    dropped.train()
    assert not torch.allclose(dropped(x), plain(x))
