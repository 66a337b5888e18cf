"""Stage 1b: train the HGAQ sample tokenizer on the training window, then export T x M uint8 codes
of every instance of the given logs into a token store (kind ``sif``).

The store's manifest carries the tokenizer's config, its sub-token layout, its training window
and its codebooks (``[T, M, V, d0]`` float32, base64), so a store decodes on its own
(:func:`store_codebooks`). Validation after each epoch reports the auxiliary CTR head's AUC and
logloss and, per level, code usage and perplexity, so a collapsed codebook is visible.
"""

from __future__ import annotations

import base64
import dataclasses
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from iat_torchrec.config import nested
from iat_torchrec.data.reader import InstanceLogReader, ReadOrder
from iat_torchrec.data.spec import FeatureSpec
from iat_torchrec.distributed.collectives import DistEnv, sum_over_ranks
from iat_torchrec.models.hgaq import (HGAQConfig, SampleTokenizer, SampleTokenizerTrain,
                                      tokenizer_embedding_bag_collection)
from iat_torchrec.stages.common import (StageIOConfig, build_sharded, start_export_stage,
                                        export_rows, resume_fingerprint, stage_log,
                                        stage_reader, training_window, write_results,
                                        write_token_store)
from iat_torchrec.tokens.store import TokenStore
from iat_torchrec.train.loop import Trainer, evaluate

STAGE = "tokenize"


@dataclasses.dataclass
class TokenizeConfig(StageIOConfig):
    """Train the HGAQ sample tokenizer and export its codes."""

    model: HGAQConfig = nested(HGAQConfig, "the sample tokenizer")

    def check(self) -> None:
        if self.model.codebook_size > 256:
            raise ValueError(f"--model.codebook_size {self.model.codebook_size}: the token store "
                             "keeps codes as uint8, so at most 256 codes per level")


def build_tokenizer(spec: FeatureSpec, cfg: TokenizeConfig, env: DistEnv):
    """The sharded tokenizer and its optimizer (seed-determined initial weights)."""
    def make(tables: Optional[torch.device]) -> SampleTokenizerTrain:
        device = env.device if tables is not None else None
        ebc = tokenizer_embedding_bag_collection(spec, cfg.model.field_dim,
                                                 device=tables or device)
        return SampleTokenizerTrain(SampleTokenizer(spec, cfg.model, ebc, device=device))
    return build_sharded(make, cfg.train.seed, env, cfg.sharding, cfg.train.batch_size)


def encode_codebooks(codebooks: torch.Tensor) -> Dict[str, Any]:
    """Codebooks as a JSON-able record (float32 bytes in base64)."""
    array = codebooks.detach().float().cpu().numpy()
    return {"shape": list(array.shape), "dtype": "float32",
            "base64": base64.b64encode(array.tobytes()).decode("ascii")}


def store_codebooks(store: TokenStore) -> torch.Tensor:
    """The codebooks [T, M, V, d0] a ``sif`` store's codes index into."""
    record = store.metadata.get("codebooks")
    if store.kind != "sif" or record is None:
        raise ValueError(f"{store.path}: not a SIF code store with codebooks in its manifest")
    array = np.frombuffer(base64.b64decode(record["base64"]), dtype=np.float32)
    return torch.from_numpy(array.reshape(record["shape"]).copy())


def run_tokenize(cfg: TokenizeConfig) -> Optional[Dict[str, Any]]:
    """Train, validate, export; returns the results on rank 0."""
    spec, exports, env = start_export_stage(cfg)
    started = time.perf_counter()
    model, optimizer = build_tokenizer(spec, cfg, env)
    tokenizer: SampleTokenizer = model.module.model
    quantizer = tokenizer.quantizer
    stage_log(env, STAGE, f"{tokenizer.num_tokens} sub-tokens x {cfg.model.levels} levels x "
                          f"{cfg.model.codebook_size} codes, d0 {cfg.model.d0}")

    def make_reader(epoch: int) -> InstanceLogReader:
        return stage_reader(cfg.train_log, spec, cfg.train.batch_size, env, ReadOrder.SHUFFLED,
                            seed=cfg.train.seed + epoch, partition=cfg.train.partition,
                            shuffle_window=cfg.train.shuffle_window)

    history: List[Dict[str, Any]] = []

    def validate(epoch: int) -> None:
        if not cfg.valid_log:
            return
        quantizer.reset_usage()
        metrics = evaluate(model, stage_reader(cfg.valid_log, spec, cfg.train.batch_size, env,
                                               ReadOrder.TEMPORAL), env, list(spec.labels))
        usage = quantizer.usage().to_dict()
        if metrics is not None:
            history.append({"epoch": epoch, **metrics, "codes": usage})
            stage_log(env, STAGE, f"epoch {epoch} valid " + "  ".join(
                f"{label}: auc {m['auc']:.4f} logloss {m['logloss']:.4f}"
                for label, m in metrics.items()))
            for level in range(cfg.model.levels):
                stage_log(env, STAGE, f"  level {level}: codes used "
                                      f"{usage['used_fraction'][level]:.1%}, perplexity "
                                      f"{usage['perplexity'][level]:.1f} of "
                                      f"{cfg.model.codebook_size}, "
                                      f"restarts {usage['restarts'][level]}")

    trainer = Trainer(model, optimizer, env, make_reader, cfg.train,
                      resume_fingerprint(cfg, spec, cfg.train_log, env))
    train_start = time.perf_counter()
    steps = trainer.fit(after_epoch=validate)
    train_seconds = time.perf_counter() - train_start

    export_start = time.perf_counter()
    parts = [export_rows(model, lambda b: tokenizer.tokenize(b.dense_features,
                                                             b.sparse_features),
                         path, spec, cfg.train.batch_size, env) for path in exports]
    exported = sum_over_ranks(sum(len(p["instance_id"]) for p in parts), env)
    export_seconds = time.perf_counter() - export_start
    metadata = {
        "tokenizer_config": dataclasses.asdict(cfg.model),
        "layout": [{"group": s.group.value, "index": s.index, "fields": list(s.fields)}
                   for s in tokenizer.layout],
        "codebooks": encode_codebooks(quantizer.codebooks),
        "training_window": training_window(cfg.train_log),
        "exported_logs": [str(Path(p).resolve()) for p in exports],
        "label_delay_s": spec.label_delay_s, "seed": cfg.train.seed,
    }
    write_token_store(cfg.store, parts, kind="sif",
                      token_shape=(tokenizer.num_tokens, cfg.model.levels), dtype="uint8",
                      metadata=metadata, overwrite=cfg.overwrite, env=env, stage=STAGE)
    results = write_results(cfg.results, cfg, env, steps=steps, validation=history,
                            train_seconds=train_seconds, export_seconds=export_seconds,
                            export_instances=exported,
                            total_seconds=time.perf_counter() - started)
    return results if env.is_main else None
