"""Token store: round trips per dtype, the per-user time index, appends, merges, bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest

from iat_torchrec.atomic import OutputExistsError
from iat_torchrec.tokens.npyfile import HEADER_BYTES
from iat_torchrec.tokens.store import MANIFEST, TokenStore, TokenStoreError

D = 8


def make_rows(n: int, seed: int = 0, users: int = 7, id_base: int = 1000) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "instance_id": rng.permutation(n).astype(np.int64) + id_base,
        "user_id": rng.integers(0, users, n),
        "ts": rng.integers(0, 50, n),  # many ties
        "label": rng.integers(0, 2, n),
        "tokens": (rng.standard_normal((n, D)) * 2).astype(np.float32),
    }


def write_store(path: Path, rows: Dict[str, np.ndarray], dtype: str = "fp32",
                chunks: int = 3, **kwargs) -> TokenStore:
    w = TokenStore.create(path, kind="iat", token_shape=(D,), dtype=dtype, **kwargs)
    for part in np.array_split(np.arange(rows["instance_id"].size), chunks):
        w.append(**{k: v[part] for k, v in rows.items()})
    return w.close()


def leftovers(folder: Path) -> List[str]:
    """Temporary entries that a failed write must not leave behind."""
    return sorted(p.name for p in folder.rglob("*")
                  if ".tmp-" in p.name or p.name == ".append.lock")


def within_tolerance(dtype: str, got: np.ndarray, want: np.ndarray) -> bool:
    """The stated tolerances: fp32 exact; fp16 |e| <= 2^-11 |x| + 2^-24 (round to nearest);
    int8 per row |e| <= 0.51 (max - min) / 255 + 2^-11 max|x| (half a quantisation step plus the
    fp16 rounding of FBGEMM's scale and bias)."""
    err = np.abs(got - want)
    if dtype == "fp32":
        return bool((err == 0).all())
    if dtype == "fp16":
        return bool((err <= np.abs(want) * 2.0 ** -11 + 2.0 ** -24).all())
    step = (want.max(axis=1) - want.min(axis=1)) / 255
    bound = 0.51 * step + np.abs(want).max(axis=1) * 2.0 ** -11
    return bool((err.max(axis=1) <= bound + 1e-7).all())


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8"])
def test_round_trip_per_dtype(tmp_path, dtype):
    rows = make_rows(300)
    store = write_store(tmp_path / "s", rows, dtype,
                        metadata={"scheme": "user", "label_delay_s": 60})
    store = TokenStore.open(tmp_path / "s")
    m = store.manifest
    assert (m["format_version"], m["version"], m["kind"], m["dtype"], m["count"]) == \
        (1, 1, "iat", dtype, 300)
    assert m["token_shape"] == [D] and m["metadata"]["scheme"] == "user"
    assert store.label_delay_s == 60 and store.num_rows == 300
    assert all("crc32" in e for e in m["checksums"].values())
    # Rows arrive in any order; rows_of maps ids to rows, tokens come back within tolerance.
    ids = rows["instance_id"][::-1]
    r = store.rows_of(ids)
    assert within_tolerance(dtype, store.tokens_fp32(r), rows["tokens"][::-1])
    assert np.array_equal(store.column("user_id", r), rows["user_id"][::-1])
    assert np.array_equal(store.column("label", r), rows["label"][::-1])
    if dtype == "int8":  # FBGEMM's inference-table row layout: fp16 scale, fp16 bias, codes
        raw = store.tokens(r[:1])
        scale, bias = raw[0, :4].view(np.float16).astype(np.float32)
        assert np.allclose(scale * raw[0, 4:] + bias, store.tokens_fp32(r[:1])[0], atol=1e-6)


def test_int8_tolerance_holds_far_from_zero(tmp_path):
    rows = make_rows(200)
    rows["tokens"] = rows["tokens"] * 0.01 + 100.0  # the fp16 bias rounding dominates here
    store = write_store(tmp_path / "s", rows, "int8")
    assert within_tolerance("int8", store.tokens_fp32(store.rows_of(rows["instance_id"])),
                            rows["tokens"])


def test_sif_codes_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 256, (50, 5, 3)).astype(np.uint8)
    w = TokenStore.create(tmp_path / "sif", kind="sif", token_shape=(5, 3), dtype="uint8")
    w.append(np.arange(50), rng.integers(0, 3, 50), rng.integers(0, 9, 50), np.zeros(50), codes)
    store = w.close()
    assert np.array_equal(store.tokens(store.rows_of(np.arange(50))), codes)
    with pytest.raises(TokenStoreError, match="codes"):
        store.tokens_fp32([0])


