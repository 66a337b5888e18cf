#!/usr/bin/env python
"""Import your own CSV or Parquet log, described by a feature spec, as an instance log.

    # propose a spec from the data, for review:
    python datasets/import_log.py --infer --source log.csv --spec spec.json --output unused \
        --user_column userId --ts_column time
    python datasets/import_log.py --source log.csv --spec spec.json --output outputs/data/mylog \
        --user_column userId --ts_column time --list_delimiter '|'

Options: iat_torchrec.data.importer.ImportConfig (the same names as import_log's arguments).
"""

import sys

from _common import run_config  # first: puts the repository on sys.path

from iat_torchrec.data.importer import ImportConfig, run_import


def main(argv=None) -> int:
    return run_config(ImportConfig, run_import, "done: {cfg.source}", argv)


if __name__ == "__main__":
    sys.exit(main())
