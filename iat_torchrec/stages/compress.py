"""Stage 1a: train the IAT source model on the training window, then compress every instance of
the given logs into a token store (instance_id -> d-dim token).

One flat configuration (:class:`CompressConfig`: the source model's sizes, the training run, the
sharding) whose field names are the command-line flags of ``apps/compress.py`` and the arguments
of the ``compress`` TorchX component.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from iat_torchrec.data.atomic import OutputExistsError, atomic_output
from iat_torchrec.data.log import log_files, read_key_columns
from iat_torchrec.data.reader import InstanceLogReader, ReaderConfig, ReadOrder
from iat_torchrec.data.spec import FeatureSpec, SpecError
from iat_torchrec.distributed.sharding import (DistEnv, ShardingConfig, all_equal_batches,
                                               copy_full_state, init_process_group,
                                               shard_model)
from iat_torchrec.models.source import Scheme, SourceModelConfig, SourceModelTrain
from iat_torchrec.tokens.store import TokenStore
from iat_torchrec.train.loop import TrainConfig, Trainer, evaluate, padded


@dataclasses.dataclass
class CompressConfig(SourceModelConfig, TrainConfig, ShardingConfig):
    """Train the IAT source model and export instance tokens."""

    train_log: str = dataclasses.field(default="", metadata={
        "help": "instance log of the training window (required)"})
    valid_log: str = dataclasses.field(default="", metadata={
        "help": "later instance log for validation after each epoch (optional)"})
    export_logs: List[str] = dataclasses.field(default_factory=list, metadata={
        "help": "logs whose instances are compressed into the store (default: train + valid)"})
    store: str = dataclasses.field(default="", metadata={
        "help": "token store directory to write (must not exist unless --overwrite)"})
    overwrite: bool = dataclasses.field(default=False, metadata={
        "help": "replace an existing token store"})
    scheme: Scheme = dataclasses.field(default=Scheme.USER, metadata={
        "help": "temporal: instances in time order, each on its own; user: whole user "
                "histories through the Source Instance Transformer"})
    two_pass: bool = dataclasses.field(default=False, metadata={
        "help": "user scheme: alternate epochs forward and reverse in user order"})
    token_dtype: str = dataclasses.field(default="fp16", metadata={
        "help": "storage of the tokens: fp32, fp16 or int8 (row-wise scale and bias)"})
    results: str = dataclasses.field(default="", metadata={
        "help": "JSON file for the run's metrics and timings (optional)"})

    def check(self) -> None:
        if not self.train_log:
            raise ValueError("--train_log is required")
        if not self.store:
            raise ValueError("--store is required")
        if self.two_pass and self.scheme != Scheme.USER:
            raise ValueError("--two_pass applies to the user scheme only")
        if not self.bottleneck and self.scheme == Scheme.USER:
            raise ValueError("--bottleneck false (the base model) runs with the temporal "
                             "scheme only: the SIT reads bottleneck tokens")


def _log(env: DistEnv, msg: str) -> None:
    if env.is_main:
        print(f"[compress] {msg}", flush=True)


def _check_spec(path: str, spec: FeatureSpec) -> None:
    other = FeatureSpec.load(path)
    if other != spec:
        raise SpecError(f"{path}: its feature spec does not match the model's (trained on a log "
                        "with a different spec); compress logs of the same feature spec")


def _reader(path: str, spec: FeatureSpec, cfg: CompressConfig, env: DistEnv,
            order: ReadOrder, reverse: bool = False) -> InstanceLogReader:
    return InstanceLogReader(path, spec, ReaderConfig(batch_size=cfg.batch_size, order=order,
                                                      seed=cfg.seed, reverse=reverse),
                             rank=env.rank, world_size=env.world_size)


def _fingerprint(cfg: CompressConfig, spec: FeatureSpec, env: DistEnv) -> Dict[str, Any]:
    """What a resume must match: everything that shapes training, not where outputs go."""
    keep = {k: v for k, v in dataclasses.asdict(cfg).items()
            if k not in ("export_logs", "store", "overwrite", "results", "log_every", "epochs",
                         "checkpoint_dir", "checkpoint_every", "token_dtype")}
    keys = read_key_columns(log_files(cfg.train_log))
    keep["train_rows"] = int(keys.ts.size)
    keep["train_ids_digest"] = int(np.bitwise_xor.reduce(keys.instance_id * 2654435761))
    keep["spec"] = spec.to_dict()
    keep["world_size"] = env.world_size
    return keep


def build_source_model(spec: FeatureSpec, cfg: CompressConfig, env: DistEnv):
    """The sharded source model and its optimizer, with initial weights that depend only on
    the seed (not on the number of processes or the sharding plan)."""
    torch.manual_seed(cfg.seed)
    full = SourceModelTrain(spec, cfg, cfg.scheme).state_dict()
    torch.manual_seed(cfg.seed)
    model = SourceModelTrain(spec, cfg, cfg.scheme, device=env.device,
                             table_device=torch.device("meta"))
    dmp, optimizer = shard_model(model, env, cfg, cfg.batch_size)
    copy_full_state(dmp, full)
    return dmp, optimizer


@torch.no_grad()
def compress_log(model, path: str, spec: FeatureSpec, cfg: CompressConfig,
                 env: DistEnv) -> Dict[str, np.ndarray]:
    """This rank's share of ``path``: key columns, first label and tokens z (fp32)."""
    model.eval()
    source: SourceModelTrain = model.module
    reader = _reader(path, spec, cfg, env, ReadOrder.TEMPORAL)
    total = all_equal_batches(len(reader), env)
    out: Dict[str, List[np.ndarray]] = {k: [] for k in
                                        ("instance_id", "user_id", "ts", "label", "tokens")}
    for batch in padded(reader, total):
        batch = batch.to(env.device)
        z = source.tokens(batch.sparse_features, batch.dense_features)
        keep = (batch.weight > 0).cpu().numpy()
        out["tokens"].append(z.float().cpu().numpy()[keep])
        out["label"].append(batch.labels[:, 0].cpu().numpy()[keep])
        for k in ("instance_id", "user_id", "ts"):
            out[k].append(getattr(batch, k).cpu().numpy()[keep])
    return {k: np.concatenate(v) for k, v in out.items()}


