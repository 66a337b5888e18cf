"""Stage ``prepare``: make or import the instance log, validate it, split it in time.

``--dataset synthetic`` (the built-in default) generates the documented synthetic log;
``--dataset movielens`` imports ml-latest-small (or ``--movielens_source``), all ratings or one
genre domain (``--movielens_domain``); any other value is the path of an instance log a user
brings (a directory with ``feature_spec.json``, or a Parquet file with ``<name>.spec.json``).
Outputs go under ``data_dir`` and are reused on a re-run when their recorded provenance says
they are what this run would make.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Dict, List

from iat_torchrec.config import nested
from iat_torchrec.data.log import LogSummary, read_provenance, validate_log
from iat_torchrec.data.movielens import DEFAULT_SOURCE, check_domain, import_movielens, \
    resolve_source
from iat_torchrec.data.splits import SPLIT_MANIFEST, SPLIT_NAMES, SplitMethod, split_log
from iat_torchrec.data.synthetic import SyntheticConfig, generate, provenance


@dataclasses.dataclass
class DataConfig:
    """Which data to run on, and how it is split in time."""

    dataset: str = dataclasses.field(default="synthetic", metadata={
        "help": "synthetic (built-in default), movielens, or the path of your own instance log"})
    data_dir: str = dataclasses.field(default="outputs/data", metadata={
        "help": "where prepared logs and their splits are written"})
    movielens_source: str = dataclasses.field(default=DEFAULT_SOURCE, metadata={
        "help": "MovieLens directory for --dataset movielens"})
    movielens_fields: List[str] = dataclasses.field(default_factory=list, metadata={
        "help": "--dataset movielens: the sparse fields to keep (empty: all; 'peer': the peer "
                "library's P1 fields, without this project's count / gap buckets and tags)"})
    movielens_domain: str = dataclasses.field(default="", metadata={
        "help": "--dataset movielens: '' (all ratings), 'action' (movies with any genre of "
                "Action, Adventure, Sci-Fi, Thriller, Crime, War, Western, Horror, Mystery, "
                "Film-Noir) or 'other' (the rest); the dataset is then named movielens-<domain>"})
    synthetic: SyntheticConfig = nested(SyntheticConfig, "the generator (--dataset synthetic)")
    split_method: str = dataclasses.field(default="auto", metadata={
        "help": "auto (per_user for movielens, time otherwise), per_user or time"})
    train_fraction: float = dataclasses.field(default=0.8, metadata={
        "help": "per user: fraction of each user's rows; time: quantile of ts"})
    valid_fraction: float = dataclasses.field(default=0.1, metadata={
        "help": "likewise for valid; the rest is test"})


@dataclasses.dataclass
class PreparedData:
    """An instance log and its train/valid/test logs, validated."""

    name: str
    log: Path
    summary: LogSummary
    splits: Dict[str, Path]
    split_summaries: Dict[str, LogSummary]
    split_method: SplitMethod

    def format(self) -> str:
        lines = [self.summary.format(), "",
                 f"time-respecting split ({self.split_method.value})",
                 f"| {'split':<5} | {'instances':>10} | {'users':>7} | {'first ts':>10} | "
                 f"{'last ts':>10} | {'label rate':>10} |",
                 f"|{'-' * 7}|{'-' * 12}|{'-' * 9}|{'-' * 12}|{'-' * 12}|{'-' * 12}|"]
        for name in SPLIT_NAMES:
            s = self.split_summaries[name]
            rate = next(iter(s.label_rates.values()))
            lines.append(f"| {name:<5} | {s.rows:>10,} | {s.users:>7,} | {s.ts_min:>10} | "
                         f"{s.ts_max:>10} | {rate:>10.4f} |")
        return "\n".join(lines)


def _log(msg: str) -> None:
    print(f"[data] {msg}", flush=True)


def _digest(obj: object) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _synthetic_provenance(cfg: DataConfig) -> dict:
    return json.loads(json.dumps(provenance(cfg.synthetic)))


@dataclasses.dataclass(frozen=True)
class DataPaths:
    """Where :func:`prepare_data` puts (or finds) a dataset's log and splits."""

    name: str
    log: Path
    splits: Dict[str, Path]


