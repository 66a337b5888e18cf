"""Importing string and large ids (vocabularies, stable hashing) and missing values."""

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import read_log

from iat_torchrec.data.importer import SourceFormatError, import_log
from iat_torchrec.data.spec import DenseField, FeatureSpec, Missing, SparseField
from iat_torchrec.data.vocab import OOV, Vocabulary, load_vocabularies, stable_hash64

SPEC = FeatureSpec(
    sparse=[SparseField("product", 100, vocabulary=True),
            SparseField("category", 10, vocabulary=True, min_count=2),
            SparseField("tags", 10, vocabulary=True, multi_valued=True),
            SparseField("query", 50, hashed=True, missing=Missing.UNKNOWN)],
    dense=[DenseField("price", missing=Missing.MEAN, missing_indicator=True)],
    labels=["click"])

HEADER = "user,time,click,product,category,price,tags,query\n"
FIRST = (HEADER +
         "u_0021,2024-05-01T10:00:00,1,P-78,shoes,12.5,a|b,q1\n"
         "u_0003,2024-05-01T09:00:00,0,P-12,hats,,b,123\n"
         "u_0021,2024-05-02T10:00:00,0,P-78,shoes,7,,q1\n"
         "u_0100,2024-05-03T10:00:00,1,P-99,bags,3,c|a,\n")
LATER = (HEADER +
         "u_0555,2024-06-01T10:00:00,1,P-99,shoes,,z|a,q1\n"
         "u_0021,2024-06-02T10:00:00,0,P-78,hats,1,b,q2\n")


def imported(tmp_path, text, name, spec=SPEC, **kwargs):
    src = tmp_path / f"{name}.csv"
    src.write_text(text)
    report = import_log(src, spec, tmp_path / name, user_column="user", ts_column="time",
                        **kwargs)
    return report, read_log(tmp_path / name).to_pylist()


def test_string_ids_through_vocabularies(tmp_path):
    report, rows = imported(tmp_path, FIRST, "first")
    vocab, means = load_vocabularies(tmp_path / "first")
    # most frequent first, ties in key order; row 0 is the unknown id
    assert vocab["product"].keys.to_pylist() == [None, "P-78", "P-12", "P-99"]
    assert vocab["tags"].keys.to_pylist() == [None, "a", "b", "c"]
    assert vocab["category"].keys.to_pylist() == [None, "shoes"]  # hats, bags: below min_count
    assert vocab["category"].counts.tolist() == [2, 2]
    # user ids without an unknown row, in key order
    assert vocab["user_id"].keys.to_pylist() == ["u_0003", "u_0021", "u_0100"]
    assert [r["user_id"] for r in rows] == [0, 1, 1, 2]  # rows in time order
    assert [r["product"] for r in rows] == [2, 1, 1, 3]
    assert [r["category"] for r in rows] == [OOV, 1, 1, OOV]
    assert [r["tags"] for r in rows] == [[2], [1, 2], [], [3, 1]]
    assert report.unknown_ids == {"category": 2}
    assert report.vocabulary_sizes == {"user_id": 3, "product": 4, "category": 2, "tags": 4}
    spec = FeatureSpec.load(tmp_path / "first")
    assert [f.num_embeddings for f in spec.sparse] == [4, 2, 4, 50]
    assert spec.dense_names == ["price", "price_missing"]


def test_hashed_text_ids_are_stable(tmp_path):
    _, rows = imported(tmp_path, FIRST, "first")
    expected = int.from_bytes(hashlib.blake2b(b"q1", digest_size=8).digest(), "little",
                              signed=True)
    # integer text stays that integer, other text is BLAKE2b-64, missing is the empty key
    assert [r["query"] for r in rows] == [123, expected, expected,
                                          int(stable_hash64(pa.array([""]))[0])]
    # fixed values: the hash must never change between processes or versions
    assert stable_hash64(pa.array(["P-78", "u_0021"])).tolist() == [-5471164796046542966,
                                                                      5266427382732543543]


def test_missing_values_by_policy(tmp_path):
    report, rows = imported(tmp_path, FIRST, "first")
    mean = (12.5 + 7 + 3) / 3
    assert [r["price"] for r in rows] == pytest.approx([mean, 12.5, 7, 3])
    assert [r["price_missing"] for r in rows] == [1, 0, 0, 0]
    assert report.missing_filled == {"query": 1, "price": 1}
    assert load_vocabularies(tmp_path / "first")[1] == {"price": pytest.approx(mean)}
    constant = FeatureSpec(sparse=SPEC.sparse, labels=SPEC.labels,
                           dense=[DenseField("price", missing=Missing.CONSTANT, fill_value=-1)])
    _, rows = imported(tmp_path, FIRST, "constant", spec=constant)
    assert [r["price"] for r in rows] == [-1, 12.5, 7, 3]
    assert "price_missing" not in rows[0]


