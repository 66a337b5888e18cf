"""Analytic cost of one training step (forward + backward) of the history models, for the
benchmarks' achieved rates and roofline fractions.

What is counted, for a batch of ``b`` samples of ``L`` history steps, all fp32 (4 bytes):

- **FLOPs**: matrix products only, 2 per multiply-add: linear layers over the positions that the
  module computes (the last block's target row / first position only, where the module computes
  only that), attention ``Q K^T`` and ``P V`` (4 S_q S_k d_h per head), DIN's first layer split
  as the module computes it; the backward counted as twice the forward (so 3x the forward in
  all). Layer norms, softmax, GELU, sigmoid, embeddings and additions are not counted.
- **Bytes**: a lower bound on memory traffic: parameters read once and their gradients written
  once (8 bytes per parameter); inputs read once (history rows, tokens, embeddings of the
  steps); saved activations written once in the forward and read once in the backward (8 bytes
  per value): per position and block the inputs of every layer norm, linear map and attention,
  the attention output, the FFN hidden before and after GELU. Attention scores are not counted
  (a fused attention keeps them in cache), nor are gradients of activations, nor re-reads.

A lower bound on bytes makes the arithmetic intensity, hence the roofline, optimistic: a fraction
of roofline computed with these counts understates how close a run is to its limit, never
overstates it.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

F32 = 4
FWD_BWD = 3  # forward + backward, the backward counted as twice the forward


@dataclasses.dataclass(frozen=True)
class Cost:
    """FLOPs and bytes of one training step (see the module docstring for what is counted)."""

    flops: float = 0.0
    bytes: float = 0.0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.bytes + other.bytes)

    def per_sample(self, batch: int) -> "Cost":
        return Cost(self.flops / batch, self.bytes / batch)

    @property
    def intensity(self) -> float:
        """FLOPs per byte."""
        return self.flops / self.bytes


def total(costs: Sequence[Cost]) -> Cost:
    out = Cost()
    for c in costs:
        out = out + c
    return out


def linear(rows: float, d_in: int, d_out: int) -> Cost:
    """A linear map over ``rows`` positions: its products and its parameters."""
    return Cost(FWD_BWD * 2.0 * rows * d_in * d_out, 2.0 * F32 * (d_in + 1) * d_out)


def activations(values: float) -> Cost:
    """Saved activations: written in the forward, read in the backward."""
    return Cost(0.0, 2.0 * F32 * values)


def inputs(values: float, value_bytes: int = F32) -> Cost:
    """Values read once (inputs, embedding rows)."""
    return Cost(0.0, float(values) * value_bytes)


def parameters(count: int) -> Cost:
    """Parameters outside linear maps (norms, embeddings, slopes): read, gradient written."""
    return Cost(0.0, 2.0 * F32 * count)


def attention_core(sequences: float, heads: int, s_q: int, s_k: int, head_dim: int) -> Cost:
    """``softmax(Q K^T) V`` for ``sequences`` x ``heads`` (scores not saved)."""
    return Cost(FWD_BWD * 4.0 * sequences * heads * s_q * s_k * head_dim, 0.0)


def attention(sequences: float, s: int, dim: int, heads: int, queries: int) -> Cost:
    """Multi-head self-attention over ``sequences`` of ``s`` positions of width ``dim``, the
    first ``queries`` attending: layer norm, Q (queries) + K, V (all) projection, core, output
    projection, and the saved values (norm input and output, Q K V, attention output)."""
    n = sequences
    return total([
        parameters(2 * dim), activations(2 * n * s * dim),
        linear(n * queries, dim, dim), linear(n * s, dim, 2 * dim),
        activations(n * (queries + 2 * s) * dim),
        attention_core(n, heads, queries, s, dim // heads), activations(n * queries * dim),
        linear(n * queries, dim, dim)])


def ffn(rows: float, dim: int, mult: int) -> Cost:
    """Pre-norm GELU FFN over ``rows`` positions (norm input and output, hidden twice saved)."""
    return total([parameters(2 * dim), activations(2 * rows * dim),
                  linear(rows, dim, mult * dim), activations(2 * rows * mult * dim),
                  linear(rows, mult * dim, dim)])


def transformer(batch: int, s: int, dim: int, heads: int, ffn_mult: int, blocks: int,
                last_queries: int) -> Cost:
    """Pre-norm Transformer blocks over ``[batch, s, dim]``; the last one computes only the
    first ``last_queries`` positions."""
    out = Cost()
    for i in range(blocks):
        q = last_queries if i == blocks - 1 else s
        out = out + attention(batch, s, dim, heads, q) + ffn(batch * q, dim, ffn_mult)
    return out


def sif_mixer(batch: int, length: int, num_tokens: int, d0: int, heads: int, ffn_mult: int,
              blocks: int, target_dim: int) -> Cost:
    """The SIF-Mixer over ``[target; L history rows]`` of T tokens (history rows read, W_res,
    per block token attention over every row, sample attention over every column (the last
    block: from the target row), FFN on the rows it computes, final norm)."""
    r, t = length + 1, num_tokens
    out = total([inputs(batch * length * t * d0 * 3),  # rows, recency and side encodings
                 Cost(FWD_BWD * 2.0 * batch * t * target_dim * d0, 2.0 * F32 * t * target_dim * d0),
                 parameters(2 * d0)])
    for i in range(blocks):
        q = 1 if i == blocks - 1 else r
        out = out + total([attention(batch * r, t, d0, heads, t),
                           attention(batch * t, r, d0, heads, q),
                           ffn(batch * q * t, d0, ffn_mult)])
    return out


def iat_branch(batch: int, length: int, token_dim: int, query_dim: int, output_dim: int,
               adapt_dim: int, side_dim: int, heads: int, ffn_mult: int, blocks: int,
               token_bytes: int = F32) -> Cost:
    """The IAT branch: tokens and side embeddings read, adaptation, query projection,
    Transformer over ``[query; L steps]`` (last block: the query only), output projection."""
    width = adapt_dim + side_dim
    return total([
        inputs(batch * length * token_dim, token_bytes), inputs(batch * length * 2 * side_dim),
        linear(batch * length, token_dim, adapt_dim), activations(batch * length * width),
        linear(batch, query_dim, width),
        transformer(batch, length + 1, width, heads, ffn_mult, blocks, 1),
        linear(batch, width, output_dim)])


def bst(batch: int, length: int, dim: int, heads: int, ffn_mult: int, blocks: int,
        target_only: bool) -> Cost:
    """BST: items and side embeddings read, Transformer over ``[target; L steps]``."""
    return total([inputs(batch * length * dim * 4), parameters(dim),
                  transformer(batch, length + 1, dim, heads, ffn_mult, blocks,
                              1 if target_only else length + 1)])


def din(batch: int, length: int, dim: int, layers: Sequence[int]) -> Cost:
    """DIN: items and side embeddings read, keys, the activation unit (first layer: [k, q k]
    per step, q per sample), the weighted sum."""
    rows = batch * length
    out = total([inputs(rows * dim * 3), activations(2 * rows * dim),
                 linear(rows, 2 * dim, layers[0]), linear(batch, dim, layers[0])])
    width = layers[0]
    for n in [*layers[1:], 1]:
        out = out + activations(2 * rows * width) + parameters(width) + linear(rows, width, n)
        width = n
    return out + Cost(FWD_BWD * 2.0 * rows * dim, 0.0)


__all__: Sequence[str] = (
    "Cost", "total", "linear", "activations", "inputs", "parameters", "attention_core",
    "attention", "ffn", "transformer", "sif_mixer", "iat_branch", "bst", "din",
)
