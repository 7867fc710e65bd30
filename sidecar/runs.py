"""`vm.run`: a WASI command's `_start`, run fresh each time, with its output captured or streamed.

Owns the run method, the per-run WASI config (the VM's view plus the run's args, env and stdin),
and the capture of stdout and stderr within `vm_output_bytes` (what passes it is counted, not
kept), or their streaming as `vm.output` notifications. A run is a job on its VM like a call, on
an instance of its own that is closed when the run ends. Knows nothing about the registry beyond
finding a VM.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import wasmtime

from protocol.envelope import Notification, RequestId, encode
from protocol.errors import InvalidParamsError
from protocol.methods import VmOutputParams, VmRunParams, VmRunResult, WasiSettings

from .completion import Completion
from .guest_abi import CallState
from .isolate import Isolate
from .job import Job
from .payloads import call_timeout, payload, text_or_base64
from .runtime import Runtime
from .vm import Vm
from .wasi_view import wasi_config
from .wasmffi import set_wasi_stdin_bytes


class WasiRuns:
    def __init__(self, find: Callable[[str], Vm], runtime: Runtime) -> None:
        self._find = find
        self._runtime = runtime

    def routes(self) -> list[tuple[str, str, Callable[..., Any]]]:
        return [("vm.run", "deferred", self.vm_run)]

    def stats(self) -> dict[str, Any]:
        return {}

    async def close(self) -> None:
        pass  # a run's instance lives only as long as the run, a job of the VM it ran on

    def vm_run(self, params: VmRunParams, reply: Completion) -> None:
        vm = self._find(params.vm_id)
        if not vm.compiled.command:
            raise InvalidParamsError("the VM's module exports no `_start`: use vm.call", path="$.vm_id")
        stdin = payload(params.stdin, params.stdin_base64)
        if len(stdin) > vm.limits.vm_input_bytes:
            raise vm.limits.exceeded("vm_input_bytes", len(stdin), vm_id=vm.vm_id)
        timeout_ms = call_timeout(params.timeout_ms, vm.limits)
        stream_to = reply.id if params.stream else None
        runtime = self._runtime

        def work(vm: Vm, _: Isolate | None, state: CallState) -> VmRunResult:
            cap = vm.limits.vm_output_bytes
            stdout = _Capture(cap, vm, "stdout", stream_to, runtime)
            stderr = _Capture(cap, vm, "stderr", stream_to, runtime)
            config = _run_config(vm.wasi, params, stdin, stdout, stderr)
            state.deadline = time.monotonic() + timeout_ms / 1000
            started = time.perf_counter()
            runtime.reader.yield_reading()  # a whole program: do not hold the host's input meanwhile
            isolate = vm.isolate_for(config)
            try:
                code = isolate.run_start(state, timeout_ms)
            finally:
                isolate.close()
            for capture in (stdout, stderr):
                capture.report()
            out_text, out_binary = text_or_base64(bytes(stdout.data))
            err_text, err_binary = text_or_base64(bytes(stderr.data))
            return VmRunResult(
                exit_code=code,
                stdout=out_text,
                stdout_base64=out_binary,
                stderr=err_text,
                stderr_base64=err_binary,
                stdout_truncated=stdout.truncated,
                stderr_truncated=stderr.truncated,
                elapsed_ms=round((time.perf_counter() - started) * 1000, 3),
            )

        vm.submit(Job(reply, work))


class _Capture:
    """A WASI stream kept up to `vm_output_bytes` (the rest counted, not kept), or streamed."""

    def __init__(self, cap: int, vm: Vm, stream: str, request_id: RequestId | None, runtime: Runtime) -> None:
        self.cap = cap
        self.data = bytearray()
        self.seen = 0
        self._vm_id = vm.vm_id
        self._limits = vm.limits
        self._stream = stream
        self._request_id = request_id
        self._runtime = runtime

    @property
    def truncated(self) -> bool:
        return self.seen > self.cap

    def __call__(self, chunk: bytes) -> None:
        room = self.cap - self.seen
        self.seen += len(chunk)
        if room <= 0:
            return
        kept = chunk[:room]
        if self._request_id is None:
            self.data += kept
            return
        text, binary = text_or_base64(kept)
        params = VmOutputParams(vm_id=self._vm_id, stream=self._stream, data=text, data_base64=binary,  # type: ignore[arg-type]
                                request_id=self._request_id)
        self._runtime.send(encode(Notification(method="vm.output", params=params)))

    def report(self) -> None:
        if self.truncated:
            self._limits.exhausted("vm_output_bytes", self.seen, capacity=self.cap, vm_id=self._vm_id,
                                   stream=self._stream)


def _run_config(
    wasi: WasiSettings, params: VmRunParams, stdin: bytes, stdout: _Capture, stderr: _Capture
) -> wasmtime.WasiConfig:
    config = wasi_config(wasi, params.args, params.env)
    set_wasi_stdin_bytes(config, stdin)
    config.stdout_custom = stdout
    config.stderr_custom = stderr
    return config
