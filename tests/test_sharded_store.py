"""The token and code stores sharded by row range over processes: each rank holds only its
range, rows kept as stored (int8 stays int8), lookups bit-identical to the whole store in one
process; and the downstream stage on 2 processes (IAT on an int8 store; SIF-Mixer over those
tokens and HGAQ codes) trains with them by default, each process holding half of each store,
with the metrics of 1 process holding the whole stores."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchx.runner import get_runner
from torchx.specs import AppState

from conftest import small_splits
from iat_torchrec.config import parse_config
from iat_torchrec.stages.assemble import AssembleConfig, assemble_history
from iat_torchrec.stages.compress import CompressConfig, run_compress
from iat_torchrec.stages.tokenize import TokenizeConfig, run_tokenize
from iat_torchrec.stages.train import TrainDownstreamConfig, run_train
from iat_torchrec.tokens.lookup import (InstanceTokenLookup, LookupConfig, SampleCodeLookup,
                                        ShardedInstanceTokenLookup, ShardedSampleCodeLookup,
                                        TokenLookupError, make_code_lookup, make_token_lookup,
                                        row_bounds)
from iat_torchrec.tokens.store import TokenStore
from test_lookup import D, N, build, random_ids
from test_train import METRICS, SMALL_MODEL, SMALL_SOURCE
from torchx_components import components

DTYPES = ("fp32", "fp16", "int8")
T, M = 3, 2


def test_row_bounds_split_as_torchrec_row_wise():
    assert row_bounds(10, 4, "row_wise") == [0, 3, 6, 9, 10]
    assert row_bounds(10, 2, "row_wise") == [0, 5, 10]
    assert row_bounds(2, 4, "row_wise") == [0, 1, 2, 2, 2]  # more ranks than rows
    assert row_bounds(10, 3, "table_wise") == [0, 10, 10, 10]
    with pytest.raises(TokenLookupError, match="row_wise or table_wise"):
        row_bounds(10, 2, "column_wise")


def build_sif(path: Path, iat: TokenStore) -> np.ndarray:
    """A SIF store of ``iat``'s instances in reverse row order; returns the codes by iat row."""
    codes = np.random.default_rng(2).integers(0, 8, (N, T, M)).astype(np.uint8)
    rev = np.arange(N)[::-1]
    w = TokenStore.create(path, kind="sif", token_shape=(T, M), dtype="uint8")
    w.append(*(iat.column(c)[rev] for c in ("instance_id", "user_id", "ts", "label")),
             codes[rev])
    w.close()
    return codes


def _worker(rank: int, world: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdzv", rank=rank,
                            world_size=world)
    try:
        bounds = row_bounds(N, world, "row_wise")
        lo, hi = bounds[rank], bounds[rank + 1]
        # The ranks ask for different rows and batch sizes; rank 1 once asks for padding only,
        # and each once only for rows the other rank holds.
        asks = [random_ids(10 + rank, shape=(5 + rank, 7)),
                torch.full((3, 4), -1) if rank else random_ids(20),
                torch.randint(bounds[1 - rank], bounds[2 - rank], (2, 5),
                              generator=torch.Generator().manual_seed(rank))]
        for dtype in DTYPES:
            store = TokenStore.open(f"{tmp}/{dtype}")
            whole = InstanceTokenLookup(store)
            sharded = make_token_lookup(store, LookupConfig(shard_min_bytes=0))  # auto: row-wise
            assert isinstance(sharded, ShardedInstanceTokenLookup)
            # This rank's range only, as stored: int8 rows stay int8 (d + 4 bytes each).
            assert (sharded.lo, sharded.hi, sharded.local_rows) == (lo, hi, hi - lo)
            assert sharded.table.dtype == dtype
            assert sharded.local_bytes == (hi - lo) * store.row_bytes < whole.local_bytes
            for ids in asks:
                got = sharded(ids)
                assert got.shape == (*ids.shape, D) and got.dtype == torch.float32
                assert torch.equal(got, whole(ids)), (dtype, (got - whole(ids)).abs().max())
            half = make_token_lookup(store, LookupConfig(output_dtype="fp16", shard_min_bytes=0))
            assert torch.equal(half(asks[0]),
                               InstanceTokenLookup(store, output_dtype="fp16")(asks[0]))
            # auto keeps a store under shard_min_bytes whole in every process.
            assert isinstance(make_token_lookup(store, LookupConfig()), InstanceTokenLookup)
        iat = TokenStore.open(f"{tmp}/fp32")
        sif = TokenStore.open(f"{tmp}/sif")
        codes = make_code_lookup(sif, LookupConfig(shard_min_bytes=0), rows_like=iat)
        assert isinstance(codes, ShardedSampleCodeLookup)
        assert codes.local_rows == hi - lo and codes.local_bytes == (hi - lo) * T * M
        whole_codes = SampleCodeLookup.from_store(sif, rows_like=iat)
        for ids in asks:
            got = codes(ids)
            assert got.shape == (*ids.shape, T, M) and got.dtype == torch.int64
            assert torch.equal(got, whole_codes(ids))
        with pytest.raises(TokenLookupError, match="out of range"):
            codes(torch.tensor([[N]]))
    finally:
        dist.destroy_process_group()


def test_sharded_lookups_over_two_processes_hold_their_rows_and_equal_the_whole(tmp_path):
    for dtype in DTYPES:
        build(tmp_path / dtype, dtype)
    build_sif(tmp_path / "sif", TokenStore.open(tmp_path / "fp32"))
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2)


