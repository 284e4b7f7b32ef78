"""The access log's writer process: ``python -m gateway.access_log_writer DESTINATION``.

It reads batches of entries from its standard input, turns each into its JSON line
(``gateway.access_log.line``) and writes each batch with one call, to its standard error
(``stderr``, inherited from the gateway) or appended to a file, reopened when logrotate moved it
away (as ``logging.handlers.WatchedFileHandler`` does). A batch is a 4-byte big-endian length and
a ``marshal`` dump of a list of entry tuples. It ends at end of input, so it never outlives the
gateway process that feeds it. Formatting here rather than in the gateway takes the JSON, the
timestamp and the reply-tail searches off the gateway's event loop and out of its GIL.
"""

from __future__ import annotations

import marshal
import os
import sys
from typing import BinaryIO

from gateway.access_log import line

_HEADER = 4


class Destination:
    """Where the lines go: ``stderr``, or a file path opened for appending."""

    def __init__(self, destination: str) -> None:
        self.name = destination
        self._path = None if destination == "stderr" else destination
        self._inode: int | None = None
        self.out = self._open()

    def _open(self) -> BinaryIO:
        if self._path is None:
            return sys.stderr.buffer
        out = open(self._path, "ab")
        self._inode = os.fstat(out.fileno()).st_ino
        return out

    def write(self, data: bytes) -> None:
        if self._path is not None:
            try:
                moved = os.stat(self._path).st_ino != self._inode
            except FileNotFoundError:
                moved = True
            if moved:
                self.out.close()
                self.out = self._open()
        self.out.write(data)
        self.out.flush()


def _read(source: BinaryIO, size: int) -> bytes | None:
    data = source.read(size)
    return data if data is not None and len(data) == size else None


def run(source: BinaryIO, destination: Destination) -> None:
    """Writes every batch ``source`` holds, until it ends."""
    while (header := _read(source, _HEADER)) is not None:
        batch = _read(source, int.from_bytes(header, "big"))
        if batch is None:
            return  # the gateway ended mid-batch
        lines = []
        for entry in marshal.loads(batch):
            try:
                lines.append(line(entry))
            except Exception as exc:  # one bad entry must not cost the batch
                print(f"interlock access log: an entry could not be written: {exc!r}", file=sys.stderr)
        if lines:
            try:
                destination.write(b"".join(lines))
            except OSError as exc:
                print(f"interlock access log: writing to {destination.name} failed: {exc}", file=sys.stderr)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m gateway.access_log_writer stderr|PATH")
    run(sys.stdin.buffer, Destination(sys.argv[1]))


if __name__ == "__main__":
    main()
