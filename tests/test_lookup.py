"""Token lookup through FBGEMM (per dtype, against direct indexing of the fp32 tokens) and its
TorchRec-sharded variant over two processes (against the unsharded lookup)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from iat_torchrec.tokens.lookup import (InstanceTokenLookup, LookupConfig, SampleCodeLookup,
                                        ShardedInstanceTokenLookup, TokenLookupError,
                                        make_token_lookup)
from iat_torchrec.tokens.store import TokenStore
from test_token_store import within_tolerance

N, D = 500, 16


def tokens_fp32(seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((N, D)) * 3).astype(np.float32)


def build(path: Path, dtype: str) -> TokenStore:
    rng = np.random.default_rng(1)
    w = TokenStore.create(path, kind="iat", token_shape=(D,), dtype=dtype)
    tok = tokens_fp32()
    for part in np.array_split(np.arange(N), 2):  # two append calls; then one more segment
        w.append(part, rng.integers(0, 9, part.size), rng.integers(0, 99, part.size),
                 rng.integers(0, 2, part.size), tok[part])
    return w.close()


def random_ids(seed: int, shape=(6, 9)) -> torch.Tensor:
    ids = torch.from_numpy(np.random.default_rng(seed).integers(0, N, shape))
    ids[0, -3:] = -1  # padding
    ids[2, :] = -1
    return ids


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8"])
def test_lookup_equals_direct_indexing_within_tolerance(tmp_path, dtype):
    store = build(tmp_path / "s", dtype)
    lookup = InstanceTokenLookup(store)
    assert not list(lookup.parameters())  # frozen: nothing to train
    ids = random_ids(0)
    out = lookup(ids)
    assert out.shape == (6, 9, D) and out.dtype == torch.float32
    valid = (ids >= 0).numpy()
    # Direct indexing of the fp32 tokens (row r holds instance r here), within the dtype's
    # tolerance; and exactly the store's own dequantisation.
    direct = tokens_fp32()[ids.numpy()[valid]]
    assert within_tolerance(dtype, out.numpy()[valid], direct)
    assert np.array_equal(out.numpy()[valid], store.tokens_fp32(ids.numpy()[valid]))
    assert (out.numpy()[~valid] == 0).all()  # padding -> zero tokens
    assert torch.equal(lookup(ids.to(torch.int32)), out)
    assert torch.equal(lookup(ids.view(2, 3, 9)), out.view(2, 3, 9, D))
    half = InstanceTokenLookup(store, output_dtype="fp16")(ids)
    assert half.dtype == torch.float16
    assert torch.allclose(half.float(), out, rtol=2 ** -10, atol=1e-3)


def test_lookup_rejects_bad_ids_and_stores(tmp_path):
    store = build(tmp_path / "s", "fp16")
    lookup = make_token_lookup(store, LookupConfig())
    assert isinstance(lookup, InstanceTokenLookup)
    for bad in (N, -2):
        with pytest.raises(TokenLookupError, match=rf"row id {bad} out of range \[0, {N}\)"):
            lookup(torch.tensor([[0, bad, 1]]))
    with pytest.raises(TokenLookupError, match="int32 or int64"):
        lookup(torch.tensor([[0.0]]))
    with pytest.raises(TokenLookupError, match="location"):
        InstanceTokenLookup(store, location="managed")
    with pytest.raises(TokenLookupError, match="sharding must be one of"):
        make_token_lookup(store, LookupConfig(sharding="column_wise"))
    w = TokenStore.create(tmp_path / "sif", kind="sif", token_shape=(2, 3), dtype="uint8")
    w.append(np.arange(3), np.zeros(3, int), np.zeros(3, int), np.zeros(3),
             np.zeros((3, 2, 3), np.uint8))
    with pytest.raises(TokenLookupError, match="holds 'sif' codes"):
        InstanceTokenLookup(w.close())


def _sharded_worker(rank: int, world: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdzv", rank=rank,
                            world_size=world)
    try:
        # Ranks ask for different rows and different batch sizes.
        ids = random_ids(10 + rank, shape=(5 + rank, 7))
        for dtype, sharding in (("fp32", "row_wise"), ("fp32", "table_wise"),
                                ("fp16", "row_wise"), ("int8", "row_wise")):
            store = TokenStore.open(f"{tmp}/{dtype}")
            sharded = make_token_lookup(store, LookupConfig(sharding=sharding))
            assert isinstance(sharded, ShardedInstanceTokenLookup)
            got, want = sharded(ids), InstanceTokenLookup(store)(ids)
            assert got.shape == want.shape and got.dtype == torch.float32
            if dtype == "int8":  # served as fp16 weights: the int8 values rounded to fp16
                ok = within_tolerance("fp16", got.numpy().reshape(-1, D),
                                      want.numpy().reshape(-1, D))
                assert ok, (dtype, sharding, (got - want).abs().max())
            else:
                assert torch.equal(got, want), (dtype, sharding, (got - want).abs().max())
            with pytest.raises(TokenLookupError, match="out of range"):
                sharded(torch.tensor([[N]]))
    finally:
        dist.destroy_process_group()


def test_sharded_over_two_processes_equals_unsharded(tmp_path):
    for dtype in ("fp32", "fp16", "int8"):
        build(tmp_path / dtype, dtype)
    mp.spawn(_sharded_worker, args=(2, str(tmp_path)), nprocs=2)


def test_code_lookup_in_another_stores_row_order(tmp_path):
    iat = build(tmp_path / "iat", "fp32")
    ids, users, ts, labels = (iat.column(c) for c in ("instance_id", "user_id", "ts", "label"))
    codes = np.random.default_rng(2).integers(0, 8, (N, 3, 2)).astype(np.uint8)
    rev = np.arange(N)[::-1]
    w = TokenStore.create(tmp_path / "sif", kind="sif", token_shape=(3, 2), dtype="uint8")
    w.append(ids[rev], users[rev], ts[rev], labels[rev], codes[rev])
    sif = w.close()
    row_ids = random_ids(3)
    got = SampleCodeLookup.from_store(sif, rows_like=iat)(row_ids)
    assert got.shape == (*row_ids.shape, 3, 2) and got.dtype == torch.int64
    want = torch.from_numpy(codes[row_ids.clamp(min=0).numpy()]).long()
    assert torch.equal(got, torch.where((row_ids >= 0)[..., None, None], want, 0))
    assert torch.equal(SampleCodeLookup.from_store(sif)(torch.tensor([0, -1])),
                       torch.stack([torch.from_numpy(codes[N - 1]).long(),
                                    torch.zeros(3, 2, dtype=torch.int64)]))
    with pytest.raises(ValueError, match="needs a SIF store"):
        SampleCodeLookup.from_store(iat)