@pytest.fixture(scope="module")
def int8_world(tmp_path_factory):
    """Synthetic splits, an int8 IAT store and a SIF code store over all three, and history
    shards of each split (on the IAT store)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the test machine is shared
    root = tmp_path_factory.mktemp("sharded")
    splits = small_splits(root / "data")
    exports = [str(splits[s]) for s in ("train", "valid", "test")]
    run_compress(parse_config(CompressConfig, [
        "--train_log", str(splits["train"]), "--store", str(root / "iat"), "--export_logs",
        *exports, *SMALL_SOURCE, "--token_dtype", "int8"]))
    run_tokenize(parse_config(TokenizeConfig, [
        "--train_log", str(splits["train"]), "--store", str(root / "sif"), "--export_logs",
        *exports, "--model.codebook_size", "16", "--model.fields_per_subtoken", "4",
        "--model.d0", "8", "--train.batch_size", "512", "--train.log_every", "0"]))
    history = {s: assemble_history(AssembleConfig(target_log=str(splits[s]),
                                                  store=str(root / "iat"),
                                                  output=str(root / f"hist_{s}"), max_len=16))
               for s in ("train", "valid", "test")}
    yield {"splits": splits, "iat": root / "iat", "sif": root / "sif", "history": history}
    torch.set_num_threads(threads)
    if dist.is_initialized():
        dist.destroy_process_group()


# SMALL_MODEL as the train component's arguments, 2 processes with half the batch each.
SMALL_COMPONENT = {
    "model.embedding_dim": 8, "model.dense_arch_layers": [16], "model.over_arch_layers": [16, 8],
    "model.mixer.d0": 8, "model.mixer.num_blocks": 1, "model.mixer.num_heads": 2,
    "model.item_feature": "item_id", "model.item_history_len": 8,
    "model.iat.adapt_dim": 8, "model.iat.side_dim": 8, "model.iat.num_layers": 1,
    "model.iat.num_heads": 2, "train.batch_size": 128, "train.log_every": 0, "j": "1x2"}


def train_on_two(args: dict, out: Path) -> dict:
    """The train component's results on 2 processes (dist.ddp -> torchrun, gloo)."""
    app = components.train(**args, **SMALL_COMPONENT, results=str(out / "results.json"))
    with get_runner() as runner:
        handle = runner.run(app, scheduler="local_cwd",
                            cfg={"log_dir": str(out / "logs"), "prepend_cwd": True})
        status = runner.wait(handle, wait_interval=1)
    assert status.state == AppState.SUCCEEDED, status
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("source, interaction, stores", [("iat", "dot", ("iat",)),
                                                         ("sif_both", "mixer", ("iat", "sif"))])
def test_two_processes_shard_the_stores_and_match_one(int8_world, tmp_path, monkeypatch,
                                                      source, interaction, stores):
    """2 processes, the lookup at auto with no size floor: each holds half of each store (the
    int8 tokens still int8), and the metrics are those of 1 process holding the whole
    stores."""
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    s, h = int8_world["splits"], int8_world["history"]
    args = {"train_log": s["train"], "valid_log": s["valid"], "test_log": s["test"],
            "train_history": h["train"], "valid_history": h["valid"], "test_history": h["test"],
            **{f"{k}_store": int8_world[k] for k in stores}}
    args = {**{k: str(v) for k, v in args.items()}, "model.history_source": source,
            "model.interaction": interaction, "lookup.shard_min_bytes": "0"}
    one = run_train(parse_config(TrainDownstreamConfig, [
        *(a for k, v in args.items() for a in (f"--{k}", v)), *SMALL_MODEL]))
    two = train_on_two(args, tmp_path)
    assert two["world_size"] == 2 and two["config"]["lookup"]["sharding"] == "auto"
    diffs = [abs(two[split]["click"][k] - one[split]["click"][k])
             for split in ("valid", "test") for k in METRICS]
    assert max(diffs) < 1e-6, diffs
    # One process holds each whole store; each of two holds its half, as stored.
    kinds = {"iat": ("tokens", "InstanceTokenLookup", "ShardedInstanceTokenLookup"),
             "sif": ("codes", "SampleCodeLookup", "ShardedSampleCodeLookup")}
    assert sorted(two["lookups"]) == sorted(kinds[k][0] for k in stores)
    report = []
    for k in stores:
        what, whole, sharded = kinds[k]
        store = TokenStore.open(int8_world[k])
        rows, table = store.num_rows, store.num_rows * store.row_bytes
        assert one["lookups"][what] == {"lookup": whole, "table_rows": rows,
                                        "table_bytes": table, "rows_per_rank": [rows],
                                        "bytes_per_rank": [table]}
        held = two["lookups"][what]
        b = row_bounds(rows, 2, "row_wise")
        assert held["lookup"] == sharded and held["table_rows"] == rows
        assert held["rows_per_rank"] == [b[1] - b[0], b[2] - b[1]]
        assert all(r < rows for r in held["rows_per_rank"]) and sum(held["rows_per_rank"]) == rows
        assert held["bytes_per_rank"] == [r * store.row_bytes for r in held["rows_per_rank"]]
        report.append(f"{what} ({store.dtype}, {rows:,} rows): bytes per process "
                      f"{held['bytes_per_rank']}, {table:,} in one process")
    assert TokenStore.open(int8_world["iat"]).dtype == "int8"
    print(f"{source}: " + "; ".join(report) + f"; metrics differ by at most {max(diffs):.2g}")
