"""History encoders blind to the target (``IATBranchConfig.history_sees_query=False``,
``SIFMixerConfig.history_sees_target=False``): against a per-sample loop over the real steps
only, and a history shared by several targets (``QueryGroups``) equal to each target reading
its own copy. Torch only."""

from __future__ import annotations

import pytest
import torch

from iat_torchrec.models.attention import MultiHeadAttention, QueryGroups
from iat_torchrec.models.history import IATBranch, IATBranchConfig
from iat_torchrec.models.mixer import SIFMixer, SIFMixerConfig

TOL = dict(atol=2e-5, rtol=1e-5)


def test_query_groups_grid_round_trip():
    g = QueryGroups.of(torch.tensor([0, 0, 0, 1, 3, 3]), count=4)
    assert g.slot.tolist() == [0, 1, 2, 0, 0, 1] and g.width == 3
    x = torch.arange(6.0)
    grid = g.to_grid(x)
    assert grid.tolist() == [[0, 1, 2], [3, 0, 0], [0, 0, 0], [4, 5, 0]]
    assert torch.equal(g.from_grid(grid), x)
    r = g.repeat(2)
    assert r.groups.tolist() == [0, 1, 0, 1, 0, 1, 2, 3, 6, 7, 6, 7] and r.count == 8


def test_attend_equals_self_attention_of_the_query_over_query_and_memory():
    torch.manual_seed(0)
    att = MultiHeadAttention(8, 2)
    x, memory = torch.randn(3, 1, 8), torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    out = att.attend(x, memory, mask)
    for i in range(3):
        seq = torch.cat([x[i:i + 1], memory[i:i + 1, mask[i]]], 1)
        torch.testing.assert_close(out[i:i + 1], att(seq, num_queries=1), **TOL)


def _matches_and_trains(module: torch.nn.Module, out: torch.Tensor, want: torch.Tensor) -> None:
    """``out`` equals the reference, and every gradient through it is finite (empty histories
    included)."""
    torch.testing.assert_close(out, want, **TOL)
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)


def _iat(seed: int = 0) -> IATBranch:
    torch.manual_seed(seed)
    return IATBranch(token_dim=12, query_dim=10, output_dim=8, config=IATBranchConfig(
        adapt_dim=8, side_dim=8, num_layers=3, num_heads=2, history_sees_query=False))


def _history(r: int, length: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(r, length, 12, generator=g)
    label = torch.randint(0, 3, (r, length), generator=g)
    gap = torch.randint(0, 5, (r, length), generator=g)
    lengths = torch.randint(0, length + 1, (r,), generator=g)
    lengths[0] = 0  # an empty history
    mask = torch.arange(length).expand(r, length) >= (length - lengths)[:, None]
    tokens[~mask] = float("nan")  # padding may hold anything
    return tokens, label, gap, mask


def _iat_reference(branch: IATBranch, tokens, label, gap, mask, query) -> torch.Tensor:
    """Per sample, the real steps only: the steps run the blocks among themselves; the query
    runs each block over [query; the block's input steps], its own output read."""
    out = []
    for i in range(query.shape[0]):
        real = mask[i]
        steps = branch.steps(tokens[i:i + 1, real], label[i:i + 1, real], gap[i:i + 1, real],
                             mask[i:i + 1, real])
        x = branch.query(query[i:i + 1]).unsqueeze(1)
        for block in branch.blocks:
            x = block(torch.cat([x, steps], 1), None, first_only=True)
            steps = block(steps, None)
        out.append(branch.output(branch.norm(x[:, 0])))
    return torch.cat(out)


def test_iat_history_blind_to_the_query_equals_a_per_sample_reference():
    branch = _iat()
    tokens, label, gap, mask = _history(5, 7)
    query = torch.randn(5, 10)
    _matches_and_trains(branch, branch(tokens, label, gap, mask, query),
                        _iat_reference(branch, tokens, label, gap, mask, query))


@pytest.mark.parametrize("sees", [True, False])
def test_iat_shared_history_equals_each_candidate_its_own_copy(sees):
    branch = _iat()
    branch.config.history_sees_query = sees
    tokens, label, gap, mask = _history(3, 6)
    groups = torch.tensor([0, 0, 1, 1, 1, 2])
    g = QueryGroups.of(groups, count=3)
    query = torch.randn(6, 10)
    shared = branch(tokens, label, gap, mask, query, groups=g)
    own = branch(tokens[groups], label[groups], gap[groups], mask[groups], query)
    torch.testing.assert_close(shared, own, **TOL)


def _mixer(**cfg) -> SIFMixer:
    torch.manual_seed(0)
    return SIFMixer(3, SIFMixerConfig(d0=8, num_blocks=3, num_heads=2, side_values=3,
                                      history_sees_target=False, **cfg), target_dim=6)


def _rows(r: int, length: int, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(r, length, 3, 8, generator=g)
    lengths = torch.randint(0, length + 1, (r,), generator=g)
    lengths[-1] = 0
    mask = torch.arange(length).expand(r, length) >= (length - lengths)[:, None]
    recency = torch.randint(0, 10, (r, length), generator=g)
    side = torch.randint(0, 3, (r, length), generator=g)
    rows[~mask] = float("nan")
    return rows, mask, recency, side


def _mixer_reference(mixer: SIFMixer, target, rows, mask, recency, side) -> torch.Tensor:
    """Per sample, the real rows only: the rows run the blocks among themselves; the target
    row runs each block over [target; the block's input rows], its own row read."""
    out = []
    for i in range(target.shape[0]):
        real = mask[i]
        h = mixer.history_rows(rows[i:i + 1, real], mask[i:i + 1, real],
                               recency[i:i + 1, real], side[i:i + 1, real])
        x = (mixer.align(target[i:i + 1]) + mixer.target_embedding).unsqueeze(1)
        for block in mixer.blocks:
            x = block(torch.cat([x, h], 1), None)[:, :1]
            h = block(h, None)
        out.append(mixer.norm(x[:, 0]).mean(1))
    return torch.cat(out)


def test_mixer_history_blind_to_the_target_equals_a_per_sample_reference():
    mixer = _mixer()
    rows, mask, recency, side = _rows(4, 6)
    target = torch.randn(4, 3, 6)
    _matches_and_trains(mixer, mixer(target, rows, mask, recency, side),
                        _mixer_reference(mixer, target, rows, mask, recency, side))


@pytest.mark.parametrize("sees", [True, False])
def test_mixer_shared_history_equals_each_target_its_own_copy(sees):
    mixer = _mixer()
    mixer.config.history_sees_target = sees
    rows, mask, recency, side = _rows(3, 5)
    groups = torch.tensor([0, 1, 1, 1, 2, 2])
    target = torch.randn(6, 3, 6)
    shared = mixer(target, rows, mask, recency, side, groups=QueryGroups.of(groups, 3))
    own = mixer(target, rows[groups], mask[groups], recency[groups], side[groups])
    torch.testing.assert_close(shared, own, **TOL)


def test_history_blind_to_the_target_needs_the_mixer_structure():
    with pytest.raises(ValueError, match="structure 'mixer'"):
        SIFMixerConfig(structure="flat", history_sees_target=False)
