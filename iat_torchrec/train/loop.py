"""Training and evaluation loops over a sharded model, driven by TorchRec's TrainPipelineSparseDist.

The model follows TorchRec's training convention: ``model(batch) -> (loss, (loss, logits,
labels))``. Ranks always take the same number of steps (collectives must match): a rank that
runs out of batches repeats its last one with weight 0 (no effect on the model). Progress is
printed by rank 0 every ``log_every`` steps; checkpoints are taken every ``checkpoint_every``
steps and a run resumes from the latest one.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.optim import Optimizer
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from iat_torchrec.data.batch import InstanceBatch
from iat_torchrec.data.reader import Partition
from iat_torchrec.distributed.checkpoint import (latest_checkpoint, load_checkpoint,
                                                 save_checkpoint)
from iat_torchrec.distributed.collectives import DistEnv, all_equal_batches, gather_arrays
from iat_torchrec.train.metrics import ranking_metrics


@dataclasses.dataclass
class TrainConfig:
    """Steps, progress and checkpoints of a training run."""

    epochs: int = dataclasses.field(default=1, metadata={"help": "passes over the train log"})
    batch_size: int = dataclasses.field(default=1024, metadata={"help": "rows per process step"})
    log_every: int = dataclasses.field(default=100, metadata={"help": "steps between log lines"})
    checkpoint_dir: str = dataclasses.field(default="", metadata={
        "help": "where checkpoints go; a run resumes from the latest one there"})
    checkpoint_every: int = dataclasses.field(default=0, metadata={
        "help": "steps between checkpoints (0: only at the end of training)"})
    seed: int = dataclasses.field(default=0, metadata={"help": "seed of initial weights"})
    partition: Partition = dataclasses.field(default=Partition.STEPS, metadata={
        "help": "how the train log's rows are split over processes (temporal and shuffled "
                "orders): steps (global steps dealt batch by batch, so W processes train "
                "exactly as one with W times the batch; every process decodes every row "
                "group) | row_groups (each process decodes only its own row groups; which "
                "rows share a step then differs from one process)"})
    shuffle_window: int = dataclasses.field(default=0, metadata={
        "help": "partition row_groups, shuffled train log: 0: one permutation of the "
                "process's rows | k: its row group pieces in a random order, rows shuffled "
                "within windows of k pieces (memory flat in the log)"})


def padded(batches: Iterable[InstanceBatch], total: int) -> Iterator[InstanceBatch]:
    """``batches``, then weight-0 repeats of the last one until ``total`` batches were given."""
    last = None
    count = 0
    for batch in batches:
        last = batch
        count += 1
        yield batch
    if last is None and total > 0:
        raise ValueError("this rank has no rows at all; use fewer processes or more data")
    for _ in range(total - count):
        yield last.as_padding()


class ProgressLog:
    """Rank 0's periodic log line: step, instances/s, running loss."""

    def __init__(self, env: DistEnv, every: int, what: str) -> None:
        self.env, self.every, self.what = env, every, what
        self.start = self.last = time.perf_counter()
        self.rows = self.rows_since = 0
        self.losses: List[float] = []

    def step(self, step: int, total: int, rows: int, loss: float) -> None:
        self.rows += rows
        self.rows_since += rows
        self.losses.append(loss)
        if self.env.is_main and self.every and (step % self.every == 0 or step == total):
            now = time.perf_counter()
            rate = self.rows_since * self.env.world_size / max(now - self.last, 1e-9)
            print(f"[{self.what}] step {step}/{total}  {rate:,.0f} instances/s  "
                  f"loss {np.mean(self.losses[-self.every:]):.4f}", flush=True)
            self.last, self.rows_since = now, 0


def plateau_schedule(valid_aucs: Sequence[float], patience: int, factor: float
                     ) -> Optional[float]:
    """Early stopping and learning-rate decay on plateau from the valid AUCs of the epochs done
    so far (FuxiCTR's schedule, METHOD.md P1): the next epoch's learning-rate scale is
    ``factor`` to the number of epochs that did not beat the best before them, or None (stop)
    once the last ``patience`` epochs did not (``patience`` 0: never stop).

    Example: ``plateau_schedule([0.70, 0.72, 0.71], patience=2, factor=0.1)`` is 0.1;
    ``plateau_schedule([0.70, 0.69, 0.69], 2, 0.1)`` is None."""
    best, since_best, worse = float("-inf"), 0, 0
    for value in valid_aucs:
        if value > best:
            best, since_best = value, 0
        else:
            since_best, worse = since_best + 1, worse + 1
    if patience and since_best >= patience:
        return None
    return factor ** worse


