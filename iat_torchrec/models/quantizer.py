"""The hierarchical quantiser of the HGAQ sample tokenizer (METHOD.md, "Stage 1b"): M levels of
residual vector quantisation, one codebook per (sub-token slot, level), EMA codebook updates,
straight-through gradients, commitment and optional entropy losses, restarts of dead codes.
PyTorch only (no torchrec), so it runs and is tested wherever PyTorch is installed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass
class RVQOutput:
    """What :class:`ResidualVectorQuantizer` returns for a batch [B, T, d]."""

    quantized: torch.Tensor  # [B, T, d]: value = sum of codewords, gradient straight to the input
    reconstruction: torch.Tensor  # [B, T, d]: the sum of the chosen codewords, no gradient
    codes: torch.Tensor  # [B, T, M] int64, in [0, V)
    loss: torch.Tensor  # commitment * commitment_loss + entropy_weight * entropy_loss
    commitment_loss: torch.Tensor
    entropy_loss: torch.Tensor
    perplexity: torch.Tensor  # [M]: exp(entropy of the batch's code usage), mean over slots


@dataclasses.dataclass
class CodebookUsage:
    """Per-level code usage since the last ``reset_usage`` (tensors of shape [M])."""

    used_fraction: torch.Tensor  # codes assigned at least once, mean over slots
    perplexity: torch.Tensor  # exp(entropy of the assignment counts), mean over slots
    dead_fraction: torch.Tensor  # codes below the dead-code threshold now (EMA counts)
    restarts: torch.Tensor  # codes restarted since construction

    def to_dict(self) -> Dict[str, List[float]]:
        return {k: getattr(self, k).tolist() for k in
                ("used_fraction", "perplexity", "dead_fraction", "restarts")}


def _perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of counts [..., V] along the last dim (0 counts give perplexity 1)."""
    p = counts.float() / counts.sum(-1, keepdim=True).clamp_min(1).float()
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(-1)
    return torch.exp(entropy)


