"""The serving bundle: a trained downstream model (any variant) and its stores as one versioned,
self-describing directory, loaded without unpickling arbitrary objects.

Layout (``format_version`` 1)::

    manifest.json        what the bundle is: the variant's config, the feature spec, the history
                         layout, the table dtype, every file's size and SHA-256
    model.pt             the downstream model in inference form: its state dict after
                         torchrec.inference's quantize_inference_model (tables in quantised
                         EmbeddingBagCollections: fp32, fp16 or int8 rows), weights only
    source.pt            the frozen IAT source model (fp32 state dict), if given: ingest
                         compresses new instances into tokens with it
    tokenizer.pt         the frozen HGAQ tokenizer (fp32 state dict), if given: ingest codes
    history_items.npy    item id per history-store row (variants with an item-id branch)
    stores/iat, stores/sif   the token / code stores (hard links of the stores' immutable files;
                         each store checks its own files against its own manifest)
    ingest/              the write-ahead log of ingested instances (:mod:`.ingest`)

The model is rebuilt from the config (:class:`~iat_torchrec.models.dlrm_sif.DLRM_SIF` on the
CPU), quantised the same way and given the saved state dict (``torch.load(weights_only=True)``:
tensors only). :meth:`Bundle.load` checks every listed file's size and SHA-256 first and
refuses the bundle naming the first file that does not match.

Example::

    export_bundle(ExportConfig(train_results="results_iat.json", output="bundle",
                               source_checkpoint="checkpoints/iat_user"))
    bundle = Bundle.load("bundle")
    model = bundle.inference_model(token_lookup=..., code_lookup=...)
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner
from torchrec.inference.modules import quantize_inference_model

from iat_torchrec.atomic import atomic_output
from iat_torchrec.config import from_dict, to_dict
from iat_torchrec.data.spec import FeatureSpec, SparseField
from iat_torchrec.distributed.checkpoint import latest_checkpoint
from iat_torchrec.history import HistoryLayout
from iat_torchrec.models.dlrm_sif import DLRM_SIF, DLRMSIFConfig
from iat_torchrec.models.hgaq import HGAQConfig, SampleTokenizer, tokenizer_embedding_bag_collection
from iat_torchrec.models.source import Scheme, SourceModelConfig, SourceModelTrain
from iat_torchrec.stages.tokenize import store_codebooks
from iat_torchrec.stages.train import TrainDownstreamConfig, check_train_inputs
from iat_torchrec.tokens.downstream import store_row_items
from iat_torchrec.tokens.store import LOCK, TokenStore

PathLike = Union[str, os.PathLike]

FORMAT = "iat_torchrec.serving_bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL_FILE, SOURCE_FILE, TOKENIZER_FILE = "model.pt", "source.pt", "tokenizer.pt"
ITEMS_FILE = "history_items.npy"
STORES = "stores"
INGEST = "ingest"
TABLE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.int8}
# Where each model's own state dict sits in its training checkpoint (DCP keys = prefix + key):
# the checkpoint holds {"model": DMP state dict} and DMP wraps DLRM_SIFTrain (.model =
# DLRM_SIF), SourceModelTrain, SampleTokenizerTrain (.model = SampleTokenizer).
CHECKPOINT_PREFIX = {"downstream": "model.model.", "source": "model.", "tokenizer": "model.model."}


class BundleError(ValueError):
    """A bundle that is missing, malformed, or whose files do not match its manifest."""


@dataclasses.dataclass
class ExportConfig:
    """Export a trained downstream model and its stores as a serving bundle."""

    train_results: str = dataclasses.field(default="", metadata={
        "help": "results JSON of the downstream run (apps/train.py --results): its config "
                "names the stores, history shards and logs (required)"})
    checkpoint: str = dataclasses.field(default="", metadata={
        "help": "checkpoint directory of that run (default: its --train.checkpoint_dir); the "
                "latest checkpoint there is exported"})
    source_checkpoint: str = dataclasses.field(default="", metadata={
        "help": "checkpoint directory of the compress stage that made the IAT store: ingest "
                "compresses new instances with this frozen source model (empty: no IAT ingest)"})
    tokenizer_checkpoint: str = dataclasses.field(default="", metadata={
        "help": "checkpoint directory of the tokenize stage that made the SIF store: ingest "
                "codes new instances with this frozen tokenizer (empty: no SIF ingest)"})
    table_dtype: str = dataclasses.field(default="fp32", metadata={
        "help": "embedding rows of the inference model (torchrec.inference quantised EBCs): "
                "fp32 (scores equal the offline model's) | fp16 | int8"})
    output: str = dataclasses.field(default="", metadata={
        "help": "bundle directory to write (required)"})
    overwrite: bool = dataclasses.field(default=False, metadata={
        "help": "replace an existing bundle"})


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _checkpoint_path(directory: PathLike, what: str) -> Path:
    d = Path(directory)
    if (d / "meta.json").is_file():
        return d
    path = latest_checkpoint(d)
    if path is None:
        raise BundleError(f"{d}: no checkpoint of the {what} here (no 'latest' pointer to a "
                          "complete checkpoint): train it with --train.checkpoint_dir")
    return path


def load_checkpoint_weights(module: nn.Module, directory: PathLike, what: str) -> Path:
    """Load ``module``'s state (unsharded tensors) from the latest training checkpoint in
    ``directory`` (DCP reshards table shards into full tensors); returns the checkpoint used."""
    path = _checkpoint_path(directory, what)
    prefix = CHECKPOINT_PREFIX[what]
    own = module.state_dict()
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    missing = [k for k in own if f"{prefix}{k}" not in saved]
    if missing:
        raise BundleError(f"{path}: the {what} checkpoint lacks {missing[:3]}: a checkpoint of "
                          "another model or configuration")
    inner = prefix[len("model."):]  # DCP flattens {"model": {inner + key: tensor}}
    state = {"model": {f"{inner}{k}": v.detach().clone() for k, v in own.items()}}
    dcp.load(state, checkpoint_id=str(path), planner=DefaultLoadPlanner(allow_partial_load=True))
    module.load_state_dict({k: state["model"][f"{inner}{k}"] for k in own})
    return path


class _NoLookup(nn.Module):
    """Stands in for a store lookup while a model is only built to be saved: it has the
    token width (what the model's constructor reads) and refuses to be called."""

    def __init__(self, dim: int = 0) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, row_ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this model was built for export; give it a real store lookup")


def build_downstream(spec: FeatureSpec, model: Dict[str, Any], info: Dict[str, Any],
                     token_lookup: Optional[nn.Module] = None,
                     code_lookup: Optional[nn.Module] = None) -> DLRM_SIF:
    """The float downstream model of a bundle's manifest entries (``model`` config and
    ``info``: token_dim, gap_vocab_size, fields_per_subtoken, codebooks_shape) on the CPU."""
    mcfg = from_dict(DLRMSIFConfig, model)
    v = mcfg.variant
    shape = info.get("codebooks_shape")
    return DLRM_SIF(
        spec, mcfg,
        token_lookup=(token_lookup or _NoLookup(info["token_dim"])) if v.uses_tokens else None,
        code_lookup=(code_lookup or _NoLookup()) if v.uses_codes else None,
        codebooks=torch.zeros(shape) if shape else None,
        token_dim=info.get("token_dim") if v.uses_tokens else None,
        gap_vocab_size=info["gap_vocab_size"], fields_per_subtoken=info["fields_per_subtoken"],
        device=torch.device("cpu")).eval()


def quantize(model: DLRM_SIF, table_dtype: str) -> nn.Module:
    """The model in inference form: torchrec.inference swaps its EmbeddingBagCollection for a
    quantised one (FBGEMM inference tables of ``table_dtype`` rows, fp32 outputs)."""
    if table_dtype not in TABLE_DTYPES:
        raise BundleError(f"table_dtype must be one of {sorted(TABLE_DTYPES)}, got "
                          f"{table_dtype!r}")
    return quantize_inference_model(model, quantization_dtype=TABLE_DTYPES[table_dtype],
                                    output_dtype=torch.float).eval()


def build_source(spec: FeatureSpec, store_metadata: Dict[str, Any]) -> SourceModelTrain:
    """The source model a compress stage trained (its config and scheme from the IAT store's
    manifest), on the CPU."""
    return SourceModelTrain(spec, from_dict(SourceModelConfig, store_metadata["model_config"]),
                            Scheme(store_metadata["scheme"]), device=torch.device("cpu")).eval()


def build_tokenizer(spec: FeatureSpec, store_metadata: Dict[str, Any]) -> SampleTokenizer:
    """The tokenizer a tokenize stage trained (its config from the SIF store's manifest)."""
    cfg = from_dict(HGAQConfig, store_metadata["tokenizer_config"])
    ebc = tokenizer_embedding_bag_collection(spec, cfg.field_dim, device=torch.device("cpu"))
    return SampleTokenizer(spec, cfg, ebc, device=torch.device("cpu")).eval()


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _copy_store(store: TokenStore, dst: Path) -> None:
    """The store's files of its current version (immutable: hard links are safe)."""
    m = store.manifest
    dst.mkdir(parents=True)
    for rel in m["checksums"]:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy(str(store.path / rel), str(dst / rel))
    shutil.copy2(store.path / "manifest.json", dst / "manifest.json")


def export_bundle(cfg: ExportConfig) -> Path:
    """Write the bundle of ``cfg`` atomically; returns its path. Every input is checked first
    (the train stage's own checks: stores, shards, spec)."""
    if not cfg.train_results or not cfg.output:
        raise BundleError("--train_results and --output are required")
    if cfg.table_dtype not in TABLE_DTYPES:
        raise BundleError(f"--table_dtype must be one of {sorted(TABLE_DTYPES)}, got "
                          f"{cfg.table_dtype!r}")
    results_path = Path(cfg.train_results)
    try:
        saved = json.loads(results_path.read_text())
        train_cfg = from_dict(TrainDownstreamConfig, saved["config"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{results_path}: not a results file of apps/train.py ({e})") from None
    inputs = check_train_inputs(train_cfg)
    if inputs.item_store is not None:
        raise BundleError(f"{results_path}: its item branch reads another store ("
                          f"{inputs.item_store.path}) than its IAT tokens; serving keeps one "
                          "history per request and does not bundle such runs yet")
    spec, mcfg = inputs.spec, train_cfg.model
    v = mcfg.variant
    checkpoint = cfg.checkpoint or train_cfg.train.checkpoint_dir
    if not checkpoint:
        raise BundleError(f"{results_path}: the run kept no checkpoint (no "
                          "--train.checkpoint_dir); give --checkpoint")
    layout = inputs.shards["train"].layout if inputs.shards["train"] is not None else None
    info = {"token_dim": inputs.iat_store.token_shape[0] if v.uses_tokens else None,
            "gap_vocab_size": inputs.gap_vocab_size,
            "fields_per_subtoken": inputs.fields_per_subtoken,
            "codebooks_shape": (list(inputs.codebooks.shape) if inputs.codebooks is not None
                                else None)}
    model = build_downstream(spec, to_dict(mcfg), info)
    used = load_checkpoint_weights(model, checkpoint, "downstream")
    if inputs.codebooks is not None and not torch.equal(model.tower.codebooks,
                                                        inputs.codebooks.float()):
        raise BundleError(f"{used}: the model's codebooks differ from {inputs.sif_store.path}'s")
    inference = quantize(model, cfg.table_dtype)

    stores: Dict[str, Any] = {}
    for name, store in (("iat", inputs.iat_store), ("sif", inputs.sif_store)):
        if store is not None:
            stores[name] = {"path": f"{STORES}/{name}", "exported_from": str(store.path),
                            "version": store.version, "rows": store.num_rows}
    history_store = None
    if v.reads_history:
        history_store = "iat" if inputs.iat_store is not None else "sif"
    ingest: Dict[str, Any] = {"source": None, "tokenizer": None}
    with atomic_output(cfg.output, overwrite=cfg.overwrite) as tmp:
        tmp.mkdir()
        files = [MODEL_FILE]
        torch.save(inference.state_dict(), tmp / MODEL_FILE)
        if cfg.source_checkpoint:
            if inputs.iat_store is None:
                raise BundleError("--source_checkpoint: this variant reads no IAT store")
            source = build_source(spec, inputs.iat_store.metadata)
            ingest["source"] = str(load_checkpoint_weights(source, cfg.source_checkpoint,
                                                           "source"))
            torch.save(source.state_dict(), tmp / SOURCE_FILE)
            files.append(SOURCE_FILE)
        if cfg.tokenizer_checkpoint:
            if inputs.sif_store is None:
                raise BundleError("--tokenizer_checkpoint: this variant reads no SIF store")
            tokenizer = build_tokenizer(spec, inputs.sif_store.metadata)
            ingest["tokenizer"] = str(load_checkpoint_weights(tokenizer, cfg.tokenizer_checkpoint,
                                                              "tokenizer"))
            if not torch.equal(tokenizer.quantizer.codebooks.float(),
                               store_codebooks(inputs.sif_store)):
                raise BundleError(f"{cfg.tokenizer_checkpoint}: its codebooks differ from those "
                                  f"in {inputs.sif_store.path}: not the tokenizer of that store")
            torch.save(tokenizer.state_dict(), tmp / TOKENIZER_FILE)
            files.append(TOKENIZER_FILE)
        if mcfg.item_branch != "none":
            field = spec.field(mcfg.item_feature)
            assert isinstance(field, SparseField)
            items = store_row_items(inputs.history_store, inputs.item_logs, field)
            np.save(tmp / ITEMS_FILE, items, allow_pickle=False)
            files.append(ITEMS_FILE)
        for name, store in (("iat", inputs.iat_store), ("sif", inputs.sif_store)):
            if store is not None:
                _copy_store(store, tmp / STORES / name)
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "bundle_id": uuid.uuid4().hex, "created_at": _now(),
            "variant": {"history_source": mcfg.history_source.value,
                        "interaction": mcfg.interaction},
            "model_config": to_dict(mcfg), "model_info": info, "spec": spec.to_dict(),
            "labels": list(spec.labels), "table_dtype": cfg.table_dtype,
            "layout": (dataclasses.asdict(layout) if layout is not None else None),
            "history_store": history_store, "stores": stores,
            "item_history_len": mcfg.item_history_len if mcfg.item_branch != "none" else 0,
            "item_feature": mcfg.item_feature if mcfg.item_branch != "none" else "",
            "exported_from": {"train_results": str(results_path.resolve()),
                              "checkpoint": str(used)},
            "ingest": ingest,
            "files": {f: {"bytes": (tmp / f).stat().st_size, "sha256": sha256_file(tmp / f)}
                      for f in files},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return Path(cfg.output)


class Bundle:
    """An opened, verified bundle (see the module docstring). :meth:`load` checks it."""

    def __init__(self, path: Path, manifest: Dict[str, Any]) -> None:
        self.path, self.manifest = path, manifest
        self.spec = FeatureSpec.from_dict(manifest["spec"])
        self.model_config = from_dict(DLRMSIFConfig, manifest["model_config"])
        lay = manifest["layout"]
        self.layout = (HistoryLayout(max_len=lay["max_len"], label_delay_s=lay["label_delay_s"],
                                     gap_boundaries_s=tuple(lay["gap_boundaries_s"]))
                       if lay else None)

    @classmethod
    def load(cls, path: PathLike) -> "Bundle":
        """Open ``path``, checking the format and every listed file's size and SHA-256; raises
        :class:`BundleError` naming the first file that is missing or differs."""
        path = Path(path)
        mf = path / MANIFEST
        if not mf.is_file():
            raise BundleError(f"{mf}: manifest missing: not a serving bundle, or one whose "
                              "export never completed")
        try:
            m = json.loads(mf.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BundleError(f"{mf}: unreadable or corrupted manifest ({e})") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise BundleError(f"{mf}: not a serving bundle manifest (format {FORMAT!r} expected)")
        if m.get("format_version") != FORMAT_VERSION:
            raise BundleError(f"{mf}: format_version {m.get('format_version')!r} is not "
                              f"supported (expected {FORMAT_VERSION})")
        for rel, entry in sorted(m["files"].items()):
            f = path / rel
            if not f.is_file():
                raise BundleError(f"{f}: listed in the bundle manifest but missing")
            size = f.stat().st_size
            if size != entry["bytes"]:
                raise BundleError(f"{f}: {size} bytes, the bundle manifest says {entry['bytes']}: "
                                  "truncated or replaced")
            if sha256_file(f) != entry["sha256"]:
                raise BundleError(f"{f}: SHA-256 differs from the bundle manifest's: the file "
                                  "is corrupted or was replaced")
        try:
            return cls(path, m)
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{mf}: malformed manifest ({e!r})") from None

    # ----------------------------------------------------------------- parts
    def store_path(self, name: str) -> Optional[Path]:
        entry = self.manifest["stores"].get(name)
        return self.path / entry["path"] if entry else None

    def open_store(self, name: str, verify: bool = True) -> Optional[TokenStore]:
        """The bundle's ``iat`` / ``sif`` store (checked against its own manifest), or None.
        A lock left by an appender killed mid-append is removed: the bundle has one writer, the
        server, and nothing of an unfinished append is visible (the manifest never named it)."""
        p = self.store_path(name)
        if p is None:
            return None
        (p / LOCK).unlink(missing_ok=True)
        return TokenStore.open(p, verify=verify)

    def _weights(self, name: str) -> Dict[str, torch.Tensor]:
        return torch.load(self.path / name, map_location="cpu", weights_only=True)

    def inference_model(self, token_lookup: Optional[nn.Module] = None,
                        code_lookup: Optional[nn.Module] = None) -> nn.Module:
        """The quantised downstream model with the saved weights, reading histories through
        the given lookups."""
        model = build_downstream(self.spec, self.manifest["model_config"],
                                 self.manifest["model_info"], token_lookup, code_lookup)
        model = quantize(model, self.manifest["table_dtype"])
        model.load_state_dict(self._weights(MODEL_FILE))
        return model

    def float_model(self, checkpoint: Optional[PathLike] = None,
                    token_lookup: Optional[nn.Module] = None,
                    code_lookup: Optional[nn.Module] = None) -> DLRM_SIF:
        """The un-quantised model from the training checkpoint the bundle was exported from
        (the offline model: what the serving scores are checked and benchmarked against)."""
        model = build_downstream(self.spec, self.manifest["model_config"],
                                 self.manifest["model_info"], token_lookup, code_lookup)
        load_checkpoint_weights(model, checkpoint or self.manifest["exported_from"]["checkpoint"],
                                "downstream")
        return model

    def source_model(self) -> Optional[SourceModelTrain]:
        if self.manifest["ingest"]["source"] is None:
            return None
        store = self.open_store("iat", verify=False)
        model = build_source(self.spec, store.metadata)
        model.load_state_dict(self._weights(SOURCE_FILE))
        return model

    def tokenizer(self) -> Optional[SampleTokenizer]:
        if self.manifest["ingest"]["tokenizer"] is None:
            return None
        store = self.open_store("sif", verify=False)
        model = build_tokenizer(self.spec, store.metadata)
        model.load_state_dict(self._weights(TOKENIZER_FILE))
        return model

    def base_items(self) -> Optional[np.ndarray]:
        """Item id per history-store row at export (item-id branch variants), else None."""
        if ITEMS_FILE not in self.manifest["files"]:
            return None
        return np.load(self.path / ITEMS_FILE, allow_pickle=False)

    @property
    def ingest_dir(self) -> Path:
        return self.path / INGEST

    def __repr__(self) -> str:
        v = self.manifest["variant"]
        return (f"Bundle({str(self.path)!r}, source={v['history_source']}, "
                f"interaction={v['interaction']}, tables={self.manifest['table_dtype']})")


__all__: List[str] = ["Bundle", "BundleError", "ExportConfig", "export_bundle",
                      "load_checkpoint_weights", "quantize", "build_downstream"]
