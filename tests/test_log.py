"""Instance-log writing, the feature spec, and every validation error."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import tiny_columns, tiny_spec
from iat_torchrec.atomic import OutputExistsError
from iat_torchrec.data.log import InstanceLogError, arrow_schema, validate_log, write_log
from iat_torchrec.data.spec import FeatureSpec, SparseField, SpecError, spec_path


def _write_raw(path, columns, spec=None):
    """Write a Parquet file exactly as given (no casting), plus the spec beside it."""
    pq.write_table(pa.table(columns), path, row_group_size=100)
    (spec or tiny_spec()).save(spec_path(path))
    return path


def test_round_trip_counts_ids_values(tmp_path, spec, columns):
    out = write_log(pa.table(columns), tmp_path / "log", spec, rows_per_file=120,
                    row_group_size=50)
    files = sorted(out.glob("*.parquet"))
    assert len(files) == 5
    summary = validate_log(out)
    assert summary.rows == 500 and summary.files == 5
    assert summary.users == len(np.unique(columns["user_id"]))
    assert summary.time_sorted
    assert summary.label_rates["click"] == pytest.approx(columns["click"].mean())
    back = pa.concat_tables(pq.read_table(f) for f in files)
    assert back.schema == arrow_schema(spec)
    np.testing.assert_array_equal(back["instance_id"].to_numpy(), columns["instance_id"])
    np.testing.assert_array_equal(back["price"].to_numpy(), columns["price"])
    assert back["tags"].to_pylist() == columns["tags"].to_pylist()
    assert FeatureSpec.load(out) == spec
    assert "instances 500" in summary.format()


def test_write_refuses_existing_output_and_leaves_it(tmp_path, spec, columns):
    out = write_log(pa.table(columns), tmp_path / "log", spec)
    before = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    with pytest.raises(OutputExistsError, match="already exists"):
        write_log(pa.table(columns), out, spec)
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == before


def test_interrupted_write_leaves_nothing(tmp_path, spec, columns):
    def tables():
        yield pa.table(columns)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_log(tables(), tmp_path / "log", spec)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mutate, column, row, message", [
    (lambda c: c.pop("buy"), "buy", None, "missing column"),
    (lambda c: c.__setitem__("user_id", c["user_id"].astype(np.int32)), "user_id", None,
     "wrong type: expected int64, got int32"),
    (lambda c: c.__setitem__("price", c["price"].astype(np.float64)), "price", None,
     "wrong type: expected float32, got double"),
    (lambda c: c.__setitem__("item", c["item"].astype(str)), "item", None,
     "wrong type: expected int64"),
    (lambda c: c["instance_id"].__setitem__(321, c["instance_id"][7]), "instance_id", 321,
     "duplicate instance_id"),
    (lambda c: c["ts"].__setitem__(42, -5), "ts", 42, "negative timestamp -5"),
    (lambda c: c.__setitem__("ts", np.where(np.arange(500) == 17, np.nan, c["ts"])), "ts", 17,
     "NaN"),
    (lambda c: c["click"].__setitem__(250, 2), "click", 250, "label 2 is not in {0, 1}"),
    (lambda c: c.__setitem__("buy", np.where(np.arange(500) == 9, np.nan, 0.0)), "buy", 9,
     "label"),
    (lambda c: c["price"].__setitem__(111, np.nan), "price", 111, "not finite"),
    (lambda c: c["age"].__setitem__(3, np.inf), "age", 3, "not finite"),
    (lambda c: c["item"].__setitem__(77, 50), "item", 77, "outside the vocabulary [0, 50)"),
    (lambda c: c["device"].__setitem__(5, -1), "device", 5, "outside the vocabulary"),
])
def test_validation_errors_name_file_column_row(tmp_path, mutate, column, row, message):
    columns = tiny_columns()
    mutate(columns)
    path = _write_raw(tmp_path / "bad.parquet", columns)
    with pytest.raises(InstanceLogError) as e:
        validate_log(path)
    text = str(e.value)
    assert str(path) in text and f"column {column!r}" in text and message in text
    if row is not None:
        assert f"row {row}:" in text and e.value.row == row


def test_out_of_vocabulary_in_multi_valued_field_names_its_row(tmp_path):
    columns = tiny_columns()
    tags = columns["tags"].to_pylist()
    row = next(i for i, t in enumerate(tags) if t)
    tags[row] = [1, 99]
    columns["tags"] = pa.array(tags, pa.list_(pa.int64()))
    path = _write_raw(tmp_path / "bad.parquet", columns)
    with pytest.raises(InstanceLogError, match=rf"column 'tags', row {row}: id 99 outside"):
        validate_log(path)


def test_hashed_fields_accept_any_id(tmp_path, spec, columns):
    assert validate_log(write_log(pa.table(columns), tmp_path / "log", spec)).rows == 500
    assert columns["cross"].max() > spec.field("cross").num_embeddings


def test_duplicate_across_files_names_both(tmp_path, spec, columns):
    columns["instance_id"][400] = columns["instance_id"][10]
    out = write_log(pa.table(columns), tmp_path / "log", spec, rows_per_file=200)
    with pytest.raises(InstanceLogError, match=r"part-00002.parquet, column 'instance_id', "
                                               r"row 0: duplicate instance_id .* part-00000"):
        validate_log(out)


def test_empty_inputs(tmp_path, spec, columns):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InstanceLogError, match="empty input: no .parquet files"):
        validate_log(tmp_path / "empty", spec)
    empty = {k: (v[:0] if not isinstance(v, pa.Array) else v.slice(0, 0))
             for k, v in columns.items()}
    pq.write_table(pa.table(empty).cast(arrow_schema(spec)), tmp_path / "zero.parquet")
    with pytest.raises(InstanceLogError, match="empty input: the log has no rows"):
        validate_log(tmp_path / "zero.parquet", spec)
    with pytest.raises(InstanceLogError, match="not found"):
        validate_log(tmp_path / "nowhere", spec)


def test_corrupted_parquet(tmp_path, spec, columns):
    out = write_log(pa.table(columns), tmp_path / "log", spec)
    part = next(out.glob("*.parquet"))
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2])
    with pytest.raises(InstanceLogError, match="unreadable or corrupted Parquet"):
        validate_log(out)
    part.write_bytes(b"this is not parquet at all")
    with pytest.raises(InstanceLogError, match="unreadable or corrupted Parquet"):
        validate_log(out)


def test_spec_that_does_not_match_the_data(tmp_path, spec, columns):
    columns["rating"] = np.ones(500, dtype=np.float32)
    path = _write_raw(tmp_path / "extra.parquet", columns)
    with pytest.raises(SpecError, match=r"columns \['rating'\] are not described by the spec"):
        validate_log(path)
    single = dataclasses.replace(spec, sparse=[dataclasses.replace(f, multi_valued=False)
                                               if f.name == "tags" else f for f in spec.sparse])
    path = _write_raw(tmp_path / "lists.parquet", tiny_columns(), spec=single)
    with pytest.raises(SpecError, match="'tags' holds lists but the spec declares it single"):
        validate_log(path)


def test_validation_reads_only(tmp_path, spec, columns):
    columns["ts"][3] = -1
    path = _write_raw(tmp_path / "bad.parquet", columns)
    before = path.read_bytes()
    with pytest.raises(InstanceLogError):
        validate_log(path)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == [
        "bad.parquet", "bad.spec.json"]


@pytest.mark.parametrize("change, message", [
    (dict(labels=[]), "at least one label"),
    (dict(label_delay_s=-1), "label_delay_s must be >= 0"),
    (dict(sparse=[SparseField("item", 10, 6)]), "multiple of 4"),
    (dict(sparse=[SparseField("items", 10, 8)]), "clashes with a torch ModuleDict"),
    (dict(sparse=[SparseField("keys", 10, 8)]), "clashes with a torch ModuleDict"),
    (dict(sparse=[SparseField("item", 0, 8)]), "num_embeddings must be > 0"),
    (dict(sparse=[SparseField("ts", 10, 8)]), "named twice"),
    (dict(sparse=[SparseField("a", 10, 8), SparseField("a", 10, 8)]), "named twice"),
])
def test_malformed_specs(spec, change, message):
    with pytest.raises(SpecError, match=message):
        dataclasses.replace(spec, **change)


def test_spec_file_round_trip_and_errors(tmp_path, spec):
    spec.save(tmp_path / "s.json")
    assert FeatureSpec.load(tmp_path / "s.json") == spec
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SpecError, match="bad.json: unreadable feature spec"):
        FeatureSpec.load(tmp_path / "bad.json")
    (tmp_path / "old.json").write_text('{"format_version": 99, "labels": ["y"]}')
    with pytest.raises(SpecError, match="format_version 99 is not supported"):
        FeatureSpec.load(tmp_path / "old.json")
    with pytest.raises(SpecError, match="feature spec not found"):
        FeatureSpec.load(tmp_path / "missing")