def write_tokens(cfg: CompressConfig, parts: Dict[str, Dict[str, np.ndarray]],
                 metadata: Dict[str, Any], env: DistEnv) -> None:
    """Each rank writes its tokens as a part store; rank 0 merges the parts into ``cfg.store``
    (atomically: the store appears whole or not at all)."""
    store = Path(cfg.store)
    box = [f".{store.name}.parts-{uuid.uuid4().hex[:8]}"]
    if env.world_size > 1:
        dist.broadcast_object_list(box, src=0)
    part_root = store.parent / box[0]
    part = part_root / f"rank{env.rank:05d}"
    dim = next(iter(parts.values()))["tokens"].shape[1]
    try:
        with TokenStore.create(part, kind="iat", token_shape=(dim,), dtype=cfg.token_dtype,
                               metadata=metadata) as writer:
            for p in parts.values():
                writer.append(p["instance_id"], p["user_id"], p["ts"], p["label"], p["tokens"])
        _barrier(env)
        if env.is_main:
            merged = TokenStore.merge(sorted(part_root.iterdir()), store,
                                      overwrite=cfg.overwrite)
            _log(env, f"wrote {merged.num_rows:,} tokens ({cfg.token_dtype}, d={dim}) to {store}")
        _barrier(env)
    finally:
        if env.is_main:
            shutil.rmtree(part_root, ignore_errors=True)


def _barrier(env: DistEnv) -> None:
    if env.world_size > 1:
        dist.barrier()


def run_compress(cfg: CompressConfig) -> Optional[Dict[str, Any]]:
    """Train, validate, export; returns the results on rank 0."""
    cfg.check()
    env = init_process_group(cfg.device)
    spec = FeatureSpec.load(cfg.train_log)
    exports = cfg.export_logs or [p for p in (cfg.train_log, cfg.valid_log) if p]
    for path in [cfg.valid_log, *exports]:
        if path:
            _check_spec(path, spec)
    if Path(cfg.store).exists() and not cfg.overwrite:
        raise OutputExistsError(f"{cfg.store}: token store already exists (pass --overwrite "
                                "to replace it); nothing was trained or written")
    started = time.perf_counter()
    model, optimizer = build_source_model(spec, cfg, env)
    source: SourceModelTrain = model.module
    cache = source.objective.cache

    def make_reader(epoch: int) -> InstanceLogReader:
        if cfg.scheme == Scheme.USER:
            return _reader(cfg.train_log, spec, cfg, env, ReadOrder.USER,
                           reverse=cfg.two_pass and epoch % 2 == 1)
        return _reader(cfg.train_log, spec, cfg, env, ReadOrder.TEMPORAL)

    history: List[Dict[str, Any]] = []

    def validate(epoch: int) -> None:
        if not cfg.valid_log:
            return
        saved = dict(cache.tokens)  # validation must not leak into the training context
        order = ReadOrder.USER if cfg.scheme == Scheme.USER else ReadOrder.TEMPORAL
        metrics = evaluate(model, _reader(cfg.valid_log, spec, cfg, env, order), env,
                           list(spec.labels))
        cache.tokens = saved
        if metrics is not None:
            history.append({"epoch": epoch, **metrics})
            _log(env, f"epoch {epoch} valid " + "  ".join(
                f"{label}: auc {m['auc']:.4f} gauc {m['gauc']:.4f} logloss {m['logloss']:.4f}"
                for label, m in metrics.items()))

    trainer = Trainer(model, optimizer, env, make_reader, cfg, _fingerprint(cfg, spec, env),
                      rank_state=(lambda: {"cache": cache.state_dict()},
                                  lambda s: cache.load_state_dict(s["cache"])))
    train_start = time.perf_counter()
    steps = trainer.fit(after_epoch=validate)
    train_seconds = time.perf_counter() - train_start

    export_start = time.perf_counter()
    parts = {path: compress_log(model, path, spec, cfg, env) for path in exports}
    export_rows = sum(len(p["instance_id"]) for p in parts.values())
    export_seconds = time.perf_counter() - export_start
    train_keys = read_key_columns(log_files(cfg.train_log))
    metadata = {
        "scheme": cfg.scheme.value, "bottleneck": cfg.bottleneck,
        "model_config": {f.name: getattr(cfg, f.name)
                         for f in dataclasses.fields(SourceModelConfig)},
        "training_window": {"log": str(Path(cfg.train_log).resolve()),
                            "ts_min": int(train_keys.ts.min()),
                            "ts_max": int(train_keys.ts.max())},
        "exported_logs": [str(Path(p).resolve()) for p in exports],
        "label_delay_s": spec.label_delay_s, "seed": cfg.seed, "two_pass": cfg.two_pass,
    }
    write_tokens(cfg, parts, metadata, env)
    results = {
        "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
        "world_size": env.world_size, "steps": steps, "validation": history,
        "train_seconds": train_seconds, "export_seconds": export_seconds,
        "export_instances": export_rows * env.world_size,
        "total_seconds": time.perf_counter() - started,
    }
    if env.is_main and cfg.results:
        with atomic_output(cfg.results, overwrite=True) as tmp:
            tmp.write_text(json.dumps(results, indent=2) + "\n")
    return results if env.is_main else None
