"""The command line of a stage: ``apps/<stage>.py`` calls ``stage_main(<Stage>Config,
run_<stage>)``."""

from __future__ import annotations

import logging
from typing import Any, Callable, List, Optional, Type, TypeVar

from iat_torchrec.config import parse_config

C = TypeVar("C")


def stage_main(config_cls: Type[C], run: Callable[[C], Any],
               argv: Optional[List[str]] = None) -> int:
    """Parse ``argv`` into ``config_cls`` (dotted flags, ``--config FILE``, ``--help``), quiet
    TorchRec's INFO logging, run the stage; returns the exit code."""
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)
    run(parse_config(config_cls, argv))
    return 0
