"""MovieLens -> instance log (one instance per rating) with its feature spec.

Formats, detected from the files in the source directory:

- ``csv``: the current format (ml-latest, ml-latest-small, ml-20m, ml-25m): ``ratings.csv``,
  ``movies.csv`` and, optionally, ``tags.csv``.
- ``ml-1m``: ``ratings.dat``, ``movies.dat`` (latin-1) and, optionally, ``users.dat``, all
  ``::``-separated; ``tags.dat`` (ml-10m) is used when present.
- ``ml-100k``: ``u.data`` (tab-separated), ``u.item`` (``|``-separated, latin-1, 19 genre flags)
  and, optionally, ``u.user``.

Instances: one per rating, label ``click = rating >= 4``, sorted by (timestamp, userId, movieId);
``instance_id`` is the position in that order, ``user_id`` the MovieLens user id, ``ts`` the
rating's timestamp. Fields (all sparse, embedding_dim 16, ``num_embeddings`` = vocabulary size,
id 0 = unknown/none wherever a vocabulary is built):

============  ========  ===================================================================
field         group     ids
============  ========  ===================================================================
user          user      the user id itself (num_embeddings = max user id + 1)
gender        user      vocabulary of the users file's values (classic formats only)
age           user      ml-1m age groups 1, 18, 25, 35, 45, 50, 56 -> 1..7 (ml-100k ages are
                        bucketed into the same groups; classic formats only)
occupation    user      vocabulary of the users file's values (classic formats only)
zip_prefix    user      vocabulary of the first ``zip_prefix_length`` characters, upper case
count_bucket  user      the user's ratings strictly before this one: 1 = none, else
                        2 + floor(2 log2 count) (two buckets per doubling)
movie         item      index in the movie catalogue sorted by movie id, + 1
genres        item      multi-valued; vocabulary of genre names sorted, + 1 ("(no genres
                        listed)" and ml-100k's "unknown" give an empty list)
year          item      vocabulary of years from the title "(1995)" (ml-100k: else from the
                        release date), + 1
tags          cross     multi-valued (formats with tags only): the user's own tags on this
                        movie with tag timestamp <= the rating's timestamp (no future
                        information); vocabulary of lower-cased, stripped tag strings, + 1
hour          context   hour of day of ts, UTC, 0..23
weekday       context   day of week of ts, UTC, Monday = 0 .. Sunday = 6
gap_bucket    context   time since the user's latest rating strictly before ts: 1 = first
                        rating, else 2 + floor(2 log2 seconds)
============  ========  ===================================================================

**Decision** (count_bucket, gap_bucket): ratings with the same timestamp as this one are not
"earlier", as in the history protocol (ties excluded), so the features do not depend on the
arbitrary order of equal-time ratings.

Domains (``domain``), for transfer between two logs of the same users: a movie is in domain
``action`` when any of its genres is in :data:`ACTION_GENRES` (Action, Adventure, Sci-Fi,
Thriller, Crime, War, Western, Horror, Mystery, Film-Noir), otherwise in ``other`` (Comedy,
Drama, Romance, Children, Animation, Fantasy, Musical, Documentary, IMAX only, no genres, and
movies missing from the catalogue); each rating goes to its movie's domain, so the two domains
partition the ratings. On ml-latest-small: action 63,001 ratings of 671 users, other 37,003 of
665, all 665 in both. A domain's log keeps only its ratings; **decision**: the vocabularies
and ``num_embeddings`` stay those of the whole source, so an id means the same in both domains
and in the undivided log, while count_bucket and gap_bucket count only the domain's own ratings
(the domain's log is all it sees). Tags attach to the domain's ratings only.

The data licence travels with the output: the source directory's README/LICENSE files are
copied beside the log (and carried on by :mod:`iat_torchrec.data.splits`). The vocabularies are
saved as ``movielens_vocabularies.json`` so ids can be mapped back.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from iat_torchrec.data.importer import SourceFormatError, check_output_path
from iat_torchrec.data.importer import read_delimited as _read_delimited
from iat_torchrec.data.log import DEFAULT_ROWS_PER_FILE, LogSummary, LogWriter, license_files, \
    validate_log
from iat_torchrec.data.spec import FeatureGroup, FeatureSpec, SparseField

PathLike = Union[str, os.PathLike]

__all__ = [
    "ACTION_GENRES",
    "DEFAULT_SOURCE",
    "MOVIELENS_DOMAINS",
    "MOVIELENS_FORMATS",
    "MovieLensConfig",
    "MovieLensError",
    "PEER_FIELDS",
    "keep_fields",
    "build_movielens",
    "check_domain",
    "detect_format",
    "import_movielens",
]

DEFAULT_SOURCE = "../shared/data/ml-latest-small"
MOVIELENS_FORMATS = ("auto", "csv", "ml-1m", "ml-100k")
MOVIELENS_DOMAINS = ("", "action", "other")
ACTION_GENRES = frozenset({"Action", "Adventure", "Sci-Fi", "Thriller", "Crime", "War", "Western",
                           "Horror", "Mystery", "Film-Noir"})
LABEL = "click"
EMBEDDING_DIM = 16
VOCAB_FILE_NAME = "movielens_vocabularies.json"

ML1M_AGE_GROUPS = (1, 18, 25, 35, 45, 50, 56)
ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western")
NO_GENRE = frozenset({"(no genres listed)", "unknown", ""})
# Log buckets: 2 per doubling; values are clipped to 2**40 (35,000 years of seconds).
_LOG_BUCKETS = 2
_LOG_MAX_EXP = 40
LOG_BUCKET_VOCAB = 2 + _LOG_BUCKETS * _LOG_MAX_EXP + 1


class MovieLensError(SourceFormatError):
    """A MovieLens directory or file that cannot be imported."""


# The fields the peer library feeds every model under Protocol P1 (METHOD.md), where the data
# has them: without this project's count / gap buckets and tags.
PEER_FIELDS = ("user", "gender", "age", "occupation", "zip_prefix", "movie", "genres", "year",
               "hour", "weekday")


@dataclasses.dataclass
class MovieLensConfig:
    """Import MovieLens ratings as an instance log (one instance per rating, click = rating>=4)."""

    output: str = dataclasses.field(metadata={"help": "instance log directory to write"})
    source: str = dataclasses.field(default=DEFAULT_SOURCE, metadata={
        "help": "MovieLens directory (ml-latest-small, ml-1m, ml-100k, ...)"})
    format: str = dataclasses.field(default="auto", metadata={
        "help": "source format: auto, csv, ml-1m or ml-100k"})
    overwrite: bool = dataclasses.field(default=False,
                                        metadata={"help": "replace an existing output"})
    zip_prefix_length: int = dataclasses.field(default=3, metadata={
        "help": "characters of the zip code kept in zip_prefix (classic formats)"})
    fields: List[str] = dataclasses.field(default_factory=list, metadata={
        "help": "the sparse fields to keep (empty: every field the source gives); 'peer': "
                "those the peer library feeds its P1 models, where the source has them ("
                + " ".join(PEER_FIELDS) + ")"})
    domain: str = dataclasses.field(default="", metadata={
        "help": "'' (all ratings), 'action' (movies with any genre of Action, Adventure, Sci-Fi, "
                "Thriller, Crime, War, Western, Horror, Mystery, Film-Noir) or 'other' (the "
                "rest): the ratings of one domain, same users, same vocabularies"})


# =========================================================================== reading
@dataclasses.dataclass
class _Raw:
    """A MovieLens directory, read."""

    format: str
    ratings: Dict[str, np.ndarray]  # user, movie, rating, ts (file order)
    ratings_path: Path
    movie_ids: np.ndarray  # catalogue, file order
    titles: pa.Array
    genres: pa.Array  # list<string> per catalogue movie
    release_year: Optional[pa.Array]  # int64 or null per catalogue movie (ml-100k)
    movies_path: Path
    movies_header_lines: int
    tags: Optional[Dict[str, object]] = None  # user, movie, ts (numpy), tag (pa string array)
    users: Optional[Dict[str, object]] = None  # user (numpy), gender, age, occupation, zip


def detect_format(source: PathLike) -> str:
    """``csv``, ``ml-1m`` or ``ml-100k`` from the files present; raises :class:`MovieLensError`."""
    d = Path(source)
    if not d.is_dir():
        raise MovieLensError(d, "MovieLens source directory not found")
    if (d / "ratings.csv").is_file():
        return "csv"
    if (d / "ratings.dat").is_file():
        return "ml-1m"
    if (d / "u.data").is_file():
        return "ml-100k"
    found = sorted(p.name for p in d.iterdir())
    raise MovieLensError(d, "no recognised MovieLens format: expected ratings.csv + movies.csv "
                            "(ml-latest, ml-20m, ml-25m), ratings.dat + movies.dat (ml-1m, ml-10m) "
                            f"or u.data + u.item (ml-100k); found {found[:20]}")


def _np(t: pa.Table, col: str) -> np.ndarray:
    return t[col].to_numpy()


def read_delimited(path: Path, **kwargs) -> pa.Table:
    """:func:`iat_torchrec.data.importer.read_delimited`, raising :class:`MovieLensError`."""
    try:
        return _read_delimited(path, **kwargs)
    except SourceFormatError as e:
        if isinstance(e, MovieLensError):
            raise
        raise MovieLensError(e.path, e.message, line=e.line, row=e.row, column=e.column) from None


_INT = pa.int64()
_FLOAT = pa.float64()
_STR = pa.string()
# Columns of the files, in the classic formats' (header-less) order; None: read, not typed.
_RATING_COLUMNS = {"userId": _INT, "movieId": _INT, "rating": _FLOAT, "timestamp": _INT}
_MOVIE_COLUMNS = {"movieId": _INT, "title": _STR, "genres": _STR}
_TAG_COLUMNS = {"userId": _INT, "movieId": _INT, "tag": _STR, "timestamp": _INT}
_Columns = Dict[str, Optional[pa.DataType]]


def _read_with_header(path: Path, columns: _Columns) -> pa.Table:
    """``columns`` of a csv-format file (a header line naming them, others ignored)."""
    return read_delimited(path, required=list(columns), include=list(columns),
                          column_types=columns)


def _read_classic(path: Path, delimiter: str, columns: _Columns,
                  encoding: str = "utf8") -> pa.Table:
    """A classic-format file: no header, exactly ``columns``, no quoting."""
    return read_delimited(path, delimiter=delimiter, column_names=list(columns),
                          column_types={c: t for c, t in columns.items() if t is not None},
                          encoding=encoding, quoting=False)


def _catalogue(d: Path, fmt: str, movies: str, ratings: str) -> Path:
    """The movie catalogue ``d / movies``, which must exist."""
    mp = d / movies
    if not mp.is_file():
        raise MovieLensError(mp, f"movie catalogue not found (the {fmt} format needs {movies} "
                                 f"beside {ratings})")
    return mp


def _list_of_strings(n: int, rows: np.ndarray, values: pa.Array) -> pa.Array:
    """A list<string> array of ``n`` rows from (row of each value, values), rows ascending."""
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum(np.bincount(rows, minlength=n), out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def _read_csv_format(d: Path) -> _Raw:
    rp = d / "ratings.csv"
    r = _read_with_header(rp, _RATING_COLUMNS)
    mp = _catalogue(d, "csv", "movies.csv", rp.name)
    m = _read_with_header(mp, _MOVIE_COLUMNS)
    raw = _Raw("csv", _ratings(r), rp, _np(m, "movieId"), m["title"].combine_chunks(),
               pc.split_pattern(m["genres"].combine_chunks(), "|"), None, mp, 1)
    tp = d / "tags.csv"
    if tp.is_file():
        raw.tags = _tags(_read_with_header(tp, _TAG_COLUMNS))
    return raw


def _ratings(t: pa.Table) -> Dict[str, np.ndarray]:
    return {"user": _np(t, "userId"), "movie": _np(t, "movieId"),
            "rating": t["rating"].to_numpy().astype(np.float64), "ts": _np(t, "timestamp")}


def _tags(t: pa.Table) -> Dict[str, object]:
    return {"user": _np(t, "userId"), "movie": _np(t, "movieId"), "ts": _np(t, "timestamp"),
            "tag": t["tag"].combine_chunks()}


def _read_ml1m(d: Path) -> _Raw:
    rp = d / "ratings.dat"
    r = _read_classic(rp, "::", _RATING_COLUMNS)
    mp = _catalogue(d, "ml-1m", "movies.dat", rp.name)
    m = _read_classic(mp, "::", _MOVIE_COLUMNS, encoding="latin-1")
    raw = _Raw("ml-1m", _ratings(r), rp, _np(m, "movieId"), m["title"].combine_chunks(),
               pc.split_pattern(m["genres"].combine_chunks(), "|"), None, mp, 0)
    up = d / "users.dat"
    if up.is_file():
        u = _read_classic(up, "::", {"userId": _INT, "gender": _STR, "age": _INT,
                                     "occupation": _INT, "zip": _STR}, encoding="latin-1")
        raw.users = _user_attributes(u, bucket_age=False)
    tp = d / "tags.dat"
    if tp.is_file():
        raw.tags = _tags(_read_classic(tp, "::", _TAG_COLUMNS))
    return raw


def _read_ml100k(d: Path) -> _Raw:
    rp = d / "u.data"
    r = _read_classic(rp, "\t", _RATING_COLUMNS)
    mp = _catalogue(d, "ml-100k", "u.item", rp.name)
    flags = [f"genre_{i}" for i in range(len(ML100K_GENRES))]
    m = _read_classic(mp, "|", {"movieId": _INT, "title": _STR, "release_date": _STR,
                                "video_release_date": None, "imdb_url": None,
                                **{f: _INT for f in flags}}, encoding="latin-1")
    flag_matrix = np.stack([_np(m, f) for f in flags], axis=1)
    rows, cols = np.nonzero(flag_matrix)
    genres = _list_of_strings(m.num_rows, rows, pa.array(np.array(ML100K_GENRES, object)[cols],
                                                         _STR))
    rel = pc.extract_regex(m["release_date"].combine_chunks(), r"(?P<y>\d{4})\s*$")
    release_year = pc.cast(pc.struct_field(rel, "y"), _INT)
    raw = _Raw("ml-100k", _ratings(r), rp, _np(m, "movieId"), m["title"].combine_chunks(), genres,
               release_year, mp, 0)
    up = d / "u.user"
    if up.is_file():
        u = _read_classic(up, "|", {"userId": _INT, "age": _INT, "gender": _STR,
                                    "occupation": _STR, "zip": _STR}, encoding="latin-1")
        raw.users = _user_attributes(u, bucket_age=True)
    return raw


def _user_attributes(u: pa.Table, bucket_age: bool) -> Dict[str, object]:
    """The user table of a classic format as id, gender, age group, occupation and zip."""
    return {"user": _np(u, "userId"), "gender": u["gender"].combine_chunks(),
            "age": _age_group_ids(_np(u, "age"), bucket=bucket_age),
            "occupation": u["occupation"].combine_chunks(), "zip": u["zip"].combine_chunks()}


def resolve_source(path: PathLike) -> Path:
    """A relative source directory is tried from the working directory, then from the
    repository root (where ``../shared/data`` is meant)."""
    p = Path(path)
    root = Path(__file__).resolve().parents[2]
    if not p.is_absolute() and not p.exists() and (root / p).exists():
        return (root / p).resolve()
    return p


def _age_group_ids(age: np.ndarray, bucket: bool) -> np.ndarray:
    """ml-1m age groups -> 1..7 (0 = unknown); with ``bucket``, raw ages are grouped first."""
    groups = np.array(ML1M_AGE_GROUPS)
    if bucket:
        return np.where(age > 0, np.searchsorted(groups[1:], age, side="right") + 1, 0)
    pos = np.searchsorted(groups, age)
    found = (pos < groups.size) & (groups[np.minimum(pos, groups.size - 1)] == age)
    return np.where(found, pos + 1, 0).astype(np.int64)


_READERS = {"csv": _read_csv_format, "ml-1m": _read_ml1m, "ml-100k": _read_ml100k}


# =========================================================================== features
def _vocab(values: pa.Array) -> Tuple[pa.Array, np.ndarray]:
    """Sorted vocabulary of the non-null values, and each value's id (index + 1; null -> 0)."""
    uniq = pc.unique(values.drop_null())
    vocab = uniq.take(pc.sort_indices(uniq))
    ids = pc.index_in(values, value_set=vocab)
    return vocab, (pc.fill_null(ids, -1).to_numpy(zero_copy_only=False).astype(np.int64) + 1)


