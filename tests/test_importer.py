"""The general importer: CSV and Parquet logs with a feature spec -> canonical instance log."""

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import read_log

from iat_torchrec.config import parse_config
from iat_torchrec.data import importer
from iat_torchrec.data.importer import ImportConfig, SourceFormatError, import_log, run_import
from iat_torchrec.data.log import arrow_schema, validate_log
from iat_torchrec.data.spec import DenseField, FeatureGroup, FeatureSpec, SparseField

SPEC = FeatureSpec(
    sparse=[SparseField("item", 100, group=FeatureGroup.ITEM),
            SparseField("cats", 10, group=FeatureGroup.ITEM, multi_valued=True),
            SparseField("query", 8, group=FeatureGroup.CONTEXT, hashed=True)],
    dense=[DenseField("price", group=FeatureGroup.ITEM)],
    labels=["click"],
)

CSV_TEXT = ("userId,time,click,item,cats,query,price,extra\n"
            "7,300,1,5,1|2|3,123456789,1.5,a\n"
            "3,100,0,6,,99,2.25,b\n"
            "7,100,1,7,4,-5,0,c\n"
            "3,300,0,8, 9 | 0 ,42,-1e3,d\n")


@pytest.fixture
def spec_file(tmp_path):
    p = tmp_path / "spec.json"
    SPEC.save(p)
    return p


def write_csv(tmp_path: Path, text: str, name: str = "log.csv") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_csv_round_trip(tmp_path, spec_file):
    src = write_csv(tmp_path, CSV_TEXT)
    (tmp_path / "LICENSE").write_text("my licence\n")
    summary = import_log(src, spec_file, tmp_path / "out", user_column="userId",
                         ts_column="time").log
    assert summary.rows == 4 and summary.users == 2 and summary.time_sorted
    t = read_log(tmp_path / "out")
    assert t.schema == arrow_schema(SPEC)
    rows = t.to_pylist()
    # instance ids assigned in (ts, user_id) order; rows written in (ts, instance_id) order
    assert [(r["ts"], r["user_id"], r["instance_id"]) for r in rows] == [
        (100, 3, 0), (100, 7, 1), (300, 3, 2), (300, 7, 3)]
    assert [r["item"] for r in rows] == [6, 7, 8, 5]
    assert [r["cats"] for r in rows] == [[], [4], [9, 0], [1, 2, 3]]
    assert [r["query"] for r in rows] == [99, -5, 42, 123456789]  # hashed: raw ids kept
    assert [r["price"] for r in rows] == [2.25, 0.0, -1000.0, 1.5]
    assert [r["click"] for r in rows] == [0, 1, 0, 1]
    assert "extra" not in t.column_names
    assert (tmp_path / "out" / "LICENSE").read_text() == "my licence\n"
    assert FeatureSpec.load(tmp_path / "out") == SPEC
    assert validate_log(tmp_path / "out").rows == 4


def test_csv_is_converted_in_slices_with_the_same_result_and_lines(tmp_path, spec_file,
                                                                   monkeypatch):
    lines = CSV_TEXT.splitlines()
    text = "\n".join([lines[0]] + lines[1:] * 5) + "\n"  # 20 rows
    src = write_csv(tmp_path, text)
    import_log(src, spec_file, tmp_path / "whole", user_column="userId", ts_column="time")
    monkeypatch.setattr(importer, "_CSV_PART_ROWS", 3)  # 7 slices
    import_log(src, spec_file, tmp_path / "sliced", user_column="userId", ts_column="time")
    assert read_log(tmp_path / "sliced").equals(read_log(tmp_path / "whole"))
    # A bad value in a later slice is named by its own line of the file.
    rows = text.splitlines()
    rows[19] = rows[19].replace(",0,c", ",cheap,c")  # line 20, in the 7th slice
    src = write_csv(tmp_path, "\n".join(rows) + "\n", "bad.csv")
    with pytest.raises(SourceFormatError, match="bad.csv, line 20, column 'price'"):
        import_log(src, spec_file, tmp_path / "bad", user_column="userId", ts_column="time")


def test_csv_with_instance_ids_and_other_delimiters(tmp_path, spec_file):
    text = ("iid;user_id;ts;click;item;cats;query;price\n"
            "10;1;5;true;1;1,2;0;1\n"
            "4;2;5;false;2;;0;1\n"
            "2;1;9;true;3;3;0;1\n")
    src = write_csv(tmp_path, text, "log.txt")
    import_log(src, spec_file, tmp_path / "out", instance_id_column="iid", csv_delimiter=";",
               list_delimiter=",")
    rows = read_log(tmp_path / "out").to_pylist()
    assert [(r["ts"], r["instance_id"]) for r in rows] == [(5, 4), (5, 10), (9, 2)]
    assert [r["cats"] for r in rows] == [[], [1, 2], [3]]
    assert [r["click"] for r in rows] == [0, 1, 1]


