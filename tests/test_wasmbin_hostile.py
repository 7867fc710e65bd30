"""Hostile input: truncated, mutated or random modules only ever raise WasmFormatError.

And whatever parses is written back byte for byte; when wasmtime accepts a mutated module, so
do we, and what we write from it is valid too.
"""

from __future__ import annotations

import wasmtime
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.wasmbin import Instrumented, Module, WasmFormatError, instrument, preinitialize
from sidecar.wasmbin.sections import decode

from .test_wasmbin_code import EVERY_FAMILY
from .test_wasmbin_module import EVERYTHING
from .test_wasmbin_preinit import COUNTER, PASSIVE, TYPED

ENGINE = wasmtime.Engine()
SEEDS = [bytes(wasmtime.wat2wasm(text)) for text in (EVERYTHING, EVERY_FAMILY, COUNTER, PASSIVE, TYPED)]
SMALL_MEMORY_PAGES = 4
HOSTILE = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[position] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del data[position:]
        elif kind == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=6))
        else:
            del data[position : position + draw(st.integers(1, 8))]
    return bytes(data)


def zero_state(info: Instrumented) -> tuple[dict[int, bytes], dict[int, int | bytes]] | None:
    """A plausible captured state: every memory at its minimum, zero in every global."""
    if any(pages > SMALL_MEMORY_PAGES for pages in info.memory_minimums):
        return None
    sizes = zip(info.memories, info.memory_minimums, strict=True)
    memories = {index: bytes(pages * 65536) for (index, _), pages in sizes}
    return memories, {g.index: bytes(16) if g.valtype == "v128" else 0 for g in info.globals}


def valid(data: bytes) -> bool:
    try:
        wasmtime.Module.validate(ENGINE, data)
    except wasmtime.WasmtimeError:
        return False
    return True


def exercise(data: bytes) -> None:
    try:
        module = Module.parse(data)
        assert module.to_bytes() == data, "whatever parses is written back byte for byte"
        decode(module)
        info = instrument(data)
    except WasmFormatError:
        assert not valid(data), "wasmtime accepts a module that we refuse"
        return
    input_valid = valid(data)
    if input_valid:
        assert valid(info.wasm), "a valid module became invalid when instrumented"
    state = zero_state(info)
    try:
        output = preinitialize(data, *(state or ({}, {})))
    except WasmFormatError:
        return
    decode(Module.parse(output))
    if input_valid:
        assert valid(output), "a valid module became invalid when pre-initialized"


def test_the_seeds_are_valid_and_survive_every_step():
    for seed in SEEDS:
        assert valid(seed)
        exercise(seed)


@HOSTILE
@given(mutated())
def test_mutated_modules(data):
    exercise(data)


@HOSTILE
@given(st.binary(max_size=200))
def test_random_bytes_after_a_valid_header(tail):
    exercise(b"\0asm\x01\0\0\0" + tail)


@HOSTILE
@given(st.sampled_from(SEEDS), st.data())
def test_every_truncation(seed, data):
    exercise(seed[: data.draw(st.integers(0, len(seed) - 1))])
