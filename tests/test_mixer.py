"""The SIF-Mixer: padding invariance, shapes, a slow reference, and DLRM's interaction arch."""

from __future__ import annotations

import math
from typing import List, Optional

import pyarrow as pa
import pytest
import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.models.dlrm import DLRM, OverArch
from torchrec.sparse.jagged_tensor import KeyedTensor

from conftest import tiny_columns, tiny_spec
from iat_torchrec.data.log import write_log
from iat_torchrec.data.reader import InstanceLogReader, ReaderConfig
from iat_torchrec.models.hgaq import HGAQConfig, SampleTokenizer, tokenizer_embedding_bag_collection
from iat_torchrec.models.mixer import (IATHistoryProjection, SIFMixer, SIFMixerBlock,
                                       SIFMixerConfig, SIFMixerInteractionArch)


def _mixer(t: int = 3, target_dim: Optional[int] = None, seed: int = 0, **cfg) -> SIFMixer:
    torch.manual_seed(seed)
    config = SIFMixerConfig(**{"d0": 8, "num_blocks": 2, "recency_buckets": 8, **cfg})
    mixer = SIFMixer(t, config, target_dim=target_dim)
    with torch.no_grad():  # non-trivial values everywhere (some start at zero)
        mixer.target_embedding.normal_()
    return mixer.eval()