def test_rename_and_ts_unit(tmp_path, spec_file):
    text = ("u,t,clicked,item,cats,query,price\n"
            "1,5999,1,1,1,0,1\n"
            "1,1000,0,2,2,0,1\n")
    src = write_csv(tmp_path, text)
    import_log(src, spec_file, tmp_path / "out", user_column="u", ts_column="t",
               rename=["clicked=click"], ts_unit="ms")
    rows = read_log(tmp_path / "out").to_pylist()
    assert [r["ts"] for r in rows] == [1, 5]


def canonical_table(n: int, seed: int = 0, shuffle: bool = False) -> pa.Table:
    rng = np.random.default_rng(seed)
    ts = np.sort(rng.integers(0, 1000, n))
    cats = [list(rng.integers(0, 10, rng.integers(0, 4))) for _ in range(n)]
    t = pa.table({
        "instance_id": np.arange(n, dtype=np.int64) * 3,
        "user": rng.integers(0, 50, n).astype(np.int32),  # renamed and cast to int64
        "ts": ts.astype(np.float64),  # integral floats are accepted
        "click": rng.integers(0, 2, n).astype(bool),
        "item": rng.integers(0, 100, n).astype(np.int16),
        "cats": pa.array(cats, pa.list_(pa.int32())),
        "query": rng.integers(-10 ** 12, 10 ** 12, n),
        "price": rng.normal(size=n),
    })
    if shuffle:
        t = t.take(pa.array(rng.permutation(n)))
    return t


@pytest.mark.parametrize("shuffle", [False, True])
def test_parquet_directory(tmp_path, spec_file, shuffle):
    t = canonical_table(1000, shuffle=shuffle)
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(t.slice(0, 600), src / "a.parquet", row_group_size=128)
    pq.write_table(t.slice(600), src / "b.parquet", row_group_size=128)
    summary = import_log(src, spec_file, tmp_path / "out", user_column="user").log
    assert summary.rows == 1000 and summary.time_sorted
    out = read_log(tmp_path / "out")
    order = np.lexsort((t["instance_id"].to_numpy(), t["ts"].to_numpy()))
    expect = t.take(pa.array(order))
    np.testing.assert_array_equal(out["instance_id"].to_numpy(), expect["instance_id"].to_numpy())
    np.testing.assert_array_equal(out["user_id"].to_numpy(), expect["user"].to_numpy())
    assert out["cats"].to_pylist() == expect["cats"].to_pylist()
    np.testing.assert_array_equal(out["query"].to_numpy(), expect["query"].to_numpy())
    np.testing.assert_allclose(out["price"].to_numpy(),
                               expect["price"].to_numpy().astype(np.float32))
    np.testing.assert_array_equal(out["click"].to_numpy(), expect["click"].to_numpy())


def test_parquet_without_instance_ids(tmp_path, spec_file):
    t = canonical_table(300, shuffle=True).drop_columns(["instance_id"])
    pq.write_table(t, tmp_path / "src.parquet", row_group_size=64)
    import_log(tmp_path / "src.parquet", spec_file, tmp_path / "out", user_column="user")
    out = read_log(tmp_path / "out")
    np.testing.assert_array_equal(out["instance_id"].to_numpy(), np.arange(300))
    key = list(zip(out["ts"].to_pylist(), out["user_id"].to_pylist()))
    assert key == sorted(key)


def test_config_names_match_the_library(tmp_path, spec_file):
    src = write_csv(tmp_path, CSV_TEXT)
    cfg = parse_config(ImportConfig, ["--source", str(src), "--spec", str(spec_file), "--output",
                                      str(tmp_path / "out"), "--user_column", "userId",
                                      "--ts_column", "time", "--rename", "a=b", "c=d"])
    assert cfg.rename == ["a=b", "c=d"]
    cfg.rename = []
    assert run_import(**dataclasses.asdict(cfg)).log.rows == 4


