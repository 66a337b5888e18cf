"""Append-only ``.npy`` column files with a CRC32 of their data, written in one streaming pass.

A column file is a standard NumPy ``.npy`` (format 1.0) file whose header has a fixed size
(:data:`HEADER_BYTES`), so rows can be streamed to disk as they arrive and the final shape patched
into the header on close: no second copy of the data. ``np.load(path, mmap_mode="r")`` reads it
zero-copy. The CRC32 covers the data bytes after the header; the header itself is checked by
parsing it against the expected dtype and shape.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import Any, Dict, Sequence, Tuple, Union

import numpy as np

PathLike = Union[str, os.PathLike]

HEADER_BYTES = 128
_MAGIC = b"\x93NUMPY\x01\x00"
_CHUNK = 16 << 20


class ColumnFileError(ValueError):
    """A column file that is missing, truncated, corrupted or not what the manifest says."""


def _header(dtype: np.dtype, shape: Sequence[int]) -> bytes:
    text = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                 "shape": tuple(int(s) for s in shape)})
    body = HEADER_BYTES - len(_MAGIC) - 2
    if len(text) + 1 > body:
        raise ValueError(f"shape {tuple(shape)} does not fit a {HEADER_BYTES}-byte .npy header")
    return _MAGIC + struct.pack("<H", body) + (text.ljust(body - 1) + "\n").encode("latin1")


class ColumnWriter:
    """Stream rows of one dtype and row shape into a ``.npy`` file; :meth:`close` patches the
    header with the final row count and returns the file's description for a manifest."""

    def __init__(self, path: PathLike, dtype: Any, row_shape: Sequence[int] = ()) -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.row_shape = tuple(int(s) for s in row_shape)
        self.rows = 0
        self._crc = 0
        self._file = open(self.path, "wb")
        self._file.write(_header(self.dtype, (0, *self.row_shape)))

    def write(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.row_shape:
            raise ValueError(f"{self.path.name}: rows of shape {rows.shape[1:]} given, expected "
                             f"{self.row_shape}")
        if rows.size == 0:
            return
        data = memoryview(rows).cast("B")
        self._file.write(data)
        self._crc = zlib.crc32(data, self._crc)
        self.rows += rows.shape[0]

    def close(self) -> Dict[str, Any]:
        """Finish the file; returns ``{"dtype", "shape", "bytes", "crc32"}``."""
        shape = (self.rows, *self.row_shape)
        self._file.seek(0)
        self._file.write(_header(self.dtype, shape))
        self._file.flush()
        os.fsync(self._file.fileno())  # on disk before any manifest names it
        self._file.close()
        return describe(self.dtype, shape, self._crc)

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()


def describe(dtype: np.dtype, shape: Sequence[int], crc: int) -> Dict[str, Any]:
    """A column file's manifest entry."""
    return {"dtype": np.lib.format.dtype_to_descr(np.dtype(dtype)),
            "shape": [int(s) for s in shape],
            "bytes": HEADER_BYTES + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize,
            "crc32": f"{crc:08x}"}


def write_column(path: PathLike, array: np.ndarray) -> Dict[str, Any]:
    """Write a whole array as a column file; returns its manifest entry."""
    w = ColumnWriter(path, array.dtype, array.shape[1:])
    try:
        w.write(array)
    except BaseException:
        w.abort()
        raise
    return w.close()


def file_crc32(path: PathLike, offset: int = HEADER_BYTES) -> int:
    """CRC32 of a file's bytes from ``offset`` on, read in chunks."""
    crc = 0
    with open(path, "rb") as f:
        f.seek(offset)
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                return crc
            crc = zlib.crc32(chunk, crc)


def open_column(path: PathLike, entry: Dict[str, Any], verify: bool = True,
                mmap_mode: str = "c") -> np.ndarray:
    """Open a column file as a memory map after checking it against its manifest ``entry``.

    Checks existence, size (truncation), the header (dtype, shape) and, with ``verify``, the
    CRC32 of the data. ``mmap_mode="c"`` (copy-on-write) gives arrays that torch can wrap
    without copying while the file stays untouched.
    """
    path = Path(path)
    if not path.is_file():
        raise ColumnFileError(f"{path}: file listed in the manifest is missing")
    size = path.stat().st_size
    if size != entry["bytes"]:
        what = "truncated" if size < entry["bytes"] else "longer than expected"
        raise ColumnFileError(f"{path}: {what}: {size} bytes, the manifest says {entry['bytes']}")
    dtype, shape = np.dtype(entry["dtype"]), tuple(entry["shape"])
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version != (1, 0):
                raise ValueError(f"npy format version {version}")
            file_shape, fortran, file_dtype = np.lib.format.read_array_header_1_0(f)
            data_start = f.tell()
    except Exception as e:  # noqa: BLE001 - numpy's header parser raises many kinds
        raise ColumnFileError(f"{path}: corrupted header ({e})") from None
    if (file_dtype, tuple(file_shape), fortran, data_start) != (dtype, shape, False, HEADER_BYTES):
        raise ColumnFileError(
            f"{path}: header says dtype {file_dtype} shape {tuple(file_shape)}, the manifest says "
            f"dtype {dtype} shape {shape}: manifest and data do not match")
    if verify:
        crc = f"{file_crc32(path):08x}"
        if crc != entry["crc32"]:
            raise ColumnFileError(f"{path}: checksum mismatch (crc32 {crc}, the manifest says "
                                  f"{entry['crc32']}): the file is corrupted")
    if int(np.prod(shape, dtype=np.int64)) == 0:
        return np.empty(shape, dtype=dtype)
    return np.load(path, mmap_mode=mmap_mode)


def check_entry(entry: Any, where: str) -> Tuple[np.dtype, Tuple[int, ...]]:
    """Validate the form of a manifest entry; returns its dtype and shape."""
    try:
        dtype, shape = np.dtype(entry["dtype"]), tuple(int(s) for s in entry["shape"])
        int(entry["bytes"]), str(entry["crc32"])
    except (KeyError, TypeError, ValueError) as e:
        raise ColumnFileError(f"{where}: malformed file entry in the manifest ({e!r})") from None
    return dtype, shape
