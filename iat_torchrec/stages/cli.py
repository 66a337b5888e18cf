"""The command line of a stage: ``apps/<stage>.py`` calls ``stage_main(<Stage>Config,
run_<stage>)``."""

from __future__ import annotations

import logging
from typing import Any, Callable, List, Optional, Type, TypeVar

from iat_torchrec.config import ConfigError, parse_config
from iat_torchrec.data.errors import report_input_errors
from iat_torchrec.stages.tasks import TASKS_HELP, run_tasks

C = TypeVar("C")


def stage_main(config_cls: Type[C], run: Callable[[C], Any],
               argv: Optional[List[str]] = None) -> int:
    """Parse ``argv`` into ``config_cls`` (dotted flags, ``--config FILE``, ``--help``) or read
    the task file of ``--tasks FILE``, quiet TorchRec's INFO logging, run the stage (once per
    task); returns the exit code: 2 after an input error, reported in one line
    (:mod:`iat_torchrec.data.errors`; ``--debug`` shows its traceback)."""
    return report_input_errors(lambda args: _run_stage(config_cls, run, args), argv)


def _run_stage(config_cls: Type[C], run: Callable[[C], Any], argv: List[str]) -> int:
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)
    if "--tasks" in argv:
        if len(argv) != 2 or argv[0] != "--tasks":
            raise ConfigError(f"--tasks FILE takes no other flag, got {argv}")
        run_tasks(config_cls, run, argv[1])
        return 0
    description = (f"{(config_cls.__doc__ or '').strip()} Or --tasks FILE (and no other flag): "
                   f"{TASKS_HELP}.")
    run(parse_config(config_cls, argv, description=description))
    return 0