# --------------------------------------------------------------------------- errors
def expect_error(tmp_path, spec_file, text, pattern, **kwargs):
    src = write_csv(tmp_path, text)
    kwargs = {"user_column": "userId", "ts_column": "time", **kwargs}
    with pytest.raises(SourceFormatError, match=pattern):
        import_log(src, spec_file, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


HEADER = "userId,time,click,item,cats,query,price\n"
GOOD = HEADER + "1,1,1,1,1,1,1\n"  # the header and a valid line 2
LIST = HEADER + "1,1,1,1,1|2,1,1\n"

# (case: source text, error pattern, import_log options); the bad value is on line 3
CSV_ERRORS = {
    "missing_column": ("userId,time,click,item,cats,price\n1,1,1,1,1,1\n",
                       r"log\.csv: missing column 'query' required by the feature spec", {}),
    "missing_user_column": (GOOD, r"missing column 'user_id'.*--user_column",
                            {"user_column": "user_id"}),
    "bad_id": (GOOD + "2,2,1,x9,1,1,1\n",
               r"log\.csv, line 3, column 'item': expected an integer id, got 'x9'", {}),
    "non_integral_id": (GOOD + "2,2,1,1.5,1,1,1\n",
                        r"line 3, column 'item': expected an integer id, got 1\.5", {}),
    "id_outside_vocabulary": (GOOD + "2,2,1,100,1,1,1\n",
                              r"line 3, column 'item': id 100 outside the vocabulary \[0, 100\)",
                              {}),
    "bad_list": (LIST + "2,2,1,1,3|b,1,1\n", r"line 3, column 'cats': expected integer ids "
                                               r"separated by '\|', got 'b' in '3\|b'", {}),
    "list_id_outside_vocabulary": (LIST + "2,2,1,1,3|12,1,1\n", r"line 3, column 'cats': id 12 "
                                                                 r"outside the vocabulary "
                                                                 r"\[0, 10\)", {}),
    "bad_label": (GOOD + "2,2,2,1,1,1,1\n", r"line 3, column 'click': label 2\.0 is not 0 or 1",
                  {}),
    "empty_value": (GOOD + "2,,1,1,1,1,1\n", r"line 3, column 'time': missing value \(empty, null "
                                             r"or NaN\), expected a timestamp", {}),
    "bad_dense": (GOOD + "2,2,1,1,1,1,cheap\n",
                  r"line 3, column 'price': expected a number, got 'cheap'", {}),
    "nan_dense": (GOOD + "2,2,1,1,1,1,nan\n",
                  r"line 3, column 'price': missing value \(empty, null or NaN\)", {}),
    "inf_dense": (GOOD + "2,2,1,1,1,1,inf\n",
                  r"line 3, column 'price': inf is not a finite float32", {}),
    "negative_ts": (GOOD + "2,-4,1,1,1,1,1\n", r"line 3, column 'time': negative timestamp -4", {}),
    "malformed_line": (GOOD + "2,2,1\n", r"line 3: malformed line: expected 7 fields", {}),
    "duplicate_instance_id": ("instance_id," + HEADER + "5,1,1,1,1,1,1,1\n5,2,2,1,1,1,1,1\n",
                              r"line 3, column 'instance_id': duplicate instance_id 5 \(first "
                              r"seen at log\.csv line 2\)", {}),
}


@pytest.mark.parametrize("case", list(CSV_ERRORS))
def test_error_csv(tmp_path, spec_file, case):
    text, pattern, kwargs = CSV_ERRORS[case]
    expect_error(tmp_path, spec_file, text, pattern, **kwargs)


def test_error_parquet_row(tmp_path, spec_file):
    t = canonical_table(200)
    item = t["item"].to_numpy().astype(np.int64)
    item[150] = 1000
    t = t.set_column(t.column_names.index("item"), "item", pa.array(item))
    pq.write_table(t, tmp_path / "src.parquet", row_group_size=64)
    with pytest.raises(SourceFormatError, match=r"src\.parquet, row 150, column 'item': id 1000 "
                                                r"outside the vocabulary"):
        import_log(tmp_path / "src.parquet", spec_file, tmp_path / "out", user_column="user")


def test_error_unknown_source_type_and_same_output(tmp_path, spec_file):
    (tmp_path / "log.json").write_text("{}")
    with pytest.raises(SourceFormatError, match="unrecognised source type"):
        import_log(tmp_path / "log.json", spec_file, tmp_path / "out")
    src = write_csv(tmp_path, CSV_TEXT)
    with pytest.raises(ValueError, match="must differ"):
        import_log(src, spec_file, src)
    with pytest.raises(ValueError, match="must not contain the source"):
        import_log(src, spec_file, tmp_path, overwrite=True)
    assert src.is_file()


def test_parquet_timestamp_and_dictionary_columns(tmp_path, spec_file):
    t = canonical_table(50)
    ts = t["ts"].to_numpy().astype(np.int64) * 1000 + 999  # milliseconds, floored to seconds
    t = t.set_column(t.column_names.index("ts"), "ts", pa.array(ts, pa.timestamp("ms")))
    item = pa.array(t["item"].to_numpy().astype(np.int64)).dictionary_encode()
    t = t.set_column(t.column_names.index("item"), "item", item)
    pq.write_table(t, tmp_path / "src.parquet")
    import_log(tmp_path / "src.parquet", spec_file, tmp_path / "out", user_column="user")
    out = read_log(tmp_path / "out")
    np.testing.assert_array_equal(out["ts"].to_numpy(), ts // 1000)
    np.testing.assert_array_equal(out["item"].to_numpy(), item.dictionary_decode().to_numpy())
