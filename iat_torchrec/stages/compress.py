"""Stage 1a: train the IAT source model on the training window, then compress every instance of
the given logs into a token store (instance_id -> d-dim token).

One configuration (:class:`CompressConfig`: inputs and outputs, the source model, the training
run, the sharding) whose dotted settings are the flags of ``apps/compress.py`` and the arguments
of the ``compress`` TorchX component.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from iat_torchrec.config import nested
from iat_torchrec.data.reader import InstanceLogReader, ReadOrder
from iat_torchrec.data.spec import FeatureSpec
from iat_torchrec.distributed.collectives import DistEnv, sum_over_ranks
from iat_torchrec.models.source import Scheme, SourceModelConfig, SourceModelTrain
from iat_torchrec.stages.common import NOT_IN_FINGERPRINT as COMMON_NOT_IN_FINGERPRINT
from iat_torchrec.stages.common import (StageIOConfig, build_sharded, start_export_stage,
                                        export_rows, resume_fingerprint, stage_log,
                                        stage_reader, training_window, write_results,
                                        write_token_store)
from iat_torchrec.train.loop import Trainer, evaluate

EXPORT_TOKENS = ("pre_sit", "post_sit")


@dataclasses.dataclass
class CompressConfig(StageIOConfig):
    """Train the IAT source model and export instance tokens."""

    scheme: Scheme = dataclasses.field(default=Scheme.USER, metadata={
        "help": "temporal: instances in time order, each on its own; user: whole user "
                "histories through the Source Instance Transformer"})
    two_pass: bool = dataclasses.field(default=False, metadata={
        "help": "user scheme: alternate epochs forward and reverse in user order"})
    token_dtype: str = dataclasses.field(default="fp16", metadata={
        "help": "storage of the tokens: fp32, fp16 or int8 (row-wise scale and bias)"})
    export_token: str = dataclasses.field(default="pre_sit", metadata={
        "help": "what the store holds: pre_sit (z, the paper's choice) | post_sit (user scheme: "
                "the SIT's output per instance, every export log read as one in user order, "
                "each user's earlier instances as context; the paper's ablation)"})
    model: SourceModelConfig = nested(SourceModelConfig, "the source model")

    def check(self) -> None:
        if self.two_pass and self.scheme != Scheme.USER:
            raise ValueError("--two_pass applies to the user scheme only")
        if self.export_token not in EXPORT_TOKENS:
            raise ValueError(f"--export_token must be one of {EXPORT_TOKENS}, "
                             f"got {self.export_token!r}")
        if self.export_token == "post_sit" and self.scheme != Scheme.USER:
            raise ValueError("--export_token post_sit needs the user scheme (the SIT)")
        if not self.model.bottleneck and self.scheme == Scheme.USER:
            raise ValueError("--model.bottleneck false (the base model) runs with the temporal "
                             "scheme only: the SIT reads bottleneck tokens")


STAGE = "compress"
NOT_IN_FINGERPRINT = (*COMMON_NOT_IN_FINGERPRINT, "token_dtype", "export_token")


def build_source_model(spec: FeatureSpec, cfg: CompressConfig, env: DistEnv):
    """The sharded source model and its optimizer (seed-determined initial weights)."""
    return build_sharded(
        lambda tables: SourceModelTrain(spec, cfg.model, cfg.scheme,
                                        device=env.device if tables is not None else None,
                                        table_device=tables),
        cfg.train.seed, env, cfg.sharding, cfg.train.batch_size)


def compress_log(model, path: str, spec: FeatureSpec, cfg: CompressConfig,
                 env: DistEnv) -> Dict[str, np.ndarray]:
    """This rank's share of ``path``: key columns, first label and tokens z (fp32)."""
    source: SourceModelTrain = model.module
    return export_rows(model, lambda b: source.tokens(b.sparse_features, b.dense_features)
                       .float(), path, spec, cfg.train.batch_size, env)