def log_bucket(x: np.ndarray) -> np.ndarray:
    """x >= 1 -> 2 + floor(2 log2 x), clipped; used by gap_bucket and count_bucket (x = 0 -> 1)."""
    x = np.asarray(x, dtype=np.float64)
    out = np.ones(x.shape, np.int64)
    pos = x >= 1
    e = np.floor(_LOG_BUCKETS * np.log2(np.minimum(x[pos], 2.0 ** _LOG_MAX_EXP)) + 1e-9)
    out[pos] = 2 + e.astype(np.int64)
    return out


def _history_features(user: np.ndarray, ts: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per rating: (count of the user's ratings with a strictly earlier ts, seconds since the
    latest of them, -1 when there is none). Rows are any order."""
    n = user.size
    order = np.lexsort((ts, user))
    u, t = user[order], ts[order]
    idx = np.arange(n)
    new_user = np.ones(n, bool)
    new_user[1:] = u[1:] != u[:-1]
    new_run = new_user.copy()
    new_run[1:] |= t[1:] != t[:-1]
    user_start = np.maximum.accumulate(np.where(new_user, idx, 0))
    run_start = np.maximum.accumulate(np.where(new_run, idx, 0))
    count_sorted = run_start - user_start
    gap_sorted = np.where(count_sorted > 0, t - t[np.maximum(run_start - 1, 0)], -1)
    count = np.empty(n, np.int64)
    gap = np.empty(n, np.int64)
    count[order] = count_sorted
    gap[order] = gap_sorted
    return count, gap


def _attach_tags(r_user: np.ndarray, r_movie: np.ndarray, r_ts: np.ndarray,
                 t_user: np.ndarray, t_movie: np.ndarray, t_ts: np.ndarray,
                 t_id: np.ndarray) -> pa.Array:
    """list<int64> per rating: ids of the user's tags on that movie with tag ts <= rating ts,
    in tag time order."""
    n = r_user.size
    all_users, u_inv = np.unique(np.concatenate([r_user, t_user]), return_inverse=True)
    all_movies, m_inv = np.unique(np.concatenate([r_movie, t_movie]), return_inverse=True)
    key = u_inv.astype(np.int64) * all_movies.size + m_inv
    rkey, tkey = key[:n], key[n:]
    tmin = int(min(r_ts.min(initial=0), t_ts.min(initial=0)))
    span = int(max(r_ts.max(initial=0), t_ts.max(initial=0))) - tmin + 1
    ukeys = np.unique(tkey)
    if ukeys.size * span >= 2 ** 62:
        raise ValueError("tag timestamps span too large a range to index")
    trank = np.searchsorted(ukeys, tkey)
    tcomp = trank * span + (t_ts - tmin)
    torder = np.lexsort((t_id, tcomp))
    tcomp, tids = tcomp[torder], t_id[torder]
    rpos = np.searchsorted(ukeys, rkey)
    has = (rpos < ukeys.size) & (ukeys[np.minimum(rpos, max(ukeys.size - 1, 0))] == rkey) \
        if ukeys.size else np.zeros(n, bool)
    lo = np.searchsorted(tcomp, rpos * span, side="left")
    hi = np.searchsorted(tcomp, rpos * span + (r_ts - tmin), side="right")
    lengths = np.where(has, hi - lo, 0)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    gather = np.repeat(lo - offsets[:-1], lengths) + np.arange(total)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)),
                                    pa.array(tids[gather], pa.int64()))


def _user_attribute(users: Dict[str, object], r_user: np.ndarray,
                    ids_per_user: np.ndarray) -> np.ndarray:
    """Map per-user ids to ratings (0 for users missing from the users file)."""
    uid = users["user"]
    order = np.argsort(uid, kind="stable")
    su = uid[order]
    pos = np.searchsorted(su, r_user)
    found = (pos < su.size) & (su[np.minimum(pos, su.size - 1)] == r_user)
    return np.where(found, ids_per_user[order][np.minimum(pos, su.size - 1)], 0)


def _check_ratings(raw: _Raw) -> None:
    r = raw.ratings
    header = 1 if raw.format == "csv" else 0
    for col, what in (("user", "userId"), ("movie", "movieId"), ("ts", "timestamp")):
        bad = r[col] < 0
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise MovieLensError(raw.ratings_path, f"negative {what} {r[col][i]}, expected >= 0",
                                 line=i + 1 + header, column=what)
    bad = ~np.isfinite(r["rating"])
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise MovieLensError(raw.ratings_path, f"rating {r['rating'][i]!r} is not a number",
                             line=i + 1 + header, column="rating")
    if r["user"].size == 0:
        raise MovieLensError(raw.ratings_path, "empty input: no ratings")


def check_domain(domain: str, field: str = "domain") -> None:
    """A ValueError naming ``field`` unless ``domain`` is one of :data:`MOVIELENS_DOMAINS`."""
    if domain not in MOVIELENS_DOMAINS:
        raise ValueError(f"{field} {domain!r}: expected one of {MOVIELENS_DOMAINS}")


def _in_domain(domain: str, movie: np.ndarray, genre_names: pa.Array, genre_rows: np.ndarray,
               num_movies: int) -> np.ndarray:
    """Per rating (``movie``: catalogue index + 1, 0 = unknown): whether it is in ``domain``,
    from the catalogue's (genre name, catalogue index) pairs."""
    action = np.zeros(num_movies + 1, bool)
    hit = pc.is_in(genre_names, value_set=pa.array(sorted(ACTION_GENRES))).to_numpy(
        zero_copy_only=False)
    action[genre_rows[hit] + 1] = True
    return action[movie] == (domain == "action")


def build_movielens(source: PathLike, format: str = "auto", zip_prefix_length: int = 3,
                    domain: str = "") -> Tuple[pa.Table, FeatureSpec, Dict[str, list]]:
    """Read a MovieLens directory into (instances table sorted by (ts, user, movie), spec,
    vocabularies), of the ratings of ``domain`` ("": all). Most callers want
    :func:`import_movielens`, which writes the log."""
    d = Path(source)
    if format not in MOVIELENS_FORMATS:
        raise ValueError(f"format {format!r}: expected one of {MOVIELENS_FORMATS}")
    check_domain(domain)
    fmt = detect_format(d) if format == "auto" else format
    if not d.is_dir():
        raise MovieLensError(d, "MovieLens source directory not found")
    raw = _READERS[fmt](d)
    _check_ratings(raw)
    r = raw.ratings
    order = np.lexsort((r["movie"], r["user"], r["ts"]))
    user, movie_raw, ts = r["user"][order], r["movie"][order], r["ts"][order]
    rating = r["rating"][order]
    num_users = int(user.max()) + 1

    # ---- movie catalogue
    if raw.movie_ids.size == 0:
        raise MovieLensError(raw.movies_path, "empty movie catalogue")
    cat_order = np.argsort(raw.movie_ids, kind="stable")
    cat_ids = raw.movie_ids[cat_order]
    dup = np.flatnonzero(cat_ids[1:] == cat_ids[:-1])
    if dup.size:
        i = int(cat_order[dup[0] + 1])
        raise MovieLensError(raw.movies_path, f"movieId {cat_ids[dup[0]]} appears twice in the "
                                              "movie catalogue", line=i + 1 + raw.movies_header_lines,
                             column="movieId")
    pos = np.searchsorted(cat_ids, movie_raw)
    known = (pos < cat_ids.size) & (cat_ids[np.minimum(pos, cat_ids.size - 1)] == movie_raw)
    movie = np.where(known, pos + 1, 0)
    if not known.all():
        warnings.warn(f"{raw.ratings_path}: {int((~known).sum())} ratings of movies missing from "
                      f"{raw.movies_path.name} get movie id 0 (unknown)", stacklevel=2)
    cat_take = pa.array(cat_order)
    # genres per catalogue movie (sorted), with an empty list for index 0
    genres_lists = raw.genres.take(cat_take)
    lens = pc.list_value_length(genres_lists).fill_null(0).to_numpy(zero_copy_only=False)
    flat = pc.utf8_trim_whitespace(pc.list_flatten(genres_lists))
    rows = np.repeat(np.arange(cat_ids.size), lens)
    keep = pc.invert(pc.is_in(flat, value_set=pa.array(sorted(NO_GENRE)))).to_numpy(
        zero_copy_only=False)
    flat = flat.filter(pa.array(keep))
    rows = rows[keep]
    if domain:
        in_domain = _in_domain(domain, movie, flat, rows, cat_ids.size)
        if not in_domain.any():
            raise MovieLensError(raw.ratings_path, f"no ratings in domain {domain!r}")
        user, movie_raw, ts, rating, movie = (a[in_domain] for a in (user, movie_raw, ts, rating,
                                                                     movie))
    n = user.size
    genre_vocab, genre_ids = _vocab(flat)
    g_offsets = np.zeros(cat_ids.size + 2, np.int32)
    np.cumsum(np.bincount(rows + 1, minlength=cat_ids.size + 1), out=g_offsets[1:])
    movie_genres = pa.ListArray.from_arrays(pa.array(g_offsets), pa.array(genre_ids, pa.int64()))
    genres = movie_genres.take(pa.array(movie))
    # year per catalogue movie
    titles = pc.utf8_trim_whitespace(raw.titles.take(cat_take))
    m = pc.extract_regex(titles, r"\((?P<y>\d{4})(?:[-–]\d{0,4})?\)$")
    years = pc.cast(pc.struct_field(m, "y"), _INT)
    if raw.release_year is not None:
        years = pc.coalesce(years, raw.release_year.take(cat_take))
    year_vocab, year_ids = _vocab(years)
    year = np.concatenate([[0], year_ids])[movie]

    # ---- context and user activity
    hour = np.floor_divide(ts, 3600) % 24
    weekday = (np.floor_divide(ts, 86400) + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
    count, gap = _history_features(user, ts)
    count_bucket = log_bucket(count)  # count 0 -> 1
    gap_bucket = np.where(gap < 0, 1, log_bucket(np.maximum(gap, 1)))

    columns: Dict[str, object] = {
        "instance_id": np.arange(n, dtype=np.int64), "user_id": user, "ts": ts,
        LABEL: (rating >= 4).astype(np.int8),
    }
    fields: List[SparseField] = []
    vocabs: Dict[str, list] = {"format": [fmt], "movie": cat_ids.tolist(),
                               "genres": genre_vocab.to_pylist(), "year": year_vocab.to_pylist()}

    def add(name: str, values: object, size: int, group: FeatureGroup,
            multi: bool = False) -> None:
        columns[name] = values
        fields.append(SparseField(name, num_embeddings=max(int(size), 1),
                                  embedding_dim=EMBEDDING_DIM, group=group, multi_valued=multi))

    add("user", user, num_users, FeatureGroup.USER)
    if raw.users is not None:
        u = raw.users
        gender_vocab, gender_ids = _vocab(pc.utf8_trim_whitespace(u["gender"]))
        occ = u["occupation"]
        occ_vocab, occ_ids = _vocab(occ if pa.types.is_integer(occ.type)
                                    else pc.utf8_trim_whitespace(occ))
        zips = pc.utf8_upper(pc.utf8_slice_codeunits(pc.utf8_trim_whitespace(u["zip"]), 0,
                                                     zip_prefix_length))
        zips = pc.if_else(pc.equal(zips, ""), pa.scalar(None, _STR), zips)
        zip_vocab, zip_ids = _vocab(zips)
        add("gender", _user_attribute(u, user, gender_ids), len(gender_vocab) + 1,
            FeatureGroup.USER)
        add("age", _user_attribute(u, user, u["age"]), len(ML1M_AGE_GROUPS) + 1,
            FeatureGroup.USER)
        add("occupation", _user_attribute(u, user, occ_ids), len(occ_vocab) + 1,
            FeatureGroup.USER)
        add("zip_prefix", _user_attribute(u, user, zip_ids), len(zip_vocab) + 1,
            FeatureGroup.USER)
        vocabs.update(gender=gender_vocab.to_pylist(), age=list(ML1M_AGE_GROUPS),
                      occupation=occ_vocab.to_pylist(), zip_prefix=zip_vocab.to_pylist())
    add("count_bucket", count_bucket, LOG_BUCKET_VOCAB, FeatureGroup.USER)
    add("movie", movie, cat_ids.size + 1, FeatureGroup.ITEM)
    add("genres", genres, len(genre_vocab) + 1, FeatureGroup.ITEM, multi=True)
    add("year", year, len(year_vocab) + 1, FeatureGroup.ITEM)
    if raw.tags is not None:
        t = raw.tags
        tag_strings = pc.utf8_lower(pc.utf8_trim_whitespace(t["tag"]))
        tag_strings = pc.if_else(pc.equal(tag_strings, ""), pa.scalar(None, _STR), tag_strings)
        tag_vocab, tag_ids = _vocab(tag_strings)
        keep = tag_ids > 0
        tags = _attach_tags(user, movie_raw, ts, t["user"][keep], t["movie"][keep],
                            t["ts"][keep], tag_ids[keep])
        add("tags", tags, len(tag_vocab) + 1, FeatureGroup.CROSS, multi=True)
        vocabs["tags"] = tag_vocab.to_pylist()
    add("hour", hour, 24, FeatureGroup.CONTEXT)
    add("weekday", weekday, 7, FeatureGroup.CONTEXT)
    add("gap_bucket", gap_bucket, LOG_BUCKET_VOCAB, FeatureGroup.CONTEXT)

    spec = FeatureSpec(sparse=fields, dense=[], labels=[LABEL], label_delay_s=0)
    arrays = {k: (v if isinstance(v, (pa.Array, pa.ChunkedArray)) else pa.array(v, pa.int64()
                                                                                  if k != LABEL
                                                                                  else pa.int8()))
              for k, v in columns.items()}
    return pa.table(arrays), spec, vocabs


def keep_fields(table: pa.Table, spec: FeatureSpec, fields: Sequence[str]
                ) -> Tuple[pa.Table, FeatureSpec]:
    """The instances and spec with only the sparse ``fields`` (empty: all; ``["peer"]``:
    :data:`PEER_FIELDS` where the data has them); a field the data does not have is an error
    naming it."""
    if not fields:
        return table, spec
    if list(fields) == ["peer"]:
        fields = [f for f in PEER_FIELDS if f in spec.sparse_names]
    unknown = [f for f in fields if f not in spec.sparse_names]
    if unknown:
        raise ValueError(f"fields {unknown} are not MovieLens fields of this source "
                         f"(it has {spec.sparse_names})")
    dropped = [f for f in spec.sparse_names if f not in fields]
    return (table.drop_columns(dropped),
            dataclasses.replace(spec, sparse=[f for f in spec.sparse if f.name in fields]))


def import_movielens(source: PathLike, output: PathLike, *, format: str = "auto",
                     overwrite: bool = False, zip_prefix_length: int = 3,
                     fields: Sequence[str] = (), domain: str = "",
                     rows_per_file: int = DEFAULT_ROWS_PER_FILE) -> LogSummary:
    """Import a MovieLens directory as an instance log at ``output`` (written atomically);
    return :func:`validate_log`'s summary. Keyword names match :class:`MovieLensConfig`."""
    src, out = Path(source), Path(output)
    check_output_path(src, out)
    table, spec, vocabs = build_movielens(src, format=format, zip_prefix_length=zip_prefix_length,
                                          domain=domain)
    table, spec = keep_fields(table, spec, fields)
    carried = license_files(src)
    if not carried:
        warnings.warn(f"{src}: no README/LICENSE file found; the MovieLens licence requires it "
                      "to travel with derived data", stacklevel=2)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = Path(tmp) / VOCAB_FILE_NAME
        vocab_file.write_text(json.dumps(vocabs, ensure_ascii=False) + "\n")
        with LogWriter(out, spec, overwrite=overwrite, rows_per_file=rows_per_file,
                       extra_files=[*carried, vocab_file],
                       provenance={"source": "movielens", "path": str(src.resolve()),
                                   "format": format,
                                   "zip_prefix_length": zip_prefix_length,
                                   "fields": list(fields),
                                   **({"domain": domain} if domain else {})}) as w:
            for start in range(0, table.num_rows, 1_000_000):
                w.write(table.slice(start, 1_000_000))
    return validate_log(out, spec)

