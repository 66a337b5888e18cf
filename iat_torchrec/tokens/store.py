"""The token store: instance_id -> token, plus the per-user time index, in one directory.

Layout (``format_version`` 1)::

    manifest.json                      what the store is, its version, every file's checksum
    segments/seg-00000/                one segment per writing session (create, append, merge part)
        instance_id.npy user_id.npy ts.npy label.npy tokens.npy
    index-v00001/                      built on every commit, named by the store version
        id_sorted.npy id_rows.npy      instance_id -> row
        users.npy offsets.npy rows.npy ts.npy label.npy ts_values.npy keys.npy   (UserTimeIndex)

Row ids are global: the rows of segment 0, then segment 1, and so on. Rows keep their arrival
order; the time index gives each user's rows in (ts, instance_id) order.

**Why NumPy memory maps, not Parquet.** Tokens are fixed-width rows read at random by row id
(history lookups) or copied wholesale into FBGEMM's weight buffer. A ``.npy`` file is that array
byte for byte: opened with ``mmap`` it costs no decoding and no memory until touched, a row is
one offset computation away, and ``torch`` wraps it without a copy. Parquet would add page
decoding on every random access and gains nothing from compressing quantised floats. The
column files are standard ``.npy`` (``np.load`` reads them) with a fixed-size header, so they are
written in one streaming pass (:mod:`iat_torchrec.tokens.npyfile`).

**Token encodings** (``dtype``): ``fp32`` and ``fp16`` rows ``[n, d]``; ``int8`` rows ``uint8
[n, 4 + d]`` exactly as FBGEMM's ``IntNBitTableBatchedEmbeddingBagsCodegen`` holds them (bytes
0-1 the fp16 scale, 2-3 the fp16 bias, then d codes; value = scale * code + bias), made by
FBGEMM's own rowwise quantiser; SIF codes ``uint8 [n, T, M]``.

**Integrity.** Every file has a CRC32 (of its data) and its size, dtype and shape in the
manifest; :meth:`TokenStore.open` checks them all. A store is created under a temporary name
and renamed when complete. An append writes a new segment and a new index beside the old ones
and then replaces ``manifest.json`` atomically: readers see the old store or the new one, never
a mixture, and existing rows are never rewritten.

**Concurrent export.** Each rank writes its own part with :meth:`TokenStore.create`; rank 0
then calls :meth:`TokenStore.merge`, which hard-links (or copies, across file systems) the parts'
segments into the final store and builds one index; instance ids must be disjoint across parts.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)
import numpy as np
import torch

from iat_torchrec.atomic import CommitOnExit, atomic_output
from iat_torchrec.tokens.npyfile import (ColumnFileError, ColumnWriter, check_entry, open_column,
                                         write_column)
from iat_torchrec.tokens.time_index import UserTimeIndex, stable_argsort

PathLike = Union[str, os.PathLike]

FORMAT = "iat_torchrec.token_store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SEGMENTS = "segments"
LOCK = ".append.lock"
KINDS: Dict[str, Tuple[str, ...]] = {"iat": ("fp32", "fp16", "int8"), "sif": ("uint8",)}
KEY_COLUMNS = ("instance_id", "user_id", "ts", "label")
COLUMNS = (*KEY_COLUMNS, "tokens")
ID_FILES = ("id_sorted", "id_rows")
INT8_SCALE_BIAS_BYTES = 4
_KEY_DTYPES = {"instance_id": np.int64, "user_id": np.int64, "ts": np.int64, "label": np.int8}


class TokenStoreError(ValueError):
    """A token store that is missing, malformed, corrupted, or asked for something it lacks."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- token encodings
def stored_row_shape(kind: str, token_shape: Sequence[int], dtype: str) -> Tuple[int, ...]:
    """Shape of one stored token row."""
    if kind == "iat" and dtype == "int8":
        return (INT8_SCALE_BIAS_BYTES + int(token_shape[0]),)
    return tuple(int(s) for s in token_shape)


def stored_numpy_dtype(dtype: str) -> np.dtype:
    return np.dtype({"fp32": np.float32, "fp16": np.float16, "int8": np.uint8,
                     "uint8": np.uint8}[dtype])


def encode_tokens(tokens: np.ndarray, dtype: str) -> np.ndarray:
    """float32 tokens [n, d] -> stored rows (``int8``: FBGEMM rowwise quantisation)."""
    if dtype == "fp32":
        return np.ascontiguousarray(tokens, dtype=np.float32)
    if dtype == "fp16":
        return np.ascontiguousarray(tokens, dtype=np.float16)
    if dtype == "int8":
        d = tokens.shape[1]
        if tokens.shape[0] == 0:
            return np.empty((0, INT8_SCALE_BIAS_BYTES + d), dtype=np.uint8)
        q = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(
            torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.float32)), 8).numpy()
        # FBGEMM's quantiser puts scale/bias after the codes; its inference TBE wants them first.
        return np.concatenate([q[:, d:], q[:, :d]], axis=1)
    raise TokenStoreError(f"cannot encode float tokens as {dtype!r}")


