"""A module as a header plus a sequence of sections; splitting and re-emitting them.

Owns the container format: magic and version, section ids, their canonical order, and writing a
module back where every untouched section (custom and unknown ones included) keeps its exact
bytes, down to a padded size field. Knows nothing about what a section's payload means.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .reader import Reader, WasmFormatError, encode_unsigned

MAGIC = b"\0asm"
VERSION = b"\x01\0\0\0"

CUSTOM, TYPE, IMPORT, FUNCTION, TABLE, MEMORY, GLOBAL, EXPORT = range(8)
START, ELEMENT, CODE, DATA, DATA_COUNT, TAG = range(8, 14)

# Position of each known section in a module; the tag section sits between memory and global.
_RANK = {
    section: rank
    for rank, section in enumerate(
        (TYPE, IMPORT, FUNCTION, TABLE, MEMORY, TAG, GLOBAL, EXPORT, START, ELEMENT, DATA_COUNT, CODE, DATA)
    )
}


@dataclass(frozen=True, slots=True)
class Section:
    """One section: its id and payload as `source[start:end]` (no copy of big modules).

    `size_width` is how many bytes the size field took in the input; when the section is
    written back unchanged it is padded to the same width, so the output is byte-identical.
    """

    id: int
    source: bytes = field(repr=False)
    start: int
    end: int
    size_width: int | None = None

    @classmethod
    def new(cls, section_id: int, payload: bytes) -> Section:
        return cls(section_id, payload, 0, len(payload))

    def reader(self) -> Reader:
        return Reader(self.source, self.start, self.end)

    def encode(self) -> list[bytes | memoryview]:
        size = encode_unsigned(self.end - self.start, width=self.size_width)
        return [bytes([self.id]), size, memoryview(self.source)[self.start : self.end]]


@dataclass(frozen=True, slots=True)
class Module:
    """The sections in file order; rewrites make new modules that share untouched sections."""

    sections: tuple[Section, ...]

    @classmethod
    def parse(cls, data: bytes | memoryview) -> Module:
        # Sections refer to `data`, which must not change under them: a read-only view (of a mapped
        # cache entry) is kept as it is, so parsing reads only the section headers' pages.
        if not isinstance(data, bytes) and not (isinstance(data, memoryview) and data.readonly):
            data = bytes(data)
        if data[:4] != MAGIC:
            raise WasmFormatError("not a wasm module (bad magic)", 0)
        if data[4:8] != VERSION:
            if len(data) >= 8 and data[6:8] == b"\x01\0":
                raise WasmFormatError("a component, not a core module", 4)
            raise WasmFormatError(f"unsupported wasm version {data[4:8].hex()}", 4)
        r = Reader(data, 8)
        sections = []
        last_rank = -1
        while not r.at_end():
            offset = r.pos
            section_id = r.u8()
            size_start = r.pos
            size = r.u32()
            width = r.pos - size_start
            body = r.sub(size)
            section = Section(section_id, data, body.pos, body.end, width)
            if section_id == CUSTOM:
                body.name()  # a custom section must at least carry a well-formed name
            elif section_id in _RANK:
                if _RANK[section_id] <= last_rank:
                    raise WasmFormatError(f"section {section_id} out of order or repeated", offset)
                last_rank = _RANK[section_id]
            sections.append(section)
        return cls(tuple(sections))

    def to_bytes(self) -> bytes:
        parts: list[bytes | memoryview] = [MAGIC, VERSION]
        for section in self.sections:
            parts.extend(section.encode())
        return b"".join(parts)

    def get(self, section_id: int) -> Section | None:
        """The section with a known (non-custom) id, if present."""
        for section in self.sections:
            if section.id == section_id:
                return section
        return None

    def replace(self, section_id: int, payload: bytes | None) -> Module:
        """A copy with that section's payload replaced, inserted in order if new, or removed (None)."""
        sections = list(self.sections)
        for index, section in enumerate(sections):
            if section.id == section_id:
                if payload is None:
                    del sections[index]
                else:
                    sections[index] = Section.new(section_id, payload)
                return Module(tuple(sections))
        if payload is None:
            return self
        rank = _RANK[section_id]
        # Before the first known section that must follow it, else after the last known one:
        # trailing custom sections (names, producers) stay at the end.
        position = next(
            (i for i, s in enumerate(sections) if _RANK.get(s.id, -1) > rank),
            max((i + 1 for i, s in enumerate(sections) if s.id in _RANK), default=len(sections)),
        )
        sections.insert(position, Section.new(section_id, payload))
        return Module(tuple(sections))
