"""A module's bytes as compiled (`wasm`) and as given (`source`), and how a cache entry keeps both.

Owns the layout of a load's `extra` in the compile cache: the compiled bytes whole, then what turns
them back into the source. A load-time rewrite changes a stretch of the module and shares the rest
(the instrumentation replaces the export section and drops the start section), so the entry keeps
that stretch of the source and the lengths of the shared prefix and suffix, not a second copy: a
CPython is 20 MB either way. A hit gives the bytes as a view of the mapped entry, so neither form is
read until something needs it (a snapshot, a pre-initialization, a compile for another engine);
parsing the sections of `wasm_view` touches only their headers.
Knows nothing about what the rewrite is, wasmtime, or the cache's own format.
"""

from __future__ import annotations

import struct

from .hostfiles import Buffer

LAYOUT_ID = "bytes-1"  # names this layout in cache keys: an entry of another layout is never read as one
_FOOTER = struct.Struct("<QQQ")  # lengths: the shared prefix, the shared suffix, the source's own stretch
_CHUNK = 1 << 16  # compared at once when looking for the shared prefix and suffix


class ModuleBytes:
    """Both forms of a module's bytes, each made on first use when it is not at hand. Two threads
    using one first may both make it: the same bytes, and one of them kept (a single attribute
    store, atomic under the GIL), so no lock."""

    __slots__ = ("_wasm", "_source", "_parts", "size")

    def __init__(self, wasm: Buffer, source: Buffer | None = None, parts: tuple[Buffer, ...] | None = None) -> None:
        """`source` None and no `parts`: the module was not rewritten. `parts` joined make the source."""
        self._wasm = wasm
        self._source = source if source is not None or parts is not None else wasm
        self._parts = parts
        self.size = sum(len(part) for part in parts) if parts is not None else len(self._source)

    @classmethod
    def stored(cls, extra: memoryview) -> ModuleBytes | None:
        """The bytes an entry's `extra` keeps (as `layout` wrote them); None when it does not add up."""
        if len(extra) < _FOOTER.size:
            return None
        prefix, suffix, own = _FOOTER.unpack(extra[len(extra) - _FOOTER.size :])
        wasm_len = len(extra) - _FOOTER.size - own
        if wasm_len < 0 or prefix + suffix > wasm_len:
            return None
        wasm = extra[:wasm_len]
        return cls(wasm, parts=(wasm[:prefix], extra[wasm_len : wasm_len + own], wasm[wasm_len - suffix :]))

    @property
    def wasm_view(self) -> Buffer:
        """The compiled bytes, maybe a view of a mapped entry: for reading in place."""
        return self._wasm

    @property
    def wasm(self) -> bytes:
        if not isinstance(self._wasm, bytes):
            self._wasm = bytes(self._wasm)
        return self._wasm

    @property
    def source(self) -> bytes:
        if self._source is None:
            self._source = b"".join(self._parts)  # type: ignore[arg-type]
        elif not isinstance(self._source, bytes):
            self._source = self.wasm if self._source is self._wasm else bytes(self._source)
        return self._source

    def layout(self) -> list[Buffer]:
        """What an entry's `extra` keeps of these bytes, in parts (read back by `stored`)."""
        wasm = memoryview(self.wasm_view)
        if self._source is self._wasm:
            return [wasm, _FOOTER.pack(len(wasm), 0, 0)]
        source = memoryview(self.source)
        prefix = _shared_length(wasm, source, from_end=False)
        suffix = _shared_length(wasm[prefix:], source[prefix:], from_end=True)
        own = source[prefix : len(source) - suffix]
        return [wasm, own, _FOOTER.pack(prefix, suffix, len(own))]


def _shared_length(a: memoryview, b: memoryview, *, from_end: bool) -> int:
    """How many bytes `a` and `b` share at their start (or end): a chunk at a time, then byte by byte
    in the first chunk that differs."""
    limit = min(len(a), len(b))
    done = 0
    while done < limit:
        stop = min(done + _CHUNK, limit)
        if from_end:
            x, y = a[len(a) - stop : len(a) - done], b[len(b) - stop : len(b) - done]
        else:
            x, y = a[done:stop], b[done:stop]
        if x != y:
            pairs = zip(reversed(x), reversed(y), strict=True) if from_end else zip(x, y, strict=True)
            return done + next(index for index, (p, q) in enumerate(pairs) if p != q)
        done = stop
    return limit
