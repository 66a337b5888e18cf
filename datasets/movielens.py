#!/usr/bin/env python
"""Import MovieLens ratings as an instance log (one instance per rating, click = rating >= 4).

    python datasets/movielens.py --output outputs/data/ml-latest-small
    python datasets/movielens.py --source /data/ml-1m --output outputs/data/ml-1m --overwrite true

The default source, ../shared/data/ml-latest-small, is resolved relative to the repository root
when it does not exist relative to the current directory. Options: iat_torchrec.data.movielens.
MovieLensConfig (the same names as import_movielens's arguments).
"""

import sys

from _common import run_config  # first: puts the repository on sys.path

from iat_torchrec.data.movielens import MovieLensConfig, import_movielens, resolve_source


def _resolve(cfg: MovieLensConfig) -> None:
    cfg.source = str(resolve_source(cfg.source))


def main(argv=None) -> int:
    return run_config(MovieLensConfig, import_movielens, "imported {cfg.source}", argv,
                      prepare=_resolve)


if __name__ == "__main__":
    sys.exit(main())
