"""Serve a bundle: score requests with the user's live history, ingest new instances.

    python apps/serve.py --bundle bundles/iat_user --port 8000
    curl -s localhost:8000/readyz
    curl -s localhost:8000/score -d '{"user_id": 3, "ts": 1700000000, "candidates": [{...}]}'

Endpoints and behaviour: :mod:`iat_torchrec.serving.server`. Every flag is a setting of
:class:`iat_torchrec.serving.server.ServeConfig` (``--help``).
"""

from __future__ import annotations

import functools
import sys

from iat_torchrec.serving.server import ServeConfig, serve
from iat_torchrec.stages.cli import stage_main

main = functools.partial(stage_main, ServeConfig, serve)


if __name__ == "__main__":
    sys.exit(main())