def decode_tokens(rows: np.ndarray, dtype: str) -> np.ndarray:
    """Stored rows -> float32 tokens [n, d] (``int8``: FBGEMM's dequantiser)."""
    if dtype in ("fp32", "fp16"):
        return np.asarray(rows, dtype=np.float32)
    if dtype == "int8":
        d = rows.shape[1] - INT8_SCALE_BIAS_BYTES
        if rows.shape[0] == 0:
            return np.empty((0, d), dtype=np.float32)
        rows = np.ascontiguousarray(rows)
        fused = np.concatenate([rows[:, INT8_SCALE_BIAS_BYTES:], rows[:, :INT8_SCALE_BIAS_BYTES]],
                               axis=1)
        return torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(
            torch.from_numpy(fused), 8).numpy()
    raise TokenStoreError(f"tokens of dtype {dtype!r} are codes, not float vectors")


# --------------------------------------------------------------------------- manifest checks
def _check_layout(kind: Any, token_shape: Any, dtype: Any, where: str) -> Tuple[int, ...]:
    if kind not in KINDS:
        raise TokenStoreError(f"{where}: kind must be one of {sorted(KINDS)}, got {kind!r}")
    if dtype not in KINDS[kind]:
        raise TokenStoreError(f"{where}: dtype for kind {kind!r} must be one of {KINDS[kind]}, "
                              f"got {dtype!r}")
    try:
        shape = tuple(int(s) for s in token_shape)
    except (TypeError, ValueError):
        raise TokenStoreError(f"{where}: token_shape must be a tuple of ints, got "
                              f"{token_shape!r}") from None
    want = 1 if kind == "iat" else 2
    if len(shape) != want or min(shape) <= 0:
        raise TokenStoreError(f"{where}: token_shape for kind {kind!r} must be "
                              f"{'(d,)' if want == 1 else '(T, M)'} of positive ints, got {shape}")
    if kind == "iat" and shape[0] % 4:
        raise TokenStoreError(f"{where}: token dim must be a multiple of 4 (FBGEMM), got "
                              f"{shape[0]}")
    return shape