def _movielens_key(cfg: DataConfig, source: Path) -> object:
    """What identifies an import: the source, then the fields and the domain where set (so the
    folder of a default import is what it was before those options)."""
    if cfg.movielens_domain:
        return [str(source), cfg.movielens_fields, cfg.movielens_domain]
    return [str(source), cfg.movielens_fields] if cfg.movielens_fields else str(source)


def data_paths(cfg: DataConfig) -> DataPaths:
    """The paths :func:`prepare_data` writes for ``cfg``, without doing any work. A dataset's
    name (its folder's and its pipeline steps' prefix) says its domain: ``movielens-action``,
    ``synthetic-domain1``."""
    data_dir = Path(cfg.data_dir)
    if cfg.dataset == "synthetic":
        name = f"synthetic-domain{cfg.synthetic.domain}" if cfg.synthetic.domain else "synthetic"
        log = data_dir / f"{name}-{_digest(_synthetic_provenance(cfg))}" / "log"
        folder = log.parent
    elif cfg.dataset == "movielens":
        check_domain(cfg.movielens_domain, "movielens_domain")
        name = f"movielens-{cfg.movielens_domain}" if cfg.movielens_domain else "movielens"
        source = resolve_source(cfg.movielens_source).resolve()
        log = data_dir / f"{name}-{source.name}-{_digest(_movielens_key(cfg, source))}" / "log"
        folder = log.parent
    else:
        log = Path(cfg.dataset).resolve()
        name = log.stem
        folder = data_dir / f"{name}-{_digest(str(log))}"
    params = {"method": _split_method(cfg).value, "train_fraction": cfg.train_fraction,
              "valid_fraction": cfg.valid_fraction}
    out = folder / f"splits-{_digest(params)}"
    return DataPaths(name=name, log=log, splits={k: out / k for k in SPLIT_NAMES})


def _synthetic_log(cfg: DataConfig, out: Path) -> Path:
    config = cfg.synthetic
    expected = _synthetic_provenance(cfg)
    if out.exists() and read_provenance(out) == expected:
        _log(f"reusing {out}")
        return out
    _log(f"generating {config.num_instances:,} synthetic instances into {out}")
    return generate(config, out, overwrite=out.exists())


def _movielens_log(cfg: DataConfig, out: Path) -> Path:
    source = resolve_source(cfg.movielens_source).resolve()
    prov = read_provenance(out) if out.exists() else None
    if (prov is not None and prov.get("path") == str(source)
            and prov.get("fields", []) == list(cfg.movielens_fields)
            and prov.get("domain", "") == cfg.movielens_domain):
        _log(f"reusing {out}")
        return out
    _log(f"importing {source} into {out}")
    import_movielens(source, out, overwrite=out.exists(), fields=cfg.movielens_fields,
                     domain=cfg.movielens_domain)
    return out


def _split_method(cfg: DataConfig) -> SplitMethod:
    if cfg.split_method == "auto":
        return SplitMethod.PER_USER if cfg.dataset == "movielens" else SplitMethod.TIME
    return SplitMethod(cfg.split_method)


def prepare_data(cfg: DataConfig) -> PreparedData:
    """Make or import the log of ``cfg.dataset``, validate it and split it in time.

    Each dataset gets a folder under ``cfg.data_dir``: the made or imported log in ``log/``
    (a user's own log stays where it is) and each split in ``splits-<parameters digest>/``.
    """
    paths = data_paths(cfg)
    name, log = paths.name, paths.log
    if cfg.dataset == "synthetic":
        _synthetic_log(cfg, log)
    elif cfg.dataset == "movielens":
        _movielens_log(cfg, log)
    _log(f"validating {log}")
    summary = validate_log(log)
    method = _split_method(cfg)
    out = paths.splits["train"].parent
    manifest = out / SPLIT_MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text()).get("source") == str(log):
        _log(f"reusing {out}")
        split_summaries = {k: validate_log(out / k) for k in SPLIT_NAMES}
    else:
        _log(f"splitting ({method.value}) into {out}")
        split_summaries = split_log(log, out, method=method, train_fraction=cfg.train_fraction,
                                    valid_fraction=cfg.valid_fraction, overwrite=out.exists())
    return PreparedData(name=name, log=log, summary=summary, splits=dict(paths.splits),
                        split_summaries=split_summaries, split_method=method)
