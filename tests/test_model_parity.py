"""The history models laid out for speed equal their earlier forward passes
(``iat_torchrec.models.reference``): outputs and every gradient (parameters and float inputs),
float32 within 1e-5, with right- and left-aligned padding, a batch whose leading steps are all
padding, empty histories, a batch without any real step, and without padding."""

from __future__ import annotations

from typing import Callable, Dict, List

import pytest
import torch
from torch import nn

from iat_torchrec.models import reference
from iat_torchrec.models.history import (BSTConfig, BSTEncoder, DINAttention, DINConfig,
                                         IATBranch, IATBranchConfig)
from iat_torchrec.models.mixer import SIFMixer, SIFMixerBlock, SIFMixerConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest
B, L, D, T, GAPS = 4, 9, 16, 5, 20
ATOL = RTOL = 1e-5

# Per sample, the number of real steps; "left": real steps first, "right": real steps last.
MASKS = {
    "mixed_right": ([0, 3, 9, 5], "right"),
    "mixed_left": ([0, 3, 9, 5], "left"),
    "leading_padding": ([2, 3, 6, 1], "right"),  # the first 3 steps padding in every sample
    "trailing_padding": ([2, 3, 6, 1], "left"),  # the last 3 steps padding in every sample
    "no_real_step": ([0, 0, 0, 0], "right"),
    "no_padding": ([9, 9, 9, 9], "right"),
    "holes": (None, "random"),
}


def _mask(name: str) -> torch.Tensor:
    lengths, align = MASKS[name]
    if lengths is None:
        return torch.rand(B, L, generator=torch.Generator().manual_seed(3)) < 0.5
    steps = torch.arange(L)
    n = torch.tensor(lengths).unsqueeze(1)
    return steps < n if align == "left" else steps >= L - n


def _grads(model: nn.Module, inputs: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {name: p.grad if p.grad is not None else torch.zeros_like(p)
           for name, p in model.named_parameters()}
    out.update({f"input{i}": x.grad for i, x in enumerate(inputs) if x.grad is not None})
    return out


def _check(model: nn.Module, fast: Callable, slow: Callable, floats: List[torch.Tensor],
           others: List[torch.Tensor]) -> None:
    """Output and gradients of ``fast`` and ``slow`` (each ``(*floats, *others) -> out``)."""
    results = []
    for run in (fast, slow):
        model.zero_grad(set_to_none=True)
        xs = [x.detach().clone().requires_grad_(True) for x in floats]
        out = run(*xs, *others)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out, _grads(model, xs)))
    (out_fast, g_fast), (out_slow, g_slow) = results
    torch.testing.assert_close(out_fast, out_slow, atol=ATOL, rtol=RTOL)
    assert g_fast.keys() == g_slow.keys()
    for name in g_fast:
        torch.testing.assert_close(g_fast[name], g_slow[name], atol=ATOL, rtol=RTOL,
                                   msg=lambda m: f"gradient of {name}: {m}")


def _side(mask: torch.Tensor, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 4, (B, L), generator=g)
    gap = torch.randint(0, GAPS, (B, L), generator=g)
    return label, gap


def _randomised(module: nn.Module) -> nn.Module:
    """Every parameter non-trivial (some start at zero or one)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return module


@pytest.mark.parametrize("mask_name", sorted(MASKS))
@pytest.mark.parametrize("explicit_recency", [True, False])
def test_sif_mixer_equals_the_reference(mask_name, explicit_recency):
    torch.manual_seed(0)
    mixer = _randomised(SIFMixer(T, SIFMixerConfig(d0=8, num_blocks=3, recency_buckets=GAPS),
                                 target_dim=6))
    mask = _mask(mask_name)
    side, recency = _side(mask)  # label, gap bucket
    target, history = torch.randn(B, T, 6), torch.randn(B, L, T, 8)
    others = [mask, recency if explicit_recency else None, side]
    _check(mixer, mixer, lambda *a: reference.sif_mixer(mixer, *a), [target, history], others)


def test_sif_mixer_without_history_equals_the_reference():
    torch.manual_seed(0)
    mixer = _randomised(SIFMixer(T, SIFMixerConfig(d0=8, num_blocks=2, pooling="flatten")))
    _check(mixer, mixer, lambda *a: reference.sif_mixer(mixer, *a), [torch.randn(B, T, 8)], [])


@pytest.mark.parametrize("target_only", [False, True])
def test_mixer_block_equals_the_reference(target_only):
    torch.manual_seed(0)
    block = _randomised(SIFMixerBlock(8, 2, 4))
    mask = _mask("holes")
    mask[:, 0] = True
    _check(block, lambda x, m: block(x, m, target_only),
           lambda x, m: reference.mixer_block(block, x, m, target_only),
           [torch.randn(B, L, T, 8)], [mask])


@pytest.mark.parametrize("mask_name", sorted(MASKS))
@pytest.mark.parametrize("config", [BSTConfig(num_layers=2), BSTConfig(output="mean")],
                         ids=["target", "mean"])
def test_bst_equals_the_reference(mask_name, config):
    torch.manual_seed(0)
    bst = _randomised(BSTEncoder(D, config, gap_vocab=GAPS))
    mask = _mask(mask_name)
    _check(bst, bst, lambda *a: reference.bst(bst, *a),
           [torch.randn(B, D), torch.randn(B, L, D)], [*_side(mask), mask])


@pytest.mark.parametrize("mask_name", sorted(MASKS))
@pytest.mark.parametrize("config", [
    IATBranchConfig(adapt_dim=16, side_dim=16, num_heads=2, position_buckets=8),
    IATBranchConfig(adapt_dim=8, side_dim=8, num_layers=1, num_heads=2)], ids=["2x", "1x"])
def test_iat_branch_equals_the_reference(mask_name, config):
    torch.manual_seed(0)
    branch = _randomised(IATBranch(12, 24, D, config, gap_vocab=GAPS))
    mask = _mask(mask_name)
    label, gap = _side(mask)
    tokens = torch.randn(B, L, 12)
    _check(branch, lambda q: branch(tokens, label, gap, mask, q),
           lambda q: reference.iat_branch(branch, tokens, label, gap, mask, q),
           [torch.randn(B, 24)], [])


@pytest.mark.parametrize("mask_name", sorted(MASKS))
@pytest.mark.parametrize("softmax", [False, True])
def test_din_equals_the_reference(mask_name, softmax):
    torch.manual_seed(0)
    din = _randomised(DINAttention(D, DINConfig(softmax=softmax), gap_vocab=GAPS))
    mask = _mask(mask_name)
    _check(din, din, lambda *a: reference.din(din, *a),
           [torch.randn(B, D), torch.randn(B, L, D)], [*_side(mask), mask])
