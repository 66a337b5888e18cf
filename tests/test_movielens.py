"""MovieLens importer: ml-latest-small on disk, and small fixtures of the classic formats."""

import json
import warnings
from pathlib import Path
from typing import Dict, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from iat_torchrec.data.log import validate_log
from iat_torchrec.data.movielens import (
    LOG_BUCKET_VOCAB,
    VOCAB_FILE_NAME,
    MovieLensError,
    build_movielens,
    detect_format,
    import_movielens,
    log_bucket,
)
from conftest import ML_LATEST_SMALL as ML_SMALL
from conftest import read_log
from iat_torchrec.data.spec import FeatureGroup, FeatureSpec


# --------------------------------------------------------------------------- ml-latest-small
# (the ml_small_log fixture, imported once per session, is in conftest.py)
def test_ml_latest_small_counts_and_label_rate(ml_small_log):
    out, summary = ml_small_log
    ratings = pacsv.read_csv(ML_SMALL / "ratings.csv")
    expected_rate = float((ratings["rating"].to_numpy() >= 4).mean())
    assert summary.rows == 100_004 == ratings.num_rows
    assert summary.users == 671
    assert summary.label_rates["click"] == pytest.approx(expected_rate, abs=1e-12)
    assert expected_rate == pytest.approx(0.5157, abs=5e-5)
    assert summary.time_sorted
    # validate again from disk, with the spec saved beside the data
    again = validate_log(out)
    assert again.rows == summary.rows
    spec = FeatureSpec.load(out)
    assert spec.labels == ("click",) and spec.label_delay_s == 0
    assert {"user", "movie", "genres", "tags", "year", "hour", "weekday", "gap_bucket",
            "count_bucket"} <= set(spec.sparse_names)
    for f in spec.sparse:
        assert f.embedding_dim == 16
        assert f.name not in {"items", "keys", "values", "instance_id", "user_id", "ts"}
    assert spec.field("genres").multi_valued and spec.field("tags").multi_valued
    assert spec.field("tags").group is FeatureGroup.CROSS
    assert spec.field("movie").num_embeddings == 9125 + 1


def test_ml_latest_small_licence_and_vocab(ml_small_log):
    out, _ = ml_small_log
    assert (out / "README.txt").read_bytes() == (ML_SMALL / "README.txt").read_bytes()
    vocab = json.loads((out / VOCAB_FILE_NAME).read_text())
    assert vocab["format"] == ["csv"]
    assert vocab["movie"] == sorted(vocab["movie"]) and len(vocab["movie"]) == 9125
    assert vocab["genres"] == sorted(vocab["genres"])
    assert "(no genres listed)" not in vocab["genres"]
    assert vocab["tags"] == sorted(vocab["tags"])


def test_ml_latest_small_rows_match_source(ml_small_log):
    out, _ = ml_small_log
    t = read_log(out)
    r = pacsv.read_csv(ML_SMALL / "ratings.csv")
    u, m, ts = (r[c].to_numpy() for c in ("userId", "movieId", "timestamp"))
    order = np.lexsort((m, u, ts))
    np.testing.assert_array_equal(t["instance_id"].to_numpy(), np.arange(r.num_rows))
    np.testing.assert_array_equal(t["user_id"].to_numpy(), u[order])
    np.testing.assert_array_equal(t["user"].to_numpy(), u[order])
    np.testing.assert_array_equal(t["ts"].to_numpy(), ts[order])
    np.testing.assert_array_equal(t["click"].to_numpy(),
                                  (r["rating"].to_numpy()[order] >= 4).astype(np.int8))
    vocab = json.loads((out / VOCAB_FILE_NAME).read_text())
    np.testing.assert_array_equal(np.array(vocab["movie"])[t["movie"].to_numpy() - 1], m[order])
    # hour / weekday in UTC
    import datetime as dt
    for i in (0, 5000, 99_999):
        d = dt.datetime.fromtimestamp(int(ts[order][i]), tz=dt.timezone.utc)
        assert t["hour"][i].as_py() == d.hour and t["weekday"][i].as_py() == d.weekday()


