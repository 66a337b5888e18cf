"""The assembly stage: every sample of a target log gets the ``(begin, length)`` of its
history in a token store's time index, written as history shards
(:mod:`iat_torchrec.tokens.shards`), optionally partitioned by user across processes.

``apps/assemble.py`` runs :func:`assemble_history` over a target log (train / valid / test);
the downstream reader opens the result with :class:`~iat_torchrec.tokens.shards.HistoryShards`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from iat_torchrec.atomic import atomic_output
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


@dataclasses.dataclass
class AssembleConfig:
    """Sequence assembly: history offsets for every sample of a target log, written as shards."""

    target_log: str = dataclasses.field(default="", metadata={
        "help": "instance log (e.g. a train / valid / test split) whose samples get histories "
                "(required)"})
    store: str = dataclasses.field(default="", metadata={
        "help": "token store directory (required)"})
    output: str = dataclasses.field(default="", metadata={
        "help": "history shards directory to write (required)"})
    max_len: int = dataclasses.field(default=HistoryLayout.max_len, metadata={
        "help": "L: the last L instances with ts < t"})
    label_delay_s: Optional[int] = dataclasses.field(default=None, metadata={
        "help": "seconds after ts until a label is known (default: the target log's feature "
                "spec)"})
    gap_boundaries_s: List[int] = dataclasses.field(
        default_factory=lambda: list(DEFAULT_GAP_BOUNDARIES_S),
        metadata={"help": "bucket boundaries of the gap t - ts_i, seconds, increasing"})
    allow_unknown_users: bool = dataclasses.field(default=False, metadata={
        "help": "give users absent from the store empty histories instead of failing"})
    verify_store: bool = dataclasses.field(default=True, metadata={
        "help": "check every store file's checksum when opening it"})
    overwrite: bool = dataclasses.field(default=False, metadata={
        "help": "replace an existing output"})


def resolve_layout(config: AssembleConfig) -> HistoryLayout:
    """The layout of a run: the label delay comes from the target log's feature spec unless
    given."""
    delay = config.label_delay_s
    if delay is None:
        try:
            delay = FeatureSpec.load(config.target_log).label_delay_s
        except SpecError as e:
            raise SpecError(f"{e}; the label delay comes from the target log's feature spec: "
                            "pass --label_delay_s to give it explicitly") from None
    return HistoryLayout(max_len=config.max_len, label_delay_s=int(delay),
                         gap_boundaries_s=tuple(config.gap_boundaries_s))


def user_partition(user_id: np.ndarray, world_size: int) -> np.ndarray:
    """The rank that assembles each user's samples (a 64-bit hash of the user id)."""
    return hash_ids(np.asarray(user_id, dtype=np.int64), world_size)


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
        out = {}
        for col in KEY_COLUMNS:
            arr = table[col]
            if arr.type != pa.int64():
                raise InstanceLogError(path, f"wrong type: expected int64, got {arr.type}",
                                       column=col)
            if arr.null_count:
                row = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
                raise InstanceLogError(path, "null value, expected int64", column=col,
                                       row=base + row)
            out[col] = arr.to_numpy()
        yield base, out
        base += table.num_rows


def assemble_part(config: AssembleConfig, store: TokenStore, layout: HistoryLayout, rank: int,
                  world_size: int, out_file: Path) -> Dict[str, Any]:
    """Write this rank's shard: the samples of its users (all samples when ``world_size`` is 1),
    streamed about a million target rows at a time. Returns the part's summary."""
    index = store.time_index
    files = log_files(config.target_log)
    rows = with_history = total_len = 0
    # No dictionary encoding: offsets and ids gain nothing from it, and it triples write time.
    writer = pq.ParquetWriter(out_file, SHARD_SCHEMA, compression="snappy",
                              use_dictionary=False)
    try:
        for path in files:
            pf = open_parquet(path)
            for col in KEY_COLUMNS:
                if col not in pf.schema_arrow.names:
                    raise InstanceLogError(path, "missing column", column=col)
            for base, keys in _key_chunks(path, pf):
                sel = None
                if world_size > 1:
                    sel = np.flatnonzero(user_partition(keys[USER_ID], world_size) == rank)
                    keys = {k: v[sel] for k, v in keys.items()}
                begin, length, known = index.query(keys[USER_ID], keys[TS], layout.max_len,
                                                   allow_unknown_users=True)
                if not config.allow_unknown_users and not known.all():
                    i = int(np.flatnonzero(~known)[0])
                    row = base + (int(sel[i]) if sel is not None else i)
                    raise InstanceLogError(
                        path, f"user_id {keys[USER_ID][i]} has no rows in the token store "
                              f"{store.path}, so its history cannot be assembled (a target log "
                              "whose users the store does not know usually means the wrong "
                              "store; --allow_unknown_users true gives them empty histories)",
                        column=USER_ID, row=row)
                writer.write_table(pa.table({
                    INSTANCE_ID: keys[INSTANCE_ID], USER_ID: keys[USER_ID], TS: keys[TS],
                    BEGIN: begin, LENGTH: length.astype(np.int32)}, schema=SHARD_SCHEMA))
                rows += length.size
                with_history += int(np.count_nonzero(length))
                total_len += int(length.sum())
    finally:
        writer.close()
    return {"name": out_file.name, "rows": rows, "with_history": with_history,
            "total_length": total_len, "bytes": out_file.stat().st_size,
            "crc32": f"{file_crc32(out_file, offset=0):08x}"}


