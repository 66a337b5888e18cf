"""History branches: DIN, BST, the mean pool and the IAT branch on their own: masks (padding
invariance, any alignment), empty histories, frozen tokens."""

from __future__ import annotations

import pytest
import torch

from iat_torchrec.history import LABEL_PAD, LABEL_UNKNOWN
from iat_torchrec.models.history import (BSTConfig, BSTEncoder, DINAttention, DINConfig,
                                         IATBranch, IATBranchConfig, MeanPoolHistory)

B, L, D, TOKEN_DIM, QUERY_DIM, GAPS = 5, 7, 16, 12, 24, 20
LENGTHS = [0, 1, 3, 7, 5]  # an empty history, a full one
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest


def _inputs(seed: int = 0):
    """Left-aligned histories: items / tokens, label, gap, mask; target; query."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(L) < torch.tensor(LENGTHS).unsqueeze(1)
    label = torch.where(mask, torch.randint(0, 3, (B, L), generator=g), LABEL_PAD)
    gap = torch.where(mask, torch.randint(0, GAPS - 1, (B, L), generator=g), GAPS - 1)
    return {
        "items": torch.randn(B, L, D, generator=g),
        "tokens": torch.randn(B, L, TOKEN_DIM, generator=g),
        "label": label, "gap": gap, "mask": mask,
        "target": torch.randn(B, D, generator=g),
        "query": torch.randn(B, QUERY_DIM, generator=g),
    }


def _branches():
    torch.manual_seed(0)
    din = DINAttention(D, DINConfig(), gap_vocab=GAPS)
    din_softmax = DINAttention(D, DINConfig(softmax=True), gap_vocab=GAPS)
    bst = BSTEncoder(D, BSTConfig(num_layers=2), gap_vocab=GAPS)
    bst_mean = BSTEncoder(D, BSTConfig(output="mean"), gap_vocab=GAPS)
    iat = IATBranch(TOKEN_DIM, QUERY_DIM, D, IATBranchConfig(adapt_dim=16, side_dim=16,
                                                             num_heads=2, position_buckets=8),
                    gap_vocab=GAPS)
    return {"din": din, "din_softmax": din_softmax, "bst": bst, "bst_mean": bst_mean,
            "iat": iat, "mean": MeanPoolHistory(D)}


def _run(name: str, module: torch.nn.Module, x) -> torch.Tensor:
    if name.startswith("iat"):
        return module(x["tokens"], x["label"], x["gap"], x["mask"], x["query"])
    return module(x["target"], x["items"], x["label"], x["gap"], x["mask"])


def _pad(x, extra: int, garbage: float):
    """The same histories with ``extra`` more padded steps holding garbage (NaN for floats)."""
    out = dict(x)
    for key, fill in (("items", garbage), ("tokens", garbage)):
        v = x[key]
        out[key] = torch.cat([v, torch.full((B, extra, v.shape[2]), fill)], dim=1)
    out["label"] = torch.cat([x["label"], torch.full((B, extra), 99)], dim=1)
    out["gap"] = torch.cat([x["gap"], torch.full((B, extra), 99)], dim=1)
    out["mask"] = torch.cat([x["mask"], torch.zeros(B, extra, dtype=torch.bool)], dim=1)
    return out


def _scramble_padding(x):
    """Garbage (NaN, out-of-vocabulary ids) in the existing padded steps."""
    out = dict(x)
    pad = ~x["mask"]
    out["items"] = torch.where(pad.unsqueeze(-1), float("nan"), x["items"])
    out["tokens"] = torch.where(pad.unsqueeze(-1), 1e6, x["tokens"])
    out["label"] = torch.where(pad, 1234, x["label"])
    out["gap"] = torch.where(pad, -5, x["gap"])
    return out


def _right_align(x):
    """The same real steps, in the same order, at the end of each row instead of the start."""
    out = dict(x)
    n = x["mask"].sum(1, keepdim=True)
    src = (torch.arange(L) - (L - n)) % L  # position j reads source step (j - (L - n)) mod L
    for key in ("items", "tokens"):
        out[key] = torch.gather(x[key], 1, src.unsqueeze(-1).expand_as(x[key]))
    for key in ("label", "gap"):
        out[key] = torch.gather(x[key], 1, src)
    out["mask"] = torch.arange(L) >= (L - n)
    return out


@pytest.mark.parametrize("name", ["din", "din_softmax", "bst", "bst_mean", "iat", "mean"])
def test_padding_invariance(name):
    module = _branches()[name].eval()
    x = _inputs()
    ref = _run(name, module, x)
    tokens = getattr(module, "num_tokens", 1)
    assert ref.shape == ((B, D) if tokens == 1 else (B, tokens, D)), name
    assert torch.isfinite(ref).all()
    for variant in (_pad(x, 4, float("nan")), _pad(x, 9, 3.0), _scramble_padding(x),
                    _right_align(x)):
        assert torch.allclose(_run(name, module, variant), ref, atol=1e-5), name


@pytest.mark.parametrize("name", ["din", "din_softmax", "bst", "bst_mean", "iat", "mean"])
def test_empty_history_is_finite_with_finite_gradients(name):
    module = _branches()[name]
    x = _scramble_padding(_inputs())
    x["mask"] = torch.zeros(B, L, dtype=torch.bool)
    out = _run(name, module, x)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    for p_name, p in module.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), p_name
    if name.startswith(("din", "mean")):
        assert torch.equal(out, torch.zeros_like(out))  # nothing to attend to
    zero_length = {k: (v[:, :0] if v.dim() > 1 and k not in ("target", "query") else v)
                   for k, v in _inputs().items()}
    assert torch.isfinite(_run(name, module, zero_length)).all()


@pytest.mark.parametrize("name", ["din", "bst", "iat", "mean"])
def test_history_content_matters(name):
    """The masks do not make the branches blind: real steps change the output."""
    module = _branches()[name].eval()
    x = _inputs()
    y = dict(x)
    y["items"], y["tokens"] = x["items"] + 1.0, x["tokens"] + 1.0
    y["label"] = torch.where(x["mask"], LABEL_UNKNOWN, x["label"])
    a, b = _run(name, module, x), _run(name, module, y)
    has = torch.tensor(LENGTHS) > 0
    assert not torch.allclose(a[has], b[has], atol=1e-4)


def test_iat_branch_takes_no_gradient_into_tokens_and_uses_the_query():
    module = _branches()["iat"]
    x = _inputs()
    x["tokens"].requires_grad_(True)
    x["query"].requires_grad_(True)
    module(x["tokens"], x["label"], x["gap"], x["mask"], x["query"]).sum().backward()
    assert x["tokens"].grad is None
    assert x["query"].grad is not None and x["query"].grad.abs().sum() > 0
    assert module.adapt.weight.grad.abs().sum() > 0  # the adaptation MLP learns


def test_configs_reject_bad_sizes():
    with pytest.raises(ValueError):
        BSTConfig(output="sum")
    with pytest.raises(ValueError):
        IATBranchConfig(adapt_dim=64, side_dim=63, num_heads=4)
    with pytest.raises(ValueError):
        DINConfig(attention_layers=[0])
    with pytest.raises(ValueError):
        BSTEncoder(18, BSTConfig(num_heads=4))


# --------------------------------------------------------------------------- ablation switches
def _iat_switch(**cfg) -> IATBranch:
    torch.manual_seed(0)
    return IATBranch(TOKEN_DIM, QUERY_DIM, D, IATBranchConfig(adapt_dim=16, side_dim=16,
                                                              num_heads=2, **cfg),
                     gap_vocab=GAPS)


SWITCHES = [dict(side_labels=False), dict(encoder="din"), dict(encoder="din", side_labels=False)]


@pytest.mark.parametrize("cfg", SWITCHES)
def test_iat_switches_respect_padding_and_train_a_step(cfg):
    module = _iat_switch(**cfg)
    x = _inputs()
    ref = _run("iat", module.eval(), x)
    assert ref.shape == (B, D) and torch.isfinite(ref).all()
    for variant in (_pad(x, 4, float("nan")), _pad(x, 9, 3.0), _scramble_padding(x),
                    _right_align(x)):
        assert torch.allclose(_run("iat", module, variant), ref, atol=1e-5), cfg
    empty = _scramble_padding(x)
    empty["mask"] = torch.zeros(B, L, dtype=torch.bool)
    assert torch.isfinite(_run("iat", module, empty)).all()
    module.train()
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    _run("iat", module, x).square().sum().backward()
    for name, p in module.named_parameters():  # every parameter is used: no idle DDP params
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    opt.step()
    assert any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_iat_without_side_labels_ignores_labels_and_keeps_widths():
    module = _iat_switch(side_labels=False).eval()
    assert module.label_embedding is None
    x = _inputs()
    y = dict(x, label=torch.where(x["mask"], LABEL_UNKNOWN, x["label"]))
    assert torch.equal(_run("iat", module, x), _run("iat", module, y))
    steps = module.steps(x["tokens"], x["label"], x["gap"], x["mask"])
    assert steps.shape == (B, L, 32)
    with_labels = _iat_switch().eval()
    assert not torch.allclose(_run("iat", with_labels, x), _run("iat", with_labels, y))


def test_iat_din_encoder_is_target_attention_over_the_steps():
    """DIN over the adapted steps, the projected query as target: no Transformer blocks, and
    the output is output(norm(sum_j a(q, x_j) x_j)) over the real steps."""
    module = _iat_switch(encoder="din").eval()
    assert len(module.blocks) == 0 and module.activation_unit is not None
    x = _inputs()
    out = _run("iat", module, x)
    with torch.no_grad():
        for i, n in enumerate(LENGTHS):
            steps = module.steps(x["tokens"][i:i + 1, :n], x["label"][i:i + 1, :n],
                                 x["gap"][i:i + 1, :n], x["mask"][i:i + 1, :n])[0]
            q = module.query(x["query"][i])
            unit_in = torch.cat([q.expand_as(steps), steps, q - steps, q * steps], 1)
            pooled = (module.activation_unit(unit_in) * steps).sum(0)
            assert torch.allclose(out[i], module.output(module.norm(pooled)), atol=1e-5), i


def test_iat_default_is_the_transformer_with_side_labels():
    cfg = IATBranchConfig()
    assert cfg.encoder == "transformer" and cfg.side_labels
    module = _iat_switch()
    assert module.activation_unit is None and module.label_embedding is not None
    assert len(module.blocks) == cfg.num_layers
    with pytest.raises(ValueError, match="encoder"):
        IATBranchConfig(encoder="lstm")


def test_iat_side_information_starts_at_its_configured_scale():
    big, small = _iat_switch(side_init_std=1.0), _iat_switch()
    for module, std in ((big, 1.0), (small, 0.02)):
        for emb in (module.label_embedding, module.gap_embedding):
            assert abs(emb.weight.std().item() - std) < 0.25 * std
    assert big.adapt.weight.equal(small.adapt.weight)  # only the side information changes
    with pytest.raises(ValueError, match="side_init_std"):
        IATBranchConfig(side_init_std=0.0)