def test_ml_latest_small_tags_never_from_the_future(ml_small_log):
    out, _ = ml_small_log
    t = read_log(out)
    tags = pacsv.read_csv(ML_SMALL / "tags.csv")
    vocab = json.loads((out / VOCAB_FILE_NAME).read_text())["tags"]
    by_pair = {}
    for u, m, tag, ts in zip(*(tags[c].to_pylist() for c in ("userId", "movieId", "tag",
                                                             "timestamp"))):
        by_pair.setdefault((u, m), []).append((ts, tag.strip().lower()))
    movie_vocab = json.loads((out / VOCAB_FILE_NAME).read_text())["movie"]
    have = t.filter(pa.compute.greater(pa.compute.list_value_length(t["tags"]), 0))
    assert have.num_rows > 0
    for row in have.to_pylist():
        pair = (row["user_id"], movie_vocab[row["movie"] - 1])
        expect = sorted(tag for ts, tag in by_pair[pair] if ts <= row["ts"])
        assert sorted(vocab[i - 1] for i in row["tags"]) == expect
    # and every rating whose pair has an earlier-or-equal tag got it
    n_expected = 0
    for row in t.select(["user_id", "movie", "ts"]).to_pylist():
        pair = (row["user_id"], movie_vocab[row["movie"] - 1])
        if any(ts <= row["ts"] for ts, _ in by_pair.get(pair, ())):
            n_expected += 1
    assert have.num_rows == n_expected


def test_log_bucket():
    np.testing.assert_array_equal(log_bucket(np.array([0, 1, 2, 3, 4, 8, 2 ** 60])),
                                  [1, 2, 4, 5, 6, 8, LOG_BUCKET_VOCAB - 1])