def assemble_history(config: AssembleConfig, env: Optional[DistEnv] = None) -> Path:
    """Assemble the history of every sample of ``config.target_log`` into shards at
    ``config.output`` (one Parquet part per rank, plus a manifest), written atomically.

    ``env`` (default: one process) is this process's place in the job; with ``world_size`` > 1,
    call it on every rank with the default ``torch.distributed`` process group initialised (gloo
    is enough, :func:`~iat_torchrec.distributed.collectives.init_process_group`): each rank takes
    the samples of its users (:func:`user_partition`), rank 0 commits once every part is
    complete. If any rank fails, every rank raises and nothing is published.
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
    summary: Optional[Dict[str, Any]] = None
    store: Optional[TokenStore] = None
    try:
        store = TokenStore.open(config.store, verify=config.verify_store)
        layout = resolve_layout(config)
        summary = assemble_part(config, store, layout, rank, world_size,
                                Path(tmp_name) / f"part-{rank:05d}.parquet")
    except Exception as e:  # noqa: BLE001 - every rank must learn of it before raising
        failure = e
    results = all_gather_object((summary, None if failure is None else
                                 f"{type(failure).__name__}: {failure}"), env)
    failed = [(r, msg) for r, (_, msg) in enumerate(results) if msg is not None]
    if failed:
        if rank == 0 and ctx is not None:
            ctx.__exit__(HistoryShardsError, HistoryShardsError("failed"), None)
        if failure is not None:
            raise failure
        r, msg = failed[0]
        raise HistoryShardsError(f"{out}: rank {r} failed ({msg}); nothing was written")
    if rank == 0:
        assert store is not None and ctx is not None
        parts = [s for s, _ in results]
        n = sum(p["rows"] for p in parts)
        manifest = {
            "format": SHARDS_FORMAT, "format_version": SHARDS_FORMAT_VERSION,
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "store": {"path": str(Path(config.store).resolve()), "version": store.version,
                      "index": store.manifest["index"], "index_checksum": store.index_checksum,
                      "num_rows": store.num_rows},
            "target_log": str(Path(config.target_log).resolve()),
            "max_len": layout.max_len, "label_delay_s": layout.label_delay_s,
            "gap_boundaries_s": list(layout.gap_boundaries_s),
            "store_label_delay_s": store.label_delay_s,
            "num_samples": n,
            "num_with_history": sum(p["with_history"] for p in parts),
            "mean_length": sum(p["total_length"] for p in parts) / max(n, 1),
            "world_size": world_size,
            "parts": parts,
            "columns": {BEGIN: "first time-index position of the history",
                        LENGTH: "history length (positions begin .. begin + length - 1)"},
        }
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
        print(f"history shards  {out}\n"
              f"  target log {m['target_log']}\n"
              f"  store {m['store']['path']} (version {m['store']['version']})\n"
              f"  samples {n:,}   with history {m['num_with_history'] / max(n, 1):.1%}   "
              f"mean length {m['mean_length']:.1f} of {m['max_len']}   "
              f"label delay {m['label_delay_s']} s\n"
              f"  {len(m['parts'])} part(s) from {m['world_size']} process(es) in {seconds:.1f} s "
              f"({n / max(seconds, 1e-9):,.0f} samples/s)", flush=True)
    return out
