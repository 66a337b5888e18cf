"""Stage 3: train the downstream model (``DLRM_SIF``) on the target train log, validate after
each epoch, test, write the results.

One flat configuration (:class:`TrainDownstreamConfig`: inputs, the model's sizes flattened, the
training run, the sharding) whose field names are the command-line flags of ``apps/train.py``
and the arguments of the ``train`` TorchX component; :func:`model_config` maps the flat model
fields into :class:`~iat_torchrec.models.dlrm_sif.DLRMSIFConfig` and its sub-configs.

Inputs: three target logs (train / valid / test splits of one feature spec), and for history
sources their history shards (``apps/assemble.py``), each assembled on the *history store*: the
IAT store when one is given (sources reading tokens need it), else the SIF store. The SIF store's
codes are looked up in the history store's row order (``SampleCodeLookup.from_store(...,
rows_like=iat store)``), so ``sif_both`` reads one history for both.

Decisions:

- **Model selection**: valid *and* test are evaluated after every epoch (cheap next to
  training at this project's scale); the reported ``test`` metrics are those of the epoch with
  the best valid AUC of the first label (early stopping on valid AUC, METHOD.md P1), and every
  epoch's metrics are kept in ``epochs``. No model copy has to be kept or reloaded; the per-epoch
  metrics ride in the checkpoints (rank state), so a resumed run reports the same selection.
- Training order: shuffled, one permutation per epoch (the reader's seed ``seed``, epoch
  ``epoch``); valid and test are read in time order.
- The item-id history's items come from ``item_logs``, by default the logs recorded as exported
  into the history store (its manifest's ``exported_logs``).
- ``gap_vocab_size`` comes from the train shards' layout and ``fields_per_subtoken`` from the SIF
  store's tokenizer config (not flags: they must match what was built); the valid / test shards
  must have the same layout as the train shards.
- Every input is checked before the process group, the model or a reader is built: logs of one
  spec with every label present and non-null, store kinds (``iat`` / ``sif``), the IAT token
  width against ``token_dim`` (when given), the SIF codebooks' d0 against ``d0``, and every
  history shard against the exact version of the history store (``HistoryShards.check_store``).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from iat_torchrec.data.downstream import DownstreamDataError, DownstreamReader, check_labels
from iat_torchrec.data.reader import ReaderConfig, ReadOrder
from iat_torchrec.data.spec import FeatureSpec, SpecError
from iat_torchrec.distributed.sharding import DistEnv, ShardingConfig, init_process_group
from iat_torchrec.models.dlrm_sif import (DLRM_SIF, DLRM_SIFTrain, DLRMSIFConfig, HistorySource,
                                          SampleCodeLookup)
from iat_torchrec.models.history import BSTConfig, DINConfig, IATBranchConfig
from iat_torchrec.models.mixer import SIFMixerConfig
from iat_torchrec.stages.common import (NOT_IN_FINGERPRINT as COMMON_NOT_IN_FINGERPRINT,
                                        build_sharded, resume_fingerprint, stage_log,
                                        write_results)
from iat_torchrec.stages.tokenize import store_codebooks
from iat_torchrec.tokens.assembly import HistoryShards, HistoryShardsError
from iat_torchrec.tokens.lookup import InstanceTokenLookup
from iat_torchrec.tokens.store import TokenStore
from iat_torchrec.train.loop import TrainConfig, Trainer, evaluate

STAGE = "train"
SPLITS = ("train", "valid", "test")


class TrainInputError(ValueError):
    """Inputs of the downstream training stage that do not fit together."""


@dataclasses.dataclass
class TrainDownstreamConfig(TrainConfig, ShardingConfig):
    """Train the downstream model (DLRM_SIF) with validation each epoch and a final test."""

    # ---------------------------------------------------------------- inputs and outputs
    train_log: str = dataclasses.field(default="", metadata={
        "help": "target log the model is trained on (required)"})
    valid_log: str = dataclasses.field(default="", metadata={
        "help": "later target log, evaluated after each epoch; selects the epoch (required)"})
    test_log: str = dataclasses.field(default="", metadata={
        "help": "target log evaluated after each epoch; the best valid epoch's is reported"})
    history_source: HistorySource = dataclasses.field(default=HistorySource.NONE, metadata={
        "help": "none | din | bst | iat | sif_codes | sif_iat | sif_both"})
    interaction: str = dataclasses.field(default="mixer", metadata={
        "help": "mixer (SIF-Mixer) | dot (TorchRec DLRM's); SIF sources need mixer"})
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
        "help": "instance logs exported into the history store, for the items of the item-id "
                "history (default: the store's recorded exported_logs)"})
    token_dim: int = dataclasses.field(default=0, metadata={
        "help": "IAT token width the model expects (0: the IAT store's); a store of another "
                "width is refused"})
    results: str = dataclasses.field(default="", metadata={
        "help": "JSON file for the run's metrics and timings (optional)"})
    # ---------------------------------------------------------------- the model (flattened)
    embedding_dim: int = dataclasses.field(default=16, metadata={
        "help": "D: width of every embedding table, the dense embedding and branch tokens"})
    dense_arch_layers: List[int] = dataclasses.field(default_factory=lambda: [64], metadata={
        "help": "hidden sizes of the dense arch (a final layer of D is appended)"})
    over_arch_layers: List[int] = dataclasses.field(default_factory=lambda: [64, 32], metadata={
        "help": "hidden sizes of the over arch (one logit per label is appended)"})
    item_feature: str = dataclasses.field(default="", metadata={
        "help": "the target's item-id field, whose table the item history shares (din, bst, "
                "iat with an item branch)"})
    item_history_len: int = dataclasses.field(default=50, metadata={
        "help": "k: the item-id history is the last k steps of the history"})
    iat_item_branch: str = dataclasses.field(default="bst", metadata={
        "help": "hand-crafted branch kept beside the IAT branch: bst | din | none"})
    d0: int = dataclasses.field(default=16, metadata={
        "help": "SIF-Mixer token size (the SIF store's codeword size with codes)"})
    num_blocks: int = dataclasses.field(default=4, metadata={"help": "SIF-Mixer blocks"})
    num_heads: int = dataclasses.field(default=2, metadata={"help": "SIF-Mixer attention heads"})
    alignment_weight: float = dataclasses.field(default=0.25, metadata={
        "help": "weight of L_align (SIF sources with codebooks)"})
    bst_layers: int = dataclasses.field(default=1, metadata={"help": "BST Transformer blocks"})
    bst_heads: int = dataclasses.field(default=2, metadata={"help": "BST attention heads"})
    din_attention_layers: List[int] = dataclasses.field(
        default_factory=lambda: [64, 32], metadata={"help": "DIN activation unit sizes"})
    iat_adapt_dim: int = dataclasses.field(default=64, metadata={
        "help": "IAT branch: width of the adaptation MLP"})
    iat_side_dim: int = dataclasses.field(default=64, metadata={
        "help": "IAT branch: width of the side-information embeddings"})
    iat_layers: int = dataclasses.field(default=2, metadata={
        "help": "IAT branch: Transformer blocks"})
    iat_heads: int = dataclasses.field(default=4, metadata={
        "help": "IAT branch: attention heads"})

    def __post_init__(self) -> None:
        self.history_source = HistorySource(self.history_source)


# Fields that do not shape training: a resume may change them.
NOT_IN_FINGERPRINT = (*COMMON_NOT_IN_FINGERPRINT, "valid_log", "test_log", "valid_history",
                      "test_history")


def model_config(cfg: TrainDownstreamConfig, gap_vocab_size: Optional[int] = None,
                 fields_per_subtoken: Optional[int] = None) -> DLRMSIFConfig:
    """The nested model config of the flat stage config (validated by ``DLRMSIFConfig``)."""
    extra: Dict[str, Any] = {}
    if gap_vocab_size is not None:
        extra["gap_vocab_size"] = gap_vocab_size
    if fields_per_subtoken is not None:
        extra["fields_per_subtoken"] = fields_per_subtoken
    return DLRMSIFConfig(
        history_source=cfg.history_source, interaction=cfg.interaction,
        embedding_dim=cfg.embedding_dim, dense_arch_layers=list(cfg.dense_arch_layers),
        over_arch_layers=list(cfg.over_arch_layers),
        mixer=SIFMixerConfig(d0=cfg.d0, num_blocks=cfg.num_blocks, num_heads=cfg.num_heads,
                             alignment_weight=cfg.alignment_weight),
        din=DINConfig(attention_layers=list(cfg.din_attention_layers)),
        bst=BSTConfig(num_layers=cfg.bst_layers, num_heads=cfg.bst_heads),
        iat=IATBranchConfig(adapt_dim=cfg.iat_adapt_dim, side_dim=cfg.iat_side_dim,
                            num_layers=cfg.iat_layers, num_heads=cfg.iat_heads),
        item_feature=cfg.item_feature, item_history_len=cfg.item_history_len,
        iat_item_branch=cfg.iat_item_branch, **extra)


@dataclasses.dataclass
class TrainInputs:
    """Everything :func:`check_train_inputs` opened and checked."""

    spec: FeatureSpec
    model: DLRMSIFConfig
    iat_store: Optional[TokenStore]
    sif_store: Optional[TokenStore]
    history_store: Optional[TokenStore]
    shards: Dict[str, Optional[HistoryShards]]
    codebooks: Optional[torch.Tensor]
    item_logs: List[str]


def _open_store(path: str, kind: str, flag: str) -> TokenStore:
    store = TokenStore.open(path)
    if store.kind != kind:
        raise TrainInputError(f"{path}: --{flag} must be a {kind!r} store, this one holds "
                              f"{store.kind!r} rows")
    return store


def check_train_inputs(cfg: TrainDownstreamConfig) -> TrainInputs:
    """Open and check every input (see the module docstring); raises a clear error on the first
    that does not fit, before any training work."""
    src = HistorySource(cfg.history_source)
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
    if src.uses_tokens and not cfg.iat_store:
        raise TrainInputError(f"history source {src.value} reads IAT tokens: give --iat_store")
    if src.uses_codes and not cfg.sif_store:
        raise TrainInputError(f"history source {src.value} reads HGAQ codes: give --sif_store")
    iat = _open_store(cfg.iat_store, "iat", "iat_store") if cfg.iat_store else None
    sif = _open_store(cfg.sif_store, "sif", "sif_store") if cfg.sif_store else None
    if iat is not None and cfg.token_dim and iat.token_shape[0] != cfg.token_dim:
        raise TrainInputError(f"{iat.path}: tokens are {iat.token_shape[0]} wide, the model "
                              f"expects --token_dim {cfg.token_dim}: a store of another source "
                              "model?")
    codebooks, fields_per_subtoken = None, None
    if sif is not None and src.is_sif:
        codebooks = store_codebooks(sif)
        if codebooks.shape[-1] != cfg.d0:
            raise TrainInputError(f"{sif.path}: codewords are {codebooks.shape[-1]} wide, the "
                                  f"model's --d0 is {cfg.d0}: set --d0 {codebooks.shape[-1]}")
        fields_per_subtoken = int(sif.metadata["tokenizer_config"]["fields_per_subtoken"])
    # History shards, each against the exact version of the history store.
    history_store = iat if iat is not None else sif
    shards: Dict[str, Optional[HistoryShards]] = {k: None for k in SPLITS}
    gap_vocab_size = None
    if src != HistorySource.NONE:
        if history_store is None:
            raise TrainInputError(f"history source {src.value} needs a store the histories "
                                  "index: --iat_store or --sif_store")
        paths = {"train": cfg.train_history, "valid": cfg.valid_history,
                 "test": cfg.test_history}
        for name in SPLITS:
            if not logs[name]:
                continue
            if not paths[name]:
                raise TrainInputError(f"history source {src.value} needs --{name}_history, the "
                                      f"history shards of --{name}_log")
            shards[name] = HistoryShards.open(paths[name])
            shards[name].check_store(history_store)
            if shards[name].layout != shards["train"].layout:
                raise HistoryShardsError(
                    f"{paths[name]}: assembled with another layout ({shards[name].layout}) than "
                    f"the train shards ({shards['train'].layout}); use one max_len, label delay "
                    "and gap buckets")
        gap_vocab_size = shards["train"].layout.gap_vocab_size
    model = model_config(cfg, gap_vocab_size, fields_per_subtoken)
    item_logs: List[str] = []
    if model.item_branch != "none":
        item_logs = list(cfg.item_logs) or list(history_store.metadata.get("exported_logs", []))
        if not item_logs:
            raise DownstreamDataError(f"{history_store.path}: records no exported logs; give "
                                      "--item_logs, the logs exported into it")
    return TrainInputs(spec, model, iat, sif, history_store, shards, codebooks, item_logs)


def _metrics_line(metrics: Dict[str, Dict[str, float]]) -> str:
    return "  ".join(f"{label}: auc {m['auc']:.4f} gauc {m['gauc']:.4f} "
                     f"logloss {m['logloss']:.4f}" for label, m in metrics.items())


def run_train(cfg: TrainDownstreamConfig) -> Optional[Dict[str, Any]]:
    """Check the inputs, train, validate (and test) each epoch; returns the results on rank 0:
    ``valid`` / ``test`` (label -> auc, gauc, logloss, count) of the best valid epoch,
    ``best_epoch``, ``epochs`` (every epoch's metrics), ``steps`` and timings."""
    inputs = check_train_inputs(cfg)
    spec, mcfg, src = inputs.spec, inputs.model, inputs.model.history_source
    env: DistEnv = init_process_group(cfg.device)
    started = time.perf_counter()

    token_lookup = (InstanceTokenLookup(inputs.iat_store, env.device)
                    if src.uses_tokens else None)
    code_lookup = None
    if src.uses_codes:
        code_lookup = SampleCodeLookup.from_store(inputs.sif_store, env.device,
                                                  rows_like=inputs.iat_store)
    code_store = inputs.sif_store if inputs.codebooks is not None else None
    k = mcfg.item_history_len if mcfg.item_branch != "none" else 0

    def reader(split: str, path: str, order: ReadOrder) -> DownstreamReader:
        shards = inputs.shards[split]
        return DownstreamReader(
            path, spec, ReaderConfig(batch_size=cfg.batch_size, order=order, seed=cfg.seed),
            env.rank, env.world_size, history=shards,
            store=inputs.history_store if shards is not None else None, device=env.device,
            item_feature=mcfg.item_feature if k else "", item_history_len=k,
            item_logs=inputs.item_logs, code_store=code_store)

    train_reader = reader("train", cfg.train_log, ReadOrder.SHUFFLED)
    valid_reader = reader("valid", cfg.valid_log, ReadOrder.TEMPORAL)
    test_reader = reader("test", cfg.test_log, ReadOrder.TEMPORAL) if cfg.test_log else None

    model, optimizer = build_sharded(
        lambda tables: DLRM_SIFTrain(DLRM_SIF(
            spec, mcfg, token_lookup=token_lookup, code_lookup=code_lookup,
            codebooks=inputs.codebooks,
            token_dim=inputs.iat_store.token_shape[0] if src.uses_tokens else None,
            device=env.device if tables is not None else None, table_device=tables)),
        cfg.seed, env, cfg, cfg.batch_size)
    stage_log(env, STAGE, f"history source {src.value}, interaction {mcfg.interaction}, "
                          f"{train_reader.num_rows:,} train rows, {env.world_size} process(es)")

    def make_reader(epoch: int) -> DownstreamReader:
        train_reader.set_epoch(epoch)
        return train_reader

    epochs: List[Dict[str, Any]] = []

    def after_epoch(epoch: int) -> None:
        valid = evaluate(model, valid_reader, env, list(spec.labels))
        test = (evaluate(model, test_reader, env, list(spec.labels))
                if test_reader is not None else None)
        if valid is not None:
            epochs.append({"epoch": epoch, "valid": valid, "test": test})
            stage_log(env, STAGE, f"epoch {epoch} valid {_metrics_line(valid)}")

    fingerprint = resume_fingerprint(cfg, spec, cfg.train_log, env, NOT_IN_FINGERPRINT)
    trainer = Trainer(model, optimizer, env, make_reader, cfg, fingerprint,
                      rank_state=(lambda: {"epochs": list(epochs)},
                                  lambda s: epochs.extend(s["epochs"])))
    train_start = time.perf_counter()
    steps = trainer.fit(after_epoch=after_epoch)
    train_seconds = time.perf_counter() - train_start

    best: Optional[Dict[str, Any]] = None
    if env.is_main and epochs:
        first = spec.labels[0]
        best = max(epochs, key=lambda e: e["valid"][first]["auc"])
        if best["test"] is not None:
            stage_log(env, STAGE, f"best epoch {best['epoch']} test {_metrics_line(best['test'])}")
    results = write_results(
        cfg.results, cfg, env, steps=steps, best_epoch=best["epoch"] if best else None,
        valid=best["valid"] if best else None, test=best["test"] if best else None,
        epochs=epochs, train_rows=train_reader.num_rows, train_seconds=train_seconds,
        total_seconds=time.perf_counter() - started,
        stores={"iat": str(Path(cfg.iat_store).resolve()) if cfg.iat_store else None,
                "sif": str(Path(cfg.sif_store).resolve()) if cfg.sif_store else None})
    return results if env.is_main else None
