"""Benchmark: forward + backward of the SIF-Mixer against flat attention over all tokens.

    python apps/bench_mixer.py [--device cpu|cuda] [--lengths 64 256 1000] [--batch_size 2]

For each history length L, in the same run and on the same device, times one training step
(forward, backward of the sum of the output) of

- the reference: **flat attention**, N pre-LayerNorm blocks of multi-head attention over all
  (L+1) x T tokens of a sample (padding mask per token) and the same FFN, the output being the
  mean of the target row's tokens (the last block, as in the mixer, attends from the target row
  only): the ablation the paper reports at -0.24% GAUC;
- the **SIF-Mixer** (``iat_torchrec.models.mixer.SIFMixer``): token attention within rows,
  sample attention within columns, FFN.

Both use ``scaled_dot_product_attention`` and the same d0, heads, blocks and FFN width. Achieved
FLOP/s are model FLOPs (matrix products and attention, 2 per multiply-add, backward counted as
twice the forward) over the measured time, compared with a large square matrix product timed in
the same run (the device's practical peak for this dtype).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from iat_torchrec.config import parse_config
from iat_torchrec.models.mixer import MultiHeadAttention, SIFMixer, SIFMixerConfig

from iat_torchrec.benchmark import best_time, markdown_table


@dataclasses.dataclass
class BenchMixerConfig:
    """SIF-Mixer benchmark."""

    device: str = dataclasses.field(default="cpu", metadata={"help": "cpu | cuda | cuda:N"})
    dtype: str = dataclasses.field(default="float32", metadata={"help": "float32 | bfloat16"})
    lengths: List[int] = dataclasses.field(default_factory=lambda: [64, 256, 1000],
                                           metadata={"help": "history lengths L"})
    batch_size: int = dataclasses.field(default=2, metadata={"help": "samples per step"})
    num_tokens: int = dataclasses.field(default=27, metadata={"help": "T (27 in the paper)"})
    d0: int = dataclasses.field(default=16, metadata={"help": "token size"})
    num_blocks: int = dataclasses.field(default=4, metadata={"help": "N"})
    num_heads: int = dataclasses.field(default=2, metadata={"help": "attention heads"})
    repeats: int = dataclasses.field(default=2, metadata={"help": "timed steps (best kept)"})
    matmul_size: int = dataclasses.field(
        default=0, metadata={"help": "side of the reference matmul (0: 2048 on CPU, 8192 GPU)"})
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

    def forward(self, x: torch.Tensor, mask: torch.Tensor,
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
        mask = rows.repeat_interleave(t, dim=1).view(b, 1, 1, -1)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block(x, mask, num_queries=t if i == last else None)
        return self.norm(x).mean(1)


def mixer_flops(b: int, length: int, t: int, d: int, blocks: int, ffn_mult: int) -> float:
    """Forward model FLOPs of the SIF-Mixer (last block: target row queries only)."""
    r = length + 1
    per_block = (8 * b * r * t * d * d + 4 * b * r * t * t * d  # token attention
                 + 6 * b * r * t * d * d + 4 * b * t * r * r * d + 2 * b * r * t * d * d
                 + 4 * ffn_mult * b * r * t * d * d)  # sample attention, FFN
    last = (8 * b * r * t * d * d + 4 * b * r * t * t * d
            + 6 * b * r * t * d * d + 4 * b * t * r * d + 2 * b * t * d * d
            + 4 * ffn_mult * b * t * d * d)
    return float((blocks - 1) * per_block + last)


def flat_flops(b: int, length: int, t: int, d: int, blocks: int, ffn_mult: int) -> float:
    """Forward model FLOPs of flat attention over S = (L+1) T tokens."""
    s = (length + 1) * t
    per_block = 8 * b * s * d * d + 4 * b * s * s * d + 4 * ffn_mult * b * s * d * d
    last = 6 * b * s * d * d + 4 * b * t * s * d + 2 * b * t * d * d + 4 * ffn_mult * b * t * d * d
    return float((blocks - 1) * per_block + last)


def device_time(step: Callable[[], None], repeats: int, device: torch.device) -> float:
    """Best wall time of ``step`` on ``device`` over ``repeats`` runs, after one warm-up run."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    return best_time(step, repeats, warmup=True, sync=sync)


def matmul_rate(n: int, dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    """FLOP/s of an n x n by n x n matrix product."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2.0 * n ** 3 / device_time(lambda: torch.mm(a, b), repeats, device)


def _train_step(model: nn.Module, inputs: Tuple[torch.Tensor, ...]) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(*inputs).sum().backward()
    return step


def main(argv: Optional[List[str]] = None) -> None:
    cfg = parse_config(BenchMixerConfig, argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    size = cfg.matmul_size or (8192 if device.type == "cuda" else 2048)
    peak = matmul_rate(size, dtype, device, cfg.repeats)
    config = SIFMixerConfig(d0=cfg.d0, num_blocks=cfg.num_blocks, num_heads=cfg.num_heads)
    b, t, d = cfg.batch_size, cfg.num_tokens, cfg.d0
    torch.manual_seed(0)
    mixer = SIFMixer(t, config).to(device=device, dtype=dtype)
    flat = FlatAttentionMixer(t, config).to(device=device, dtype=dtype)
    rows = []
    for length in cfg.lengths:
        target = torch.randn(b, t, d, device=device, dtype=dtype)
        history = torch.randn(b, length, t, d, device=device, dtype=dtype)
        mask = torch.ones(b, length, dtype=torch.bool, device=device)
        inputs = (target, history, mask)
        t_flat = device_time(_train_step(flat, inputs), cfg.repeats, device)
        t_mix = device_time(_train_step(mixer, inputs), cfg.repeats, device)
        f_flat = 3 * flat_flops(b, length, t, d, cfg.num_blocks, config.ffn_mult)
        f_mix = 3 * mixer_flops(b, length, t, d, cfg.num_blocks, config.ffn_mult)
        for what, seconds, speedup, flops in (("flat attention (reference)", t_flat, 1.0, f_flat),
                                              ("SIF-Mixer", t_mix, t_flat / t_mix, f_mix)):
            rate = flops / seconds
            rows.append((length, (length + 1) * t, what, seconds * 1e3, speedup, rate / 1e9,
                         rate / peak))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"\nSIF-Mixer benchmark on {name}, {cfg.dtype}: batch {b}, T = {t}, d0 = {d}, "
          f"N = {cfg.num_blocks}, heads = {cfg.num_heads}, forward + backward, best of "
          f"{cfg.repeats}")
    print(f"reference matmul {size} x {size}: {peak / 1e9:,.1f} GFLOP/s")
    print(markdown_table([("L", ">5"), ("tokens", ">7,"), ("what", "<27"), ("ms / step", ">10.1f"),
                          ("x flat", ">7.2f"), ("GFLOP/s", ">8.2f"), ("x matmul", ">8.3f")], rows))


if __name__ == "__main__":
    main()
