"""WASI stdin from bytes (`wasi_config_set_stdin_bytes`), which `WasiConfig` does not offer.

Owns the hand-over of a byte buffer to wasmtime. Knows nothing about size budgets (the caller
checks the payload against its limit first) or about stdout/stderr (`WasiConfig.stdout_custom`
and `stdout_file` exist in wasmtime-py 50.0.1 and need no help).
"""

from __future__ import annotations

import ctypes

import wasmtime
from wasmtime import _ffi

__all__ = ["set_wasi_stdin_bytes"]


def set_wasi_stdin_bytes(config: wasmtime.WasiConfig, data: bytes | bytearray | memoryview) -> None:
    """Make `data` the guest's whole stdin; reads past its end see EOF. Replaces earlier stdin settings.

    The C function takes ownership of the `wasm_byte_vec_t` contents (it moves the buffer out
    and leaves the vec empty), so the vec is allocated by wasmtime (`wasm_byte_vec_new_uninitialized`),
    filled with one copy, handed over, and never deleted here.
    """
    if not isinstance(config, wasmtime.WasiConfig):
        raise TypeError(f"expected a wasmtime.WasiConfig, got {type(config).__name__}")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"stdin must be bytes-like, got {type(data).__name__}")
    payload = data if type(data) is bytes else bytes(data)
    config_ptr = config.ptr()  # ValueError if the config was already consumed by a store: check before allocating
    vec = _ffi.wasm_byte_vec_t()
    _ffi.wasm_byte_vec_new_uninitialized(ctypes.byref(vec), len(payload))
    if payload:
        ctypes.memmove(vec.data, payload, len(payload))
    _ffi.wasi_config_set_stdin_bytes(config_ptr, ctypes.byref(vec))
