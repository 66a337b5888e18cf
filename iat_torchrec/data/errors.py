"""The project's input errors, and how a command line reports them.

The rule: an exception whose class, or one of its base classes, is defined in the
``iat_torchrec`` package is one of the project's own messages about its input (a feature spec, an
instance log, a setting, a source file: ``SpecError``, ``InstanceLogError``, ``ConfigError``,
``SourceFormatError``, ``OutputExistsError``, ...). The project raises those classes for nothing
else, and their messages say where (file, line or row, column), what was expected and what was
found. A command prints such an error as one line on stderr and exits with
:data:`INPUT_ERROR_EXIT`; with ``--debug`` it shows the traceback instead. Any other exception is
unexpected and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable, List, Optional, Sequence

INPUT_ERROR_EXIT = 2
DEBUG_FLAG = "--debug"


def is_input_error(error: BaseException) -> bool:
    """Whether ``error`` is one of the project's own input errors (see the module doc)."""
    return any(c.__module__.partition(".")[0] == "iat_torchrec" for c in type(error).__mro__)


def report_input_errors(main: Callable[[List[str]], int],
                        argv: Optional[Sequence[str]] = None) -> int:
    """Run ``main`` on ``argv`` (default ``sys.argv[1:]``) less ``--debug``; an input error
    becomes one line on stderr and exit code 2 unless ``--debug`` was given."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = DEBUG_FLAG in argv
    try:
        return main([a for a in argv if a != DEBUG_FLAG])
    except Exception as e:
        if debug or not is_input_error(e):
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return INPUT_ERROR_EXIT
