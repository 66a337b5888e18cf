"""What the training stages share: input checks, readers, seeded sharded models, token export.

Stage 1a (``compress``, the IAT source model) and stage 1b (``tokenize``, the HGAQ tokenizer)
both train a sharded model on the training window and then write one token per instance of the
given logs into a token store; the pieces they have in common live here.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from iat_torchrec.config import nested, to_dict, to_flat
from iat_torchrec.atomic import OutputExistsError, atomic_output
from iat_torchrec.data.batch import InstanceBatch
from iat_torchrec.data.log import log_files, read_key_columns
from iat_torchrec.data.reader import InstanceLogReader, Partition, ReaderConfig, ReadOrder
from iat_torchrec.data.spec import FeatureSpec, SpecError
from iat_torchrec.distributed.collectives import (DistEnv, all_equal_batches, barrier,
                                                  broadcast_object, init_process_group)
from iat_torchrec.distributed.sharding import ShardingConfig, copy_full_state, shard_model
from iat_torchrec.tokens.store import TokenStore
from iat_torchrec.train.loop import TrainConfig, padded

KEYS = ("instance_id", "user_id", "ts")


@dataclasses.dataclass
class TrainingStageConfig:
    """What every training stage has: the training window's logs, the results file, the
    training run and the sharding (a stage adds its inputs, outputs and ``model``)."""

    train_log: str = dataclasses.field(default="", metadata={
        "help": "instance log of the training window (required)"})
    valid_log: str = dataclasses.field(default="", metadata={
        "help": "later instance log, evaluated after each epoch (the downstream stage selects "
                "its epoch on it)"})
    results: str = dataclasses.field(default="", metadata={
        "help": "JSON file for the run's metrics and timings (optional)"})
    train: TrainConfig = nested(TrainConfig, "the training run")
    sharding: ShardingConfig = nested(ShardingConfig, "devices, sharding plan and optimizers")


@dataclasses.dataclass
class StageIOConfig(TrainingStageConfig):
    """Inputs and outputs of a stage that trains on the training window and exports tokens."""

    export_logs: List[str] = dataclasses.field(default_factory=list, metadata={
        "help": "logs whose instances go into the store (default: train + valid)"})
    store: str = dataclasses.field(default="", metadata={
        "help": "token store directory to write (must not exist unless --overwrite)"})
    overwrite: bool = dataclasses.field(default=False, metadata={
        "help": "replace an existing token store"})

    def check(self) -> None:
        """Checks across settings, before any work (a stage adds its own)."""


# Settings that do not shape training: a resume may change them.
NOT_IN_FINGERPRINT = ("export_logs", "store", "overwrite", "results", "train.log_every",
                      "train.epochs", "train.checkpoint_dir", "train.checkpoint_every")


def write_results(path: str, config: Any, env: DistEnv, **results: Any) -> Dict[str, Any]:
    """The run's results with its config, written atomically to ``path`` (if given) by rank 0."""
    out = {"config": to_dict(config),
           "world_size": env.world_size, **results}
    if env.is_main and path:
        with atomic_output(path, overwrite=True) as tmp:
            tmp.write_text(json.dumps(out, indent=2) + "\n")
    return out


def stage_log(env: DistEnv, stage: str, msg: str) -> None:
    """A progress line from rank 0."""
    if env.is_main:
        print(f"[{stage}] {msg}", flush=True)


def start_export_stage(cfg: StageIOConfig) -> Tuple[FeatureSpec, List[str], DistEnv]:
    """Check the stage's config and inputs, then join the process group: the train log's spec,
    the logs to export and this process's place."""
    cfg.check()
    spec, exports = check_inputs(cfg.train_log, cfg.valid_log, cfg.export_logs, cfg.store,
                                 cfg.overwrite)
    return spec, exports, init_process_group(cfg.sharding.device)


def check_inputs(train_log: str, valid_log: str, export_logs: Sequence[str], store: str,
                 overwrite: bool) -> Tuple[FeatureSpec, List[str]]:
    """The train log's spec and the logs to export (default: train + valid), after checking,
    before any work, that every log has that spec and that the store may be written."""
    if not train_log:
        raise ValueError("--train_log is required")
    if not store:
        raise ValueError("--store is required")
    spec = FeatureSpec.load(train_log)
    exports = list(export_logs) or [p for p in (train_log, valid_log) if p]
    for path in [valid_log, *exports]:
        if path and FeatureSpec.load(path) != spec:
            raise SpecError(f"{path}: its feature spec does not match the model's (trained on a "
                            "log with a different spec); use logs of the same feature spec")
    if Path(store).exists() and not overwrite:
        raise OutputExistsError(f"{store}: token store already exists (pass --overwrite to "
                                "replace it); nothing was trained or written")
    return spec, exports


