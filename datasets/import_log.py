#!/usr/bin/env python
"""Import your own CSV or Parquet log, described by a feature spec, as an instance log.

    python datasets/import_log.py --source log.csv --spec spec.json --output outputs/data/mylog \
        --user_column userId --ts_column time --list_delimiter '|'

Options: iat_torchrec.data.importer.ImportConfig (the same names as import_log's arguments).
"""

import sys

from _common import run_config  # first: puts the repository on sys.path

from iat_torchrec.data.importer import ImportConfig, import_log


def main(argv=None) -> int:
    return run_config(ImportConfig, import_log, "imported {cfg.source}", argv)


if __name__ == "__main__":
    sys.exit(main())
