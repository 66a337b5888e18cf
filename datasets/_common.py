"""What the dataset scripts share: the repository on ``sys.path`` and one timed library call.

Imported as a sibling module (``from _common import ...``): the scripts are run as
``python datasets/<name>.py``, which puts ``datasets/`` (not a Python package) on ``sys.path``.
"""

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Callable, List, Optional, Type

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from iat_torchrec.config import parse_config  # noqa: E402
from iat_torchrec.data.errors import report_input_errors  # noqa: E402


def run_config(config_cls: Type[Any], command: Callable[..., Any], done: str,
               argv: Optional[List[str]] = None,
               prepare: Optional[Callable[[Any], None]] = None) -> int:
    """Parse ``config_cls`` from ``argv`` and call ``command`` with its fields as arguments
    (``prepare(config)`` first, if given); print the returned log summary, or each of a
    ``{name: summary}`` dict under its ``[name]``, then ``done`` (``str.format``-ted with
    ``cfg``) and the seconds taken. Returns the exit status: 0, or 2 after an input error,
    reported in one line (``--debug`` shows its traceback)."""
    return report_input_errors(lambda args: _run(config_cls, command, done, args, prepare), argv)


def _run(config_cls: Type[Any], command: Callable[..., Any], done: str, argv: List[str],
         prepare: Optional[Callable[[Any], None]]) -> int:
    cfg = parse_config(config_cls, argv)
    if prepare is not None:
        prepare(cfg)
    t0 = time.perf_counter()
    result = command(**dataclasses.asdict(cfg))
    for name, summary in result.items() if isinstance(result, dict) else [(None, result)]:
        if name is not None:
            print(f"[{name}]")
        print(summary.format())
    print(f"{done.format(cfg=cfg)} ({time.perf_counter() - t0:.1f} s)")
    return 0
