"""Time-respecting splits: per-user fractions (Protocol P1) and global time cuts."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from conftest import ML_LATEST_SMALL as ML_SMALL
from conftest import read_log

from iat_torchrec.config import parse_config
from iat_torchrec.data.log import write_log
from iat_torchrec.data.spec import FeatureSpec, SparseField
from iat_torchrec.data.splits import (
    SPLIT_MANIFEST,
    SPLIT_NAMES,
    SplitConfig,
    SplitMethod,
    per_user_assignment,
    quantile_cuts,
    split_by_time,
    split_log,
    split_per_user,
    time_cut_assignment,
)

SPEC = FeatureSpec(sparse=[SparseField("item", 1000)], dense=[], labels=["click"])


def make_log(path: Path, users, ts, instance_ids=None, rows_per_file=1_000_000) -> Path:
    n = len(users)
    iid = np.arange(n) if instance_ids is None else np.asarray(instance_ids)
    order = np.lexsort((iid, ts))
    t = pa.table({"instance_id": np.asarray(iid, np.int64), "user_id": np.asarray(users, np.int64),
                  "ts": np.asarray(ts, np.int64), "click": np.arange(n) % 2,
                  "item": np.arange(n) % 1000}).take(pa.array(order))
    write_log(t, path, SPEC, rows_per_file=rows_per_file,
              extra_files=[_licence(path.parent)])
    return path


def _licence(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / "LICENSE.txt"
    p.write_text("the data licence\n")
    return p


# --------------------------------------------------------------------------- per user
def test_per_user_fractions_exact():
    # user 1: 10 rows -> 8/1/1; user 2: 5 rows -> 4/0/1; user 3: 1 row -> 0/0/1;
    # user 4: 20 rows -> 16/2/2; user 5: 9 rows -> floor(7.2)=7, floor(8.1)=8 -> 7/1/1
    sizes = {1: 10, 2: 5, 3: 1, 4: 20, 5: 9}
    users = np.concatenate([np.full(n, u) for u, n in sizes.items()])
    rng = np.random.default_rng(0)
    ts = rng.integers(0, 50, users.size)  # with ties
    iid = rng.permutation(users.size)
    perm = rng.permutation(users.size)  # any row order
    a = per_user_assignment(users[perm], ts[perm], iid[perm])
    expect = {1: (8, 1, 1), 2: (4, 0, 1), 3: (0, 0, 1), 4: (16, 2, 2), 5: (7, 1, 1)}
    for u, counts in expect.items():
        mine = a[users[perm] == u]
        assert tuple(np.bincount(mine, minlength=3)) == counts
        # chronological by (ts, instance_id)
        key = sorted(zip(ts[perm][users[perm] == u], iid[perm][users[perm] == u], mine))
        assert [k[2] for k in key] == sorted(k[2] for k in key)


def test_per_user_fraction_floors_are_exact():
    # 0.7 + 0.1 is 0.7999999999999999 in floating point; the cut must still be floor(0.8 n).
    users = np.zeros(10, np.int64)
    a = per_user_assignment(users, np.arange(10), np.arange(10), 0.7, 0.1)
    assert tuple(np.bincount(a, minlength=3)) == (7, 1, 2)
    with pytest.raises(ValueError, match="<= 1"):
        per_user_assignment(users, np.arange(10), np.arange(10), 0.7, 0.4)


def test_split_per_user_writes_three_logs(tmp_path):
    users = np.repeat([1, 2, 3], 10)
    ts = np.tile(np.arange(10) * 100, 3)
    src = make_log(tmp_path / "src" / "log", users, ts, rows_per_file=7)
    out = tmp_path / "split"
    summaries = split_per_user(src, out)
    assert {k: s.rows for k, s in summaries.items()} == {"train": 24, "valid": 3, "test": 3}
    for name in SPLIT_NAMES:
        d = out / name
        assert FeatureSpec.load(d) == SPEC
        assert (d / "LICENSE.txt").read_text() == "the data licence\n"
        assert summaries[name].path == str(d)
    manifest = json.loads((out / SPLIT_MANIFEST).read_text())
    assert manifest["method"] == "per_user" and manifest["rows"]["train"] == 24
    test = read_log(out / "test")
    assert sorted(test["ts"].to_pylist()) == [900] * 3
    # the source is untouched
    assert read_log(src).num_rows == 30


# --------------------------------------------------------------------------- global cuts
def test_time_cuts(tmp_path):
    ts = np.array([5, 1, 3, 3, 7, 9, 9, 2, 8, 4])
    users = np.arange(10) % 3
    src = make_log(tmp_path / "log", users, ts)
    summaries = split_by_time(src, tmp_path / "out", cuts=[3, 8])
    got = {k: sorted(read_log(tmp_path / "out" / k)["ts"].to_pylist()) for k in SPLIT_NAMES}
    assert got == {"train": [1, 2], "valid": [3, 3, 4, 5, 7], "test": [8, 9, 9]}
    assert {k: s.rows for k, s in summaries.items()} == {"train": 2, "valid": 5, "test": 3}
    for k in SPLIT_NAMES:
        assert summaries[k].time_sorted


def test_quantile_cuts():
    ts = np.array([5, 1, 3, 3, 7, 9, 9, 2, 8, 4])  # sorted: 1 2 3 3 4 5 7 8 9 9
    assert quantile_cuts(ts, [0.5, 0.8]) == [5, 9]
    assert quantile_cuts(ts, [0.3, 1.0]) == [3, 10]  # q = 1: past the end, all before
    a = time_cut_assignment(ts, *quantile_cuts(ts, [0.5, 0.8]))
    assert tuple(np.bincount(a, minlength=3)) == (5, 3, 2)
    with pytest.raises(ValueError, match="ordered"):
        time_cut_assignment(ts, 5, 3)


def test_time_split_by_quantiles_and_defaults(tmp_path):
    rng = np.random.default_rng(1)
    ts = rng.permutation(1000)
    src = make_log(tmp_path / "log", rng.integers(0, 20, 1000), ts)
    s = split_log(src, tmp_path / "q", method="time", quantiles=[0.6, 0.7])
    assert {k: v.rows for k, v in s.items()} == {"train": 600, "valid": 100, "test": 300}
    s = split_log(src, tmp_path / "d", method=SplitMethod.TIME)  # 0.8 / 0.9 quantiles
    assert {k: v.rows for k, v in s.items()} == {"train": 800, "valid": 100, "test": 100}
    assert json.loads((tmp_path / "d" / SPLIT_MANIFEST).read_text())["cuts"] == [800, 900]
    assert read_log(tmp_path / "d" / "train")["ts"].to_numpy().max() < 800


def test_split_errors(tmp_path):
    src = make_log(tmp_path / "data" / "log", np.zeros(10), np.arange(10))
    with pytest.raises(ValueError, match="must differ"):
        split_per_user(src, src, overwrite=True)
    with pytest.raises(ValueError, match="inside the source"):
        split_per_user(src, src / "split")
    with pytest.raises(ValueError, match="contain the source"):
        split_per_user(src, tmp_path / "data", overwrite=True)
    with pytest.raises(ValueError, match="valid split would be empty"):
        split_by_time(src, tmp_path / "out", cuts=[5, 5])
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="exactly one"):
        split_by_time(src, tmp_path / "out")
    with pytest.raises(ValueError, match="time method only"):
        split_log(src, tmp_path / "out", cuts=[1, 2])
    split_per_user(src, tmp_path / "out")
    with pytest.raises(FileExistsError):
        split_per_user(src, tmp_path / "out")
    split_per_user(src, tmp_path / "out", overwrite=True, train_fraction=0.5, valid_fraction=0.3)
    assert read_log(tmp_path / "out" / "train").num_rows == 5
    assert read_log(src).num_rows == 10


def test_config_names_match_the_library(tmp_path):
    src = make_log(tmp_path / "log", np.zeros(10), np.arange(10))
    cfg = parse_config(SplitConfig, ["--source", str(src), "--output", str(tmp_path / "out"),
                                     "--method", "time", "--cuts", "3", "6"])
    assert cfg.method is SplitMethod.TIME and cfg.cuts == [3, 6]
    s = split_log(**dataclasses.asdict(cfg))
    assert [s[k].rows for k in SPLIT_NAMES] == [3, 3, 4]


# --------------------------------------------------------------------------- MovieLens P1
def test_p1_on_ml_latest_small(tmp_path, ml_small_log):
    log, _ = ml_small_log
    summaries = split_per_user(log, tmp_path / "p1")
    full = read_log(log)
    users = full["user_id"].to_numpy()
    n_per_user = np.bincount(users)
    n_per_user = n_per_user[n_per_user > 0]
    expect_train = sum(n * 8 // 10 for n in n_per_user.tolist())
    expect_valid = sum(n * 9 // 10 - n * 8 // 10 for n in n_per_user.tolist())
    expect_test = int(n_per_user.sum()) - expect_train - expect_valid
    rows = {k: s.rows for k, s in summaries.items()}
    assert rows == {"train": expect_train, "valid": expect_valid, "test": expect_test}
    assert rows == {"train": 79_748, "valid": 9_957, "test": 10_299}
    parts = {k: read_log(tmp_path / "p1" / k) for k in SPLIT_NAMES}
    ids = np.concatenate([parts[k]["instance_id"].to_numpy() for k in SPLIT_NAMES])
    np.testing.assert_array_equal(np.sort(ids), np.arange(full.num_rows))
    # per user: every train row precedes every valid row, which precedes every test row, in
    # (ts, instance_id) order -- i.e. P1's (timestamp, movie id) order
    key = {}
    for k in SPLIT_NAMES:
        u = parts[k]["user_id"].to_numpy()
        # (ts, instance_id) as one int64: ts < 2**31 and ids < 2**20 here
        order_key = parts[k]["ts"].to_numpy() * 2 ** 20 + parts[k]["instance_id"].to_numpy()
        key[k] = (u, order_key)
    nu = int(users.max()) + 1

    def per_user(fn, k, fill):
        u, v = key[k]
        out = np.full(nu, fill)
        fn.at(out, u, v)
        return out

    lo, hi = np.iinfo(np.int64).min, np.iinfo(np.int64).max
    train_max = per_user(np.maximum, "train", lo)
    valid_min = per_user(np.minimum, "valid", hi)
    valid_max = per_user(np.maximum, "valid", lo)
    test_min = per_user(np.minimum, "test", hi)
    assert (train_max < np.minimum(valid_min, test_min)).all()
    assert (valid_max < test_min).all()
    assert full["ts"].to_numpy().max() < 2 ** 31 and full.num_rows < 2 ** 20
    licence = (ML_SMALL / "README.txt").read_bytes()
    for k in SPLIT_NAMES:
        assert (tmp_path / "p1" / k / "README.txt").read_bytes() == licence
    # every user has rows in each split (all users rated >= 20 movies)
    for k in SPLIT_NAMES:
        assert summaries[k].users == 671