def test_training_window(tmp_path):
    # the first half of the rows in time order: P-99 and the price 3 come after it
    report, rows = imported(tmp_path, FIRST, "first", vocab_fraction=0.5)
    vocab, means = load_vocabularies(tmp_path / "first")
    assert vocab["product"].keys.to_pylist() == [None, "P-12", "P-78"]
    assert [r["product"] for r in rows] == [1, 2, 2, OOV]
    assert report.unknown_ids["product"] == 1  # P-99
    assert means == {"price": 12.5}


def test_later_import_reuses_the_vocabularies(tmp_path):
    _, first = imported(tmp_path, FIRST, "first")
    report, later = imported(tmp_path, LATER, "later", vocab_from=str(tmp_path / "first"))
    assert [r["product"] for r in later] == [3, 1]  # P-99, P-78: their rows of the first import
    assert [r["category"] for r in later] == [1, OOV]
    assert [r["tags"] for r in later] == [[OOV, 1], [2]]  # z was never seen
    assert [r["price"] for r in later] == pytest.approx([first[0]["price"], 1])  # first's mean
    # known users keep their ids, new ones are appended
    assert [r["user_id"] for r in later] == [3, 1]
    assert report.unknown_ids == {"category": 1, "tags": 1}
    vocab, _ = load_vocabularies(tmp_path / "later")
    assert vocab["user_id"].keys.to_pylist() == ["u_0003", "u_0021", "u_0100", "u_0555"]
    assert vocab["product"].keys.equals(load_vocabularies(tmp_path / "first")[0]["product"].keys)


def test_parquet_with_text_and_large_ids(tmp_path):
    big = [2 ** 62, -(2 ** 62), 2 ** 62, 7]
    t = pa.table({"user_id": ["a", "b", "a", "c"], "ts": [1, 2, 3, 4], "click": [0, 1, 0, 1],
                  "product": pa.array(big, pa.int64()),
                  "tags": pa.array([["x"], [], ["y", "x"], None], pa.list_(pa.string())),
                  "query": ["q", "5", "q", "q"], "price": [1.0, np.nan, 2.0, 3.0]})
    spec = FeatureSpec(sparse=[SparseField("product", 10, vocabulary=True),
                               SparseField("tags", 10, vocabulary=True, multi_valued=True),
                               SparseField("query", 8, hashed=True)],
                       dense=[DenseField("price", missing=Missing.MEAN)], labels=["click"])
    pq.write_table(t, tmp_path / "src.parquet", row_group_size=2)
    import_log(tmp_path / "src.parquet", spec, tmp_path / "out")
    out = read_log(tmp_path / "out").to_pylist()
    assert [r["product"] for r in out] == [1, 2, 1, 3]  # 2**62 twice; "-4611..." < "7"
    assert [r["tags"] for r in out] == [[1], [], [2, 1], []]
    assert [r["user_id"] for r in out] == [0, 1, 0, 2]
    assert out[1]["query"] == 5 and out[1]["price"] == 2.0


def test_missing_without_policy_is_an_error(tmp_path):
    spec = FeatureSpec(sparse=[SparseField("product", 10, vocabulary=True)],
                       dense=[DenseField("price")], labels=["click"])
    with pytest.raises(SourceFormatError, match=r"first\.csv, line 3, column 'price': missing "
                                                r"value .*declare \"missing\": \"mean\""):
        imported(tmp_path, FIRST, "first", spec=spec)
    text = FIRST.replace("P-99", "")
    with pytest.raises(SourceFormatError, match=r"line 5, column 'product': missing value .*"
                                                r"\"unknown\""):
        imported(tmp_path, text, "first", spec=FeatureSpec(
            sparse=spec.sparse, dense=[DenseField("price", missing=Missing.MEAN)],
            labels=["click"]))
    assert not (tmp_path / "first").exists()


def test_vocabulary_round_trip(tmp_path):
    v = Vocabulary.build(pa.table({"key": ["b", "a", "c"], "count": [3, 3, 1]}), max_size=3)
    assert v.keys.to_pylist() == [None, "a", "b"] and v.counts.tolist() == [1, 3, 3]
    v.save(tmp_path / "v.parquet")
    back = Vocabulary.load(tmp_path / "v.parquet")
    ids, unseen = back.lookup(pa.array(["b", "c", "a"]))
    assert ids.tolist() == [2, OOV, 1] and unseen.tolist() == [False, True, False]
