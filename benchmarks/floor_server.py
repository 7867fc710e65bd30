"""Floor of issue 15's rows 1 and 2: the least a Python process can do per `vm.call` in this design.

Run by `bench_path` beside the echo (`python benchmarks/floor_server.py add|ask`). Like the echo it
reads stdin with blocking `read`s on its main thread and writes each answer at once; unlike it, it
does the two things a `vm.call` cannot skip: decode the request with msgspec and call a wasm
export through the sidecar's own `FastCall`. `ask` adds a guest that calls the host once: its
Python host function writes a `host.call` frame and reads the answer from stdin on the same thread
(as the sidecar's leader does), then the guest returns. No budgets, no ids to correlate, no errors,
no bookkeeping: what stays between the sidecar and this is everything the sidecar adds.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import msgspec
import wasmtime

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sidecar.wasmffi import FastCall  # noqa: E402

GUEST = """(module
  (import "host" "ask" (func $ask (result i32)))
  (func (export "add") (param i32 i32) (result i32) (i32.add (local.get 0) (local.get 1)))
  (func (export "ask") (result i32) (call $ask)))"""


class Params(msgspec.Struct):
    vm_id: str
    export: str
    args: list[int] = []
    input: str = ""


class Call(msgspec.Struct):
    id: int | str
    method: str
    params: Params


class Answer(msgspec.Struct):
    id: int | str
    result: object


class Lines:
    """Complete lines from fd 0, read in large chunks with blocking reads."""

    def __init__(self) -> None:
        self._buffer = b""

    def next(self) -> bytes:
        while b"\n" not in self._buffer:
            chunk = os.read(0, 1 << 16)
            if not chunk:
                raise EOFError
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line


def main() -> None:
    export = sys.argv[1]
    lines = Lines()
    decode_call, decode_answer = msgspec.json.Decoder(Call).decode, msgspec.json.Decoder(Answer).decode
    encode = msgspec.json.Encoder().encode
    engine = wasmtime.Engine()
    store = wasmtime.Store(engine)
    linker = wasmtime.Linker(engine)

    output = [b""]

    def ask() -> int:
        os.write(1, b'{"jsonrpc":"2.0","id":"h.1","method":"host.call","params":{"method":"lookup","params":{}}}\n')
        output[0] = msgspec.json.encode(decode_answer(lines.next()).result)
        return len(output[0])

    linker.define_func("host", "ask", wasmtime.FuncType([], [wasmtime.ValType.i32()]), ask)
    instance = linker.instantiate(store, wasmtime.Module(engine, GUEST))
    func = instance.exports(store)[export]
    assert isinstance(func, wasmtime.Func)
    call = FastCall(store, func, name=export)
    try:
        while True:
            request = decode_call(lines.next())
            results = call(request.params.args)
            answer = {"results": results, "output": output[0].decode()}
            os.write(1, encode({"jsonrpc": "2.0", "id": request.id, "result": answer}) + b"\n")
    except EOFError:
        store.close()


if __name__ == "__main__":
    main()