def test_time_index_orders_each_user_by_ts_then_instance_id(tmp_path):
    rows = make_rows(400, seed=3)
    store = write_store(tmp_path / "s", rows)
    index = store.time_index
    ids = store.column("instance_id")
    for u_pos, user in enumerate(index.users):
        got = index.rows[index.offsets[u_pos]:index.offsets[u_pos + 1]]
        mine = np.flatnonzero(store.column("user_id") == user)
        want = sorted(mine, key=lambda r: (store.column("ts")[r], ids[r]))
        assert got.tolist() == want
        assert np.array_equal(index.ts[index.offsets[u_pos]:index.offsets[u_pos + 1]],
                              store.column("ts", got))
    assert sorted(index.users.tolist()) == sorted(set(rows["user_id"].tolist()))


# --------------------------------------------------------------------------- appends
def test_append_adds_a_segment_without_rewriting_rows(tmp_path):
    rows = make_rows(300)
    store = write_store(tmp_path / "s", rows, "fp16")
    seg0 = tmp_path / "s" / "segments" / "seg-00000"
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes())
              for p in seg0.iterdir()}
    more = make_rows(50, seed=9, id_base=10_000)
    with store.appender() as a:
        a.append(**more)
    store2 = TokenStore.open(tmp_path / "s")
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes())
             for p in seg0.iterdir()}
    assert before == after
    assert (store2.version, store2.num_rows, len(store2.manifest["segments"])) == (2, 350, 2)
    assert within_tolerance("fp16", store2.tokens_fp32(store2.rows_of(more["instance_id"])),
                            more["tokens"])
    assert within_tolerance("fp16", store2.tokens_fp32(store2.rows_of(rows["instance_id"])),
                            rows["tokens"])
    assert store2.time_index.num_positions == 350
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["index-v00002", MANIFEST,
                                                                   "segments"]
    # The store opened before the append still reads its own (old) version.
    assert store.num_rows == 300 and store.tokens(np.array([0])).shape == (1, D)


def test_failed_append_leaves_the_store_unchanged(tmp_path):
    rows = make_rows(100)
    write_store(tmp_path / "s", rows)
    manifest = (tmp_path / "s" / MANIFEST).read_text()
    a = TokenStore.open(tmp_path / "s").appender()
    with pytest.raises(TokenStoreError, match="another appender"):
        TokenStore.open(tmp_path / "s").appender()
    clash = make_rows(5, seed=2, id_base=5000)
    clash["instance_id"][3] = rows["instance_id"][17]
    a.append(**clash)
    with pytest.raises(TokenStoreError, match=rf"duplicate instance_id {rows['instance_id'][17]}: "
                                              r"existing store row 17 and append call 1, row 3"):
        a.close()
    assert (tmp_path / "s" / MANIFEST).read_text() == manifest
    assert leftovers(tmp_path) == []
    assert TokenStore.open(tmp_path / "s").num_rows == 100


