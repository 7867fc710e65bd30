"""`vm.eval` and the Python runtime's VMs: code in, the interpreter's answer out.

Owns what makes a runtime VM: `vm.create {runtime: "python"}` becomes a VM of the installed
runtime's module, pre-initialized by its `py_init` (baked once per engine, cached like any
preinit), with the runtime's directory preopened read-only where its interpreter looks
(`/python`) next to the host's own WASI view. Every new instance is warmed up by a no-op eval
before it serves. A stateless Python VM gives every eval a pristine interpreter: its instances
are recycled after each call, the (warmed) replacement made after the answer leaves. A stateful
one is a session, whose instance a fault (timeout, trap, limit) replaces with a fresh
interpreter: the error says the session was lost. `vm.eval` runs `py_eval`: the request is JSON
through the guest ABI's input, the driver's one JSON result comes back as output. Knows nothing
about how the runtime is built (`sidecar.runtimes`) or how VMs run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

import msgspec

from protocol.errors import GuestTrapError, InvalidParamsError, RpcError
from protocol.methods import (
    EvalError,
    EvalParams,
    EvalResult,
    PreinitSpec,
    Preopen,
    VmCreateParams,
    WasiSettings,
)

from . import runtimes
from .completion import Completion
from .guest_abi import CallState
from .isolate import Isolate
from .job import Job
from .payloads import call_timeout
from .runtimes import PYTHON
from .vm import Vm

INIT_EXPORT, EVAL_EXPORT = "py_init", "py_eval"


class _DriverResult(msgspec.Struct, forbid_unknown_fields=True):
    """What the guest's driver writes: `vm.eval`'s result but for the time, which is ours to tell."""

    status: Literal["ok", "error", "exit"]
    stdout: str
    stderr: str
    value: str | msgspec.UnsetType = msgspec.UNSET
    error: EvalError | msgspec.UnsetType = msgspec.UNSET
    exit_code: int | msgspec.UnsetType = msgspec.UNSET


_request_encoder = msgspec.json.Encoder()
_result_decoder = msgspec.json.Decoder(_DriverResult)
# What a new interpreter runs before it serves: the paths a typical eval takes (compile, a call that
# writes to the captured stdout, a trailing expression), leaving nothing behind.
_WARM_UP = _request_encoder.encode({"code": "print(end='')\n0"})


def runtime_create_params(params: VmCreateParams) -> tuple[VmCreateParams, str]:
    """`vm.create {runtime}` as the module-and-preinit request it stands for, and the id of that
    module as the runtime's manifest records it."""
    if not isinstance(params.preinit, msgspec.UnsetType):
        raise InvalidParamsError("a runtime's VMs are pre-initialized by the sidecar", path="$.preinit")
    runtime = runtimes.find(params.runtime)  # type: ignore[arg-type]
    if runtime is None:
        raise InvalidParamsError(
            f"runtime {params.runtime!r} is not installed here; install it with: wasm-sidecar runtime install "
            f"{params.runtime}", path="$.runtime", runtime=params.runtime,
        )
    given = params.wasi if isinstance(params.wasi, WasiSettings) else WasiSettings()
    return msgspec.structs.replace(
        params,
        runtime=msgspec.UNSET,
        path=str(runtime.module),
        # The interpreter initializes seeing only its own files; the host's view is the VM's. A bake
        # is cached by its spec, which names directories by path: the variable names the files by
        # content, so a runtime reinstalled in place with other files is baked anew (the driver
        # clears the environment before the state is baked).
        preinit=PreinitSpec(export=INIT_EXPORT, wasi=WasiSettings(
            env={"SIDECAR_RUNTIME_FILES": runtime.files_id}, preopens=[_own_files(runtime)])),
        wasi=runtime_view(runtime, given),
    ), runtime.module_id


def runtime_view(runtime: runtimes.InstalledRuntime, given: WasiSettings) -> WasiSettings:
    """The host's WASI view of a runtime VM, plus the runtime's own files, read-only, where its
    interpreter looks for them (the baked state holds that path)."""
    if any(p.guest_path.rstrip("/") == runtime.guest_path for p in given.preopens):
        raise InvalidParamsError(f"{runtime.guest_path} is where the runtime's own files are", path="$.wasi.preopens")
    return msgspec.structs.replace(given, preopens=[*given.preopens, _own_files(runtime)])


def _own_files(runtime: runtimes.InstalledRuntime) -> Preopen:
    return Preopen(host_path=str(runtime.directory), guest_path=runtime.guest_path, writable=False)


def runtime_warm_up(name: str | None) -> Callable[[Isolate], None] | None:
    """What a new instance of runtime `name` runs before it serves: for Python, a no-op eval. A
    baked interpreter's first eval touches the pages its state lives in (copy-on-write faults)
    and reseeds `random`: ~1.2 ms, paid here, after an answer has left, instead of by a request."""
    return _warm_up_python if name == PYTHON else None


def _warm_up_python(isolate: Isolate) -> None:
    limits = isolate.limits
    state = CallState(input=_WARM_UP, output_cap=limits.vm_output_bytes,
                      deadline=time.monotonic() + limits.vm_call_timeout_ms / 1000)
    [status] = isolate.call(EVAL_EXPORT, [], state, limits.vm_call_timeout_ms)
    if status != 0:
        raise GuestTrapError("interpreter_failed", "a new interpreter could not run a no-op eval")


class PythonEvals:
    def __init__(self, find: Callable[[str], Vm]) -> None:
        self._find = find

    def routes(self) -> list[tuple[str, str, Callable[..., Any]]]:
        return [("vm.eval", "deferred", self.vm_eval)]

    def stats(self) -> dict[str, Any]:
        return {}

    async def close(self) -> None:
        pass  # its VMs belong to the registry, which disposes them

    def vm_eval(self, params: EvalParams, reply: Completion) -> None:
        vm = self._find(params.vm_id)
        if vm.runtime_name != PYTHON:
            raise InvalidParamsError("vm.eval runs code in a VM made with runtime: python", path="$.vm_id")
        request = _request_encoder.encode({"code": params.code, "stdin": params.stdin or ""})
        if len(request) > vm.budget.input_bytes:
            raise vm.limits.exceeded("vm_input_bytes", len(request), vm_id=vm.vm_id)
        timeout_ms = call_timeout(params.timeout_ms, vm.limits)

        def work(vm: Vm, isolate: Isolate | None, state: CallState) -> EvalResult:
            assert isolate is not None  # a runtime's module is a reactor
            state.input = request
            state.output_cap = vm.budget.output_bytes
            started = time.perf_counter()
            state.deadline = time.monotonic() + timeout_ms / 1000
            try:
                [status] = isolate.call(EVAL_EXPORT, [], state, timeout_ms)
                if status != 0:
                    raise GuestTrapError("interpreter_failed", "the interpreter could not run the request")
                result = _result_decoder.decode(state.output)
            except msgspec.DecodeError:
                error: RpcError = GuestTrapError("interpreter_failed", "the interpreter's answer is not a result")
                raise _lost(error, vm) from None
            except RpcError as exc:
                raise _lost(exc, vm) from None
            return EvalResult(
                status=result.status, value=result.value, stdout=result.stdout, stderr=result.stderr,
                error=result.error, exit_code=result.exit_code,
                elapsed_ms=round((time.perf_counter() - started) * 1000, 3),
            )

        vm.submit(Job(reply, work))


def _lost(error: RpcError, vm: Vm) -> RpcError:
    """The interpreter that failed is thrown away (the VM replaces it): a session says so."""
    if vm.mode == "stateful":
        error.details["session"] = "lost"
    return error
