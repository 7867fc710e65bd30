"""Newline framing with a size bound: bytes in, complete lines out.

Owns turning an arbitrary chunked byte stream into lines and refusing lines over the bound
without ever holding more than the bound in memory: the rest of an oversized line is skipped as
it arrives and framing picks up again after its newline. Knows nothing about JSON.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class OversizedLine:
    """A line that passed the bound; `seen` is how many bytes had arrived when it was refused."""

    seen: int
    bound: int


class LineFramer:
    """Feed chunks, get lines (without `\\n` or a trailing `\\r`) and `OversizedLine` markers.

    Blank lines are skipped: they carry no message and answering them would desynchronize hosts
    that end frames with `\\r\\n` or pad with newlines.
    """

    def __init__(self, max_line_bytes: int) -> None:
        self._max = max_line_bytes
        self._partial = bytearray()
        self._skipping = False  # inside an oversized line, waiting for its newline

    @property
    def buffered(self) -> int:
        return len(self._partial)

    def feed(self, chunk: bytes) -> list[bytes | OversizedLine]:
        if not self._partial and not self._skipping and b"\r" not in chunk:
            # The common chunk (whole lines, none carriage-returned), split in C: a pipelining
            # host's chunk holds hundreds of frames, and a Python step per line shows.
            lines = chunk.split(b"\n")
            rest = lines.pop()  # after the last newline: b"" when the chunk ends with one
            if not lines or max(map(len, lines)) <= self._max:
                out: list[bytes | OversizedLine] = [line for line in lines if line.strip()]
                if rest:
                    self._keep_partial(chunk, len(chunk) - len(rest), len(chunk), out)
                return out
        out = []
        start = 0
        end = len(chunk)
        while start < end:
            newline = chunk.find(b"\n", start)
            if newline < 0:
                self._keep_partial(chunk, start, end, out)
                break
            if self._skipping:
                self._skipping = False
            elif self._partial:
                self._partial += chunk[start:newline]
                line = bytes(self._partial)
                self._partial.clear()
                self._emit(line, out)
            else:
                self._emit(chunk[start:newline], out)
            start = newline + 1
        return out

    def _keep_partial(self, chunk: bytes, start: int, end: int, out: list[bytes | OversizedLine]) -> None:
        if self._skipping:
            return
        kept = len(self._partial) + (end - start)
        # A line's `\r` before its `\n` is not part of it: a line of exactly the bound may sit here
        # one byte over, ending in `\r`, until its newline arrives in a later chunk.
        if kept > self._max and not (kept == self._max + 1 and chunk[end - 1 : end] == b"\r"):
            out.append(OversizedLine(seen=kept, bound=self._max))
            self._partial.clear()
            self._skipping = True
            return
        self._partial += chunk[start:end]

    def _emit(self, line: bytes, out: list[bytes | OversizedLine]) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > self._max:
            out.append(OversizedLine(seen=len(line), bound=self._max))
        elif line.strip():
            out.append(line)