# --------------------------------------------------------------------------- merging rank parts
def test_merge_of_rank_parts_equals_one_store(tmp_path):
    rows = make_rows(600, seed=5)
    whole = write_store(tmp_path / "whole", rows, "int8")
    ranks = np.random.default_rng(0).integers(0, 3, 600)
    parts = []
    for r in range(3):
        sel = np.flatnonzero(ranks == r)
        parts.append(write_store(tmp_path / f"part-{r}", {k: v[sel] for k, v in rows.items()},
                                 "int8", chunks=2).path)
    merged = TokenStore.merge(parts, tmp_path / "merged", remove_parts=True)
    assert not any(p.exists() for p in parts)
    merged = TokenStore.open(tmp_path / "merged")
    ids = rows["instance_id"]
    assert merged.num_rows == 600 and merged.version == 1
    assert np.array_equal(merged.tokens(merged.rows_of(ids)), whole.tokens(whole.rows_of(ids)))
    # The same per-user time order (row ids differ, instance ids agree).
    in_time_order = [s.column("instance_id", s.time_index.rows) for s in (merged, whole)]
    assert np.array_equal(*in_time_order)


def test_empty_parts_are_valid_stores_and_merge(tmp_path):
    empty = TokenStore.create(tmp_path / "e", kind="iat", token_shape=(D,), dtype="fp16").close()
    empty = TokenStore.open(empty.path)
    assert empty.num_rows == 0 and empty.time_index.num_users == 0
    with pytest.raises(TokenStoreError, match="not in the store"):
        empty.rows_of([1])
    rows = make_rows(30)
    full = write_store(tmp_path / "f", rows, "fp16")
    merged = TokenStore.merge([empty.path, full.path], tmp_path / "m")
    assert merged.num_rows == 30
    assert np.array_equal(merged.tokens(merged.rows_of(rows["instance_id"])),
                          full.tokens(full.rows_of(rows["instance_id"])))
    with pytest.raises(TokenStoreError, match="no rows were appended"):
        merged.appender().close()
    assert leftovers(tmp_path) == []


def test_merge_refuses_mismatched_or_overlapping_parts(tmp_path):
    a = write_store(tmp_path / "a", make_rows(20, id_base=0), metadata={"scheme": "user"}).path
    b = write_store(tmp_path / "b", make_rows(20, id_base=100),
                    metadata={"scheme": "temporal"}).path
    c = write_store(tmp_path / "c", make_rows(20, id_base=10), metadata={"scheme": "user"}).path
    with pytest.raises(TokenStoreError, match="metadata differs"):
        TokenStore.merge([a, b], tmp_path / "m")
    with pytest.raises(TokenStoreError, match="duplicate instance_id"):
        TokenStore.merge([a, c], tmp_path / "m")
    assert not (tmp_path / "m").exists() and leftovers(tmp_path) == []


# --------------------------------------------------------------------------- bad input
def test_bad_appends_name_column_and_row_and_write_nothing(tmp_path):
    rows = make_rows(10)
    cases = [
        ({"tokens": rows["tokens"][:, :4]}, r"column 'tokens': expected shape \(10, 8\)"),
        ({"label": np.r_[np.zeros(5), 2, np.zeros(4)]},
         r"column 'label', row 5: 2.0 is not 0 or 1"),
        ({"ts": np.r_[np.zeros(3, int), -4, np.zeros(6, int)]},
         r"column 'ts', row 3: negative timestamp -4"),
        ({"instance_id": rows["instance_id"].astype(float)},
         r"column 'instance_id': expected integers"),
        ({"user_id": rows["user_id"][:9]}, r"column 'user_id': expected a 1-D array of 10"),
    ]
    nan_tokens, big_tokens = rows["tokens"].copy(), rows["tokens"].copy()
    nan_tokens[7, 2] = np.nan
    big_tokens[6, 1] = 1e6
    cases += [({"tokens": nan_tokens}, r"column 'tokens', row 7: NaN or inf"),
              ({"tokens": big_tokens}, r"column 'tokens', row 6: a value beyond the fp16 range")]
    for change, message in cases:
        w = TokenStore.create(tmp_path / "s", kind="iat", token_shape=(D,), dtype="fp16")
        with pytest.raises(TokenStoreError, match=message):
            w.append(**{**rows, **change})
        assert not (tmp_path / "s").exists() and leftovers(tmp_path) == []


