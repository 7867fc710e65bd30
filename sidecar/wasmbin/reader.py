"""Byte-level primitives of the wasm binary format: the error type, LEB128, a bounded cursor.

Owns the one error every malformed input turns into and the integer encodings the format is
built from (unsigned/signed LEB128 with the spec's length and unused-bit rules). Knows nothing
about sections, instructions or what the bytes mean.
"""

from __future__ import annotations


class WasmFormatError(ValueError):
    """Malformed or unsupported wasm; `offset` is the byte position in the module, if known."""

    def __init__(self, message: str, offset: int | None = None) -> None:
        super().__init__(message if offset is None else f"{message} (at byte {offset})")
        self.message = message
        self.offset = offset


def encode_unsigned(value: int, bits: int = 32, width: int | None = None) -> bytes:
    """LEB128 of an unsigned value, padded to at least `width` bytes (as some linkers write it)."""
    if not 0 <= value < 1 << bits:
        raise ValueError(f"{value} does not fit in u{bits}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value == 0 and (width is None or len(out) + 1 >= width):
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def encode_signed(value: int, bits: int = 32) -> bytes:
    """Shortest signed LEB128 of `value`, which must fit in a two's complement `bits` integer."""
    if not -(1 << (bits - 1)) <= value < 1 << (bits - 1):
        raise ValueError(f"{value} does not fit in s{bits}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7  # arithmetic shift: negative values converge to -1
        if (value == 0 and not byte & 0x40) or (value == -1 and byte & 0x40):
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def encode_name(text: str) -> bytes:
    raw = text.encode("utf-8")
    return encode_unsigned(len(raw)) + raw


class Reader:
    """A cursor over `data[pos:end]`; every read is bounds-checked and reports absolute offsets.

    Sub-readers share the underlying bytes, so errors deep inside a section still name the
    position in the whole module.
    """

    __slots__ = ("data", "pos", "end")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def at_end(self) -> bool:
        return self.pos >= self.end

    def expect_end(self, what: str) -> None:
        if self.pos != self.end:
            raise WasmFormatError(f"{self.end - self.pos} unexpected trailing bytes in {what}", self.pos)

    def u8(self) -> int:
        if self.pos >= self.end:
            raise WasmFormatError("unexpected end of data", self.pos)
        byte = self.data[self.pos]
        self.pos += 1
        return byte

    def peek(self) -> int:
        if self.pos >= self.end:
            raise WasmFormatError("unexpected end of data", self.pos)
        return self.data[self.pos]

    def take(self, length: int) -> bytes:
        if length > self.end - self.pos:
            raise WasmFormatError(f"{length} bytes announced, {self.end - self.pos} available", self.pos)
        start = self.pos
        self.pos += length
        return self.data[start : self.pos]

    def sub(self, length: int) -> Reader:
        """A reader over the next `length` bytes, which this reader then skips."""
        if length > self.end - self.pos:
            raise WasmFormatError(f"{length} bytes announced, {self.end - self.pos} available", self.pos)
        start = self.pos
        self.pos += length
        return Reader(self.data, start, self.pos)

    def _leb(self, bits: int, signed: bool) -> int:
        start = self.pos
        max_bytes = (bits + 6) // 7
        result = shift = 0
        for index in range(max_bytes):
            byte = self.u8()
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
            if index == max_bytes - 1:
                raise WasmFormatError(f"LEB128 longer than {max_bytes} bytes for {bits} bits", start)
        if shift > bits:
            # The last byte carries bits past the type's width: unsigned ones must be zero,
            # signed ones copies of the sign bit. Anything else is an oversized value.
            unused = shift - bits
            top = byte & 0x7F
            if signed:
                sign = (top >> (7 - unused - 1)) & 1
                expected = ((1 << unused) - 1) if sign else 0
            else:
                expected = 0
            if top >> (7 - unused) != expected:
                raise WasmFormatError(f"LEB128 value out of range for {bits} bits", start)
        if signed and byte & 0x40:
            result -= 1 << shift
        return result

    def u32(self) -> int:
        return self._leb(32, signed=False)

    def u64(self) -> int:
        return self._leb(64, signed=False)

    def s32(self) -> int:
        return self._leb(32, signed=True)

    def s33(self) -> int:
        return self._leb(33, signed=True)

    def s64(self) -> int:
        return self._leb(64, signed=True)

    def count(self, what: str) -> int:
        """A vector length; every element takes at least one byte, so larger counts are lies."""
        start = self.pos
        value = self.u32()
        if value > self.end - self.pos:
            raise WasmFormatError(f"{what} count {value} exceeds the remaining bytes", start)
        return value

    def name(self) -> str:
        start = self.pos
        raw = self.take(self.u32())
        try:
            return str(raw, "utf-8")  # `raw` may be a memoryview
        except UnicodeDecodeError:
            raise WasmFormatError("name is not valid UTF-8", start) from None