def _inputs(b: int, length: int, t: int = 3, d: int = 8, seed: int = 1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(b, t, d, generator=g, dtype=dtype)
    history = torch.randn(b, length, t, d, generator=g, dtype=dtype)
    mask = torch.rand(b, length, generator=g) < 0.6
    recency = torch.randint(0, 8, (b, length), generator=g)
    side = torch.randint(0, 4, (b, length), generator=g)
    return target, history, mask, recency, side


# --------------------------------------------------------------------------- invariances
def test_masked_history_steps_do_not_change_the_output():
    mixer = _mixer()
    target, history, mask, recency, side = _inputs(4, 10)
    out = mixer(target, history, mask, recency, side)
    garbage = history.clone()
    garbage[~mask] = torch.randn(int((~mask).sum()), 3, 8) * 100
    steps = (~mask).nonzero()
    garbage[steps[:, 0], steps[:, 1], 0, 0] = float("nan")
    recency2, side2 = recency.clone(), side.clone()
    recency2[~mask], side2[~mask] = 10**6, -5  # out-of-range ids on masked steps are ignored
    out2 = mixer(target, garbage, mask, recency2, side2)
    assert torch.equal(out, out2)
    # Dropping the masked steps altogether gives the same output (explicit recency ids).
    for i in range(4):
        keep = mask[i]
        alone = mixer(target[i:i + 1], history[i:i + 1, keep], keep[keep].unsqueeze(0),
                      recency[i:i + 1, keep], side[i:i + 1, keep])
        torch.testing.assert_close(alone, out[i:i + 1], rtol=1e-5, atol=1e-6)


def test_an_all_empty_history_equals_no_history():
    mixer = _mixer()
    target, history, _, recency, side = _inputs(3, 7)
    empty = torch.zeros(3, 7, dtype=torch.bool)
    out = mixer(target, history, empty, recency, side)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, mixer(target), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, mixer(target, history[:, :0], empty[:, :0]),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("length", [0, 1, 256])
def test_shapes_and_finite_gradients(length):
    mixer = _mixer(t=4, target_dim=5, pooling="flatten").train()
    target, history, mask, recency, side = _inputs(2, length, t=4)
    mask[:, -1:] = True  # at least one real step when there are steps
    target = torch.randn(2, 4, 5, requires_grad=True)
    history.requires_grad_(True)
    out = mixer(target, history, mask, recency, side)
    assert out.shape == (2, mixer.output_dim) and mixer.output_dim == 4 * 8
    out.square().sum().backward()
    grads = [target.grad] + [p.grad for p in mixer.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads)
    if length:
        assert torch.isfinite(history.grad).all()
        assert history.grad[~mask].abs().sum() == 0 and history.grad[mask].abs().sum() > 0
    mean = _mixer(t=4, target_dim=5)(target.detach(), history.detach(), mask, recency, side)
    assert mean.shape == (2, 8)


def test_last_block_target_only_matches_the_full_block():
    torch.manual_seed(0)
    block = SIFMixerBlock(8, 2, 4).eval()
    x = torch.randn(3, 6, 4, 8)
    mask = torch.rand(3, 6) < 0.5
    mask[:, 0] = True
    torch.testing.assert_close(block(x, mask, target_only=True), block(x, mask)[:, :1])


# --------------------------------------------------------------------------- slow reference
def _layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    mean = sum(x) / len(x)
    var = sum((xi - mean) ** 2 for xi in x) / len(x)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _attention(queries: List[torch.Tensor], keys: List[torch.Tensor], valid: List[bool],
               attn) -> List[torch.Tensor]:
    """Explicit multi-head softmax attention, one query, head and key at a time."""
    d = queries[0].shape[0]
    heads = attn.num_heads
    dh = d // heads
    w, b = attn.in_proj.weight, attn.in_proj.bias
    proj = [(w[:d] @ x + b[:d], w[d:2 * d] @ x + b[d:2 * d], w[2 * d:] @ x + b[2 * d:])
            for x in keys]
    outs = []
    for qi, x in enumerate(queries):
        q = w[:d] @ x + b[:d]
        head_outs = []
        for h in range(heads):
            s = slice(h * dh, (h + 1) * dh)
            scores = [float(torch.dot(q[s], proj[j][1][s])) / math.sqrt(dh)
                      for j in range(len(keys)) if valid[j]]
            top = max(scores)
            weights = [math.exp(sc - top) for sc in scores]
            total = sum(weights)
            values = [proj[j][2][s] for j in range(len(keys)) if valid[j]]
            head_outs.append(sum(wt / total * v for wt, v in zip(weights, values)))
        outs.append(attn.out_proj.weight @ torch.cat(head_outs) + attn.out_proj.bias)
    return outs


def _ffn(x: torch.Tensor, ffn: nn.Sequential) -> torch.Tensor:
    h = ffn[0].weight @ x + ffn[0].bias
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return ffn[2].weight @ h + ffn[2].bias


def _reference(mixer: SIFMixer, target, history, mask, recency, side) -> torch.Tensor:
    """The SIF-Mixer in flat loops over samples, rows and columns."""
    b_size, t_size, _ = target.shape
    length = history.shape[1]
    d0 = mixer.config.d0
    outs = []
    for b in range(b_size):
        x = [[target[b, t] @ mixer.align_weight[t] + mixer.align_bias[t]
              + mixer.target_embedding[t] for t in range(t_size)]]
        for i in range(length):
            row = []
            for t in range(t_size):
                if mask[b, i]:
                    enc = mixer.recency_embedding.weight[recency[b, i], t * d0:(t + 1) * d0]
                    enc = enc + mixer.side_embedding.weight[side[b, i], t * d0:(t + 1) * d0]
                    row.append(history[b, i, t] + enc)
                else:
                    row.append(torch.zeros_like(history[b, i, t]))
            x.append(row)
        valid = [True] + [bool(m) for m in mask[b]]
        for block in mixer.blocks:
            for r in range(length + 1):
                ys = [_layer_norm(x[r][t], block.token_norm) for t in range(t_size)]
                a = _attention(ys, ys, [True] * t_size, block.token_attention)
                x[r] = [x[r][t] + a[t] for t in range(t_size)]
            for t in range(t_size):
                ys = [_layer_norm(x[r][t], block.sample_norm) for r in range(length + 1)]
                a = _attention(ys, ys, valid, block.sample_attention)
                for r in range(length + 1):
                    x[r][t] = x[r][t] + a[r]
            for r in range(length + 1):
                x[r] = [x[r][t] + _ffn(_layer_norm(x[r][t], block.ffn_norm), block.ffn)
                        for t in range(t_size)]
        final = [_layer_norm(x[0][t], mixer.norm) for t in range(t_size)]
        outs.append(sum(final) / t_size)
    return torch.stack(outs)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_equals_a_slow_reference(dtype, tol):
    """Float64: equal within 1e-10 (rounding only); float32: within 1e-5 absolute and relative."""
    mixer = _mixer(t=3, target_dim=5).to(dtype)
    _, history, mask, recency, side = _inputs(2, 4, dtype=dtype)
    mask[1] = torch.tensor([True, False, True, False])
    target = torch.randn(2, 3, 5, dtype=dtype)
    with torch.no_grad():
        fast = mixer(target, history, mask, recency, side)
        slow = _reference(mixer, target, history, mask, recency, side)
    torch.testing.assert_close(fast, slow, rtol=tol, atol=tol)


# --------------------------------------------------------------------------- the pieces
def test_alignment_loss_against_the_tokenizer_reconstruction():
    spec = tiny_spec()
    torch.manual_seed(0)
    config = HGAQConfig(fields_per_subtoken=2, codebook_size=16, aux_layers=[])
    tok = SampleTokenizer(spec, config, tokenizer_embedding_bag_collection(spec, 8))
    tok.quantizer.train()
    features = torch.randn(16, tok.num_tokens, 8)
    reconstruction = tok.quantizer(torch.randn(16, tok.num_tokens, 16)).reconstruction
    reconstruction.requires_grad_(True)
    mixer = SIFMixer(tok.num_tokens, SIFMixerConfig(), target_dim=8)
    loss = mixer.alignment_loss(features, reconstruction)
    torch.testing.assert_close(loss, (mixer.align(features) - reconstruction).pow(2).mean())
    loss.backward()
    assert mixer.align_weight.grad.abs().sum() > 0
    assert reconstruction.grad is None  # stop-gradient on e


def test_history_from_codes_and_from_iat_tokens():
    spec = tiny_spec()
    torch.manual_seed(0)
    tok = SampleTokenizer(spec, HGAQConfig(fields_per_subtoken=2, codebook_size=16),
                          tokenizer_embedding_bag_collection(spec, 8))
    t = tok.num_tokens
    codes = torch.randint(0, 16, (2, 6, t, 3), dtype=torch.uint8)
    from_codes = tok.codes_to_embeddings(codes)
    iat = IATHistoryProjection(token_dim=64, num_tokens=t, d0=16)
    from_iat = iat(torch.rand(2, 6, 64))
    assert from_codes.shape == from_iat.shape == (2, 6, t, 16)
    mixer = SIFMixer(t, SIFMixerConfig(), target_dim=8)
    mask = torch.ones(2, 6, dtype=torch.bool)
    for history in (from_codes, from_iat, torch.cat([from_codes, from_iat], dim=1)):
        out = mixer(torch.randn(2, t, 8), history, mask.repeat(1, history.shape[1] // 6))
        assert out.shape == (2, 16) and torch.isfinite(out).all()


def test_interaction_arch_reads_keyed_tensors_in_any_order():
    torch.manual_seed(0)
    arch = SIFMixerInteractionArch(8, [8, 4, 8], SIFMixerConfig(d0=8, num_blocks=1),
                                   feature_names=["a", "b", "c"]).eval()
    dense = torch.randn(5, 8)
    emb = {"a": torch.randn(5, 8), "b": torch.randn(5, 4), "c": torch.randn(5, 8)}
    ordered = KeyedTensor.from_tensor_list(["a", "b", "c"], [emb["a"], emb["b"], emb["c"]])
    shuffled = KeyedTensor.from_tensor_list(["c", "a", "b"], [emb["c"], emb["a"], emb["b"]])
    out = arch(dense, ordered)
    assert out.shape == (5, arch.output_dim) and arch.output_dim == 8
    torch.testing.assert_close(out, arch(dense, shuffled))
    padded = torch.stack([emb["a"], nn.functional.pad(emb["b"], (0, 4)), emb["c"]], dim=1)
    torch.testing.assert_close(out, arch(dense, padded))


# --------------------------------------------------------------------------- inside DLRM
def test_dlrm_with_the_mixer_as_interaction_trains(tmp_path):
    spec = tiny_spec()
    path = write_log(pa.table(tiny_columns(n=512, seed=4)), tmp_path / "log", spec)
    batch = next(iter(InstanceLogReader(path, config=ReaderConfig(batch_size=512))))
    torch.manual_seed(0)
    dim = 8
    ebc = EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name=f"t_{f.name}", embedding_dim=dim, num_embeddings=f.num_embeddings,
                           feature_names=[f.name]) for f in spec.sparse])
    model = DLRM(embedding_bag_collection=ebc, dense_in_features=len(spec.dense),
                 dense_arch_layer_sizes=[16, dim], over_arch_layer_sizes=[16, 1])
    # Replace the interaction and over arch the way DLRM_DCN does.
    model.inter_arch = SIFMixerInteractionArch(
        dim, [dim] * len(spec.sparse), SIFMixerConfig(d0=8, num_blocks=2, pooling="flatten"))
    model.over_arch = OverArch(model.inter_arch.output_dim, [16, 1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    labels = batch.labels[:, 0]
    losses = []
    for _ in range(30):
        logits = model(batch.dense_features, batch.sparse_features).squeeze(-1)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.05, losses


# --------------------------------------------------------------------------- structure ablations
@pytest.mark.parametrize("structure", ["flat", "pooled"])
def test_structures_respect_masks_and_train_a_step(structure):
    mixer = _mixer(structure=structure)
    assert all(not isinstance(b, SIFMixerBlock) for b in mixer.blocks)
    assert len(mixer.blocks) == 2
    target, history, mask, recency, side = _inputs(4, 10)
    mask[0] = False  # one empty history
    out = mixer(target, history, mask, recency, side)
    assert out.shape == (4, 8) and torch.isfinite(out).all()
    garbage = history.clone()
    garbage[~mask] = torch.randn(int((~mask).sum()), 3, 8) * 100
    steps = (~mask).nonzero()
    garbage[steps[:, 0], steps[:, 1], 0, 0] = float("nan")
    recency2, side2 = recency.clone(), side.clone()
    recency2[~mask], side2[~mask] = 10**6, -5
    assert torch.equal(mixer(target, garbage, mask, recency2, side2), out)
    for i in range(4):  # the masked steps dropped altogether: the same output
        keep = mask[i]
        alone = mixer(target[i:i + 1], history[i:i + 1, keep], keep[keep].unsqueeze(0),
                      recency[i:i + 1, keep], side[i:i + 1, keep])
        torch.testing.assert_close(alone, out[i:i + 1], rtol=1e-5, atol=1e-6)
    # A training step: finite gradients, none into masked steps, every parameter used.
    mixer.train()
    history.requires_grad_(True)
    mixer(target, history, mask, recency, side).square().sum().backward()
    assert history.grad[~mask].abs().sum() == 0 and history.grad[mask].abs().sum() > 0
    for name, p in mixer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    before = [p.detach().clone() for p in mixer.parameters()]
    torch.optim.SGD(mixer.parameters(), lr=0.1).step()
    assert any(not torch.equal(a, p) for a, p in zip(before, mixer.parameters()))


def test_flat_is_one_attention_over_all_tokens():
    """flat: every block attends over all (L+1) T tokens, so a history row's sub-tokens are
    seen one by one; the output is the target row's T tokens (flatten: T * d0)."""
    mixer = _mixer(structure="flat", pooling="flatten")
    target, history, mask, recency, side = _inputs(2, 5)
    mask[:] = True
    out = mixer(target, history, mask, recency, side)
    assert out.shape == (2, 3 * 8)
    with torch.no_grad():
        x = torch.cat([(mixer.align(target) + mixer.target_embedding).unsqueeze(1),
                       mixer.history_rows(history, mask, recency, side)], 1).flatten(1, 2)
        for block in mixer.blocks:
            x = block(x, None)
        torch.testing.assert_close(out, mixer.norm(x[:, :3]).flatten(1))


def test_pooled_sees_only_the_mean_of_each_history_row():
    """pooled: permuting a history row's sub-tokens changes nothing (the mixer sees them)."""
    target, history, mask, recency, side = _inputs(3, 6)
    mask[:, -1] = True
    shuffled = history[:, :, [2, 0, 1]]
    pooled, mixer = _mixer(structure="pooled"), _mixer()
    torch.testing.assert_close(pooled(target, shuffled, mask, recency, side),
                               pooled(target, history, mask, recency, side))
    assert not torch.allclose(mixer(target, shuffled, mask, recency, side),
                              mixer(target, history, mask, recency, side))


def test_structure_settings_are_checked_and_default_to_the_mixer():
    assert SIFMixerConfig().structure == "mixer"
    assert all(isinstance(b, SIFMixerBlock) for b in _mixer().blocks)
    with pytest.raises(ValueError, match="structure"):
        SIFMixerConfig(structure="nope")
    with pytest.raises(ValueError, match="pooling"):
        SIFMixerConfig(structure="pooled", pooling="flatten")


def test_recency_and_side_encodings_start_at_their_configured_scale():
    big, small = _mixer(side_init_std=1.0), _mixer()
    for module, std in ((big, 1.0), (small, 0.02)):
        for emb in (module.recency_embedding, module.side_embedding):
            assert abs(emb.weight.std().item() - std) < 0.25 * std
    with pytest.raises(ValueError, match="side_init_std"):
        SIFMixerConfig(side_init_std=-1.0)
