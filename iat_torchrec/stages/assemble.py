"""The assembly stage: every sample of a target log gets the ``(begin, length)`` of its
history in a token store's time index, written as history shards
(:mod:`iat_torchrec.tokens.shards`), optionally partitioned by user across processes.

``apps/assemble.py`` runs :func:`assemble_history` over a target log (train / valid / test);
the downstream reader opens the result with :class:`~iat_torchrec.tokens.shards.HistoryShards`.

The store may come from another domain's instance log (another feature spec): target samples are
joined to store rows on the user id, translated through ``--user_map`` when the two domains
number users differently, and a store row's label is shown only once it has matured in the
store's own domain (the label delay recorded at export).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from iat_torchrec.atomic import atomic_output
from iat_torchrec.config import ConfigError
from iat_torchrec.data.log import InstanceLogError, log_files, open_parquet
from iat_torchrec.data.reader import hash_ids
from iat_torchrec.data.spec import INSTANCE_ID, KEY_COLUMNS, TS, USER_ID, FeatureSpec, SpecError
from iat_torchrec.distributed.collectives import (DistEnv, all_gather_object, barrier,
                                                  broadcast_object, init_process_group)
from iat_torchrec.history import DEFAULT_GAP_BOUNDARIES_S, HistoryLayout
from iat_torchrec.tokens.npyfile import file_crc32
from iat_torchrec.tokens.shards import (BEGIN, LENGTH, SHARD_SCHEMA, SHARDS_FORMAT,
                                        SHARDS_FORMAT_VERSION, SHARDS_MANIFEST,
                                        HistoryShards, HistoryShardsError)
from iat_torchrec.tokens.store import TokenStore
from iat_torchrec.tokens.time_index import UserTimeIndex


@dataclasses.dataclass
class AssembleConfig:
    """Sequence assembly: history offsets for every sample of a target log, written as shards."""

    target_log: str = dataclasses.field(default="", metadata={
        "help": "instance log (e.g. a train / valid / test split) whose samples get histories "
                "(required)"})
    store: str = dataclasses.field(default="", metadata={
        "help": "token store directory, exported from this log's domain or another (required)"})
    output: str = dataclasses.field(default="", metadata={
        "help": "history shards directory to write (required)"})
    max_len: int = dataclasses.field(default=HistoryLayout.max_len, metadata={
        "help": "L: the last L instances with ts < t"})
    label_delay_s: Optional[int] = dataclasses.field(default=None, metadata={
        "help": "seconds after ts until a store row's label is known (default: the delay the "
                "store recorded at export, its own domain's; else the target log's feature "
                "spec); shorter than the store's recorded delay is refused"})
    user_map: str = dataclasses.field(default="", metadata={
        "help": "Parquet file with int64 columns user_id (the target log's ids) and "
                "store_user_id (the store's), for a store whose log numbers users differently "
                "(default: the same ids); users missing from it are unknown to the store"})
    gap_boundaries_s: List[int] = dataclasses.field(
        default_factory=lambda: list(DEFAULT_GAP_BOUNDARIES_S),
        metadata={"help": "bucket boundaries of the gap t - ts_i, seconds, increasing"})
    allow_unknown_users: bool = dataclasses.field(default=False, metadata={
        "help": "give users absent from the store empty histories instead of failing"})
    verify_store: bool = dataclasses.field(default=True, metadata={
        "help": "check every store file's checksum when opening it"})
    overwrite: bool = dataclasses.field(default=False, metadata={
        "help": "replace an existing output"})


DELAY_SOURCES = {"store": "the store's delay",
                 "spec": "the target log's feature spec: the store records none",
                 "given": "given by --label_delay_s"}


def resolve_layout(config: AssembleConfig, store: TokenStore) -> Tuple[HistoryLayout, str]:
    """The layout of a run, and where its label delay came from (a key of
    :data:`DELAY_SOURCES`): ``--label_delay_s`` if given, else the delay the store recorded at
    export (its own domain's), else the target log's feature spec. A given delay shorter than
    the store's recorded one is refused: labels would show before they mature there."""
    recorded = store.label_delay_s
    if config.label_delay_s is not None:
        if recorded is not None and config.label_delay_s < recorded:
            raise ConfigError(
                f"--label_delay_s {config.label_delay_s} is shorter than the label delay "
                f"{recorded} s recorded by the token store {store.path}: labels would be shown "
                "before they mature in the store's domain (leave --label_delay_s out to use the "
                "store's delay, or give a longer one)")
        delay, source = config.label_delay_s, "given"
    elif recorded is not None:
        delay, source = recorded, "store"
    else:
        try:
            delay, source = FeatureSpec.load(config.target_log).label_delay_s, "spec"
        except SpecError as e:
            raise SpecError(f"{e}; the token store {store.path} records no label delay, so it "
                            "comes from the target log's feature spec: pass --label_delay_s to "
                            "give it explicitly") from None
    return HistoryLayout(max_len=config.max_len, label_delay_s=int(delay),
                         gap_boundaries_s=tuple(config.gap_boundaries_s)), source


def user_partition(user_id: np.ndarray, world_size: int) -> np.ndarray:
    """The rank that assembles each user's samples (a 64-bit hash of the user id)."""
    return hash_ids(np.asarray(user_id, dtype=np.int64), world_size)


# --------------------------------------------------------------------------- user-id map
STORE_USER_ID = "store_user_id"


class UserMapError(InstanceLogError):
    """A bad ``--user_map`` file; the message names the file and, where it can, the column
    and row."""


@dataclasses.dataclass(frozen=True)
class UserMap:
    """Target user id -> the store's user id, read from a ``--user_map`` Parquet file."""

    path: Path
    user_id: np.ndarray        # [n] int64, sorted distinct target user ids
    store_user_id: np.ndarray  # [n] int64, the store's id of each

    @classmethod
    def read(cls, path: str) -> "UserMap":
        """Read and check a map: int64 columns ``user_id`` and ``store_user_id``, no nulls,
        each ``user_id`` once (several may share a ``store_user_id``)."""
        file = Path(path)
        if not file.is_file():
            raise UserMapError(file, "user map not found (a Parquet file with int64 columns "
                                     f"{USER_ID} and {STORE_USER_ID})")
        try:
            table = pq.read_table(file)
        except (OSError, pa.ArrowException) as e:
            raise UserMapError(file, f"unreadable or corrupted Parquet file ({e})") from None
        cols = {}
        for col in (USER_ID, STORE_USER_ID):
            if col not in table.column_names:
                raise UserMapError(file, f"missing column: a user map needs int64 columns "
                                         f"{USER_ID} (the target log's ids) and {STORE_USER_ID} "
                                         "(the store's)", column=col)
            cols[col] = int64_column(table[col], file, col, UserMapError)
        order = np.argsort(cols[USER_ID], kind="stable")
        ids = cols[USER_ID][order]
        dup = np.flatnonzero(ids[1:] == ids[:-1])
        if dup.size:
            first, second = int(order[dup[0]]), int(order[dup[0] + 1])  # stable: first < second
            raise UserMapError(file, f"user_id {ids[dup[0]]} is mapped twice (rows {first} and "
                                     f"{second}): each target user needs one store user",
                               column=USER_ID, row=second)
        return cls(file, ids, cols[STORE_USER_ID][order])

    def translate(self, user_id: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """The store's ids of target users, and whether each is in the map (an id not in it
        gets an arbitrary store id)."""
        if not self.user_id.size:
            return np.zeros_like(user_id), np.zeros(user_id.shape, dtype=bool)
        pos = np.minimum(np.searchsorted(self.user_id, user_id), self.user_id.size - 1)
        return self.store_user_id[pos], self.user_id[pos] == user_id


def to_store_users(user_map: Optional[UserMap], user_id: np.ndarray
                   ) -> Tuple[np.ndarray, np.ndarray]:
    """The store's ids of target users, and whether each has one (all do without a map)."""
    if user_map is None:
        return user_id, np.ones(user_id.shape, dtype=bool)
    return user_map.translate(user_id)


def users_in_store(index: UserTimeIndex, user_map: Optional[UserMap],
                   user_id: np.ndarray) -> np.ndarray:
    """Whether the store holds rows of each target user (through the map, if any)."""
    store_users, mapped = to_store_users(user_map, user_id)
    return mapped & np.isin(store_users, index.users)


def int64_column(arr: pa.ChunkedArray, path: Path, col: str, error: type = InstanceLogError,
                 first_row: int = 0) -> np.ndarray:
    """``arr`` as int64 NumPy, or ``error`` naming the file, the column and (for a null) the row
    (``first_row``: the file row of ``arr``'s first)."""
    if arr.type != pa.int64():
        raise error(path, f"wrong type: expected int64, got {arr.type}", column=col)
    if arr.null_count:
        row = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
        raise error(path, "null value, expected int64", column=col, row=first_row + row)
    return arr.to_numpy()


CHUNK_ROWS = 1 << 20  # target rows queried at once: sorted-needle searches amortise better


def _key_chunks(path: Path, pf: pq.ParquetFile) -> Iterator[Tuple[int, Dict[str, np.ndarray]]]:
    """``(first row, key columns)`` of consecutive row groups of about :data:`CHUNK_ROWS` rows."""
    meta, base, g = pf.metadata, 0, 0
    while g < pf.num_row_groups:
        groups, rows = [], 0
        while g < pf.num_row_groups and (not groups or rows < CHUNK_ROWS):
            groups.append(g)
            rows += meta.row_group(g).num_rows
            g += 1
        try:
            table = pf.read_row_groups(groups, columns=list(KEY_COLUMNS))
        except (OSError, pa.ArrowException) as e:
            raise InstanceLogError(path, f"unreadable or corrupted Parquet data in row groups "
                                         f"{groups[0]}-{groups[-1]} ({e})", row=base) from None
        yield base, {col: int64_column(table[col], path, col, InstanceLogError, base)
                     for col in KEY_COLUMNS}
        base += table.num_rows


def assemble_part(config: AssembleConfig, store: TokenStore, layout: HistoryLayout,
                  user_map: Optional[UserMap], rank: int, world_size: int, out_file: Path
                  ) -> Tuple[Dict[str, Any], Optional[Dict[str, Any]]]:
    """Write this rank's shard: the samples of its users (all samples when ``world_size`` is 1,
    partitioned by the target's user id, mapped to the store's after), streamed about a million
    target rows at a time.

    Returns the part's summary and the first sample whose user the store does not know
    (``path``, ``file`` index, ``row``, ``user_id``, ``store_user_id``: None when missing from
    the map), or None. Unless unknown users are allowed, nothing more is queried after that
    sample, but every user id is still read: the part's user counts are complete either way.
    """
    index = store.time_index
    store_end = store.manifest.get("ts_max")
    files = log_files(config.target_log)
    rows = with_history = total_len = after_store = 0
    ts_range: Optional[Tuple[int, int]] = None
    seen_users: List[np.ndarray] = []  # distinct user ids of chunks, merged every few chunks
    first_unknown: Optional[Dict[str, Any]] = None
    # No dictionary encoding: offsets and ids gain nothing from it, and it triples write time.
    writer = pq.ParquetWriter(out_file, SHARD_SCHEMA, compression="snappy",
                              use_dictionary=False)
    try:
        for file_index, path in enumerate(files):
            pf = open_parquet(path)
            for col in KEY_COLUMNS:
                if col not in pf.schema_arrow.names:
                    raise InstanceLogError(path, f"missing column: every target sample needs "
                                                 f"{', '.join(KEY_COLUMNS)} ({USER_ID} joins it "
                                                 "to its history in the token store)",
                                           column=col)
            for base, keys in _key_chunks(path, pf):
                sel = None
                if world_size > 1:
                    sel = np.flatnonzero(user_partition(keys[USER_ID], world_size) == rank)
                    keys = {k: v[sel] for k, v in keys.items()}
                users, t = keys[USER_ID], keys[TS]
                seen_users.append(np.unique(users))
                if len(seen_users) > 8:
                    seen_users = [np.unique(np.concatenate(seen_users))]
                if first_unknown is not None and not config.allow_unknown_users:
                    continue  # failing: only the user counts are still wanted
                store_users, mapped = to_store_users(user_map, users)
                begin, length, known = index.query(store_users, t, layout.max_len,
                                                   allow_unknown_users=True)
                known &= mapped
                begin[~known], length[~known] = 0, 0
                if first_unknown is None and not known.all():
                    i = int(np.flatnonzero(~known)[0])
                    first_unknown = {
                        "path": str(path), "file": file_index,
                        "row": base + (int(sel[i]) if sel is not None else i),
                        "user_id": int(users[i]),
                        "store_user_id": int(store_users[i]) if mapped[i] else None}
                    if not config.allow_unknown_users:
                        continue
                writer.write_table(pa.table({
                    INSTANCE_ID: keys[INSTANCE_ID], USER_ID: users, TS: t,
                    BEGIN: begin, LENGTH: length.astype(np.int32)}, schema=SHARD_SCHEMA))
                rows += length.size
                with_history += int(np.count_nonzero(length))
                total_len += int(length.sum())
                if t.size:
                    lo, hi = int(t.min()), int(t.max())
                    ts_range = (lo, hi) if ts_range is None else (min(ts_range[0], lo),
                                                                  max(ts_range[1], hi))
                    if store_end is not None:
                        after_store += int(np.count_nonzero(t > store_end))
    finally:
        writer.close()
    users = np.unique(np.concatenate(seen_users)) if seen_users else np.empty(0, np.int64)
    part = {"name": out_file.name, "rows": rows, "with_history": with_history,
            "total_length": total_len, "users": int(users.size),
            "users_in_store": int(np.count_nonzero(users_in_store(index, user_map, users))),
            "samples_after_store": after_store,
            "ts_min": ts_range[0] if ts_range else None,
            "ts_max": ts_range[1] if ts_range else None,
            "bytes": out_file.stat().st_size,
            "crc32": f"{file_crc32(out_file, offset=0):08x}"}
    return part, first_unknown


def unknown_users_error(first: Dict[str, Any], parts: List[Dict[str, Any]], store: TokenStore,
                        user_map: Optional[UserMap]) -> InstanceLogError:
    """The error for target users the store does not know, naming the first one's sample and
    how many users are unknown in all."""
    num_users = sum(p["users"] for p in parts)
    unknown = num_users - sum(p["users_in_store"] for p in parts)
    user = f"user_id {first['user_id']}"
    if user_map is None:
        what = f"{user} has no rows in the token store {store.path}"
    elif first["store_user_id"] is None:
        what = f"{user} is not in the user map {user_map.path}"
    else:
        what = (f"{user} (store user_id {first['store_user_id']} by the user map "
                f"{user_map.path}) has no rows in the token store {store.path}")
    hint = "the wrong store or user map" if user_map is not None else "the wrong store"
    return InstanceLogError(
        first["path"], f"{what}, so its history cannot be assembled; {unknown} of {num_users} "
                       f"target users are unknown to the store (which usually means {hint}; "
                       "--allow_unknown_users true gives them empty histories)",
        column=USER_ID, row=first["row"])


def _utc(ts: int) -> str:
    try:
        return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return "beyond the calendar"


STALE_SHARE = 0.02  # warn when more than this share of targets is later than the whole store


def coverage_warnings(manifest: Dict[str, Any]) -> List[str]:
    """What the store lacks for the target log, from a shards manifest: any user in common,
    or rows as late as the target's (more than :data:`STALE_SHARE` of the targets later than
    its last row: a store of an earlier window, not a log that merely went quiet sooner)."""
    m, store = manifest, manifest["store"]["path"]
    out = []
    if m["num_users"] and not m["num_users_in_store"]:
        via = f" through the user map {m['user_map']}" if m["user_map"] else ""
        out.append(f"0 of {m['num_users']} target users have rows in the store {store}{via}: "
                   "every history is empty")
    end, later, n = m["store_ts_max"], m["num_samples_after_store"], m["num_samples"]
    if later > STALE_SHARE * n:
        ends = f"the store {store} ends at {end} ({_utc(end)}), before the target log " \
               f"{m['target_log']}"
        if later == n:
            out.append(f"{ends} begins at {m['target_ts_min']} ({_utc(m['target_ts_min'])}): "
                       f"every one of its {n} target samples is later than every store row, so "
                       "their histories stop at the store's end")
        else:
            out.append(f"{ends}, which runs to {m['target_ts_max']} "
                       f"({_utc(m['target_ts_max'])}): {later} of {n} target samples are later "
                       "than every store row, so their histories stop at the store's end")
    return out


def assemble_history(config: AssembleConfig, env: Optional[DistEnv] = None) -> Path:
    """Assemble the history of every sample of ``config.target_log`` into shards at
    ``config.output`` (one Parquet part per rank, plus a manifest), written atomically.

    ``env`` (default: one process) is this process's place in the job; with ``world_size`` > 1,
    call it on every rank with the default ``torch.distributed`` process group initialised (gloo
    is enough, :func:`~iat_torchrec.distributed.collectives.init_process_group`): each rank takes
    the samples of its users (:func:`user_partition`), rank 0 commits once every part is
    complete. If any rank fails, every rank raises and nothing is published. Rank 0 warns
    (:func:`coverage_warnings`) when no target user is in the store, or the store ends before
    the target log.
    """
    missing = [f"--{k}" for k in ("target_log", "store", "output") if not getattr(config, k)]
    if missing:
        raise ValueError(f"assembly needs {', '.join(missing)}")
    env = env if env is not None else DistEnv(0, 1, 0, torch.device("cpu"))
    rank, world_size = env.rank, env.world_size
    out = Path(config.output)
    if world_size > 1 and not dist.is_initialized():
        raise HistoryShardsError(f"{out}: world_size {world_size} needs the default "
                                 "torch.distributed process group initialised on every rank")
    ctx, tmp, start_error = None, None, None
    if rank == 0:
        try:
            ctx = atomic_output(out, overwrite=config.overwrite)
            tmp = ctx.__enter__()
            tmp.mkdir()
        except Exception as e:  # noqa: BLE001 - re-raised below, after telling the other ranks
            start_error = e
    tmp_name, start_msg = broadcast_object((str(tmp) if tmp else None,
                                            str(start_error) if start_error else None), env)
    if start_msg is not None:
        if start_error is not None:
            raise start_error
        raise HistoryShardsError(f"{out}: rank 0 could not start the output: {start_msg}")
    failure: Optional[BaseException] = None
    summary: Optional[Tuple[Dict[str, Any], Optional[Dict[str, Any]]]] = None
    store: Optional[TokenStore] = None
    user_map: Optional[UserMap] = None
    try:
        store = TokenStore.open(config.store, verify=config.verify_store)
        layout, delay_source = resolve_layout(config, store)
        user_map = UserMap.read(config.user_map) if config.user_map else None
        summary = assemble_part(config, store, layout, user_map, rank, world_size,
                                Path(tmp_name) / f"part-{rank:05d}.parquet")
    except Exception as e:  # noqa: BLE001 - every rank must learn of it before raising
        failure = e
    results = all_gather_object((summary, None if failure is None else
                                 f"{type(failure).__name__}: {failure}"), env)
    failed = [(r, msg) for r, (_, msg) in enumerate(results) if msg is not None]
    error: Optional[BaseException] = failure
    if failed and error is None:
        r, msg = failed[0]
        error = HistoryShardsError(f"{out}: rank {r} failed ({msg}); nothing was written")
    if not failed:
        assert store is not None
        parts = [s[0] for s, _ in results]
        unknown = [s[1] for s, _ in results if s[1] is not None]
        if unknown and not config.allow_unknown_users:
            first = min(unknown, key=lambda u: (u["file"], u["row"]))
            error = unknown_users_error(first, parts, store, user_map)
    if error is not None:
        if rank == 0 and ctx is not None:
            ctx.__exit__(HistoryShardsError, HistoryShardsError("failed"), None)
        raise error
    if rank == 0:
        assert store is not None and ctx is not None
        n = sum(p["rows"] for p in parts)
        starts = [p["ts_min"] for p in parts if p["ts_min"] is not None]
        ends = [p["ts_max"] for p in parts if p["ts_max"] is not None]
        manifest = {
            "format": SHARDS_FORMAT, "format_version": SHARDS_FORMAT_VERSION,
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "store": {"path": str(Path(config.store).resolve()), "version": store.version,
                      "index": store.manifest["index"], "index_checksum": store.index_checksum,
                      "num_rows": store.num_rows},
            "target_log": str(Path(config.target_log).resolve()),
            "max_len": layout.max_len, "label_delay_s": layout.label_delay_s,
            "label_delay_source": delay_source,
            "gap_boundaries_s": list(layout.gap_boundaries_s),
            "store_label_delay_s": store.label_delay_s,
            "user_map": str(Path(config.user_map).resolve()) if config.user_map else None,
            "num_samples": n,
            "num_with_history": sum(p["with_history"] for p in parts),
            "mean_length": sum(p["total_length"] for p in parts) / max(n, 1),
            "num_users": sum(p["users"] for p in parts),
            "num_users_in_store": sum(p["users_in_store"] for p in parts),
            "target_ts_min": min(starts) if starts else None,
            "target_ts_max": max(ends) if ends else None,
            "store_ts_max": store.manifest.get("ts_max"),
            "num_samples_after_store": sum(p["samples_after_store"] for p in parts),
            "world_size": world_size,
            "parts": parts,
            "columns": {BEGIN: "first time-index position of the history",
                        LENGTH: "history length (positions begin .. begin + length - 1)"},
        }
        for message in coverage_warnings(manifest):
            warnings.warn(message, stacklevel=2)
        (Path(tmp_name) / SHARDS_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        ctx.__exit__(None, None, None)
    barrier(env)
    return out


def run_assemble(config: AssembleConfig) -> Path:
    """``apps/assemble.py``: join the job's process group (or a one-process group), assemble,
    print a summary of the shards from rank 0; returns the output path."""
    env = init_process_group("cpu")
    start = time.perf_counter()
    out = assemble_history(config, env)
    if env.is_main:
        m = HistoryShards.open(out, verify=False).manifest
        n, seconds = m["num_samples"], time.perf_counter() - start
        via = f" (user map {m['user_map']})" if m["user_map"] else ""
        print(f"history shards  {out}\n"
              f"  target log {m['target_log']}\n"
              f"  store {m['store']['path']} (version {m['store']['version']})\n"
              f"  users in store {m['num_users_in_store']:,} of {m['num_users']:,}{via}\n"
              f"  samples {n:,}   with history {m['num_with_history'] / max(n, 1):.1%}   "
              f"mean length {m['mean_length']:.1f} of {m['max_len']}\n"
              f"  labels mature after {m['label_delay_s']} s "
              f"({DELAY_SOURCES[m['label_delay_source']]})\n"
              f"  {len(m['parts'])} part(s) from {m['world_size']} process(es) in {seconds:.1f} s "
              f"({n / max(seconds, 1e-9):,.0f} samples/s)", flush=True)
    return out