def test_duplicates_and_empty_writers_are_refused(tmp_path):
    rows = make_rows(10)
    w = TokenStore.create(tmp_path / "s", kind="iat", token_shape=(D,), dtype="fp32")
    w.append(**rows)
    w.append(**{**rows, "instance_id": rows["instance_id"] + 100})
    w.append(**{k: v[4:5] for k, v in rows.items()})
    with pytest.raises(TokenStoreError, match=rf"duplicate instance_id {rows['instance_id'][4]}: "
                                              r"append call 1, row 4 and append call 3, row 0"):
        w.close()
    assert not (tmp_path / "s").exists() and leftovers(tmp_path) == []
    with pytest.raises(TokenStoreError, match="multiple of 4"):
        TokenStore.create(tmp_path / "s", kind="iat", token_shape=(6,), dtype="fp32")
    with pytest.raises(TokenStoreError, match="dtype for kind 'iat'"):
        TokenStore.create(tmp_path / "s", kind="iat", token_shape=(8,), dtype="uint8")
    write_store(tmp_path / "s", rows)
    with pytest.raises(OutputExistsError):
        TokenStore.create(tmp_path / "s", kind="iat", token_shape=(D,), dtype="fp32")


def test_missing_instance_ids_are_named(tmp_path):
    store = write_store(tmp_path / "s", make_rows(10, id_base=0))
    with pytest.raises(TokenStoreError, match=r"2 instance id\(s\) not in the store: 77, 99"):
        store.rows_of(np.array([3, 99, 77, 99]))


def _edit_manifest(path: Path, edit) -> None:
    m = json.loads((path / MANIFEST).read_text())
    edit(m)
    (path / MANIFEST).write_text(json.dumps(m))


def test_corrupted_truncated_or_mismatched_stores_are_refused(tmp_path):
    src = tmp_path / "s"
    write_store(src, make_rows(50))
    tokens = src / "segments" / "seg-00000" / "tokens.npy"
    good = tokens.read_bytes()

    def check(message: str, verify: bool = True) -> None:
        with pytest.raises(TokenStoreError, match=message):
            TokenStore.open(src, verify=verify)

    flipped = bytearray(good)
    flipped[HEADER_BYTES + 17] ^= 0xFF
    tokens.write_bytes(bytes(flipped))
    check(r"tokens.npy: checksum mismatch .* corrupted")
    assert TokenStore.open(src, verify=False).num_rows == 50  # sizes and headers still checked
    tokens.write_bytes(good[:-40])
    check(r"tokens.npy: truncated: .* the manifest says", verify=False)
    tokens.write_bytes(good[:10] + b"garbage!" + good[18:])
    check(r"tokens.npy: corrupted header", verify=False)
    tokens.write_bytes(good)
    assert TokenStore.open(src).num_rows == 50

    _edit_manifest(src, lambda m: m.update(count=51))
    check(r"count 51 but the segments hold 50 rows: manifest and data do not match")
    _edit_manifest(src, lambda m: m.update(count=50, token_shape=[12]))
    check(r"tokens.npy: rows of shape \(8,\), .* need \(12,\): manifest and data do not match")
    _edit_manifest(src, lambda m: m.update(token_shape=[8], segments=[{"rows": 50}]))
    check(r"malformed manifest \(KeyError\('name'\)\)")
    _edit_manifest(src, lambda m: m.update(segments=[{"name": "seg-00000", "rows": 50}],
                                           format_version=99))
    check(r"format_version 99 is not supported")
    (src / MANIFEST).write_text("{ not json")
    check(r"unreadable or corrupted manifest")
    os.remove(src / MANIFEST)
    check(r"manifest missing")
    with pytest.raises(TokenStoreError, match="token store not found"):
        TokenStore.open(tmp_path / "nowhere")
