"""CUDA checks of the PyTorch-only models: on a GPU, forward and backward of the SIF-Mixer (the
paper's form and the history blind to the target, shared across candidates), the IAT branch,
the SIT and the residual quantiser equal the same modules on the CPU. Skipped without CUDA.

This file imports PyTorch and the torch-only modules alone, so it runs where torchrec and
fbgemm-gpu are not installed (a GPU machine with PyTorch only):
``python -m pytest --noconftest tests/test_cuda.py``. The TorchRec / FBGEMM CUDA paths (sharded
lookups, nccl stages) need the CUDA fbgemm-gpu and are not covered here.
"""

from __future__ import annotations

import pytest
import torch

from iat_torchrec.models.attention import QueryGroups
from iat_torchrec.models.history import IATBranch, IATBranchConfig
from iat_torchrec.models.mixer import SIFMixer, SIFMixerConfig
from iat_torchrec.models.quantizer import ResidualVectorQuantizer
from iat_torchrec.models.sit import SourceInstanceTransformer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device on this machine")
CUDA = torch.device("cuda")
TOL = dict(atol=1e-4, rtol=1e-4)


def _same_on_cuda(module: torch.nn.Module, *inputs, **kwargs) -> None:
    """module(*inputs) and the gradients of its parameters match on CPU and CUDA."""
    outs, grads = [], []
    for device in (torch.device("cpu"), CUDA):
        m = module.to(device)
        m.zero_grad()
        moved = [x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs]
        extra = {k: (QueryGroups(*(t.to(device) for t in (v.groups, v.slot)), v.width, v.count)
                     if isinstance(v, QueryGroups) else v) for k, v in kwargs.items()}
        out = m(*moved, **extra)
        out.float().pow(2).sum().backward()
        outs.append(out.detach().cpu())
        grads.append([p.grad.detach().cpu() for p in m.parameters() if p.grad is not None])
    torch.testing.assert_close(outs[1], outs[0], **TOL)
    for g_cuda, g_cpu in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_cuda, g_cpu, **TOL)


def _history(r: int, length: int, width: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(r, length, width, generator=g)
    lengths = torch.randint(0, length + 1, (r,), generator=g)
    mask = torch.arange(length).expand(r, length) >= (length - lengths)[:, None]
    ids = torch.randint(0, 3, (r, length), generator=g)
    return x, mask, ids


@pytest.mark.parametrize("sees", [True, False])
def test_sif_mixer(sees):
    torch.manual_seed(0)
    mixer = SIFMixer(4, SIFMixerConfig(d0=16, num_blocks=2, side_values=3,
                                       history_sees_target=sees), target_dim=12)
    rows, mask, side = _history(3, 33, 4 * 16)
    groups = QueryGroups.of(torch.tensor([0, 0, 1, 2, 2, 2]), 3)
    _same_on_cuda(mixer, torch.randn(6, 4, 12), rows.view(3, 33, 4, 16), mask, None, side,
                  groups=groups)


@pytest.mark.parametrize("sees", [True, False])
def test_iat_branch(sees):
    torch.manual_seed(0)
    branch = IATBranch(24, 20, 16, IATBranchConfig(history_sees_query=sees))
    tokens, mask, label = _history(5, 65, 24)
    _same_on_cuda(branch, tokens, label, label, mask, torch.randn(5, 20))


def test_sit():
    torch.manual_seed(0)
    sit = SourceInstanceTransformer(16, 2, 2, context=8)
    _same_on_cuda(sit, torch.randn(2, 12, 16))


def test_residual_quantizer_picks_the_same_codes():
    torch.manual_seed(0)
    rvq = ResidualVectorQuantizer(3, 2, 32, 8).eval()
    x = torch.randn(64, 3, 8)
    on_cpu = rvq(x)
    on_cuda = rvq.to(CUDA)(x.to(CUDA))
    assert torch.equal(on_cuda.codes.cpu(), on_cpu.codes)
    torch.testing.assert_close(on_cuda.quantized.cpu(), on_cpu.quantized, **TOL)