def _read_manifest(path: Path) -> Dict[str, Any]:
    f = path / MANIFEST
    if not path.is_dir():
        raise TokenStoreError(f"{path}: token store not found")
    if not f.is_file():
        raise TokenStoreError(f"{f}: manifest missing: not a token store, or one whose writing "
                              "never completed")
    try:
        m = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenStoreError(f"{f}: unreadable or corrupted manifest ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise TokenStoreError(f"{f}: not a token store manifest (format {FORMAT!r} expected)")
    if m.get("format_version") != FORMAT_VERSION:
        raise TokenStoreError(f"{f}: format_version {m.get('format_version')!r} is not supported "
                              f"(expected {FORMAT_VERSION})")
    for key in ("version", "kind", "token_shape", "dtype", "count", "segments", "index",
                "checksums", "metadata"):
        if key not in m:
            raise TokenStoreError(f"{f}: malformed manifest: key {key!r} missing")
    return m


def _write_manifest(path: Path, manifest: Mapping[str, Any]) -> None:
    """Replace ``path`` atomically and durably: the new manifest is on disk (fsync) before the
    rename, and the rename is on disk (directory fsync) before this returns."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        f.write(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- the store
class _Segment:
    def __init__(self, name: str, start: int, columns: Dict[str, np.ndarray]) -> None:
        self.name, self.start, self.columns = name, start, columns
        self.rows = int(columns["instance_id"].shape[0])


class TokenStore:
    """An opened token store (memory-mapped, read-only). Make one with :meth:`create`,
    :meth:`merge`, or open one with :meth:`open`."""

    def __init__(self, path: Path, manifest: Dict[str, Any], segments: List[_Segment],
                 ids: Dict[str, np.ndarray], index: UserTimeIndex,
                 labels: Optional[Tuple[np.ndarray, np.ndarray]] = None) -> None:
        self.path = path
        self.manifest = manifest
        self._segments = segments
        self._starts = np.array([s.start for s in segments] + [int(manifest["count"])],
                                dtype=np.int64)
        self._id_sorted, self._id_rows = ids["id_sorted"], ids["id_rows"]
        self.time_index = index
        self._label_rows, self._label_values = labels if labels is not None else (None, None)

    # ----------------------------------------------------------------- creating and opening
    @classmethod
    def create(cls, path: PathLike, *, kind: str, token_shape: Sequence[int], dtype: str,
               metadata: Optional[Mapping[str, Any]] = None,
               overwrite: bool = False) -> "TokenStoreWriter":
        """Start a new store at ``path`` (written under a temporary name until ``close()``; a
        writer given no rows makes a valid empty store, e.g. the part of a rank with no rows).

        ``kind`` "iat" with ``token_shape`` (d,) and ``dtype`` fp32 | fp16 | int8, or "sif" with
        (T, M) and uint8. ``metadata`` (JSON-serialisable) is kept in the manifest; a
        ``label_delay_s`` in it is also exposed as :attr:`label_delay_s`.
        """
        shape = _check_layout(kind, token_shape, dtype, str(path))
        metadata = dict(metadata or {})
        try:
            json.dumps(metadata)
        except TypeError as e:
            raise TokenStoreError(f"{path}: metadata must be JSON-serialisable ({e})") from None
        return TokenStoreWriter(Path(path), kind=kind, token_shape=shape, dtype=dtype,
                                metadata=metadata, base=None, overwrite=overwrite)

    @classmethod
    def open(cls, path: PathLike, verify: bool = True) -> "TokenStore":
        """Open a store, checking the format version, every file's size, header and (with
        ``verify``, the default) CRC32 against the manifest."""
        path = Path(path)
        try:
            return cls._open(path, verify)
        except TokenStoreError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise TokenStoreError(f"{path / MANIFEST}: malformed manifest ({e!r})") from None

    @classmethod
    def _open(cls, path: Path, verify: bool) -> "TokenStore":
        m = _read_manifest(path)
        shape = _check_layout(m["kind"], m["token_shape"], m["dtype"], str(path / MANIFEST))
        row_shape = stored_row_shape(m["kind"], shape, m["dtype"])
        checksums = m["checksums"]

        def load(rel: str) -> np.ndarray:
            if rel not in checksums:
                raise TokenStoreError(f"{path / MANIFEST}: malformed manifest: no checksum "
                                      f"entry for {rel}")
            try:
                check_entry(checksums[rel], str(path / rel))
                return open_column(path / rel, checksums[rel], verify=verify)
            except ColumnFileError as e:
                raise TokenStoreError(str(e)) from None

        segments, start = [], 0
        for seg in m["segments"]:
            cols = {c: load(f"{SEGMENTS}/{seg['name']}/{c}.npy") for c in COLUMNS}
            for c in COLUMNS:
                if cols[c].shape[0] != seg["rows"]:
                    raise TokenStoreError(
                        f"{path / SEGMENTS / seg['name'] / (c + '.npy')}: {cols[c].shape[0]} "
                        f"rows, the manifest says {seg['rows']}: manifest and data do not match")
            if cols["tokens"].shape[1:] != row_shape:
                raise TokenStoreError(
                    f"{path / SEGMENTS / seg['name'] / 'tokens.npy'}: rows of shape "
                    f"{cols['tokens'].shape[1:]}, the manifest's kind/dtype/token_shape need "
                    f"{row_shape}: manifest and data do not match")
            segments.append(_Segment(seg["name"], start, cols))
            start += int(seg["rows"])
        if start != m["count"]:
            raise TokenStoreError(f"{path / MANIFEST}: count {m['count']} but the segments hold "
                                  f"{start} rows: manifest and data do not match")
        ids = {name: load(f"{m['index']}/{name}.npy") for name in ID_FILES}
        index = UserTimeIndex(**{name: load(f"{m['index']}/{name}.npy")
                                 for name in UserTimeIndex.FILES})
        for name, arr in (*ids.items(), ("rows", index.rows), ("keys", index.keys)):
            if arr.shape[0] != start:
                raise TokenStoreError(f"{path / m['index'] / (name + '.npy')}: {arr.shape[0]} "
                                      f"entries for {start} rows: manifest and data do not match")
        labels = None
        if m.get("label_overrides"):
            lo = m["label_overrides"]
            labels = (load(f"{lo}/rows.npy"), load(f"{lo}/values.npy"))
        return cls(path, m, segments, ids, index, labels)

    @classmethod
    def merge(cls, parts: Sequence[PathLike], path: PathLike, *, overwrite: bool = False,
              remove_parts: bool = False) -> "TokenStore":
        """Combine stores written independently (one per rank) into one new store at ``path``.

        The parts must agree on kind, token_shape, dtype and metadata, and hold disjoint
        instance ids. Segment files are hard-linked where possible (segments are immutable), else
        copied; the index is built once over all rows. With ``remove_parts`` the parts are
        deleted after the merged store is complete.
        """
        if not parts:
            raise TokenStoreError(f"{path}: merge needs at least one part")
        stores = [cls.open(p) for p in parts]
        first = stores[0]
        for s in stores[1:]:
            for key in ("kind", "token_shape", "dtype", "metadata"):
                if s.manifest[key] != first.manifest[key]:
                    raise TokenStoreError(
                        f"{s.path}: cannot merge with {first.path}: {key} differs "
                        f"({s.manifest[key]!r} vs {first.manifest[key]!r})")
        with atomic_output(path, overwrite=overwrite) as tmp:
            (tmp / SEGMENTS).mkdir(parents=True)
            checksums: Dict[str, Any] = {}
            seg_entries = []
            for s in stores:
                for seg in s._segments:
                    name = f"seg-{len(seg_entries):05d}"
                    (tmp / SEGMENTS / name).mkdir()
                    for c in COLUMNS:
                        _link_or_copy(s.path / SEGMENTS / seg.name / f"{c}.npy",
                                      tmp / SEGMENTS / name / f"{c}.npy")
                        checksums[f"{SEGMENTS}/{name}/{c}.npy"] = \
                            s.manifest["checksums"][f"{SEGMENTS}/{seg.name}/{c}.npy"]
                    seg_entries.append({"name": name, "rows": seg.rows,
                                        "source": f"{s.path}:{seg.name}"})
            keys = {c: np.concatenate([s.column(c) for s in stores]) for c in KEY_COLUMNS}
            where = _Where([(f"part {s.path} row", s.num_rows) for s in stores])
            manifest = {k: first.manifest[k] for k in ("kind", "token_shape", "dtype", "metadata")}
            manifest.update(version=1, segments=seg_entries, created_at=_now(),
                            merged_from=[str(s.path) for s in stores])
            _write_manifest(tmp / MANIFEST, _finish(tmp, manifest, keys, checksums, where))
        if remove_parts:
            for s in stores:
                shutil.rmtree(s.path)
        return cls.open(path, verify=False)

    def appender(self) -> "TokenStoreWriter":
        """A writer that adds rows as a new segment (existing rows untouched) and bumps the
        version on ``close()``. One appender at a time (a lock file guards the store)."""
        m = self.manifest
        return TokenStoreWriter(self.path, kind=m["kind"], token_shape=tuple(m["token_shape"]),
                                dtype=m["dtype"], metadata=m["metadata"], base=self,
                                overwrite=False)

    # ----------------------------------------------------------------- properties
    @property
    def num_rows(self) -> int:
        return int(self.manifest["count"])

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @property
    def token_shape(self) -> Tuple[int, ...]:
        return tuple(self.manifest["token_shape"])

    @property
    def version(self) -> int:
        return int(self.manifest["version"])

    @property
    def metadata(self) -> Dict[str, Any]:
        return self.manifest["metadata"]

    @property
    def label_delay_s(self) -> Optional[int]:
        return self.manifest.get("label_delay_s")

    @property
    def row_bytes(self) -> int:
        """Bytes of one stored token row (FBGEMM's unpadded row size)."""
        shape = stored_row_shape(self.kind, self.token_shape, self.dtype)
        return int(np.prod(shape)) * stored_numpy_dtype(self.dtype).itemsize

    @property
    def index_checksum(self) -> str:
        """CRC32 of the time index's ``keys`` and ``rows``: identifies the index positions that
        history shards refer to."""
        c = self.manifest["checksums"]
        return f"{c[self.manifest['index'] + '/keys.npy']['crc32']}" \
               f"{c[self.manifest['index'] + '/rows.npy']['crc32']}"

    # ----------------------------------------------------------------- reading
    def rows_of(self, instance_ids: np.ndarray) -> np.ndarray:
        """Row ids of ``instance_ids``; raises :class:`TokenStoreError` naming missing ids."""
        ids = np.asarray(instance_ids, dtype=np.int64)
        pos = np.searchsorted(self._id_sorted, ids)
        np.minimum(pos, max(self.num_rows - 1, 0), out=pos)
        found = (self._id_sorted[pos] == ids) if self.num_rows else np.zeros(ids.shape, bool)
        if not found.all():
            missing = np.unique(ids[~found])
            shown = ", ".join(str(int(i)) for i in missing[:5])
            more = f" and {missing.size - 5} more" if missing.size > 5 else ""
            raise TokenStoreError(f"{self.path}: {missing.size} instance id(s) not in the store: "
                                  f"{shown}{more}")
        return np.asarray(self._id_rows[pos], dtype=np.int64)

    def column(self, name: str, rows: Optional[np.ndarray] = None) -> np.ndarray:
        """A column (instance_id, user_id, ts, label or tokens as stored) of ``rows``, or of
        every row in row order."""
        if name not in COLUMNS:
            raise KeyError(f"no column {name!r}; columns are {COLUMNS}")
        if name == "label" and self._label_rows is not None:
            return self._updated_labels(rows)
        if rows is None:
            parts = [s.columns[name] for s in self._segments]
            return np.array(parts[0]) if len(parts) == 1 else np.concatenate(parts)
        rows = self._check_rows(rows)
        if len(self._segments) == 1:
            return np.asarray(self._segments[0].columns[name][rows])
        seg = np.searchsorted(self._starts, rows, side="right") - 1
        first = self._segments[0].columns[name]
        out = np.empty((rows.size, *first.shape[1:]), dtype=first.dtype)
        for s in np.unique(seg):
            m = seg == s
            out[m] = self._segments[s].columns[name][rows[m] - self._segments[s].start]
        return out

    def _updated_labels(self, rows: Optional[np.ndarray]) -> np.ndarray:
        """The label column with :meth:`update_labels`'s later labels over the first ones."""
        first = self._label_rows
        self._label_rows = None
        try:
            out = np.array(self.column("label", rows))
        finally:
            self._label_rows = first
        at = np.arange(self.num_rows) if rows is None else self._check_rows(rows)
        pos = np.minimum(np.searchsorted(first, at), max(first.size - 1, 0))
        hit = first[pos] == at if first.size else np.zeros(at.shape, bool)
        out[hit] = self._label_values[pos[hit]]
        return out

    def update_labels(self, instance_ids: np.ndarray, labels: np.ndarray) -> "TokenStore":
        """Record labels that arrived after their instances were stored (0/1 each; the last
        given wins) and publish them as a new version: the time index (what histories read)
        carries them, :meth:`column` ``("label")`` returns them; segment rows stay untouched.
        Atomic and durable like an append (same lock); returns the new store."""
        ids = np.asarray(instance_ids, dtype=np.int64).reshape(-1)
        lab = np.asarray(labels).reshape(-1)
        if lab.shape != ids.shape or lab.dtype.kind not in "iufb" or not np.isin(lab, (0, 1)).all():
            raise TokenStoreError(f"{self.path}: update_labels needs one 0/1 label per instance "
                                  f"id, got {lab.size} label(s) for {ids.size} id(s)")
        lock = _take_lock(self.path)
        version = self.version + 1
        tmp_dirs: List[Path] = []
        try:
            rows = self.rows_of(ids)
            if self._label_rows is not None:
                rows = np.concatenate([self._label_rows, rows])
                lab = np.concatenate([self._label_values, lab.astype(np.int8)])
            last = np.unique(rows[::-1], return_index=True)[1]  # last update of each row
            keep = rows.size - 1 - last
            new_rows, new_values = rows[keep], lab[keep].astype(np.int8)
            old = dict(self.manifest)
            name = f"labels-v{version:05d}"
            label_tmp = self.path / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
            label_tmp.mkdir()
            tmp_dirs.append(label_tmp)
            checksums = {k: v for k, v in old["checksums"].items()
                         if k.startswith(SEGMENTS + "/")}
            checksums[f"{name}/rows.npy"] = write_column(label_tmp / "rows.npy", new_rows)
            checksums[f"{name}/values.npy"] = write_column(label_tmp / "values.npy", new_values)
            keys = {c: self.column(c) for c in KEY_COLUMNS if c != "label"}
            keys["label"] = np.array(self.column("label"))
            keys["label"][new_rows] = new_values
            manifest = {k: old[k] for k in ("kind", "token_shape", "dtype", "metadata",
                                            "segments") if k in old}
            manifest.update(version=version, created_at=old.get("created_at"),
                            label_overrides=name)
            index_tmp = self.path / f".index-v{version:05d}.tmp-{uuid.uuid4().hex[:8]}"
            tmp_dirs.append(index_tmp)
            _finish(self.path, manifest, keys, checksums, _Where([("store row", self.num_rows)]),
                    index_dir=index_tmp)
            for src, dst in ((label_tmp, self.path / name),
                             (index_tmp, self.path / manifest["index"])):
                if dst.exists():  # left by a crash before a manifest swap
                    shutil.rmtree(dst)
                os.replace(src, dst)
            _write_manifest(self.path / MANIFEST, manifest)  # the commit point
            for stale in (old["index"], old.get("label_overrides")):
                if stale and (self.path / stale).exists():
                    shutil.rmtree(self.path / stale, ignore_errors=True)
        finally:
            for d in tmp_dirs:
                shutil.rmtree(d, ignore_errors=True)
            lock.unlink(missing_ok=True)
        return TokenStore.open(self.path, verify=False)

    def tokens(self, rows: np.ndarray) -> np.ndarray:
        """Tokens of ``rows`` as stored (fp32 / fp16 [n, d], FBGEMM int8 rows uint8 [n, 4 + d],
        or SIF codes uint8 [n, T, M])."""
        return self.column("tokens", rows)

    def tokens_fp32(self, rows: np.ndarray) -> np.ndarray:
        """IAT tokens of ``rows`` as float32 [n, d], dequantised."""
        if self.kind != "iat":
            raise TokenStoreError(f"{self.path}: a {self.kind!r} store holds codes; use tokens()")
        return decode_tokens(self.tokens(rows), self.dtype)

    def raw_row_chunks(self, chunk_rows: int = 1 << 20) -> Iterator[Tuple[int, np.ndarray]]:
        """``(first row, uint8 [n, row_bytes])`` over all rows in order, in FBGEMM's row layout
        (what :class:`~iat_torchrec.tokens.lookup.InstanceTokenLookup` copies into its weights)."""
        for seg in self._segments:
            tok = seg.columns["tokens"]
            flat = tok.reshape(tok.shape[0], -1).view(np.uint8)
            for lo in range(0, seg.rows, chunk_rows):
                yield seg.start + lo, flat[lo:lo + chunk_rows]

    def _check_rows(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        bad = (rows < 0) | (rows >= self.num_rows)
        if bad.any():
            raise TokenStoreError(f"{self.path}: row id {int(rows[bad][0])} out of range "
                                  f"[0, {self.num_rows})")
        return rows

    def __repr__(self) -> str:
        return (f"TokenStore({str(self.path)!r}, kind={self.kind}, token_shape={self.token_shape}, "
                f"dtype={self.dtype}, rows={self.num_rows}, version={self.version})")


# --------------------------------------------------------------------------- writing
class _Where:
    """Names a global row for error messages: which writer call / part it came from."""

    def __init__(self, ranges: List[Tuple[str, int]]) -> None:
        self.labels = [label for label, _ in ranges]
        self.starts = np.cumsum([0] + [n for _, n in ranges])

    def __call__(self, row: int) -> str:
        i = int(np.searchsorted(self.starts, row, side="right") - 1)
        return f"{self.labels[i]} {row - self.starts[i]}"


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _finish(index_parent: Path, manifest: Dict[str, Any], keys: Dict[str, np.ndarray],
            checksums: Dict[str, Any], where: _Where,
            index_dir: Optional[Path] = None) -> Dict[str, Any]:
    """Check ids are unique, build and write the index into ``index_dir`` (default
    ``index_parent/index-v<version>``) and complete ``manifest`` (the caller writes it)."""
    ids = keys["instance_id"]
    id_order = stable_argsort(ids)
    id_sorted = ids[id_order]
    dup = np.flatnonzero(id_sorted[1:] == id_sorted[:-1])
    if dup.size:
        a, b = sorted((int(id_order[dup[0]]), int(id_order[dup[0] + 1])))
        raise TokenStoreError(f"duplicate instance_id {int(id_sorted[dup[0]])}: {where(a)} and "
                              f"{where(b)}; nothing was written")
    index = UserTimeIndex.build(keys["user_id"], keys["ts"], keys["label"], id_order)
    name = f"index-v{manifest['version']:05d}"
    index_dir = index_dir or index_parent / name
    index_dir.mkdir()
    arrays = {"id_sorted": id_sorted, "id_rows": id_order, **index.arrays()}
    for k, arr in arrays.items():
        checksums[f"{name}/{k}.npy"] = write_column(index_dir / f"{k}.npy", arr)
    ts = keys["ts"]
    manifest.update(format=FORMAT, format_version=FORMAT_VERSION, index=name, checksums=checksums,
                    count=int(ids.size), num_users=index.num_users,
                    ts_min=int(ts.min()) if ts.size else None,
                    ts_max=int(ts.max()) if ts.size else None, updated_at=_now())
    manifest.setdefault("created_at", manifest["updated_at"])
    if "label_delay_s" in manifest["metadata"]:
        manifest["label_delay_s"] = int(manifest["metadata"]["label_delay_s"])
    if manifest["dtype"] == "int8":
        manifest["int8_row_layout"] = ("FBGEMM IntNBit rows: fp16 scale, fp16 bias, then d uint8 "
                                       "codes; value = scale * code + bias")
    return manifest


def _take_lock(path: Path) -> Path:
    """The store's writer lock (one appender or label update at a time)."""
    lock = path / LOCK
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        raise TokenStoreError(
            f"{lock}: another appender holds this store (if none is running, a "
            "crashed one left the lock: remove the file)") from None
    os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
    os.close(fd)
    return lock


class TokenStoreWriter(CommitOnExit):
    """Streams rows into a new store (from :meth:`TokenStore.create`) or a new segment of an
    existing one (from :meth:`TokenStore.appender`). Use as a context manager, or call
    :meth:`close` (commit) / :meth:`abort`."""

    def __init__(self, path: Path, *, kind: str, token_shape: Tuple[int, ...], dtype: str,
                 metadata: Dict[str, Any], base: Optional[TokenStore], overwrite: bool) -> None:
        self.path = path
        self.kind, self.token_shape, self.dtype, self.metadata = kind, token_shape, dtype, metadata
        self.rows_written = 0
        self._base = base
        self._calls: List[Tuple[str, int]] = []
        self._closed = False
        self._lock: Optional[Path] = None
        if base is None:
            self._ctx = atomic_output(path, overwrite=overwrite)
            self._root = self._ctx.__enter__()
            (self._root / SEGMENTS).mkdir(parents=True)
            self._seg_name = "seg-00000"
            self._seg_dir = self._root / SEGMENTS / self._seg_name
        else:
            self._lock = _take_lock(path)
            self._root = path
            self._seg_name = f"seg-{len(base.manifest['segments']):05d}"
            self._seg_dir = path / SEGMENTS / f".{self._seg_name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            self._seg_dir.mkdir()
            row_shape = stored_row_shape(kind, token_shape, dtype)
            self._writers = {c: ColumnWriter(self._seg_dir / f"{c}.npy", t)
                             for c, t in _KEY_DTYPES.items()}
            self._writers["tokens"] = ColumnWriter(self._seg_dir / "tokens.npy",
                                                   stored_numpy_dtype(dtype), row_shape)
        except BaseException:
            self.abort()
            raise

    # ----------------------------------------------------------------- appending rows
    def append(self, instance_id: np.ndarray, user_id: np.ndarray, ts: np.ndarray,
               label: np.ndarray, tokens: np.ndarray) -> None:
        """Add rows (any order, any subset). ``label`` is the instance's first label (0/1,
        int/float/bool); ``tokens`` float [n, d] for IAT (quantised to the store dtype here) or
        uint8 [n, T, M] for SIF. A bad call raises :class:`TokenStoreError` naming the column
        and row, and aborts the writer: nothing of it is published."""
        if self._closed:
            raise TokenStoreError(f"{self.path}: writer already closed")
        call = f"append call {len(self._calls) + 1}"
        try:
            cols = self._validate(call, instance_id, user_id, ts, label, tokens)
            for c, w in self._writers.items():
                w.write(cols[c])
        except BaseException:
            self.abort()
            raise
        self._calls.append((f"{call}, row", int(cols["instance_id"].size)))
        self.rows_written += int(cols["instance_id"].size)

    def _validate(self, call: str, instance_id: np.ndarray, user_id: np.ndarray, ts: np.ndarray,
                  label: np.ndarray, tokens: np.ndarray) -> Dict[str, np.ndarray]:
        where = f"{self.path}: {call}"
        given = {"instance_id": instance_id, "user_id": user_id, "ts": ts, "label": label}
        arrays = {k: np.asarray(v) for k, v in given.items()}
        n = arrays["instance_id"].shape[0] if arrays["instance_id"].ndim == 1 else -1
        for k, a in arrays.items():
            if a.ndim != 1 or a.shape[0] != n:
                raise TokenStoreError(f"{where}: column {k!r}: expected a 1-D array of "
                                      f"{max(n, 0)} values (like instance_id), got shape {a.shape}")
        out: Dict[str, np.ndarray] = {}
        for k in ("instance_id", "user_id", "ts"):
            a = arrays[k]
            if a.dtype.kind not in "iu":
                raise TokenStoreError(f"{where}: column {k!r}: expected integers, got {a.dtype}")
            out[k] = a.astype(np.int64, copy=False)
        neg = np.flatnonzero(out["ts"] < 0)
        if neg.size:
            raise TokenStoreError(f"{where}: column 'ts', row {neg[0]}: negative timestamp "
                                  f"{out['ts'][neg[0]]}, expected seconds >= 0")
        lab = arrays["label"]
        if lab.dtype.kind not in "iufb":
            raise TokenStoreError(f"{where}: column 'label': expected 0/1 numbers, got {lab.dtype}")
        labf = lab.astype(np.float64)
        bad = np.flatnonzero(~((labf == 0) | (labf == 1)))
        if bad.size:
            raise TokenStoreError(f"{where}: column 'label', row {bad[0]}: {lab[bad[0]]} is not "
                                  "0 or 1 (the instance's first label is required)")
        out["label"] = labf.astype(np.int8)
        tok = np.asarray(tokens)
        if tok.shape != (n, *self.token_shape):
            raise TokenStoreError(f"{where}: column 'tokens': expected shape "
                                  f"{(n, *self.token_shape)}, got {tok.shape}")
        if self.kind == "iat":
            if tok.dtype.kind != "f":
                raise TokenStoreError(f"{where}: column 'tokens': expected float tokens, got "
                                      f"{tok.dtype}")
            finite = np.isfinite(tok).all(axis=1)
            if not finite.all():
                r = int(np.flatnonzero(~finite)[0])
                raise TokenStoreError(f"{where}: column 'tokens', row {r}: NaN or inf in the "
                                      "token, expected finite floats")
            if self.dtype == "fp16":
                big = np.abs(tok).max(axis=1) > np.finfo(np.float16).max
                if big.any():
                    r = int(np.flatnonzero(big)[0])
                    raise TokenStoreError(f"{where}: column 'tokens', row {r}: a value beyond "
                                          "the fp16 range (65504); store it as fp32 or int8")
            out["tokens"] = encode_tokens(tok, self.dtype)
        else:
            if tok.dtype != np.uint8:
                raise TokenStoreError(f"{where}: column 'tokens': expected uint8 codes, got "
                                      f"{tok.dtype}")
            out["tokens"] = tok
        return out

    # ----------------------------------------------------------------- commit / abort
    def close(self) -> TokenStore:
        """Finish: check instance ids are unique (also against the existing rows), build the
        per-user time index, write checksums and the manifest, and publish atomically."""
        if self._closed:
            raise TokenStoreError(f"{self.path}: writer already closed")
        try:
            entries = {c: w.close() for c, w in self._writers.items()}
            if self.rows_written == 0 and self._base is not None:
                raise TokenStoreError(f"{self.path}: no rows were appended; nothing was written")
            checksums: Dict[str, Any] = {f"{SEGMENTS}/{self._seg_name}/{c}.npy": e
                                         for c, e in entries.items()}
            new = {c: open_column(self._seg_dir / f"{c}.npy", entries[c], verify=False)
                   for c in KEY_COLUMNS}
            base = self._base
            manifest: Dict[str, Any] = {"kind": self.kind, "token_shape": list(self.token_shape),
                                        "dtype": self.dtype, "metadata": self.metadata}
            seg_entry = {"name": self._seg_name, "rows": self.rows_written}
            if base is None:
                manifest.update(version=1, segments=[seg_entry])
                _finish(self._root, manifest, new, checksums, _Where(self._calls))
                _write_manifest(self._root / MANIFEST, manifest)
                self._ctx.__exit__(None, None, None)
            else:
                keys = {c: np.concatenate([base.column(c), new[c]]) for c in KEY_COLUMNS}
                old = dict(base.manifest)
                manifest.update(version=base.version + 1,
                                segments=[*old["segments"], seg_entry],
                                created_at=old.get("created_at"))
                if "merged_from" in old:
                    manifest["merged_from"] = old["merged_from"]
                lo = old.get("label_overrides")
                if lo:
                    manifest["label_overrides"] = lo
                checksums = {**{k: v for k, v in old["checksums"].items()
                                if k.startswith(SEGMENTS + "/") or (lo and k.startswith(lo + "/"))},
                             **checksums}
                index_tmp = (self.path / f".index-v{manifest['version']:05d}"
                             f".tmp-{uuid.uuid4().hex[:8]}")
                where = _Where([("existing store row", base.num_rows), *self._calls])
                try:
                    _finish(self.path, manifest, keys, checksums, where, index_dir=index_tmp)
                except BaseException:
                    shutil.rmtree(index_tmp, ignore_errors=True)
                    raise
                final_seg = self.path / SEGMENTS / self._seg_name
                final_index = self.path / manifest["index"]
                for stale in (final_seg, final_index):  # left by a crash before a manifest swap
                    if stale.exists():
                        shutil.rmtree(stale)
                os.replace(self._seg_dir, final_seg)
                os.replace(index_tmp, final_index)
                fsync_dir(final_seg.parent)
                # The commit point: the new manifest names the new segment and index.
                _write_manifest(self.path / MANIFEST, manifest)
                old_index = self.path / old["index"]
                if old_index != final_index and old_index.exists():
                    shutil.rmtree(old_index, ignore_errors=True)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self._release()
        return TokenStore.open(self.path, verify=False)

    def abort(self) -> None:
        """Drop everything written by this writer; the store (or target path) is unchanged."""
        if self._closed:
            return
        self._closed = True
        for w in getattr(self, "_writers", {}).values():
            w.abort()
        if self._base is None:
            try:
                self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)
            except RuntimeError:
                pass
        else:
            shutil.rmtree(self._seg_dir, ignore_errors=True)
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.unlink(missing_ok=True)
            self._lock = None
