"""The CPython runtime (runtimes/python) in plain wasmtime-py: the guest side of `vm.eval`.

Each case drives the built `python.wasm` as the sidecar will: WASI with the runtime directory
preopened read-only at /python, the guest ABI as host functions, `py_init` once, then `py_eval`
with a JSON request as the call's input and one JSON result as its output. The cases about fresh
interpreters (random streams, environment, preopens) run on a module baked after `py_init` by the
sidecar's own pre-initializer, because only after a bake can state from `py_init` leak into
another instance. Skipped when the runtime is not installed: `wasm-sidecar runtime install python`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import wasmtime

from sidecar import runtimes
from sidecar.wasmbin import instrument, preinitialize

from .support import installed_python_runtime

pytestmark = pytest.mark.slow

INSTALLED = runtimes.find("python")
RUNTIME = INSTALLED.directory if INSTALLED is not None else runtimes.install_dir("python")
GUEST_ROOT = "/python"
STACK_BYTES = 1 << 20  # the sidecar's default vm_stack_bytes: the wasm stack the guest runs with
I32 = wasmtime.ValType.i32()

# host_call answers: (status, JSON payload or None)
Answer = tuple[int, Any]
HostHandler = Callable[[str, Any], Answer]


def echo(method: str, params: Any) -> Answer:
    return 0, {"method": method, "params": params}


@pytest.fixture(scope="module")
def engine() -> wasmtime.Engine:
    installed_python_runtime()  # or skip (fail in CI)
    config = wasmtime.Config()
    config.max_wasm_stack = STACK_BYTES
    return wasmtime.Engine(config)


@pytest.fixture(scope="module")
def manifest(engine: wasmtime.Engine) -> dict[str, Any]:
    return json.loads((RUNTIME / "manifest.json").read_text())


@pytest.fixture(scope="module")
def module(engine: wasmtime.Engine) -> wasmtime.Module:
    return wasmtime.Module.from_file(engine, str(RUNTIME / "python.wasm"))


class Guest:
    """One instance with WASI and the sidecar guest ABI; `eval` is one `vm.eval` call."""

    def __init__(
        self,
        engine: wasmtime.Engine,
        module: wasmtime.Module,
        *,
        host: HostHandler = echo,
        env: dict[str, str] | None = None,
        preopens: tuple[tuple[str, str], ...] = ((str(RUNTIME), GUEST_ROOT),),
        random_get: Callable[[int], bytes] | None = None,
    ) -> None:
        self.store = wasmtime.Store(engine)
        wasi = wasmtime.WasiConfig()
        wasi.env = list((env or {}).items())
        for host_path, guest_path in preopens:
            wasi.preopen_dir(host_path, guest_path, False)
        self.store.set_wasi(wasi)
        linker = wasmtime.Linker(engine)
        linker.define_wasi()
        self.input = b""
        self.output = bytearray()
        self.response = b""
        self.host = host
        self._define_abi(linker)
        if random_get is not None:
            linker.allow_shadowing = True
            self._define_random_get(linker, random_get)
        self.exports = linker.instantiate(self.store, module).exports(self.store)

    def _define_abi(self, linker: wasmtime.Linker) -> None:
        def func(name: str, params: int, results: int, body: Callable[..., Any]) -> None:
            kind = wasmtime.FuncType([I32] * params, [I32] * results)
            linker.define_func("sidecar", name, kind, body, access_caller=True)

        def input_read(caller: wasmtime.Caller, ptr: int) -> None:
            caller["memory"].write(caller, self.input, ptr)

        def output_write(caller: wasmtime.Caller, ptr: int, length: int) -> None:
            self.output += caller["memory"].read(caller, ptr, ptr + length)

        def host_call(caller: wasmtime.Caller, *pointers: int) -> int:
            method_ptr, method_len, params_ptr, params_len = pointers
            memory = caller["memory"]
            method = memory.read(caller, method_ptr, method_ptr + method_len).decode()
            status, payload = self.host(method, json.loads(memory.read(caller, params_ptr, params_ptr + params_len)))
            self.response = b"" if payload is None else json.dumps(payload, separators=(",", ":")).encode()
            return len(self.response) if status == 0 else status

        def response_read(caller: wasmtime.Caller, ptr: int) -> None:
            caller["memory"].write(caller, self.response, ptr)

        func("input_len", 0, 1, lambda caller: len(self.input))
        func("input_read", 1, 0, input_read)
        func("output_write", 2, 0, output_write)
        func("host_call", 4, 1, host_call)
        func("response_read", 1, 0, response_read)
        func("response_len", 0, 1, lambda caller: len(self.response))
        # Imported by no build yet; defined so that a guest that starts using it still links.
        linker.define_func(
            "sidecar", "host_call_async", wasmtime.FuncType([I32] * 4, [wasmtime.ValType.i64()]), lambda *_: -3
        )

    def _define_random_get(self, linker: wasmtime.Linker, random_get: Callable[[int], bytes]) -> None:
        def shadow(caller: wasmtime.Caller, ptr: int, length: int) -> int:
            caller["memory"].write(caller, random_get(length), ptr)
            return 0

        kind = wasmtime.FuncType([I32, I32], [I32])
        linker.define_func("wasi_snapshot_preview1", "random_get", kind, shadow, access_caller=True)

    def init(self) -> None:
        assert self.exports["py_init"](self.store) == 0

    def call(self, request: bytes) -> tuple[int, bytes]:
        self.input, self.output = request, bytearray()
        return self.exports["py_eval"](self.store), bytes(self.output)

    def eval(self, code: str, **fields: str) -> dict[str, Any]:
        status, output = self.call(json.dumps({"code": code, **fields}).encode())
        assert status == 0
        return json.loads(output)

    def value(self, code: str) -> str:
        result = self.eval(code)
        assert result["status"] == "ok", result
        return result["value"]


@pytest.fixture
def guests(engine: wasmtime.Engine) -> Iterator[Callable[..., Guest]]:
    """`guests(module, **options)`: instances whose stores are closed after the test."""
    made: list[Guest] = []

    def make(module: wasmtime.Module, **options: Any) -> Guest:
        guest = Guest(engine, module, **options)
        made.append(guest)
        return guest

    yield make
    for guest in made:
        guest.store.close()


@pytest.fixture
def python(module: wasmtime.Module, guests: Callable[..., Guest]) -> Guest:
    """An initialized interpreter."""
    guest = guests(module)
    guest.init()
    return guest


def capture(guest: Guest, wasm: bytes) -> bytes:
    """A module whose instances start where `guest`, an instance of `wasm`, is now: the bake."""
    info = instrument(wasm)  # idempotent: the names of the exports that reach memory and globals
    exports, store = guest.exports, guest.store
    memories = {m.index: exports[m.export].read(store, 0, exports[m.export].data_len(store)) for m in info.memories}
    return preinitialize(info.wasm, memories, {g.index: exports[g.export].value(store) for g in info.globals})


@pytest.fixture(scope="module")
def baked_wasm(engine: wasmtime.Engine) -> bytes:
    """python.wasm pre-initialized as the sidecar will: memory and globals after py_init."""
    wasm = instrument((RUNTIME / "python.wasm").read_bytes()).wasm
    guest = Guest(engine, wasmtime.Module(engine, wasm), env={"BAKED_SECRET": "must not leak"})
    try:
        guest.init()
        return capture(guest, wasm)
    finally:
        guest.store.close()


@pytest.fixture(scope="module")
def baked(engine: wasmtime.Engine, baked_wasm: bytes) -> wasmtime.Module:
    return wasmtime.Module(engine, baked_wasm)


def test_py_init_runs_after_the_hosts_own_initialize_too(module: wasmtime.Module, guests: Callable[..., Guest]) -> None:
    """wasmtime's CLI and Wizer call a reactor's _initialize first; the sidecar does not."""
    guest = guests(module)
    guest.exports["_initialize"](guest.store)
    guest.init()
    assert guest.value("1 + 1") == "2"


def test_print_goes_to_stdout_and_a_statement_has_no_value(python: Guest) -> None:
    assert python.eval("print(1+1)") == {"status": "ok", "stdout": "2\n", "stderr": ""}


def test_names_persist_between_evals_and_a_trailing_expression_is_the_value(python: Guest) -> None:
    assert python.eval("x = 41")["status"] == "ok"
    assert python.eval("x + 1") == {"status": "ok", "value": "42", "stdout": "", "stderr": ""}
    assert python.value("print('side effect'); [x]") == "[41]"
    assert "value" not in python.eval("None")


def test_an_exception_is_a_result_with_type_message_and_the_snippets_own_frames(python: Guest) -> None:
    result = python.eval("print('before')\n1/0")
    assert result["status"] == "error"
    assert result["stdout"] == "before\n"
    error = result["error"]
    assert (error["type"], error["message"]) == ("ZeroDivisionError", "division by zero")
    assert error["traceback"].startswith("Traceback (most recent call last):\n  File \"<eval-")
    assert "    1/0\n" in error["traceback"]  # the snippet's source line is there
    assert error["traceback"].endswith("ZeroDivisionError: division by zero\n")
    assert "_sidecar_driver" not in error["traceback"]


def test_exception_types_outside_builtins_are_qualified_and_stdlib_frames_show_source(python: Guest) -> None:
    error = python.eval("import json\njson.loads('{')")["error"]
    assert error["type"] == "json.decoder.JSONDecodeError"
    assert 'File "/python/lib/python311.zip/json/decoder.py"' in error["traceback"]
    assert "return _default_decoder.decode(s)" in error["traceback"]  # the stdlib ships its sources


def test_a_syntax_error_has_no_frames(python: Guest) -> None:
    error = python.eval("def broken(:")["error"]
    assert error["type"] == "SyntaxError"
    assert not error["traceback"].startswith("Traceback")
    assert "def broken(:" in error["traceback"]


def test_system_exit_is_a_status_with_the_exit_code(python: Guest) -> None:
    assert python.eval("raise SystemExit(3)") == {"status": "exit", "exit_code": 3, "stdout": "", "stderr": ""}
    bye = {"status": "exit", "exit_code": 1, "stdout": "", "stderr": "bye\n"}
    assert python.eval("import sys; sys.exit('bye')") == bye
    assert python.eval("exit()")["exit_code"] == 0  # exit() exists without the site module
    assert python.value("'the interpreter goes on'") == "'the interpreter goes on'"


def test_stdin_and_stderr(python: Guest) -> None:
    result = python.eval("import sys\nprint('warn', file=sys.stderr)\ninput('name? ')", stdin="Ada\n")
    assert (result["value"], result["stdout"], result["stderr"]) == ("'Ada'", "name? ", "warn\n")
    assert python.eval("input()")["error"]["type"] == "EOFError"  # no stdin: end of file, never a wait


def test_output_survives_a_closed_stdout_and_text_that_is_not_utf8(python: Guest) -> None:
    assert python.eval("import sys; print('kept'); sys.stdout.close()")["stdout"] == "kept\n"
    assert python.eval("print('\\udc80')")["stdout"] == "?\n"


def test_a_request_that_is_not_json_writes_nothing_and_the_interpreter_goes_on(python: Guest) -> None:
    assert python.call(b"not json") == (1, b"")
    assert python.value("6 * 7") == "42"


def test_host_call_returns_the_hosts_result(python: Guest) -> None:
    answer = python.value("import sidecar; sidecar.host_call('echo', {'a': 1})")
    assert answer == "{'method': 'echo', 'params': {'a': 1}}"


def test_host_call_failures_are_host_errors(python: Guest) -> None:
    answers: dict[str, Answer] = {
        "fails": (-1, {"code": 4001, "message": "no such user", "data": {"user": "ada"}}),
        "slow": (-2, None),
        "huge": (-3, {"code": -3, "message": "host call larger than vm_host_call_bytes",
                      "limit": "vm_host_call_bytes", "env": "SIDECAR_VM_HOST_CALL_BYTES"}),
    }
    python.host = lambda method, params: answers[method]
    python.eval(
        "import sidecar\ndef attempt(method):\n    try: sidecar.host_call(method)\n"
        "    except sidecar.HostError as e: return e"
    )
    assert python.value("e = attempt('fails'); type(e).__name__, e.code, e.message, e.data") == (
        "('HostError', 4001, 'no such user', {'user': 'ada'})"
    )
    assert python.value("e = attempt('slow'); type(e).__name__, e.code, isinstance(e, TimeoutError)") == (
        "('HostCallTimeout', -2, True)"
    )
    assert python.value("e = attempt('huge'); type(e).__name__, e.code, e.message, e.data['limit']") == (
        "('HostCallRefused', -3, 'host call larger than vm_host_call_bytes', 'vm_host_call_bytes')"
    )
    error = python.eval("sidecar.host_call('fails')")["error"]
    assert (error["type"], error["message"]) == ("sidecar.HostError", "no such user (code 4001)")


def test_the_preimported_modules_are_loaded_and_match_the_manifest(python: Guest, manifest: dict[str, Any]) -> None:
    names = python.value("import _sidecar_driver; _sidecar_driver.PREIMPORTED")
    assert list(eval(names)) == manifest["preimported"]
    assert python.value(f"import sys; [m for m in {names} if m not in sys.modules]") == "[]"


def test_py_init_leaves_no_file_open_but_the_preopen(python: Guest) -> None:
    open_fds = python.value(
        "import os\ndef is_open(fd):\n    try: os.fstat(fd)\n    except OSError: return False\n    return True\n"
        "[fd for fd in range(3, 32) if is_open(fd)]"
    )
    assert open_fds == "[3]"


def test_c_recursion_ends_in_recursion_error_within_the_stack(python: Guest) -> None:
    code = "class Loop:\n    def __getattr__(self, name): return getattr(self, name)\nLoop().x"
    assert python.eval(code)["error"]["type"] == "RecursionError"
    assert python.value("import json; x = []\nfor _ in range(500): x = [x]\nlen(json.dumps(x))") == "1002"


def test_fresh_interpreters_of_a_baked_module_draw_their_own_random_streams(
    baked: wasmtime.Module, guests: Callable[..., Guest]
) -> None:
    code = "import random, os; random.random(), os.urandom(16).hex()"
    first, second = (guests(baked).value(code) for _ in range(2))
    assert first != second
    one = guests(baked)
    assert one.value("import os; os.urandom(16)") != one.value("os.urandom(16)")


def test_os_urandom_reads_wasi_random_get_when_called(baked: wasmtime.Module, guests: Callable[..., Guest]) -> None:
    guest = guests(baked, random_get=lambda length: bytes(range(length)))
    assert guest.value("import os; os.urandom(4)") == repr(bytes(range(4)))


def test_hash_of_str_is_shared_by_every_instance_of_a_baked_module(
    baked: wasmtime.Module, guests: Callable[..., Guest]
) -> None:
    """A documented limit: the hash seed is fixed when py_init runs (PYTHONHASHSEED=0)."""
    assert guests(baked).value("hash('abc')") == guests(baked).value("hash('abc')")


def test_a_baked_interpreter_sees_its_own_environment_and_preopens(
    baked: wasmtime.Module, guests: Callable[..., Guest], tmp_path: Path
) -> None:
    (tmp_path / "note.txt").write_text("from the host")
    # Another preopen first: the runtime directory now has another fd than when py_init ran.
    guest = guests(baked, env={"GREETING": "hi"}, preopens=((str(tmp_path), "/data"), (str(RUNTIME), GUEST_ROOT)))
    assert guest.value("import os; dict(os.environ)") == "{'GREETING': 'hi'}"
    assert guest.value("open('/data/note.txt').read()") == "'from the host'"
    assert guest.value("import email.message; email.message.__name__") == "'email.message'"


def test_a_restored_session_keeps_its_names_and_uses_the_preopens_it_is_restored_with(
    engine: wasmtime.Engine, baked_wasm: bytes, baked: wasmtime.Module, guests: Callable[..., Guest], tmp_path: Path
) -> None:
    session = guests(baked)
    assert session.eval("import os\nx = 42\nlen(os.listdir('/python'))")["status"] == "ok"
    (tmp_path / "note.txt").write_text("from the host")
    restored = guests(
        wasmtime.Module(engine, capture(session, baked_wasm)),
        preopens=((str(tmp_path), "/data"), (str(RUNTIME), GUEST_ROOT)),
    )
    assert restored.value("x, open('/data/note.txt').read()") == "(42, 'from the host')"
    assert restored.value("import email.message; email.message.__name__") == "'email.message'"
