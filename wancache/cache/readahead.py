"""Read-ahead: per open file, detect sequential access and size the window.

Like the kernel's readahead: the first read that continues where the previous one
ended opens a window of two blocks; each further sequential read doubles it, up to
`max_window` bytes.  A read elsewhere (random access) closes it again, so random
readers never pay for data they will not use.  Reads a little out of order (the
kernel's own readahead keeps several FUSE reads in flight) still count as
sequential.

The interface to the data path is deliberately narrow: `plan()` says which block
indexes should be fetched ahead; the caller fetches them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ReadAhead:
    """Sequential-access detector and window of one open file."""

    block_size: int
    max_window: int
    window: int = 0
    expected: int | None = None     # where a sequential reader reads next
    planned_to: int = 0             # bytes already scheduled up to here

    def plan(self, offset: int, size: int, file_size: int) -> range:
        """Record a read of `size` bytes at `offset`; return block indexes to fetch ahead."""
        end = offset + size
        slack = max(4 * size, 2 * self.block_size)
        sequential = self.expected is not None and abs(offset - self.expected) <= slack
        if sequential:
            self.window = min(self.max_window, max(2 * self.block_size, 2 * self.window))
        elif offset == 0 and self.expected is None:
            self.window = min(self.max_window, 2 * self.block_size)   # first read of a file
        else:
            self.window = 0
            self.planned_to = 0
        self.expected = max(end, self.expected or 0) if sequential else end
        if self.window == 0:
            return range(0)
        start = max(end, self.planned_to)
        stop = min(end + self.window, file_size)
        if stop <= start:
            return range(0)
        self.planned_to = stop
        bs = self.block_size
        return range(start // bs, (stop - 1) // bs + 1)
