"""Updates staged on disk while they wait to be folded in (`fl-server --spool-dir`).

A stream's tensors must be kept until the whole stream has passed its checks, since a
stream that breaks off must leave the aggregate untouched. In memory that costs one model
per update being received; spooled, each checked tensor goes to an unlinked temporary file
and memory holds one tensor per stream. The kernel's page cache keeps recently written
bytes, but that memory is reclaimable and not part of the server's resident set.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import overload

import numpy as np


class SpooledUpdate(Sequence[np.ndarray]):
    """An update's tensors in one temporary file, written in order and read back one by one.

    The file has no name (it is unlinked at once), so it is gone when closed, or when the
    process dies, whatever happens.
    """

    def __init__(self, directory: Path) -> None:
        self._file = tempfile.TemporaryFile(dir=directory, prefix="fedgrpc-update-", buffering=0)  # noqa: SIM115 (closed by close())
        self._fd = self._file.fileno()
        self._entries: list[tuple[int, np.dtype[np.generic], tuple[int, ...]]] = []
        self._end = 0

    def append(self, tensor: np.ndarray) -> None:
        self._check_open()
        data = _bytes_of(np.ascontiguousarray(tensor)).data
        offset = self._end
        while data:
            written = os.pwrite(self._fd, data, self._end)
            data = data[written:]
            self._end += written
        self._entries.append((offset, tensor.dtype, tuple(tensor.shape)))

    def __len__(self) -> int:
        return len(self._entries)

    @overload
    def __getitem__(self, index: int) -> np.ndarray: ...

    @overload
    def __getitem__(self, index: slice) -> list[np.ndarray]: ...

    def __getitem__(self, index: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        self._check_open()
        offset, dtype, shape = self._entries[index]
        out = np.empty(shape, dtype)
        view = _bytes_of(out).data
        while view:
            read = os.preadv(self._fd, [view], offset)
            if read == 0:
                raise OSError(f"spool file ended early at offset {offset}")
            view, offset = view[read:], offset + read
        return out

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """Every tensor's shape, without reading the file."""
        return [shape for _, _, shape in self._entries]

    @property
    def nbytes(self) -> int:
        return self._end

    def close(self) -> None:
        self._file.close()

    def _check_open(self) -> None:
        # Not just tidiness: once closed, the descriptor number may belong to another file.
        if self._file.closed:
            raise ValueError("this spooled update was closed: its file is gone")


def _bytes_of(array: np.ndarray) -> np.ndarray:
    """A flat uint8 view of a C-contiguous array (0-d and empty arrays included)."""
    return array.reshape(-1).view(np.uint8)