class Trainer:
    """Epochs of pipelined training with checkpoint and resume.

    Args:
        model: the DMP-wrapped training model.
        optimizer: its combined (fused sparse + dense) optimizer.
        env: the process group.
        make_reader: epoch -> this rank's reader of the train log for that epoch.
        config: steps, logging, checkpoints.
        fingerprint: everything a resume must match (configs, data, world size).
        rank_state: get/set of per-rank state outside the model (saved in checkpoints).
    """

    def __init__(self, model: nn.Module, optimizer: Optimizer, env: DistEnv,
                 make_reader: Callable[[int], Any], config: TrainConfig,
                 fingerprint: Dict[str, Any],
                 rank_state: Optional[tuple] = None) -> None:
        self.model, self.optimizer, self.env = model, optimizer, env
        self.make_reader, self.config, self.fingerprint = make_reader, config, fingerprint
        self.get_rank_state, self.set_rank_state = rank_state or (dict, lambda s: None)
        self.pipeline = TrainPipelineSparseDist(model, optimizer, env.device)
        # Every optimizer's learning rates as configured (what ``lr_scale`` multiplies).
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]

    def set_lr_scale(self, scale: float) -> None:
        """Every learning rate = its configured value x ``scale`` (fused embedding optimizers
        take it at their next step)."""
        for group, lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = lr * scale

    def fit(self, after_epoch: Optional[Callable[[int], None]] = None,
            before_epoch: Optional[Callable[[int], None]] = None,
            schedule: Optional[Callable[[], Optional[float]]] = None) -> int:
        """Train all epochs (resuming if a checkpoint exists); returns the global step.

        ``before_epoch(epoch)`` runs when an epoch starts from its first batch (not when a run
        resumes in the middle of one); ``after_epoch(epoch)`` when it ends. ``schedule()``, asked
        before every epoch (a resumed one included, so it must derive its answer from state that
        checkpoints keep), returns the learning-rate scale of that epoch, or None to stop
        training there (early stopping); it must answer alike on every rank."""
        cfg = self.config
        epoch, skip, step = 0, 0, 0
        ckpt = latest_checkpoint(Path(cfg.checkpoint_dir)) if cfg.checkpoint_dir else None
        if ckpt is not None:
            loaded = load_checkpoint(ckpt, self.model, self.optimizer, self.fingerprint,
                                     self.env)
            pos = loaded["position"]
            epoch, skip, step = pos["epoch"], pos["step_in_epoch"], pos["global_step"]
            self.set_rank_state(loaded["rank_state"])
            if self.env.is_main:
                print(f"[train] resumed from {ckpt} (epoch {epoch}, step {step})", flush=True)
        while epoch < cfg.epochs:
            if schedule is not None:
                scale = schedule()
                if scale is None:
                    break
                self.set_lr_scale(scale)
            if skip == 0 and before_epoch is not None:
                before_epoch(epoch)
            reader = self.make_reader(epoch)
            total = all_equal_batches(len(reader), self.env)
            batches = itertools.islice(padded(reader, total), skip, None)
            self.model.train()
            self.pipeline.attach()
            progress = ProgressLog(self.env, cfg.log_every, f"train epoch {epoch}")
            in_epoch = skip
            while True:
                try:
                    loss, _, _ = self.pipeline.progress(batches)
                except StopIteration:
                    break
                in_epoch += 1
                step += 1
                progress.step(in_epoch, total, cfg.batch_size, float(loss))
                if cfg.checkpoint_dir and cfg.checkpoint_every and \
                        step % cfg.checkpoint_every == 0 and in_epoch < total:
                    self._save(epoch, in_epoch, step)
            # Give the model its own forwards back (evaluation and export call it directly).
            self.pipeline.detach()
            epoch, skip = epoch + 1, 0
            if after_epoch is not None:
                after_epoch(epoch - 1)
            if cfg.checkpoint_dir:
                self._save(epoch, 0, step)
        return step

    def _save(self, epoch: int, in_epoch: int, step: int) -> None:
        save_checkpoint(Path(self.config.checkpoint_dir), self.model, self.optimizer,
                        {"epoch": epoch, "step_in_epoch": in_epoch, "global_step": step},
                        self.fingerprint, self.get_rank_state(), self.env)


@torch.no_grad()
def predict(model: nn.Module, reader: Any, env: DistEnv) -> Optional[Dict[str, np.ndarray]]:
    """``model``'s logits over ``reader``'s rows of every rank, gathered on rank 0 (None
    elsewhere): ``instance_id``, ``users`` [n], ``labels``, ``logits`` [n, num_labels]."""
    was_training = model.training
    model.eval()
    total = all_equal_batches(len(reader), env)
    logits, labels, users, ids = [], [], [], []
    for batch in padded(reader, total):
        batch = batch.to(env.device)
        _, (_, out, y) = model(batch)
        keep = batch.weight > 0
        logits.append(out[keep].float().cpu().numpy())
        labels.append(y[keep].cpu().numpy())
        users.append(batch.user_id[keep].cpu().numpy())
        ids.append(batch.instance_id[keep].cpu().numpy())
    model.train(was_training)
    mine = {"instance_id": np.concatenate(ids), "users": np.concatenate(users),
            "labels": np.concatenate(labels), "logits": np.concatenate(logits)}
    parts = gather_arrays(mine, env)
    if parts is None:
        return None
    return {k: np.concatenate([p[k] for p in parts]) for k in mine}


def prediction_metrics(pred: Dict[str, np.ndarray], label_names: List[str]
                       ) -> Dict[str, Dict[str, float]]:
    """AUC, GAUC and logloss per label of :func:`predict`'s output."""
    return {name: ranking_metrics(pred["labels"][:, j], pred["logits"][:, j], pred["users"])
            for j, name in enumerate(label_names)}


def evaluate(model: nn.Module, reader: Any, env: DistEnv,
             label_names: List[str]) -> Optional[Dict[str, Dict[str, float]]]:
    """AUC, GAUC and logloss per label of ``model`` over ``reader``'s rows of every rank;
    returned on rank 0 (None elsewhere)."""
    pred = predict(model, reader, env)
    return None if pred is None else prediction_metrics(pred, label_names)
