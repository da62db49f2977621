"""A bounded reorder buffer: rows finish in any order, the output file gets them in input order.

The producer asks `has_room(index)` before it starts work on input line `index`, so at most
`capacity` finished lines ever wait here for an earlier one: memory is independent of the
input size. A line is flushed to the OS as soon as every earlier one is written (a kill -9
loses nothing written); the file is fsynced every `sync_seconds` and at close (a machine
crash loses at most that much, and the resume logic redoes it).
"""

from __future__ import annotations

import os
import time
from pathlib import Path


class OrderedWriter:
    """Appends the lines of input positions next_index, next_index + 1, ... in that order.

    `put(index, None)` marks a position that has no output line (a blank input line).
    A position given twice (a retried Ray batch) is written once.
    """

    def __init__(self, path: str | os.PathLike, next_index: int, capacity: int,
                 sync_seconds: float = 10.0):
        if capacity < 1:
            raise ValueError(f"the reorder buffer needs room for at least 1 row, got {capacity}")
        self.path = Path(path)
        self.next_index = next_index
        self.capacity = capacity
        self.sync_seconds = sync_seconds
        self.pending: dict[int, str | None] = {}
        self.peak_pending = 0  # most lines held at once (tests check the bound)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        self._last_sync = time.monotonic()

    def has_room(self, index: int) -> bool:
        return index < self.next_index + self.capacity

    def put(self, index: int, line: str | None) -> int:
        """Take the line of position `index`; returns how many lines this wrote."""
        if index < self.next_index or index in self.pending:
            return 0  # written already
        if not self.has_room(index):
            raise RuntimeError(f"row {index} is beyond the reorder buffer ({self.next_index} + "
                               f"{self.capacity}); ask has_room() before starting a row")
        self.pending[index] = line
        self.peak_pending = max(self.peak_pending, len(self.pending))
        written = 0
        while self.next_index in self.pending:
            text = self.pending.pop(self.next_index)
            if text is not None:
                self._file.write(text)
                written += 1
            self.next_index += 1
        if written:
            self._file.flush()
            if time.monotonic() - self._last_sync > self.sync_seconds:
                os.fsync(self._file.fileno())
                self._last_sync = time.monotonic()
        return written

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    def __enter__(self) -> OrderedWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
