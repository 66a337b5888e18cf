"""Atomic outputs: write under a temporary name beside the target, rename when complete.

An interrupted run leaves at most a ``.<name>.tmp-*`` entry behind, never a half-written output
that looks whole.
"""

from __future__ import annotations

import abc
import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator, Self, Union


class OutputExistsError(FileExistsError):
    """The output already exists and overwriting was not asked for."""


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_output(path: Union[str, os.PathLike], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write ``path`` (a file or a directory) into.

    On normal exit the temporary is renamed to ``path``; on an exception it is removed and
    ``path`` is left as it was. With ``overwrite=False`` an existing ``path`` is an error raised
    before anything is written.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path}: output already exists (pass overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if not tmp.exists():
        raise RuntimeError(f"{path}: nothing was written")
    if path.exists():
        old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(path, old)
        os.replace(tmp, path)
        _remove(old)
    else:
        os.replace(tmp, path)


class CommitOnExit(abc.ABC):
    """A writer that is its own context manager: :meth:`close` commits the output on a normal
    exit of the ``with`` block, :meth:`abort` drops it when the block raises."""

    @abc.abstractmethod
    def close(self) -> object:
        """Commit the output (rename it into place); returns what the writer made."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Drop everything written so far; the output is left as it was."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