def compress_post_sit(model, paths: List[str], spec: FeatureSpec, cfg: CompressConfig,
                      env: DistEnv) -> Dict[str, np.ndarray]:
    """This rank's share of all ``paths`` read as one log in user order (whole users per rank,
    each user's rows of every log by time): key columns, first label and the SIT's output per
    row (fp32), each over the user's earlier rows only, streamed from an empty context."""
    source: SourceModelTrain = model.module
    source.objective.cache.clear()
    return export_rows(model, lambda b: source.sit_tokens(b).float(), paths, spec,
                       cfg.train.batch_size, env, order=ReadOrder.USER)


def run_compress(cfg: CompressConfig) -> Optional[Dict[str, Any]]:
    """Train, validate, export; returns the results on rank 0."""
    spec, exports, env = start_export_stage(cfg)
    started = time.perf_counter()
    model, optimizer = build_source_model(spec, cfg, env)
    source: SourceModelTrain = model.module
    cache = source.objective.cache

    def make_reader(epoch: int) -> InstanceLogReader:
        if cfg.scheme == Scheme.USER:
            return stage_reader(cfg.train_log, spec, cfg.train.batch_size, env, ReadOrder.USER,
                                reverse=cfg.two_pass and epoch % 2 == 1)
        return stage_reader(cfg.train_log, spec, cfg.train.batch_size, env, ReadOrder.TEMPORAL,
                            partition=cfg.train.partition)

    history: List[Dict[str, Any]] = []

    def validate(epoch: int) -> None:
        if not cfg.valid_log:
            return
        saved = cache.snapshot()  # validation must not leak into the training context
        order = ReadOrder.USER if cfg.scheme == Scheme.USER else ReadOrder.TEMPORAL
        reader = stage_reader(cfg.valid_log, spec, cfg.train.batch_size, env, order)
        metrics = evaluate(model, reader, env, list(spec.labels))
        cache.load_state_dict(saved)
        if metrics is not None:
            history.append({"epoch": epoch, **metrics})
            stage_log(env, STAGE, f"epoch {epoch} valid " + "  ".join(
                f"{label}: auc {m['auc']:.4f} gauc {m['gauc']:.4f} logloss {m['logloss']:.4f}"
                for label, m in metrics.items()))

    trainer = Trainer(model, optimizer, env, make_reader, cfg.train,
                      resume_fingerprint(cfg, spec, cfg.train_log, env, NOT_IN_FINGERPRINT),
                      rank_state=(lambda: {"cache": cache.state_dict()},
                                  lambda s: cache.load_state_dict(s["cache"])))
    train_start = time.perf_counter()
    # Every pass reads each user's history from its start: context left from the previous pass
    # would put the user's later tokens in front of the earlier ones.
    steps = trainer.fit(after_epoch=validate, before_epoch=lambda epoch: cache.clear())
    train_seconds = time.perf_counter() - train_start

    export_start = time.perf_counter()
    if cfg.export_token == "post_sit":
        parts = {"all": compress_post_sit(model, exports, spec, cfg, env)}
    else:
        parts = {path: compress_log(model, path, spec, cfg, env) for path in exports}
    exported = sum_over_ranks(sum(len(p["instance_id"]) for p in parts.values()), env)
    export_seconds = time.perf_counter() - export_start
    metadata = {
        "scheme": cfg.scheme.value, "bottleneck": cfg.model.bottleneck,
        "model_config": dataclasses.asdict(cfg.model),
        "training_window": training_window(cfg.train_log),
        "exported_logs": [str(Path(p).resolve()) for p in exports],
        "label_delay_s": spec.label_delay_s, "seed": cfg.train.seed, "two_pass": cfg.two_pass,
        "export_token": cfg.export_token,
    }
    dim = next(iter(parts.values()))["tokens"].shape[1]
    write_token_store(cfg.store, list(parts.values()), kind="iat", token_shape=(dim,),
                      dtype=cfg.token_dtype, metadata=metadata, overwrite=cfg.overwrite,
                      env=env, stage=STAGE)
    results = write_results(cfg.results, cfg, env, steps=steps, validation=history,
                            train_seconds=train_seconds, export_seconds=export_seconds,
                            export_instances=exported,
                            total_seconds=time.perf_counter() - started)
    return results if env.is_main else None