def stage_reader(path: Union[str, Sequence[str]], spec: FeatureSpec, batch_size: int,
                 env: DistEnv, order: ReadOrder, seed: int = 0, reverse: bool = False,
                 partition: Partition = Partition.STEPS, shuffle_window: int = 0
                 ) -> InstanceLogReader:
    """This rank's reader of ``path`` (a log, or a list of logs read as one)."""
    return InstanceLogReader(path, spec, ReaderConfig(batch_size=batch_size, order=order,
                                                      seed=seed, reverse=reverse,
                                                      partition=partition,
                                                      shuffle_window=shuffle_window),
                             rank=env.rank, world_size=env.world_size)


def resume_fingerprint(config: Any, spec: FeatureSpec, train_log: str, env: DistEnv,
                       ignore: Sequence[str] = NOT_IN_FINGERPRINT) -> Dict[str, Any]:
    """What a resume must match: the config's settings less ``ignore`` (dotted names: outputs,
    logging, epochs), the spec, the training rows and the process count."""
    keep = {k: v for k, v in to_flat(config).items() if k not in ignore}
    keys = read_key_columns(log_files(train_log))
    keep["train_rows"] = int(keys.ts.size)
    keep["train_ids_digest"] = int(np.bitwise_xor.reduce(keys.instance_id * 2654435761))
    keep["spec"] = spec.to_dict()
    keep["world_size"] = env.world_size
    return keep


def training_window(train_log: str) -> Dict[str, Any]:
    """The log a model was trained on and its time span (for the token store's manifest)."""
    keys = read_key_columns(log_files(train_log))
    return {"log": str(Path(train_log).resolve()), "ts_min": int(keys.ts.min()),
            "ts_max": int(keys.ts.max()), "rows": int(keys.ts.size)}


def build_sharded(make_model: Callable[[Optional[torch.device]], nn.Module], seed: int,
                  env: DistEnv, sharding: ShardingConfig, batch_size: int):
    """Shard ``make_model(table_device)`` with DMP; its initial weights depend only on the seed
    (an unsharded copy is made first and copied in), not on the process count or the plan."""
    torch.manual_seed(seed)
    full = make_model(None).state_dict()
    torch.manual_seed(seed)
    model = make_model(torch.device("meta"))
    dmp, optimizer = shard_model(model, env, sharding, batch_size)
    copy_full_state(dmp, full)
    return dmp, optimizer


@torch.no_grad()
def export_rows(model: nn.Module, encode: Callable[[InstanceBatch], torch.Tensor],
                path: Union[str, Sequence[str]], spec: FeatureSpec, batch_size: int,
                env: DistEnv, order: ReadOrder = ReadOrder.TEMPORAL) -> Dict[str, np.ndarray]:
    """This rank's share of ``path`` (a log, or logs read as one) in ``order``: key columns,
    first label and ``encode(batch)`` per row. Every rank runs the same number of batches
    (sharded lookups are collective; the extra ones are weight-0 padding)."""
    model.eval()
    reader = stage_reader(path, spec, batch_size, env, order)
    total = all_equal_batches(len(reader), env)
    out: Dict[str, List[np.ndarray]] = {k: [] for k in (*KEYS, "label", "tokens")}
    for batch in padded(reader, total):
        batch = batch.to(env.device)
        tokens = encode(batch)
        keep = (batch.weight > 0).cpu().numpy()
        out["tokens"].append(tokens.cpu().numpy()[keep])
        out["label"].append(batch.labels[:, 0].cpu().numpy()[keep])
        for k in KEYS:
            out[k].append(getattr(batch, k).cpu().numpy()[keep])
    return {k: np.concatenate(v) for k, v in out.items()}


def write_token_store(store: str, parts: Sequence[Dict[str, np.ndarray]], *, kind: str,
                      token_shape: Tuple[int, ...], dtype: str, metadata: Dict[str, Any],
                      overwrite: bool, env: DistEnv, stage: str) -> None:
    """Each rank writes its rows as a part store; rank 0 merges the parts into ``store``
    (atomically: the store appears whole or not at all)."""
    target = Path(store)
    part_root = target.parent / broadcast_object(f".{target.name}.parts-{uuid.uuid4().hex[:8]}",
                                                 env)
    try:
        with TokenStore.create(part_root / f"rank{env.rank:05d}", kind=kind,
                               token_shape=token_shape, dtype=dtype,
                               metadata=metadata) as writer:
            for p in parts:
                writer.append(p["instance_id"], p["user_id"], p["ts"], p["label"], p["tokens"])
        barrier(env)
        if env.is_main:
            merged = TokenStore.merge(sorted(part_root.iterdir()), target, overwrite=overwrite)
            stage_log(env, stage, f"wrote {merged.num_rows:,} tokens ({kind}, {dtype}, shape "
                                  f"{tuple(token_shape)}) to {target}")
        barrier(env)
    finally:
        if env.is_main:
            shutil.rmtree(part_root, ignore_errors=True)