def weighted_mean(values: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of per-sample values [B], weighted when ``weight`` [B] is given."""
    if weight is None:
        return values.mean()
    return (values * weight).sum() / weight.sum().clamp_min(1.0)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class ResidualVectorQuantizer(nn.Module):
    """M-level residual VQ with one codebook per (slot, level), vectorised over slots.

    Codebooks are buffers [T, M, V, d] updated by exponential moving averages in training mode
    (they take no gradient); the output carries straight-through gradients to the input.

    Args:
        num_slots: T, sub-token slots per sample.
        levels: M.
        codebook_size: V.
        dim: d, codeword size.
        commitment, decay, epsilon, dead_code_threshold, entropy_weight, entropy_temperature:
            as in :class:`HGAQConfig`.
        device: where the buffers live.

    Example::

        rvq = ResidualVectorQuantizer(num_slots=4, levels=3, codebook_size=256, dim=16)
        out = rvq(torch.randn(64, 4, 16))      # out.codes [64, 4, 3], out.quantized [64, 4, 16]
        e = rvq.decode(out.codes)              # codebook sums, [64, 4, 16]
    """

    def __init__(self, num_slots: int, levels: int, codebook_size: int, dim: int,
                 commitment: float = 0.25, decay: float = 0.99, epsilon: float = 1e-5,
                 dead_code_threshold: float = 0.03, entropy_weight: float = 0.0,
                 entropy_temperature: float = 1.0, device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.num_slots, self.levels, self.codebook_size, self.dim = (
            num_slots, levels, codebook_size, dim)
        self.commitment = commitment
        self.decay = decay
        self.epsilon = epsilon
        self.dead_code_threshold = dead_code_threshold
        self.entropy_weight = entropy_weight
        self.entropy_temperature = entropy_temperature
        shape = (num_slots, levels, codebook_size)
        self.register_buffer(
            "codebooks", torch.randn(*shape, dim, device=device) / math.sqrt(dim))
        self.register_buffer("ema_cluster_size", torch.ones(shape, device=device))
        self.register_buffer("ema_embed_sum", self.codebooks.clone())
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool, device=device))
        self.register_buffer("restarts", torch.zeros(levels, dtype=torch.int64, device=device))
        self.register_buffer("code_counts", torch.zeros(shape, dtype=torch.int64, device=device),
                             persistent=False)
        # (slot, level) -> first row of its codebook in the flattened [T*M*V, d] view.
        self.register_buffer(
            "_offsets", torch.arange(num_slots * levels, device=device).view(num_slots, levels)
            * codebook_size, persistent=False)
        self._init_checked = False
        self.register_load_state_dict_post_hook(_reset_init_check)

    # ------------------------------------------------------------------ encoding / decoding
    def _nearest(self, residual: torch.Tensor, level: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Codes [B, T] of the nearest codewords of ``level`` and those codewords [B, T, d]."""
        codebook = self.codebooks[:, level]  # [T, V, d]
        # ||r - c||^2 up to ||r||^2, batched over slots: [T, B, V].
        scores = torch.baddbmm((codebook * codebook).sum(-1).unsqueeze(1),
                               residual.transpose(0, 1), codebook.transpose(1, 2), alpha=-2.0)
        codes = scores.argmin(-1).transpose(0, 1)  # [B, T]
        slots = torch.arange(self.num_slots, device=codes.device)
        return codes, codebook[slots, codes]

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """Codes [B, T, M] (int64) of inputs [B, T, d]; no state changes."""
        residual = z.detach()
        codes = []
        for m in range(self.levels):
            c, q = self._nearest(residual, m)
            codes.append(c)
            residual = residual - q
        return torch.stack(codes, dim=-1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codebook sums [..., T, d] of codes [..., T, M] (any integer dtype)."""
        if codes.shape[-2:] != (self.num_slots, self.levels):
            raise ValueError(f"codes must end in [T={self.num_slots}, M={self.levels}], "
                             f"got {tuple(codes.shape)}")
        flat = (codes.long() + self._offsets).reshape(-1, self.levels)
        out = F.embedding_bag(flat, self.codebooks.view(-1, self.dim), mode="sum")
        return out.view(*codes.shape[:-1], self.dim)

    # ------------------------------------------------------------------ training
    def forward(self, z: torch.Tensor, weight: Optional[torch.Tensor] = None) -> RVQOutput:
        """Quantise z [B, T, d]; in training mode also update the codebooks (EMA, restarts).

        ``weight`` [B] weighs each sample in the losses and the codebook statistics (0: the
        sample takes part in collectives but changes nothing)."""
        if z.dim() != 3 or z.shape[1:] != (self.num_slots, self.dim):
            raise ValueError(f"expected [B, {self.num_slots}, {self.dim}], got {tuple(z.shape)}")
        init = self.training and not self._is_initialized()
        residual = z
        codes, residuals, commit, entropy = [], [], [], []
        total = torch.zeros_like(z)
        for m in range(self.levels):
            r = residual.detach()
            if init:
                self._init_level(m, r)
            c, q = self._nearest(r, m)
            commit.append(weighted_mean((residual - q).pow(2).mean(dim=(1, 2)), weight))
            if self.entropy_weight > 0:
                entropy.append(self._entropy(residual, m))
            codes.append(c)
            residuals.append(r)
            residual = residual - q
            total = total + q
        codes_t = torch.stack(codes, dim=-1)  # [B, T, M]
        with torch.no_grad():
            counts = self._count(codes_t, weight)
            self.code_counts += counts.round().long()
            perplexity = _perplexity(counts).mean(0)
            if self.training:
                self._ema_update(torch.stack(residuals, dim=2), codes_t, counts, weight)
        commitment_loss = torch.stack(commit).mean()
        entropy_loss = torch.stack(entropy).mean() if entropy else z.new_zeros(())
        loss = self.commitment * commitment_loss + self.entropy_weight * entropy_loss
        quantized = z + (total - z).detach()
        return RVQOutput(quantized=quantized, reconstruction=total.detach(), codes=codes_t,
                         loss=loss, commitment_loss=commitment_loss, entropy_loss=entropy_loss,
                         perplexity=perplexity)

    def _entropy(self, residual: torch.Tensor, level: int) -> torch.Tensor:
        """Mean per-sample entropy of the soft assignment minus the batch-mean's entropy."""
        codebook = self.codebooks[:, level].clone()  # saved for backward; EMA updates in place
        scores = torch.baddbmm((codebook * codebook).sum(-1).unsqueeze(1),
                               residual.transpose(0, 1), codebook.transpose(1, 2), alpha=-2.0)
        logp = F.log_softmax(-scores / self.entropy_temperature, dim=-1)  # [T, B, V]
        p = logp.exp()
        per_sample = -(p * logp).sum(-1).mean()
        mean_p = p.mean(1)
        marginal = -(mean_p * torch.log(mean_p.clamp_min(1e-12))).sum(-1).mean()
        return per_sample - marginal

    def _count(self, codes: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(Weighted) assignments per code in this batch, [T, M, V] float."""
        n = self.num_slots * self.levels * self.codebook_size
        flat = (codes + self._offsets).reshape(-1)
        w = None if weight is None else weight.view(-1, 1, 1).expand_as(codes).reshape(-1)
        return torch.bincount(flat, weights=w, minlength=n).view(
            self.num_slots, self.levels, self.codebook_size).float()

    def _is_initialized(self) -> bool:
        if not self._init_checked:
            self._init_checked = bool(self.initialized)
        return self._init_checked

    @torch.no_grad()
    def _init_level(self, level: int, residual: torch.Tensor) -> None:
        """Codebooks of ``level`` from random residuals of this batch (distinct when B >= V)."""
        b, t = residual.shape[:2]
        v = self.codebook_size
        if b >= v:
            pick = torch.rand(t, b, device=residual.device).argsort(-1)[:, :v]
        else:
            pick = torch.randint(0, b, (t, v), device=residual.device)
        slots = torch.arange(t, device=residual.device).unsqueeze(1)
        self.codebooks[:, level] = residual[pick, slots]
        if _distributed():
            dist.broadcast(self.codebooks, src=0)
        share = float(b) / v
        self.ema_cluster_size[:, level] = share
        self.ema_embed_sum[:, level] = self.codebooks[:, level] * share
        if level == self.levels - 1:
            self.initialized.fill_(True)
            self._init_checked = True

    @torch.no_grad()
    def _ema_update(self, residuals: torch.Tensor, codes: torch.Tensor,
                    counts: torch.Tensor, weight: Optional[torch.Tensor] = None) -> None:
        """EMA of counts and residual sums per code, then restart the dead codes.

        residuals [B, T, M, d] (what each level quantised), codes [B, T, M], counts [T, M, V].
        """
        t, m, v, d = self.codebooks.shape
        flat = (codes + self._offsets).reshape(-1)
        sums = torch.zeros(t * m * v, d, dtype=residuals.dtype, device=residuals.device)
        weighted = residuals if weight is None else residuals * weight.view(-1, 1, 1, 1)
        sums.index_add_(0, flat, weighted.reshape(-1, d))
        sums = sums.view(t, m, v, d)
        if _distributed():
            stats = torch.cat([counts.reshape(-1), sums.reshape(-1)])
            dist.all_reduce(stats)
            split = counts.numel()
            counts, sums = stats[:split].view_as(counts), stats[split:].view_as(sums)
        self.ema_cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.ema_cluster_size.sum(-1, keepdim=True)
        smoothed = (self.ema_cluster_size + self.epsilon) / (n + v * self.epsilon) * n
        self.codebooks.copy_(self.ema_embed_sum / smoothed.unsqueeze(-1))
        if self.dead_code_threshold > 0:
            self._restart_dead(residuals, n)

    @torch.no_grad()
    def _restart_dead(self, residuals: torch.Tensor, n: torch.Tensor) -> None:
        """Move each dead code to a random residual of this batch at its (slot, level)."""
        b, t, m, _ = residuals.shape
        share = n / self.codebook_size  # [T, M, 1]
        dead = self.ema_cluster_size < self.dead_code_threshold * share  # [T, M, V]
        pick = torch.randint(0, b, dead.shape, device=residuals.device)
        slots = torch.arange(t, device=residuals.device).view(t, 1, 1)
        levels = torch.arange(m, device=residuals.device).view(1, m, 1)
        candidates = residuals[pick, slots, levels]  # [T, M, V, d]
        self.codebooks.copy_(torch.where(dead.unsqueeze(-1), candidates, self.codebooks))
        self.ema_cluster_size.copy_(torch.where(dead, share.expand_as(dead),
                                                self.ema_cluster_size))
        self.ema_embed_sum.copy_(torch.where(dead.unsqueeze(-1), candidates * share.unsqueeze(-1),
                                             self.ema_embed_sum))
        self.restarts += dead.sum(dim=(0, 2))
        if _distributed():
            for buf in (self.codebooks, self.ema_cluster_size, self.ema_embed_sum, self.restarts):
                dist.broadcast(buf, src=0)

    # ------------------------------------------------------------------ monitoring
    @torch.no_grad()
    def usage(self) -> CodebookUsage:
        """Per-level usage since the last :meth:`reset_usage` (counts every forward)."""
        counts = self.code_counts
        share = self.ema_cluster_size.sum(-1, keepdim=True) / self.codebook_size
        dead = self.ema_cluster_size < self.dead_code_threshold * share
        return CodebookUsage(
            used_fraction=(counts > 0).float().mean(dim=(0, 2)),
            perplexity=_perplexity(counts).mean(0),
            dead_fraction=dead.float().mean(dim=(0, 2)),
            restarts=self.restarts.clone(),
        )

    def reset_usage(self) -> None:
        """Start counting code usage afresh."""
        self.code_counts.zero_()


def _reset_init_check(module: nn.Module, incompatible_keys: object) -> None:
    module._init_checked = False


__all__: Sequence[str] = ("RVQOutput", "CodebookUsage", "ResidualVectorQuantizer", "weighted_mean")
