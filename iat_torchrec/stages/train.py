"""Stage 3: train the downstream model (``DLRM_SIF``) on the target train log, validate after
each epoch, test, write the results.

One configuration (:class:`TrainDownstreamConfig`: inputs, the model
(:class:`~iat_torchrec.models.dlrm_sif.DLRMSIFConfig`), the training run, the sharding) whose
dotted settings are the flags of ``apps/train.py`` and the arguments of the ``train`` TorchX
component.

Inputs: three target logs (train / valid / test splits of one feature spec), and for history
sources their history shards (``apps/assemble.py``), each assembled on the *history store*: the
IAT store when one is given (sources reading tokens need it), else the SIF store. The SIF store's
codes are looked up in the history store's row order (``SampleCodeLookup.from_store(...,
rows_like=iat store)``), so ``sif_both`` reads one history for both.

Decisions:

- **Model selection**: valid *and* test are evaluated after every epoch (cheap next to
  training at this project's scale); the reported ``test`` metrics are those of the epoch with
  the best valid AUC of the first label (early stopping on valid AUC, METHOD.md P1), and every
  epoch's metrics are kept in ``epochs``. With ``patience`` training stops once that many
  epochs in a row brought no better valid AUC, and ``plateau_lr_factor`` scales every learning
  rate (Adam's and the fused embedding optimizer's) after each such epoch (the peer's schedule,
  :func:`~iat_torchrec.train.loop.plateau_schedule`); both follow from the kept per-epoch
  metrics, so a resumed run stops and decays where an uninterrupted one does. No model copy
  has to be kept or reloaded; the per-epoch metrics ride in the checkpoints (rank state), so a
  resumed run reports the same selection. The selected epoch's test predictions are kept
  beside the results (:func:`predictions_path`, named in the results as
  ``test_predictions``): the evaluation's paired bootstrap over users reads them.
- Training order: shuffled, one permutation per epoch (the reader's seed ``seed``, epoch
  ``epoch``); valid and test are read in time order.
- The item-id history's items come from ``item_logs``, by default the logs recorded as exported
  into the history store (its manifest's ``exported_logs``).
- **Histories from another domain** (IAT paper, transfer): ``iat_store`` may be a store
  exported from another instance log (another domain or task, its own feature spec), its
  histories assembled for these target logs by joining on the user id. The item branch can then
  keep the target domain's own history: ``item_store`` and ``*_item_history`` (shards of the
  same target logs on that store; its items from ``item_logs``, default the item store's
  exported logs) feed the item branch while the IAT branch reads ``iat_store``; with
  ``--model.item_store_iat`` (an ``iat`` item store, the target domain's own tokens) a second
  IAT branch reads the item store's tokens over those same histories.
- ``gap_vocab_size`` comes from the train shards' layout and ``fields_per_subtoken`` from the SIF
  store's tokenizer config (not flags: they must match what was built); the valid / test shards
  must have the same layout as the train shards.
- The frozen stores (IAT tokens, SIF codes) are looked up as ``lookup`` says
  (:class:`~iat_torchrec.tokens.lookup.LookupConfig`, default ``auto``): with more than one
  process each holds one contiguous row range of each store, rows kept as stored (an int8
  store stays int8; FBGEMM dequantises only the rows looked up); the rows and bytes each rank
  holds go into the results (``lookups``).
- Every input is checked before the process group, the model or a reader is built: logs of one
  spec with every label present and non-null, store kinds (``iat`` / ``sif``), the IAT token
  width against ``token_dim`` (when given), the SIF codebooks' d0 against ``d0``, and every
  history shard against the exact version of the history store (``HistoryShards.check_store``).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from iat_torchrec.config import nested
from iat_torchrec.data.reader import Partition, ReaderConfig, ReadOrder
from iat_torchrec.data.spec import FeatureSpec, SpecError
from iat_torchrec.distributed.collectives import (DistEnv, broadcast_object, gather_arrays,
                                                  init_process_group)
from iat_torchrec.models.dlrm_sif import (DEFAULT_FIELDS_PER_SUBTOKEN, DLRM_SIF, DLRM_SIFTrain,
                                          DLRMSIFConfig)
from iat_torchrec.models.history import DEFAULT_GAP_VOCAB
from iat_torchrec.stages.common import (NOT_IN_FINGERPRINT as COMMON_NOT_IN_FINGERPRINT,
                                        TrainingStageConfig, build_sharded, resume_fingerprint,
                                        stage_log, write_results)
from iat_torchrec.stages.tokenize import store_codebooks
from iat_torchrec.tokens.downstream import DownstreamDataError, DownstreamReader, check_labels
from iat_torchrec.tokens.lookup import LookupConfig, make_code_lookup, make_token_lookup
from iat_torchrec.tokens.shards import HistoryShards, HistoryShardsError
from iat_torchrec.tokens.store import TokenStore
from iat_torchrec.train.loop import (Trainer, evaluate, plateau_schedule, prediction_metrics,
                                     predict)
from iat_torchrec.train.predictions import write_predictions

STAGE = "train"
SPLITS = ("train", "valid", "test")


class TrainInputError(ValueError):
    """Inputs of the downstream training stage that do not fit together."""


@dataclasses.dataclass
class TrainDownstreamConfig(TrainingStageConfig):
    """Train the downstream model (DLRM_SIF) with validation each epoch and a final test."""

    test_log: str = dataclasses.field(default="", metadata={
        "help": "target log evaluated after each epoch; the best valid epoch's is reported"})
    iat_store: str = dataclasses.field(default="", metadata={
        "help": "IAT token store (apps/compress.py) holding every instance of the histories"})
    sif_store: str = dataclasses.field(default="", metadata={
        "help": "SIF code store (apps/tokenize_samples.py): history codes, targets' codes"})
    train_history: str = dataclasses.field(default="", metadata={
        "help": "history shards of train_log (apps/assemble.py on the IAT store, else SIF)"})
    valid_history: str = dataclasses.field(default="", metadata={
        "help": "history shards of valid_log (same store)"})
    test_history: str = dataclasses.field(default="", metadata={
        "help": "history shards of test_log (same store)"})
    item_logs: List[str] = dataclasses.field(default_factory=list, metadata={
        "help": "instance logs exported into the item branch's store (--item_store, else the "
                "history store), for the items of the item-id history (default: the store's "
                "recorded exported_logs)"})
    item_store: str = dataclasses.field(default="", metadata={
        "help": "the item branch's own store, when its history comes from another store than "
                "the IAT tokens' (the target domain's own, beside another domain's --iat_store)"})
    train_item_history: str = dataclasses.field(default="", metadata={
        "help": "history shards of train_log on --item_store"})
    valid_item_history: str = dataclasses.field(default="", metadata={
        "help": "history shards of valid_log on --item_store"})
    test_item_history: str = dataclasses.field(default="", metadata={
        "help": "history shards of test_log on --item_store"})
    token_dim: int = dataclasses.field(default=0, metadata={
        "help": "IAT token width the model expects (0: the IAT store's); a store of another "
                "width is refused"})
    patience: int = dataclasses.field(default=0, metadata={
        "help": "early stopping: stop after this many epochs in a row without a better valid "
                "AUC (0: train every epoch)"})
    plateau_lr_factor: float = dataclasses.field(default=1.0, metadata={
        "help": "every learning rate x this after each epoch without a better valid AUC "
                "(1: constant)"})
    model: DLRMSIFConfig = nested(DLRMSIFConfig, "the downstream model")
    lookup: LookupConfig = nested(LookupConfig, "how each process holds the frozen token and "
                                                "code stores")

    def __post_init__(self) -> None:
        if self.patience < 0 or not 0.0 < self.plateau_lr_factor <= 1.0:
            raise ValueError("patience must be >= 0 and plateau_lr_factor in (0, 1]")


# Settings that do not shape training: a resume may change them.
NOT_IN_FINGERPRINT = (*COMMON_NOT_IN_FINGERPRINT, "valid_log", "test_log", "valid_history",
                      "test_history", "valid_item_history", "test_item_history",
                      "lookup.sharding", "lookup.location",
                      "lookup.shard_min_bytes")


@dataclasses.dataclass
class TrainInputs:
    """Everything :func:`check_train_inputs` opened and checked, and the model's data-given
    sizes: ``gap_vocab_size`` (the train shards' layout) and ``fields_per_subtoken`` (the SIF
    store's tokenizer); ``DLRM_SIF``'s defaults where the variant reads no such data."""

    spec: FeatureSpec
    iat_store: Optional[TokenStore]
    sif_store: Optional[TokenStore]
    history_store: Optional[TokenStore]
    shards: Dict[str, Optional[HistoryShards]]
    item_store: Optional[TokenStore]
    item_shards: Dict[str, Optional[HistoryShards]]
    codebooks: Optional[torch.Tensor]
    item_logs: List[str]
    gap_vocab_size: int
    fields_per_subtoken: int


def _open_store(path: str, kind: str, flag: str) -> TokenStore:
    store = TokenStore.open(path)
    if store.kind != kind:
        raise TrainInputError(f"{path}: --{flag} must be a {kind!r} store, this one holds "
                              f"{store.kind!r} rows")
    return store


def check_train_inputs(cfg: TrainDownstreamConfig) -> TrainInputs:
    """Open and check every input (see the module docstring); raises a clear error on the first
    that does not fit, before any training work."""
    src, v = cfg.model.history_source, cfg.model.variant
    if not cfg.train_log or not cfg.valid_log:
        raise TrainInputError("--train_log and --valid_log are required")
    logs = {"train": cfg.train_log, "valid": cfg.valid_log, "test": cfg.test_log}
    spec = FeatureSpec.load(cfg.train_log)
    for name, path in logs.items():
        if not path:
            continue
        if name != "train" and FeatureSpec.load(path) != spec:
            raise SpecError(f"{path}: the {name} log's feature spec differs from the train "
                            f"log's ({cfg.train_log}); use splits of one log")
        check_labels(path, spec)
    # Stores.
    if v.uses_tokens and not cfg.iat_store:
        raise TrainInputError(f"history source {src.value} reads IAT tokens: give --iat_store")
    if v.uses_codes and not cfg.sif_store:
        raise TrainInputError(f"history source {src.value} reads HGAQ codes: give --sif_store")
    iat = _open_store(cfg.iat_store, "iat", "iat_store") if cfg.iat_store else None
    sif = _open_store(cfg.sif_store, "sif", "sif_store") if cfg.sif_store else None
    if iat is not None and cfg.token_dim and iat.token_shape[0] != cfg.token_dim:
        raise TrainInputError(f"{iat.path}: tokens are {iat.token_shape[0]} wide, the model "
                              f"expects --token_dim {cfg.token_dim}: a store of another source "
                              "model?")
    codebooks, fields_per_subtoken = None, DEFAULT_FIELDS_PER_SUBTOKEN
    if sif is not None and v.is_sif:
        codebooks = store_codebooks(sif)
        if codebooks.shape[-1] != cfg.model.mixer.d0:
            raise TrainInputError(f"{sif.path}: codewords are {codebooks.shape[-1]} wide, the "
                                  f"model's --model.mixer.d0 is {cfg.model.mixer.d0}: set "
                                  f"--model.mixer.d0 {codebooks.shape[-1]}")
        fields_per_subtoken = int(sif.metadata["tokenizer_config"]["fields_per_subtoken"])
    # History shards, each against the exact version of the history store.
    history_store = iat if iat is not None else sif
    shards: Dict[str, Optional[HistoryShards]] = {k: None for k in SPLITS}
    gap_vocab_size = DEFAULT_GAP_VOCAB
    if v.reads_history:
        if history_store is None:
            raise TrainInputError(f"history source {src.value} needs a store the histories "
                                  "index: --iat_store or --sif_store")
        shards = _open_shards(logs, {"train": cfg.train_history, "valid": cfg.valid_history,
                                     "test": cfg.test_history}, history_store, "history",
                              f"history source {src.value}")
        gap_vocab_size = shards["train"].layout.gap_vocab_size
    item_store: Optional[TokenStore] = None
    item_shards: Dict[str, Optional[HistoryShards]] = {k: None for k in SPLITS}
    if cfg.item_store:
        if cfg.model.item_branch == "none" or not v.reads_history:
            raise TrainInputError(f"--item_store feeds the item branch; history source "
                                  f"{src.value} with item branch {cfg.model.item_branch} has "
                                  "none")
        item_store = (_open_store(cfg.item_store, "iat", "item_store")
                      if cfg.model.item_store_iat else TokenStore.open(cfg.item_store))
        item_shards = _open_shards(logs, {"train": cfg.train_item_history,
                                          "valid": cfg.valid_item_history,
                                          "test": cfg.test_item_history}, item_store,
                                   "item_history", "--item_store")
        theirs, ours = item_shards["train"].layout, shards["train"].layout
        if theirs.gap_boundaries_s != ours.gap_boundaries_s:
            raise HistoryShardsError(
                f"{cfg.train_item_history}: gap buckets {list(theirs.gap_boundaries_s)} differ "
                f"from the history shards' {list(ours.gap_boundaries_s)}; assemble both with "
                "the same --gap_boundaries_s")
    elif cfg.model.item_store_iat:
        raise TrainInputError("--model.item_store_iat reads the item store's tokens: give "
                              "--item_store")
    item_logs: List[str] = []
    if cfg.model.item_branch != "none":
        items_from = item_store if item_store is not None else history_store
        item_logs = list(cfg.item_logs) or list(items_from.metadata.get("exported_logs", []))
        if not item_logs:
            raise DownstreamDataError(f"{items_from.path}: records no exported logs; give "
                                      "--item_logs, the logs exported into it")
    return TrainInputs(spec, iat, sif, history_store, shards, item_store, item_shards,
                       codebooks, item_logs, gap_vocab_size, fields_per_subtoken)


def _open_shards(logs: Dict[str, str], paths: Dict[str, str], store: TokenStore, flag: str,
                 needed_by: str) -> Dict[str, Optional[HistoryShards]]:
    """The history shards of each given log (``--<split>_<flag>``), each checked against the
    exact version of ``store`` and against the train shards' layout."""
    shards: Dict[str, Optional[HistoryShards]] = {k: None for k in SPLITS}
    for name in SPLITS:
        if not logs[name]:
            continue
        if not paths[name]:
            raise TrainInputError(f"{needed_by} needs --{name}_{flag}, the history shards of "
                                  f"--{name}_log")
        shards[name] = HistoryShards.open(paths[name])
        shards[name].check_store(store)
        if shards[name].layout != shards["train"].layout:
            raise HistoryShardsError(
                f"{paths[name]}: assembled with another layout ({shards[name].layout}) than "
                f"the train shards ({shards['train'].layout}); use one max_len, label delay "
                "and gap buckets")
    return shards


def _metrics_line(metrics: Dict[str, Dict[str, float]]) -> str:
    return "  ".join(f"{label}: auc {m['auc']:.4f} gauc {m['gauc']:.4f} "
                     f"logloss {m['logloss']:.4f}" for label, m in metrics.items())


def held_rows(lookup: Any, store: TokenStore, env: DistEnv) -> Optional[Dict[str, Any]]:
    """On rank 0, what each rank's frozen ``lookup`` of ``store`` holds: ``{"lookup": its class,
    "table_rows", "table_bytes" (the whole table as stored), "rows_per_rank",
    "bytes_per_rank"}``; None on other ranks."""
    parts = gather_arrays({"rows": int(lookup.local_rows), "bytes": int(lookup.local_bytes)},
                          env)
    if parts is None:
        return None
    return {"lookup": type(lookup).__name__, "table_rows": lookup.num_rows,
            "table_bytes": lookup.num_rows * store.row_bytes,
            "rows_per_rank": [p["rows"] for p in parts],
            "bytes_per_rank": [p["bytes"] for p in parts]}


def predictions_path(results: str, epoch: Optional[int] = None) -> Path:
    """Where a run's test predictions go: beside its results file, one per epoch while it
    trains (``<results>.test_epoch<k>.parquet``), the best valid epoch's at the end
    (``<results>.test.parquet``)."""
    stem = Path(results).with_suffix("")
    return stem.with_name(f"{stem.name}.test" + ("" if epoch is None else f"_epoch{epoch}")
                          + ".parquet")


def keep_best_predictions(results: str, best: int, epochs: List[int]) -> str:
    """The best epoch's test predictions become the run's; the other epochs' are removed."""
    final = predictions_path(results)
    os.replace(predictions_path(results, best), final)
    for epoch in epochs:
        predictions_path(results, epoch).unlink(missing_ok=True)
    return str(final)


def run_train(cfg: TrainDownstreamConfig) -> Optional[Dict[str, Any]]:
    """Check the inputs, train, validate (and test) each epoch; returns the results on rank 0:
    ``valid`` / ``test`` (label -> auc, gauc, logloss, count) of the best valid epoch,
    ``best_epoch``, ``epochs`` (every epoch's metrics), ``steps`` and timings."""
    inputs = check_train_inputs(cfg)
    spec, mcfg = inputs.spec, cfg.model
    v = mcfg.variant
    env: DistEnv = init_process_group(cfg.sharding.device)
    started = time.perf_counter()

    lookups: Dict[str, Any] = {}
    token_lookup = code_lookup = None
    if v.uses_tokens:
        token_lookup = make_token_lookup(inputs.iat_store, cfg.lookup, env.device)
        lookups["tokens"] = held_rows(token_lookup, inputs.iat_store, env)
    if v.uses_codes:
        code_lookup = make_code_lookup(inputs.sif_store, cfg.lookup, env.device,
                                       rows_like=inputs.iat_store)
        lookups["codes"] = held_rows(code_lookup, inputs.sif_store, env)
    item_token_lookup = None
    if mcfg.item_store_iat:
        item_token_lookup = make_token_lookup(inputs.item_store, cfg.lookup, env.device)
        lookups["item tokens"] = held_rows(item_token_lookup, inputs.item_store, env)
    code_store = inputs.sif_store if inputs.codebooks is not None else None
    k = mcfg.item_history_len if mcfg.item_branch != "none" else 0

    def reader(split: str, path: str, order: ReadOrder) -> DownstreamReader:
        shards = inputs.shards[split]
        train = split == "train"
        return DownstreamReader(
            path, spec, ReaderConfig(
                batch_size=cfg.train.batch_size, order=order, seed=cfg.train.seed,
                partition=cfg.train.partition if train else Partition.STEPS,
                shuffle_window=cfg.train.shuffle_window if train else 0),
            env.rank, env.world_size, history=shards,
            store=inputs.history_store if shards is not None else None, device=env.device,
            item_feature=mcfg.item_feature if k else "", item_history_len=k,
            item_logs=inputs.item_logs, code_store=code_store,
            item_shards=inputs.item_shards[split], item_store=inputs.item_store)

    train_reader = reader("train", cfg.train_log, ReadOrder.SHUFFLED)
    valid_reader = reader("valid", cfg.valid_log, ReadOrder.TEMPORAL)
    test_reader = reader("test", cfg.test_log, ReadOrder.TEMPORAL) if cfg.test_log else None

    model, optimizer = build_sharded(
        lambda tables: DLRM_SIFTrain(DLRM_SIF(
            spec, mcfg, token_lookup=token_lookup, item_token_lookup=item_token_lookup,
            code_lookup=code_lookup,
            codebooks=inputs.codebooks,
            token_dim=inputs.iat_store.token_shape[0] if v.uses_tokens else None,
            gap_vocab_size=inputs.gap_vocab_size,
            fields_per_subtoken=inputs.fields_per_subtoken,
            device=env.device if tables is not None else None, table_device=tables)),
        cfg.train.seed, env, cfg.sharding, cfg.train.batch_size)
    stage_log(env, STAGE, f"history source {mcfg.history_source.value}, interaction "
                          f"{mcfg.interaction}, {train_reader.num_rows:,} train rows, "
                          f"{env.world_size} process(es)")
    if env.is_main:
        for what, held in lookups.items():
            stage_log(env, STAGE, f"{what}: {held['lookup']}, rows held per process "
                                  f"{held['rows_per_rank']} of {held['table_rows']:,}")

    def make_reader(epoch: int) -> DownstreamReader:
        train_reader.set_epoch(epoch)
        return train_reader

    epochs: List[Dict[str, Any]] = []

    def after_epoch(epoch: int) -> None:
        valid = evaluate(model, valid_reader, env, list(spec.labels))
        test = None
        if test_reader is not None:
            pred = predict(model, test_reader, env)
            if pred is not None:
                test = prediction_metrics(pred, list(spec.labels))
                if cfg.results:
                    write_predictions(predictions_path(cfg.results, epoch), pred, spec.labels)
        if valid is not None:
            epochs.append({"epoch": epoch, "valid": valid, "test": test})
            stage_log(env, STAGE, f"epoch {epoch} valid {_metrics_line(valid)}")

    fingerprint = resume_fingerprint(cfg, spec, cfg.train_log, env, NOT_IN_FINGERPRINT)
    trainer = Trainer(model, optimizer, env, make_reader, cfg.train, fingerprint,
                      rank_state=(lambda: {"epochs": list(epochs)},
                                  lambda s: epochs.extend(s["epochs"])))
    first = spec.labels[0]

    def schedule() -> Optional[float]:
        aucs = [e["valid"][first]["auc"] for e in epochs]
        scale = plateau_schedule(aucs, cfg.patience, cfg.plateau_lr_factor)
        return broadcast_object(scale, env)

    train_start = time.perf_counter()
    steps = trainer.fit(after_epoch=after_epoch, schedule=schedule)
    train_seconds = time.perf_counter() - train_start

    best: Optional[Dict[str, Any]] = None
    test_predictions = None
    if env.is_main and epochs:
        best = max(epochs, key=lambda e: e["valid"][first]["auc"])
        if best["test"] is not None:
            stage_log(env, STAGE, f"best epoch {best['epoch']} test {_metrics_line(best['test'])}")
            if cfg.results:
                test_predictions = keep_best_predictions(cfg.results, best["epoch"],
                                                         [e["epoch"] for e in epochs])
    results = write_results(
        cfg.results, cfg, env, steps=steps, best_epoch=best["epoch"] if best else None,
        valid=best["valid"] if best else None, test=best["test"] if best else None,
        test_predictions=test_predictions,
        epochs=epochs, train_rows=train_reader.num_rows, train_seconds=train_seconds,
        total_seconds=time.perf_counter() - started, lookups=lookups,
        stores={"iat": str(Path(cfg.iat_store).resolve()) if cfg.iat_store else None,
                "sif": str(Path(cfg.sif_store).resolve()) if cfg.sif_store else None,
                "item": str(Path(cfg.item_store).resolve()) if cfg.item_store else None})
    return results if env.is_main else None
