"""The feature spec: which columns of an instance log are which.

A :class:`FeatureSpec` is saved as JSON beside the data (see :func:`spec_path`). It names every
sparse and dense field with its feature group (used by the SIF tokenizer), the label columns and
the label delay (how long after ``ts`` a label becomes known).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Sequence, Union

SPEC_FORMAT_VERSION = 1
SPEC_FILE_NAME = "feature_spec.json"

INSTANCE_ID = "instance_id"
USER_ID = "user_id"
TS = "ts"
KEY_COLUMNS = (INSTANCE_ID, USER_ID, TS)

# Names that break torch.nn.ModuleDict / EmbeddingBagCollection when used as table names.
_RESERVED_NAMES = frozenset(
    {"items", "keys", "values", "update", "pop", "clear", "to", "forward", "type", "cuda", "cpu"}
)


class SpecError(ValueError):
    """A feature spec that is malformed or does not describe its data."""


class Missing(str, enum.Enum):
    """What the importer does with a missing value (empty cell, null, NaN) of a field."""

    ERROR = "error"  # stop with an error naming file, row and column
    UNKNOWN = "unknown"  # sparse: the out-of-vocabulary id (hashed: the hash of the empty key)
    MEAN = "mean"  # dense: the field's mean over the training window
    CONSTANT = "constant"  # dense: ``fill_value``


class FeatureGroup(str, enum.Enum):
    """Semantic group of a field; HGAQ gives each group its own sub-tokens."""

    USER = "user"
    ITEM = "item"
    CONTEXT = "context"
    CROSS = "cross"


@dataclasses.dataclass(frozen=True)
class SparseField:
    """An id-valued field (int64, or list<int64> when ``multi_valued``).

    ``num_embeddings`` is the vocabulary size (ids must lie in ``[0, num_embeddings)``) or, when
    ``hashed``, the number of hash buckets raw ids are mapped into at read time. With
    ``vocabulary`` the importer maps raw ids (strings or any integers) through a vocabulary
    built on the training window (:mod:`iat_torchrec.data.vocab`): ``num_embeddings`` is then
    its largest size, the out-of-vocabulary row 0 included, and ids seen fewer than
    ``min_count`` times fold into that row. ``missing`` is the importer's policy for missing ids.
    """

    name: str
    num_embeddings: int
    embedding_dim: int = 16
    group: FeatureGroup = FeatureGroup.ITEM
    multi_valued: bool = False
    hashed: bool = False
    vocabulary: bool = False
    min_count: int = 1
    missing: Missing = Missing.ERROR


@dataclasses.dataclass(frozen=True)
class DenseField:
    """A float32 field; ``missing`` (with ``fill_value`` for ``constant``) is the importer's
    policy for missing values, and ``missing_indicator`` adds a 0/1 field ``<name>_missing``."""

    name: str
    group: FeatureGroup = FeatureGroup.CONTEXT
    missing: Missing = Missing.ERROR
    fill_value: float = 0.0
    missing_indicator: bool = False

    @property
    def indicator_name(self) -> str:
        return f"{self.name}_missing"


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """Every column of an instance log beyond ``instance_id``, ``user_id`` and ``ts``."""

    sparse: Sequence[SparseField]
    dense: Sequence[DenseField]
    labels: Sequence[str]
    label_delay_s: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparse", tuple(self.sparse))
        object.__setattr__(self, "dense", tuple(self.dense))
        object.__setattr__(self, "labels", tuple(self.labels))
        self.check()

    # ----------------------------------------------------------------- derived views
    @property
    def sparse_names(self) -> List[str]:
        return [f.name for f in self.sparse]

    @property
    def dense_names(self) -> List[str]:
        return [f.name for f in self.dense]

    @property
    def columns(self) -> List[str]:
        """All columns an instance log with this spec holds, in canonical order."""
        return [*KEY_COLUMNS, *self.labels, *self.sparse_names, *self.dense_names]

    def field(self, name: str) -> Union[SparseField, DenseField]:
        for f in (*self.sparse, *self.dense):
            if f.name == name:
                return f
        raise KeyError(f"no field {name!r} in the feature spec")

    def fields_by_group(self) -> Dict[FeatureGroup, List[str]]:
        """Field names per feature group (groups without fields are left out)."""
        out: Dict[FeatureGroup, List[str]] = {}
        for f in (*self.sparse, *self.dense):
            out.setdefault(f.group, []).append(f.name)
        return out

    # ----------------------------------------------------------------- checks
    def check(self) -> None:
        """Raise :class:`SpecError` if the spec is malformed."""
        if not self.labels:
            raise SpecError("feature spec: at least one label column is required")
        if not self.sparse and not self.dense:
            raise SpecError("feature spec: at least one sparse or dense field is required")
        if self.label_delay_s < 0:
            raise SpecError(f"feature spec: label_delay_s must be >= 0, got {self.label_delay_s}")
        seen = set(KEY_COLUMNS)
        for name in (*self.labels, *self.sparse_names, *self.dense_names):
            if not name or not isinstance(name, str):
                raise SpecError(f"feature spec: column names must be non-empty strings, got {name!r}")
            if name in seen:
                raise SpecError(f"feature spec: column {name!r} is named twice (or is a key column)")
            seen.add(name)
        for f in self.sparse:
            if f.name in _RESERVED_NAMES or f.name.startswith("_"):
                raise SpecError(
                    f"feature spec: sparse field name {f.name!r} clashes with a torch ModuleDict "
                    "attribute and would break the embedding tables; rename it"
                )
            if f.num_embeddings <= 0:
                raise SpecError(
                    f"feature spec: field {f.name!r}: num_embeddings must be > 0, got {f.num_embeddings}"
                )
            if f.embedding_dim <= 0 or f.embedding_dim % 4:
                raise SpecError(
                    f"feature spec: field {f.name!r}: embedding_dim must be a positive multiple of 4 "
                    f"(FBGEMM requirement), got {f.embedding_dim}"
                )
            if f.vocabulary and f.hashed:
                raise SpecError(f"feature spec: field {f.name!r} is either hashed or has a "
                                "vocabulary, not both")
            if f.min_count < 1:
                raise SpecError(f"feature spec: field {f.name!r}: min_count must be >= 1, got "
                                f"{f.min_count}")
            if f.missing not in (Missing.ERROR, Missing.UNKNOWN):
                raise SpecError(f"feature spec: sparse field {f.name!r}: missing must be "
                                f"'error' or 'unknown', got {f.missing.value!r}")
            if f.missing is Missing.UNKNOWN and not (f.vocabulary or f.hashed):
                raise SpecError(f"feature spec: field {f.name!r}: missing 'unknown' needs an "
                                "unknown id: give the field a vocabulary or hash it")
        for f in self.dense:
            if f.missing is Missing.UNKNOWN:
                raise SpecError(f"feature spec: dense field {f.name!r}: missing must be "
                                "'error', 'mean' or 'constant', got 'unknown'")

    # ----------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> Dict[str, Any]:
        return {
            "format_version": SPEC_FORMAT_VERSION,
            "labels": list(self.labels),
            "label_delay_s": self.label_delay_s,
            "sparse": [_field_dict(f) for f in self.sparse],
            "dense": [_field_dict(f) for f in self.dense],
        }

    @classmethod
    def from_dict(cls, d: Dict[str, Any], source: str = "feature spec") -> "FeatureSpec":
        try:
            version = d.get("format_version", SPEC_FORMAT_VERSION)
            if version != SPEC_FORMAT_VERSION:
                raise SpecError(f"{source}: format_version {version} is not supported "
                                f"(expected {SPEC_FORMAT_VERSION})")
            return cls(
                sparse=[SparseField(**{**f, "group": FeatureGroup(f.get("group", "item")),
                                       "missing": Missing(f.get("missing", "error"))})
                        for f in d.get("sparse", [])],
                dense=[DenseField(**{**f, "group": FeatureGroup(f.get("group", "context")),
                                     "missing": Missing(f.get("missing", "error"))})
                       for f in d.get("dense", [])],
                labels=list(d["labels"]),
                label_delay_s=int(d.get("label_delay_s", 0)),
            )
        except SpecError as e:
            raise SpecError(f"{source}: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise SpecError(f"{source}: malformed feature spec: {e}") from None

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the spec as JSON, atomically."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "FeatureSpec":
        """Read a spec file; a log path (file or directory) reads the spec saved beside it."""
        path = Path(path)
        if path.is_dir() or path.suffix == ".parquet":
            path = spec_path(path)
        if not path.is_file():
            raise SpecError(f"{path}: feature spec not found")
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SpecError(f"{path}: unreadable feature spec: {e}") from None
        return cls.from_dict(d, source=str(path))


def _field_dict(f: Union[SparseField, DenseField]) -> Dict[str, Any]:
    """A field as JSON; the importer's settings only where they differ from their defaults, so
    that the spec of a log without them reads as before."""
    out: Dict[str, Any] = {}
    for fd in dataclasses.fields(f):
        value = getattr(f, fd.name)
        if fd.name in _IMPORT_SETTINGS and value == fd.default:
            continue
        out[fd.name] = value.value if isinstance(value, enum.Enum) else value
    return out


_IMPORT_SETTINGS = frozenset({"vocabulary", "min_count", "missing", "fill_value",
                              "missing_indicator"})


def spec_path(log_path: Union[str, os.PathLike]) -> Path:
    """Where the spec of an instance log lives: ``<dir>/feature_spec.json`` for a directory log,
    ``<name>.spec.json`` beside a single-file log."""
    p = Path(log_path)
    if p.suffix == ".parquet":
        return p.with_suffix(".spec.json")
    return p / SPEC_FILE_NAME
