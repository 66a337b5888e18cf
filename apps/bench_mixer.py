"""Benchmark: one training step (forward, backward of a weighted sum of the output) of the four
long-history models, pure PyTorch (no torchrec needed), against the device's roofline.

    python apps/bench_mixer.py [--device cpu|cuda] [--lengths 64 256 1000] [--one_core true]
        [--batch_size 2] [--branch_batch_size 32] [--reference true] [--threads 1]

For each history length L, in the same run and on the same device, times

- **flat attention** (reference of the SIF-Mixer): N pre-LayerNorm blocks of multi-head attention
  over all (L+1) x T tokens of a sample and the same FFN, the last block attending from the
  target row's tokens only (the paper's ablation, -0.24% GAUC);
- the **SIF-Mixer** (``SIFMixer``: T = ``num_tokens`` sub-tokens, ``mixer.*`` sizes), batch
  ``batch_size``;
- the **IAT branch** (``IATBranch``, ``iat.*`` sizes, tokens of ``token_dim``, a query of
  ``query_dim``), **BST** and **DIN** over item embeddings of width ``item_dim``, batch
  ``branch_batch_size``;
- with ``--reference``: each of the four as it was before issue 12
  (``iat_torchrec.models.reference``), rows marked "before".

Histories are full (no padding: what the models compute, not what they skip). Per row:
samples/s, the model's FLOPs and bytes per sample (forward + backward; counted analytically by
``iat_torchrec.models.cost``, whose docstring says exactly what is counted), achieved GFLOP/s
and GB/s, and the fraction of the roofline min(matmul rate, copy bandwidth x FLOPs / bytes),
matmul rate and copy bandwidth measured in the same run (``iat_torchrec.benchmark.Limits``).
Times are best-of-``repeats`` wall seconds after one warm-up step.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from iat_torchrec.benchmark import (ROOFLINE_COLUMNS, Limits, device_time, markdown_table,
                                    pin_one_core, roofline_cells)
from iat_torchrec.config import parse_config
from iat_torchrec.models import cost, reference
from iat_torchrec.models.attention import MultiHeadAttention
from iat_torchrec.models.history import (BSTConfig, BSTEncoder, DINAttention, DINConfig,
                                         IATBranch, IATBranchConfig)
from iat_torchrec.models.mixer import SIFMixer, SIFMixerConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclasses.dataclass
class BenchMixerConfig:
    """Long-history models benchmark."""

    device: str = dataclasses.field(default="cpu", metadata={"help": "cpu | cuda | cuda:N"})
    dtype: str = dataclasses.field(default="float32", metadata={"help": "float32 | bfloat16"})
    lengths: List[int] = dataclasses.field(default_factory=lambda: [64, 256, 1000],
                                           metadata={"help": "history lengths L"})
    batch_size: int = dataclasses.field(default=2, metadata={
        "help": "samples per step of the SIF-Mixer and flat attention"})
    branch_batch_size: int = dataclasses.field(default=32, metadata={
        "help": "samples per step of the IAT branch, BST and DIN"})
    num_tokens: int = dataclasses.field(default=27, metadata={"help": "T (27 in the paper)"})
    mixer: SIFMixerConfig = dataclasses.field(default_factory=SIFMixerConfig, metadata={
        "help": "SIF-Mixer sizes"})
    iat: IATBranchConfig = dataclasses.field(default_factory=IATBranchConfig, metadata={
        "help": "IAT branch sizes"})
    bst: BSTConfig = dataclasses.field(default_factory=BSTConfig, metadata={"help": "BST"})
    din: DINConfig = dataclasses.field(default_factory=DINConfig, metadata={"help": "DIN"})
    token_dim: int = dataclasses.field(default=64, metadata={"help": "IAT token width d"})
    query_dim: int = dataclasses.field(default=432, metadata={
        "help": "IAT query width ((1 + 26) x 16: the dense and 26 sparse embeddings)"})
    item_dim: int = dataclasses.field(default=16, metadata={
        "help": "item embedding width D of BST and DIN (and the IAT output)"})
    flat: bool = dataclasses.field(default=True, metadata={"help": "time flat attention"})
    reference: bool = dataclasses.field(default=False, metadata={
        "help": "also time the models as they were before (iat_torchrec.models.reference)"})
    repeats: int = dataclasses.field(default=2, metadata={"help": "timed steps (best kept)"})
    matmul_size: int = dataclasses.field(
        default=0, metadata={"help": "side of the reference matmul (0: 2048 on CPU, 8192 GPU)"})
    one_core: bool = dataclasses.field(default=False, metadata={
        "help": "CPU: pin the process to one core, one thread"})
    threads: int = dataclasses.field(default=0, metadata={"help": "CPU threads (0: default)"})


class FlatAttentionBlock(nn.Module):
    """Pre-LayerNorm attention over all tokens of a sample, then the FFN."""

    def __init__(self, dim: int, num_heads: int, ffn_mult: int) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = MultiHeadAttention(dim, num_heads)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.GELU(),
                                 nn.Linear(ffn_mult * dim, dim))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor],
                num_queries: Optional[int] = None) -> torch.Tensor:
        """x [B, S, d], mask [B, 1, 1, S] -> [B, S or num_queries, d]."""
        a = self.attention(self.attention_norm(x), mask, num_queries=num_queries)
        x = (x if num_queries is None else x[:, :num_queries]) + a
        return x + self.ffn(self.ffn_norm(x))


class FlatAttentionMixer(nn.Module):
    """The flat-attention reference over H [B, L+1, T, d0]: output the mean of row 0."""

    def __init__(self, num_tokens: int, config: SIFMixerConfig) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.align = nn.Linear(config.d0, config.d0)
        self.blocks = nn.ModuleList(FlatAttentionBlock(config.d0, config.num_heads,
                                                       config.ffn_mult)
                                    for _ in range(config.num_blocks))
        self.norm = nn.LayerNorm(config.d0)

    def forward(self, target: torch.Tensor, history: torch.Tensor,
                history_mask: torch.Tensor) -> torch.Tensor:
        b, length, t, d = history.shape
        x = torch.cat([self.align(target).unsqueeze(1), history], dim=1).reshape(b, -1, d)
        rows = torch.cat([history_mask.new_ones(b, 1), history_mask], dim=1)
        mask = None if bool(rows.all()) else rows.repeat_interleave(t, dim=1).view(b, 1, 1, -1)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block(x, mask, num_queries=t if i == last else None)
        return self.norm(x).mean(1)


@dataclasses.dataclass
class Case:
    """One row: a model, how to run it on its inputs, its batch and analytic cost."""

    name: str
    module: nn.Module
    run: Callable[..., torch.Tensor]
    inputs: Tuple[torch.Tensor, ...]
    batch: int
    cost: cost.Cost


def _train_step(case: Case) -> Callable[[], None]:
    def step() -> None:
        case.module.zero_grad(set_to_none=True)
        case.run(*case.inputs).sum().backward()
    return step


def cases(cfg: BenchMixerConfig, length: int, models: dict, device: torch.device,
          dtype: torch.dtype) -> List[Case]:
    """The rows at one L (full histories, random inputs)."""
    m, i, bc = cfg.mixer, cfg.iat, cfg.bst
    b, t, d0 = cfg.batch_size, cfg.num_tokens, m.d0
    g = torch.Generator(device=device).manual_seed(length)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    def ids(high, *shape):
        return torch.randint(0, high, shape, generator=g, device=device)

    mask = torch.ones(b, length, dtype=torch.bool, device=device)
    mix_in = (randn(b, t, d0), randn(b, length, t, d0), mask, ids(m.recency_buckets, b, length),
              ids(m.side_values, b, length))
    mix_cost = cost.sif_mixer(b, length, t, d0, m.num_heads, m.ffn_mult, m.num_blocks, d0)
    nb, dim = cfg.branch_batch_size, cfg.item_dim
    steps = (ids(4, nb, length), ids(20, nb, length),
             torch.ones(nb, length, dtype=torch.bool, device=device))
    iat_in = (randn(nb, length, cfg.token_dim), *steps, randn(nb, cfg.query_dim))
    item_in = (randn(nb, dim), randn(nb, length, dim), *steps)
    mixer, iat, bst, din = models["mixer"], models["iat"], models["bst"], models["din"]
    out = []
    if cfg.flat:
        out.append(Case("flat attention (reference)", models["flat"], models["flat"],
                        mix_in[:3], b, cost.total([
                            cost.linear(b * t, d0, d0), cost.inputs(b * length * t * d0),
                            cost.transformer(b, (length + 1) * t, d0, m.num_heads, m.ffn_mult,
                                             m.num_blocks, t)])))
    rows = [("SIF-Mixer", mixer, mixer, reference.sif_mixer, mix_in, b, mix_cost),
            ("IAT branch", iat, iat, reference.iat_branch, iat_in, nb,
             cost.iat_branch(nb, length, cfg.token_dim, cfg.query_dim, dim, i.adapt_dim,
                             i.side_dim, i.num_heads, i.ffn_mult, i.num_layers)),
            ("BST", bst, bst, reference.bst, item_in, nb,
             cost.bst(nb, length, dim, bc.num_heads, bc.ffn_mult, bc.num_layers,
                      bc.output == "target")),
            ("DIN", din, din, reference.din, item_in, nb,
             cost.din(nb, length, dim, cfg.din.attention_layers))]
    for name, module, fast, slow, inputs, batch, c in rows:
        out.append(Case(name, module, fast, inputs, batch, c))
        if cfg.reference:
            out.append(Case(f"{name} (before)", module,
                            lambda *a, _m=module, _f=slow: _f(_m, *a), inputs, batch, c))
    return out


def build_models(cfg: BenchMixerConfig, device: torch.device, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    models = {
        "flat": FlatAttentionMixer(cfg.num_tokens, cfg.mixer),
        "mixer": SIFMixer(cfg.num_tokens, cfg.mixer),
        "iat": IATBranch(cfg.token_dim, cfg.query_dim, cfg.item_dim, cfg.iat),
        "bst": BSTEncoder(cfg.item_dim, cfg.bst),
        "din": DINAttention(cfg.item_dim, cfg.din),
    }
    return {k: v.to(device=device, dtype=dtype) for k, v in models.items()}


def main(argv: Optional[Sequence[str]] = None) -> None:
    cfg = parse_config(BenchMixerConfig, argv)
    device = torch.device(cfg.device)
    if cfg.one_core and device.type == "cpu":
        pin_one_core()
    elif cfg.threads:
        torch.set_num_threads(cfg.threads)
    dtype = DTYPES[cfg.dtype]
    limits = Limits.measure(device, cfg.repeats, dtype, cfg.matmul_size)
    models = build_models(cfg, device, dtype)
    rows = []
    for length in cfg.lengths:
        for case in cases(cfg, length, models, device, dtype):
            seconds = device_time(_train_step(case), cfg.repeats, device)
            per = case.cost.per_sample(case.batch)
            rows.append((length, case.name, case.batch, seconds * 1e3,
                         *roofline_cells(case.batch / seconds, per.flops, per.bytes, limits)))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} thread(s)"
    m = cfg.mixer
    print(f"\nlong-history models on {name}, {cfg.dtype}, torch {torch.__version__}, "
          f"{datetime.date.today().isoformat()}: forward + backward, best of {cfg.repeats}; "
          f"SIF-Mixer T = {cfg.num_tokens}, d0 = {m.d0}, N = {m.num_blocks}, heads = "
          f"{m.num_heads}; IAT branch {cfg.iat.adapt_dim} + {cfg.iat.side_dim}, "
          f"{cfg.iat.num_layers} layers, {cfg.iat.num_heads} heads, tokens d = {cfg.token_dim}; "
          f"BST / DIN D = {cfg.item_dim}")
    print(f"limits measured in this run: {limits.describe()}")
    print(markdown_table([("L", ">5"), ("model", "<26"), ("batch", ">5"), ("ms / step", ">9.1f"),
                          *ROOFLINE_COLUMNS], rows))


if __name__ == "__main__":
    main()
