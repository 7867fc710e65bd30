"""Decoded views of the known sections, and encoders for the ones snapshots rewrite.

Owns the payload grammar of the type, import, function, table, memory, global, export, start,
element, data count, code and data sections, and the index spaces they define (imports come
first). `decode` reads them all, so a structurally broken module is refused here, before any
rewrite. Knows nothing about instructions beyond handing constant expressions and function
bodies to `code`, and nothing about snapshots. Custom, tag and unknown sections are not decoded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from . import module as ids
from .code import read_const_expr
from .module import Module
from .reader import Reader, WasmFormatError, encode_name, encode_unsigned
from .valtypes import read_reftype, read_valtype

T = TypeVar("T")
FUNC, TABLE, MEMORY, GLOBAL, TAG = range(5)  # external kinds, as in imports and exports


@dataclass(frozen=True, slots=True)
class FuncType:
    params: tuple[str, ...]
    results: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Limits:
    minimum: int
    maximum: int | None
    shared: bool = False
    index64: bool = False
    page_size_log2: int | None = None  # custom-page-sizes proposal; None means 64 KiB pages


@dataclass(frozen=True, slots=True)
class TableType:
    reftype: str
    limits: Limits


@dataclass(frozen=True, slots=True)
class GlobalType:
    valtype: str
    mutable: bool


@dataclass(frozen=True, slots=True)
class Import:
    module: str
    name: str
    kind: int
    type: int | TableType | Limits | GlobalType  # type index for functions and tags


@dataclass(frozen=True, slots=True)
class Global:
    type: GlobalType
    init: bytes  # constant expression through its `end`
    encoded_type: bytes = field(repr=False)  # written back as read: type names are one-way


@dataclass(frozen=True, slots=True)
class Export:
    name: str
    kind: int
    index: int


@dataclass(frozen=True, slots=True)
class Element:
    mode: str  # "active", "passive" or "declarative"
    reftype: str
    count: int


@dataclass(frozen=True, slots=True)
class Data:
    memory: int | None  # None for a passive segment
    offset: bytes | None  # constant expression of an active segment
    init: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class FunctionBody:
    """A body as `source[start:end]`, left undecoded until something scans it."""

    source: bytes = field(repr=False)
    start: int
    end: int

    def reader(self) -> Reader:
        return Reader(self.source, self.start, self.end)


@dataclass(frozen=True, slots=True)
class Decoded:
    types: tuple[FuncType | None, ...]  # None for GC struct and array types
    imports: tuple[Import, ...]
    functions: tuple[int, ...]  # type index of each defined function
    tables: tuple[TableType, ...]
    memories: tuple[Limits, ...]
    globals: tuple[Global, ...]
    exports: tuple[Export, ...]
    start: int | None
    elements: tuple[Element, ...]
    data_count: int | None
    code: tuple[FunctionBody, ...]
    data: tuple[Data, ...]

    def imported(self, kind: int) -> tuple[Import, ...]:
        return tuple(i for i in self.imports if i.kind == kind)


def _vec(r: Reader, what: str, item: Callable[[Reader], T]) -> tuple[T, ...]:
    return tuple(item(r) for _ in range(r.count(what)))


def _limits(r: Reader, memory: bool) -> Limits:
    start = r.pos
    flags = r.u8()
    if flags > (0x0F if memory else 0x05) or (not memory and flags & 0x02):
        raise WasmFormatError(f"invalid limits flags 0x{flags:02x}", start)
    index64 = bool(flags & 0x04)
    read = r.u64 if index64 else r.u32
    minimum = read()
    maximum = read() if flags & 0x01 else None
    page_size_log2 = r.u32() if flags & 0x08 else None
    if maximum is not None and maximum < minimum:
        raise WasmFormatError("limits maximum below minimum", start)
    return Limits(minimum, maximum, bool(flags & 0x02), index64, page_size_log2)


def _rectype(r: Reader) -> tuple[FuncType | None, ...]:
    """One entry of the type section; a rec group defines several types."""
    if r.peek() == 0x4E:
        r.u8()
        return _vec(r, "rec group type", _subtype)
    return (_subtype(r),)


def _subtype(r: Reader) -> FuncType | None:
    if r.peek() in (0x50, 0x4F):  # sub / sub final: supertypes, then a composite type
        r.u8()
        _vec(r, "supertype", Reader.u32)
    start = r.pos
    form = r.u8()
    if form == 0x60:
        params = _vec(r, "parameter", read_valtype)
        return FuncType(params, _vec(r, "result", read_valtype))
    if form == 0x5F:
        _vec(r, "field", _field)
    elif form == 0x5E:
        _field(r)
    else:
        raise WasmFormatError(f"unknown type form 0x{form:02x}", start)
    return None


def _field(r: Reader) -> None:
    if r.peek() in (0x78, 0x77):  # packed i8 / i16
        r.u8()
    else:
        read_valtype(r)
    _mutability(r)


def _mutability(r: Reader) -> bool:
    start = r.pos
    flag = r.u8()
    if flag > 1:
        raise WasmFormatError(f"invalid mutability flag {flag}", start)
    return flag == 1


def _global_type(r: Reader) -> GlobalType:
    return GlobalType(read_valtype(r), _mutability(r))


def _table_type(r: Reader) -> TableType:
    if r.peek() == 0x40:  # function-references: a table with an initializer expression
        start = r.pos
        if r.take(2) != b"\x40\x00":
            raise WasmFormatError("invalid table encoding", start)
        table = TableType(read_reftype(r), _limits(r, memory=False))
        read_const_expr(r)
        return table
    return TableType(read_reftype(r), _limits(r, memory=False))


def _import(r: Reader) -> Import:
    module, name = r.name(), r.name()
    start = r.pos
    kind = r.u8()
    desc: int | TableType | Limits | GlobalType
    if kind == FUNC:
        desc = r.u32()
    elif kind == TABLE:
        desc = _table_type(r)
    elif kind == MEMORY:
        desc = _limits(r, memory=True)
    elif kind == GLOBAL:
        desc = _global_type(r)
    elif kind == TAG:
        if r.u8() != 0:
            raise WasmFormatError("unknown tag attribute", r.pos - 1)
        desc = r.u32()
    else:
        raise WasmFormatError(f"unknown import kind {kind}", start)
    return Import(module, name, kind, desc)


def _global(r: Reader) -> Global:
    start = r.pos
    global_type = _global_type(r)
    encoded_type = r.data[start : r.pos]
    return Global(global_type, read_const_expr(r), encoded_type)


def _export(r: Reader) -> Export:
    name = r.name()
    start = r.pos
    kind = r.u8()
    if kind > TAG:
        raise WasmFormatError(f"unknown export kind {kind}", start)
    return Export(name, kind, r.u32())


def _element(r: Reader) -> Element:
    start = r.pos
    flags = r.u32()
    if flags > 7:
        raise WasmFormatError(f"invalid element segment flags {flags}", start)
    mode = "passive" if flags & 0b11 == 1 else "declarative" if flags & 0b11 == 3 else "active"
    if flags & 0b10 and mode == "active":
        r.u32()  # explicit table index
    if mode == "active":
        read_const_expr(r)
    if flags & 0b100:  # elements are expressions
        reftype = read_reftype(r) if flags & 0b11 else "funcref"
        return Element(mode, reftype, len(_vec(r, "element expression", read_const_expr)))
    if flags & 0b11 and r.u8() != 0:
        raise WasmFormatError("unknown element kind", r.pos - 1)
    return Element(mode, "funcref", len(_vec(r, "element function index", Reader.u32)))


def _data(r: Reader) -> Data:
    start = r.pos
    flags = r.u32()
    if flags == 1:
        return Data(None, None, r.take(r.u32()))
    if flags not in (0, 2):
        raise WasmFormatError(f"invalid data segment flags {flags}", start)
    memory = r.u32() if flags == 2 else 0
    offset = read_const_expr(r)
    return Data(memory, offset, r.take(r.u32()))


def _body(r: Reader) -> FunctionBody:
    body = r.sub(r.u32())
    return FunctionBody(r.data, body.pos, body.end)


def _section(module: Module, section_id: int, what: str, item: Callable[[Reader], T]) -> tuple[T, ...]:
    section = module.get(section_id)
    if section is None:
        return ()
    r = section.reader()
    items = _vec(r, what, item)
    r.expect_end(f"{what} section")
    return items


def _single_u32(module: Module, section_id: int, what: str) -> int | None:
    """The one u32 a start or data count section holds, or None without that section."""
    section = module.get(section_id)
    if section is None:
        return None
    r = section.reader()
    value = r.u32()
    r.expect_end(what)
    return value


def defined_tables(module: Module) -> tuple[TableType, ...]:
    """The table section alone, for a caller that needs table sizes without decoding the module."""
    return _section(module, ids.TABLE, "table", _table_type)


def decode(module: Module) -> Decoded:
    types = [t for group in _section(module, ids.TYPE, "type", _rectype) for t in group]
    start = _single_u32(module, ids.START, "start section")
    data_count = _single_u32(module, ids.DATA_COUNT, "data count section")
    decoded = Decoded(
        types=tuple(types),
        imports=_section(module, ids.IMPORT, "import", _import),
        functions=_section(module, ids.FUNCTION, "function", Reader.u32),
        tables=_section(module, ids.TABLE, "table", _table_type),
        memories=_section(module, ids.MEMORY, "memory", lambda r: _limits(r, memory=True)),
        globals=_section(module, ids.GLOBAL, "global", _global),
        exports=_section(module, ids.EXPORT, "export", _export),
        start=start,
        elements=_section(module, ids.ELEMENT, "element", _element),
        data_count=data_count,
        code=_section(module, ids.CODE, "function body", _body),
        data=_section(module, ids.DATA, "data segment", _data),
    )
    if len(decoded.functions) != len(decoded.code):
        raise WasmFormatError(f"{len(decoded.functions)} functions declared, {len(decoded.code)} bodies")
    if data_count is not None and data_count != len(decoded.data):
        raise WasmFormatError(f"data count {data_count} but {len(decoded.data)} data segments")
    return decoded


# --- encoders for the sections a rewrite changes ---


def _encode_vec(items: list[bytes]) -> bytes:
    return encode_unsigned(len(items)) + b"".join(items)


def _encode_limits(limits: Limits) -> bytes:
    bits = 64 if limits.index64 else 32
    flags = (limits.maximum is not None) | limits.shared << 1 | limits.index64 << 2
    flags |= (limits.page_size_log2 is not None) << 3
    out = bytes([flags]) + encode_unsigned(limits.minimum, bits)
    if limits.maximum is not None:
        out += encode_unsigned(limits.maximum, bits)
    if limits.page_size_log2 is not None:
        out += encode_unsigned(limits.page_size_log2)
    return out


def encode_memories(memories: tuple[Limits, ...]) -> bytes:
    return _encode_vec([_encode_limits(m) for m in memories])


def encode_globals(globals_: tuple[Global, ...]) -> bytes:
    return _encode_vec([g.encoded_type + g.init for g in globals_])


def encode_exports(exports: tuple[Export, ...]) -> bytes:
    return _encode_vec([encode_name(e.name) + bytes([e.kind]) + encode_unsigned(e.index) for e in exports])


def encode_data(segments: tuple[Data, ...]) -> bytes:
    items = []
    for segment in segments:
        if segment.memory is None:
            head = b"\x01"
        elif segment.memory == 0:
            head = b"\x00" + (segment.offset or b"")
        else:
            head = b"\x02" + encode_unsigned(segment.memory) + (segment.offset or b"")
        items.append(head + encode_unsigned(len(segment.init)) + segment.init)
    return _encode_vec(items)