# --------------------------------------------------------------------------- csv fixture
def write(path: Path, text: str, encoding: str = "utf8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def source_dir(d: Path, files: Dict[str, str], latin1: Sequence[str] = ()) -> Path:
    """A new MovieLens source directory ``d`` of ``files`` (name: text), the ``latin1`` ones
    encoded as latin-1 and the others as utf8."""
    d.mkdir()
    for name, text in files.items():
        write(d / name, text, "latin-1" if name in latin1 else "utf8")
    return d


@pytest.fixture
def csv_dir(tmp_path):
    return source_dir(tmp_path / "csv", {
        "ratings.csv": "userId,movieId,rating,timestamp\n"
                       "1,10,4.0,1000\n"
                       "1,20,3.5,1000\n"
                       "2,10,5.0,500\n"
                       "1,30,4.5,5000\n"
                       "2,30,1.0,90000\n",
        "movies.csv": "movieId,title,genres\n"
                      "30,\"Thing, The (1982)\",Horror|Sci-Fi\n"
                      "10,Toy Story (1995),Animation|Comedy\n"
                      "20,Stranger Things,(no genres listed)\n",
        "tags.csv": "userId,movieId,tag,timestamp\n"
                    "1,10,Pixar,900\n"
                    "1,10,fun,2000\n"
                    "2,30,Creepy ,80000\n"
                    "2,30,creepy,95000\n",
        "README.txt": "licence text\n"})


def test_csv_fixture(csv_dir, tmp_path):
    summary = import_movielens(csv_dir, tmp_path / "out")
    assert detect_format(csv_dir) == "csv"
    assert summary.rows == 5 and summary.users == 2
    t = read_log(tmp_path / "out").to_pylist()
    # order by (ts, user, movie)
    assert [(r["ts"], r["user_id"]) for r in t] == [(500, 2), (1000, 1), (1000, 1), (5000, 1),
                                                   (90000, 2)]
    assert [r["instance_id"] for r in t] == list(range(5))
    assert [r["click"] for r in t] == [1, 1, 0, 1, 0]
    # movies sorted by id: 10 -> 1, 20 -> 2, 30 -> 3
    assert [r["movie"] for r in t] == [1, 1, 2, 3, 3]
    # genres sorted: Animation 1, Comedy 2, Horror 3, Sci-Fi 4
    assert [r["genres"] for r in t] == [[1, 2], [1, 2], [], [3, 4], [3, 4]]
    # years: 1982 -> 1, 1995 -> 2, none -> 0
    assert [r["year"] for r in t] == [2, 2, 0, 1, 1]
    # tags: vocabulary creepy 1, fun 2, pixar 3; only tags with ts <= the rating's ts
    assert [r["tags"] for r in t] == [[], [3], [], [], [1]]
    # counts of strictly earlier ratings: user 2: 0, 1; user 1: 0, 0 (tie), 2
    assert [r["count_bucket"] for r in t] == [1, 1, 1, 4, 2]
    assert [r["gap_bucket"] for r in t] == [1, 1, 1, int(log_bucket(np.array([4000]))[0]),
                                            int(log_bucket(np.array([89500]))[0])]
    spec = FeatureSpec.load(tmp_path / "out")
    assert "gender" not in spec.sparse_names  # the csv format has no user attributes
    assert spec.field("tags").num_embeddings == 4
    assert (tmp_path / "out" / "README.txt").read_text() == "licence text\n"


def test_csv_without_tags(csv_dir, tmp_path):
    (csv_dir / "tags.csv").unlink()
    summary = import_movielens(csv_dir, tmp_path / "out")
    assert summary.rows == 5
    assert "tags" not in FeatureSpec.load(tmp_path / "out").sparse_names


def test_the_peer_fields_only(csv_dir, tmp_path):
    """fields ["peer"]: the peer library's P1 fields the source has, same rows and values."""
    full = read_log(import_movielens(csv_dir, tmp_path / "all") and tmp_path / "all")
    import_movielens(csv_dir, tmp_path / "peer", fields=["peer"])
    spec = FeatureSpec.load(tmp_path / "peer")
    assert spec.sparse_names == ["user", "movie", "genres", "year", "hour", "weekday"]
    peer = read_log(tmp_path / "peer")
    for name in ["instance_id", "click", *spec.sparse_names]:
        assert peer.column(name).to_pylist() == full.column(name).to_pylist()
    assert "tags" not in peer.column_names and "count_bucket" not in peer.column_names
    with pytest.raises(ValueError, match=r"fields \['gender'\] are not MovieLens fields"):
        import_movielens(csv_dir, tmp_path / "bad", fields=["user", "gender"])
    assert not (tmp_path / "bad").exists()


def test_unrecognised_directory(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "junk.txt").write_text("x")
    with pytest.raises(MovieLensError, match="no recognised MovieLens format.*junk.txt"):
        import_movielens(tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(MovieLensError, match="not found"):
        import_movielens(tmp_path / "nothing", tmp_path / "out2")


def test_output_exists_and_overwrite(csv_dir, tmp_path):
    import_movielens(csv_dir, tmp_path / "out")
    with pytest.raises(FileExistsError):
        import_movielens(csv_dir, tmp_path / "out")
    assert import_movielens(csv_dir, tmp_path / "out", overwrite=True).rows == 5
    with pytest.raises(ValueError, match="inside the source"):
        import_movielens(csv_dir, csv_dir / "out")


# --------------------------------------------------------------------------- genre domains
@pytest.fixture
def genre_dir(tmp_path):
    """Users 1 (both domains), 2 (action only) and 3 (other only)."""
    return source_dir(tmp_path / "genres", {
        "ratings.csv": "userId,movieId,rating,timestamp\n"
                       "1,1,4.0,100\n"
                       "1,2,3.0,200\n"
                       "1,3,5.0,300\n"
                       "2,1,2.0,150\n"
                       "3,4,4.0,250\n"
                       "3,5,1.0,260\n"
                       "1,99,4.0,400\n",
        "movies.csv": "movieId,title,genres\n"
                      "1,Die Hard (1988),Action|Thriller\n"
                      "2,Toy Story (1995),Animation|Children|Comedy\n"
                      "3,Shaun of the Dead (2004),Comedy|Horror\n"
                      "4,Untitled,(no genres listed)\n"
                      "5,Big Screen (2010),IMAX\n",
        "tags.csv": "userId,movieId,tag,timestamp\n1,1,classic,50\n1,2,cute,50\n",
        "README.txt": "licence text\n"})


@pytest.mark.filterwarnings("ignore:.*ratings of movies missing")
def test_domains_partition_the_ratings(genre_dir, tmp_path):
    """action: any genre of the group (Comedy|Horror too); other: the rest, no genres and
    movies missing from the catalogue included; same vocabularies and spec as the whole."""
    import_movielens(genre_dir, tmp_path / "all")
    full = read_log(tmp_path / "all")
    logs = {}
    for domain in ("action", "other"):
        import_movielens(genre_dir, tmp_path / domain, domain=domain)
        logs[domain] = read_log(tmp_path / domain)
        assert FeatureSpec.load(tmp_path / domain) == FeatureSpec.load(tmp_path / "all")
        assert ((tmp_path / domain / VOCAB_FILE_NAME).read_bytes()
                == (tmp_path / "all" / VOCAB_FILE_NAME).read_bytes())
        assert json.loads((tmp_path / domain / "provenance.json").read_text())["domain"] == domain
        assert (tmp_path / domain / "README.txt").read_text() == "licence text\n"
        assert logs[domain]["instance_id"].to_pylist() == list(range(logs[domain].num_rows))
    assert "domain" not in json.loads((tmp_path / "all" / "provenance.json").read_text())

    def rows(t):
        return list(zip(*(t[c].to_pylist() for c in ("ts", "user_id", "movie"))))

    # movies by id: 1 -> 1, ..., 5 -> 5; 99 is missing (0)
    assert rows(logs["action"]) == [(100, 1, 1), (150, 2, 1), (300, 1, 3)]
    assert rows(logs["other"]) == [(200, 1, 2), (250, 3, 4), (260, 3, 5), (400, 1, 0)]
    assert sorted(rows(logs["action"]) + rows(logs["other"])) == rows(full)
    # users shared: 1 in both, 2 action only, 3 other only
    users = {d: set(t["user_id"].to_pylist()) for d, t in logs.items()}
    assert users["action"] & users["other"] == {1}
    assert users["action"] | users["other"] == set(full["user_id"].to_pylist())
    # history features count the domain's own ratings only
    assert logs["action"]["count_bucket"].to_pylist() == [1, 1, 2]
    assert logs["action"]["gap_bucket"].to_pylist() == [1, 1, int(log_bucket(np.array([200]))[0])]
    assert full.filter(pa.compute.equal(full["ts"], 300))["count_bucket"].to_pylist() == [4]
    # tags (classic 1, cute 2) attach to the domain's ratings only
    assert logs["action"]["tags"].to_pylist() == [[1], [], []]
    assert logs["other"]["tags"].to_pylist() == [[2], [], [], []]


def test_bad_domain(genre_dir, tmp_path):
    with pytest.raises(ValueError, match=r"^domain 'comedy': expected one of "
                                         r"\('', 'action', 'other'\)$"):
        import_movielens(genre_dir, tmp_path / "out", domain="comedy")
    write(genre_dir / "ratings.csv", "userId,movieId,rating,timestamp\n1,2,3.0,200\n")
    with pytest.raises(MovieLensError, match=r"ratings\.csv: no ratings in domain 'action'"):
        import_movielens(genre_dir, tmp_path / "out", domain="action")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- ml-100k fixture
def _flags(*on):
    return "|".join("1" if i in on else "0" for i in range(19))


@pytest.fixture
def ml100k_dir(tmp_path):
    return source_dir(tmp_path / "ml-100k", {
        "u.data": "1\t10\t4\t100\n"
                  "1\t20\t3\t200\n"
                  "2\t10\t5\t150\n"
                  "2\t30\t2\t150\n"
                  "1\t30\t5\t300\n"
                  "3\t99\t4\t50\n",
        "u.item": f"10|Toy Story (1995)|01-Jan-1995||http://x|{_flags(3, 4, 5)}\n"
                  f"20|Caf\u00e9 Society|01-Jan-1980||http://x|{_flags(1)}\n"
                  f"30|unknown||||{_flags(0)}\n",
        "u.user": "1|24|M|technician|85711\n"
                  "2|53|F|other|94043\n",
        "README": "ml-100k readme\n"}, latin1=["u.item"])


def test_ml100k_fixture(ml100k_dir, tmp_path):
    assert detect_format(ml100k_dir) == "ml-100k"
    with pytest.warns(UserWarning, match="1 ratings of movies missing"):
        summary = import_movielens(ml100k_dir, tmp_path / "out")
    assert summary.rows == 6 and summary.users == 3
    t = read_log(tmp_path / "out").to_pylist()
    assert [(r["ts"], r["user_id"]) for r in t] == [(50, 3), (100, 1), (150, 2), (150, 2),
                                                   (200, 1), (300, 1)]
    assert [r["click"] for r in t] == [1, 1, 1, 0, 0, 1]
    assert [r["movie"] for r in t] == [0, 1, 1, 3, 2, 3]
    # genres: Action 1, Animation 2, Children's 3, Comedy 4; "unknown" -> none
    assert [r["genres"] for r in t] == [[], [2, 3, 4], [2, 3, 4], [], [1], []]
    # years: 1980 (release date) -> 1, 1995 -> 2; unknown -> 0
    assert [r["year"] for r in t] == [0, 2, 2, 0, 1, 0]
    # age 24 -> group 18 (id 2), 53 -> group 50 (id 6); user 3 unknown
    assert [r["age"] for r in t] == [0, 2, 6, 6, 2, 2]
    assert [r["gender"] for r in t] == [0, 2, 1, 1, 2, 2]  # F 1, M 2
    assert [r["occupation"] for r in t] == [0, 2, 1, 1, 2, 2]  # other 1, technician 2
    assert [r["zip_prefix"] for r in t] == [0, 1, 2, 2, 1, 1]  # 857 1, 940 2
    spec = FeatureSpec.load(tmp_path / "out")
    assert "tags" not in spec.sparse_names
    for name in ("gender", "age", "occupation", "zip_prefix"):
        assert spec.field(name).group is FeatureGroup.USER
    assert (tmp_path / "out" / "README").read_text() == "ml-100k readme\n"
    vocab = json.loads((tmp_path / "out" / VOCAB_FILE_NAME).read_text())
    assert vocab["genres"] == ["Action", "Animation", "Children's", "Comedy"]


# --------------------------------------------------------------------------- ml-1m fixture
@pytest.fixture
def ml1m_dir(tmp_path):
    return source_dir(tmp_path / "ml-1m", {
        "ratings.dat": "1::1193::5::978300760\n"
                       "1::1::3::978302109\n"
                       "2::1193::4::978300760\n"
                       "2::2::1::978299000\n",
        "movies.dat": "1::Toy Story (1995)::Animation|Children's|Comedy\n"
                      "2::Caf\u00e9: \"Quoted\" (2000)::Drama\n"
                      "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n",
        "users.dat": "1::F::1::10::48067\n"
                     "2::M::56::16::70072-1234\n",
        "README": "ml-1m readme\n"}, latin1=["movies.dat"])


def test_ml1m_fixture(ml1m_dir, tmp_path):
    assert detect_format(ml1m_dir) == "ml-1m"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = import_movielens(ml1m_dir, tmp_path / "out")
    assert summary.rows == 4 and summary.users == 2
    t = read_log(tmp_path / "out").to_pylist()
    assert [(r["ts"], r["user_id"]) for r in t] == [(978299000, 2), (978300760, 1),
                                                   (978300760, 2), (978302109, 1)]
    assert [r["movie"] for r in t] == [2, 3, 3, 1]
    assert [r["click"] for r in t] == [0, 1, 1, 0]
    # genres: Animation 1, Children's 2, Comedy 3, Drama 4
    assert [r["genres"] for r in t] == [[4], [4], [4], [1, 2, 3]]
    # years 1975 -> 1, 1995 -> 2, 2000 -> 3
    assert [r["year"] for r in t] == [3, 1, 1, 2]
    assert [r["age"] for r in t] == [7, 1, 7, 1]  # code 56 -> 7, code 1 -> 1
    assert [r["gender"] for r in t] == [2, 1, 2, 1]
    assert [r["occupation"] for r in t] == [2, 1, 2, 1]  # codes 10 -> 1, 16 -> 2
    assert [r["zip_prefix"] for r in t] == [2, 1, 2, 1]  # 480 -> 1, 700 -> 2
    vocab = json.loads((tmp_path / "out" / VOCAB_FILE_NAME).read_text())
    assert vocab["zip_prefix"] == ["480", "700"] and vocab["occupation"] == [10, 16]
    assert (tmp_path / "out" / "README").read_text() == "ml-1m readme\n"
    assert validate_log(tmp_path / "out").rows == 4


def test_ml1m_without_users_file(ml1m_dir, tmp_path):
    (ml1m_dir / "users.dat").unlink()
    import_movielens(ml1m_dir, tmp_path / "out")
    assert "gender" not in FeatureSpec.load(tmp_path / "out").sparse_names


# --------------------------------------------------------------------------- bad files
# (case: fixture directory, file rewritten, its text, the error it must raise); nothing is written
BAD_FILES = {
    "csv_missing_column": ("csv_dir", "ratings.csv", "userId,movieId,timestamp\n1,10,1000\n",
                           r"ratings\.csv, line 1: missing column.*'rating'"),
    "csv_malformed_line": ("csv_dir", "ratings.csv",
                           "userId,movieId,rating,timestamp\n1,10,4,1000\n2,20\n",
                           r"ratings\.csv, line 3: malformed line: expected 4 fields separated "
                           r"by ',', got 2"),
    "csv_bad_value": ("csv_dir", "ratings.csv",
                      "userId,movieId,rating,timestamp\n1,10,4,1000\n2,x7,4,5\n",
                      r"ratings\.csv, line 3, column 'movieId': expected an integer, got 'x7'"),
    "ml100k_bad_value_names_line_and_column": (
        "ml100k_dir", "u.data", "1\t10\t4\t100\n1\t20\tfour\t200\n",
        r"u\.data, line 2, column 'rating': expected a number, got 'four'"),
    "ml100k_malformed_item_line": (
        "ml100k_dir", "u.item",
        f"10|Toy Story (1995)|01-Jan-1995||http://x|{_flags(3)}\n20|Broken|line\n",
        r"u\.item, line 2: malformed line: expected 24 fields separated by '\|', got 3"),
    "ml1m_malformed_line": (
        "ml1m_dir", "ratings.dat", "1::1193::5::978300760\n1::1::3\n",
        r"ratings\.dat, line 2: malformed line: expected 4 fields separated by '::', got 3: "
        r"'1::1::3'"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file(request, tmp_path, case):
    fixture, name, text, pattern = BAD_FILES[case]
    source = request.getfixturevalue(fixture)
    write(source / name, text)
    with pytest.raises(MovieLensError, match=pattern):
        import_movielens(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_ml1m_missing_catalogue(ml1m_dir, tmp_path):
    (ml1m_dir / "movies.dat").unlink()
    with pytest.raises(MovieLensError, match=r"movies\.dat: movie catalogue not found"):
        import_movielens(ml1m_dir, tmp_path / "out")


def test_duplicate_movie_in_catalogue(ml1m_dir, tmp_path):
    write(ml1m_dir / "movies.dat", "1::A (1995)::Drama\n2::B (1996)::Drama\n1::C (1997)::Drama\n"
                                   "1193::D (1975)::Drama\n")
    with pytest.raises(MovieLensError, match=r"movies\.dat, line 3, column 'movieId': movieId 1 "
                                             "appears twice"):
        build_movielens(ml1m_dir)
