"""vm.call end to end with real guests, over both transports.

What a host sees: numbers in and out of every wasm type, input and output through the guest
ABI, traps and bad guest pointers that end one call only, state that persists in a stateful VM,
and the registry's view (vm.list, vm.dispose, sidecar.stats).
"""

from __future__ import annotations

import base64
import gc

import anyio
import pytest

from .guests import (
    call,
    module_id,
    new_vm,
    refused,
    rpc,
    vm_info,
    wasm,
)
from .support import WAIT, memory_session

pytestmark = pytest.mark.anyio


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# -- vm.call: numbers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("export", "args", "results"),
    [
        ("add", [2, 40], [42]),
        ("add", [-5, 3], [-2]),
        ("add", [2147483647, 1], [-2147483648]),  # i32 wraps
        ("id_i32", [-2147483648], [-2147483648]),
        ("id_i32", [4294967295], [-1]),  # the unsigned range is accepted; results are signed
        ("as_u32", [4294967295], [4294967295]),
        ("as_u32", [-1], [4294967295]),
        ("id_i64", [9223372036854775807], [9223372036854775807]),  # beyond 2**53: exact
        ("id_i64", [-9223372036854775808], [-9223372036854775808]),
        ("id_i64", [18446744073709551615], [-1]),
        ("neg_i64", [1234567890123456789], [-1234567890123456789]),
        ("id_f32", [1.5], [1.5]),
        ("id_f32", [-0.25], [-0.25]),
        ("id_f32", [3], [3.0]),  # an integer for a float
        ("id_f64", [-0.1], [-0.1]),
        ("id_f64", [1e308], [1e308]),
        ("id_f64", [2**60], [float(2**60)]),
        ("swap", [1, -2, 3.5, 4.25], [4.25, 3.5, -2, 1]),
        ("nothing", [], []),
    ],
)
async def test_numbers_in_and_out(session, export, args, results) -> None:
    async with session() as (client, _):
        vm_id = await new_vm(client, "numeric")
        answer = await call(client, vm_id, export, *args)
    assert answer["results"] == results
    assert [type(value) for value in answer["results"]] == [type(value) for value in results]
    assert answer["output"] == "" and answer["elapsed_ms"] >= 0
    assert "fuel_used" not in answer  # fuel is off by default


@pytest.mark.parametrize(
    ("export", "args", "path"),
    [
        ("add", [1], "$.args"),
        ("add", [1, 2, 3], "$.args"),
        ("add", [1, 2.5], "$.args[1]"),
        ("add", [True, 1], "$.args[0]"),
        ("add", [1, "2"], "$.args[1]"),
        ("add", [None, 2], "$.args[0]"),
        ("id_i32", [4294967296], "$.args[0]"),
        ("id_i32", [-2147483649], "$.args[0]"),
        ("id_i64", [18446744073709551616], "$.args[0]"),
        ("id_f32", [1e39], "$.args[0]"),
        ("swap", [1, 2, 3.0, "x"], "$.args[3]"),
    ],
)
async def test_bad_arguments_are_invalid_params_naming_the_argument(session, export, args, path) -> None:
    async with session() as (client, _):
        vm_id = await new_vm(client, "numeric")
        error = await refused(client, "vm.call", {"vm_id": vm_id, "export": export, "args": args}, code=-32602)
        assert error.data["path"] == path, error.data
        assert (await call(client, vm_id, "add", 1, 1))["results"] == [2]


@pytest.mark.parametrize("export", ["no_such_export", "memory", "answer", "table"])
async def test_only_exported_functions_can_be_called(session, export) -> None:
    async with session() as (client, _):
        vm_id = await new_vm(client, "numeric")
        error = await refused(client, "vm.call", {"vm_id": vm_id, "export": export}, code=-32602)
        assert error.data["path"] == "$.export"
        assert (await call(client, vm_id, "add", 1, 1))["results"] == [2]


async def test_unknown_and_disposed_vms_are_not_found(session) -> None:
    async with session() as (client, _):
        for method, params in [
            ("vm.call", {"vm_id": "vm-nope", "export": "add", "args": [1, 2]}),
            ("vm.dispose", {"vm_id": "vm-nope"}),
            ("vm.run", {"vm_id": "vm-nope"}),
        ]:
            error = await refused(client, method, params, code=-32001)
            assert error.kind == "vm_not_found" and error.data["vm_id"] == "vm-nope"
        vm_id = await new_vm(client, "numeric")
        assert await rpc(client, "vm.dispose", {"vm_id": vm_id}) == {}
        error = await refused(client, "vm.call", {"vm_id": vm_id, "export": "add", "args": [1, 2]}, code=-32001)
        assert error.data["vm_id"] == vm_id
        await refused(client, "vm.dispose", {"vm_id": vm_id}, code=-32001)


# -- vm.call: the guest ABI -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"input": "héllo, wörld ✓"}, {"output": "héllo, wörld ✓"}),
        ({"input": ""}, {"output": ""}),
        ({}, {"output": ""}),
        ({"input_base64": b64(b"plain")}, {"output": "plain"}),
        ({"input_base64": b64(b"\xff\xfe\x00\x80")}, {"output_base64": b64(b"\xff\xfe\x00\x80")}),
        ({"input": "x" * 200_000}, {"output": "x" * 200_000}),  # the guest grows its memory to hold it
    ],
    ids=["text", "empty", "absent", "base64-text", "base64-binary", "large"],
)
async def test_input_reaches_the_guest_and_output_comes_back(session, given, expected) -> None:
    async with session() as (client, _):
        vm_id = await new_vm(client, "abi")
        answer = await rpc(client, "vm.call", {"vm_id": vm_id, "export": "echo", **given})
    size = (
        len(base64.b64decode(expected["output_base64"]))
        if "output_base64" in expected
        else len(expected["output"].encode())
    )
    assert answer["results"] == [size]
    assert {key: answer[key] for key in expected} == expected
    assert ("output" in answer) != ("output_base64" in answer)


async def test_output_that_is_not_utf8_comes_back_as_base64(session) -> None:
    async with session() as (client, _):
        vm_id = await new_vm(client, "abi")
        answer = await call(client, vm_id, "emit_binary")
    assert "output" not in answer
    assert base64.b64decode(answer["output_base64"]) == b"\xff\xfe\x00binary"


async def test_input_and_input_base64_together_are_refused(session) -> None:
    async with session() as (client, _):
        vm_id = await new_vm(client, "abi")
        params = {"vm_id": vm_id, "export": "echo", "input": "a", "input_base64": b64(b"a")}
        await refused(client, "vm.call", params, code=-32602)
        await refused(client, "vm.call", {"vm_id": vm_id, "export": "echo", "input_base64": "***"}, code=-32602)


# -- traps ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("export", "args", "trap_code"),
    [
        ("trap", [], "unreachable"),
        ("div", [1, 0], "integer_division_by_zero"),
        ("div", [-2147483648, -1], "integer_overflow"),
        ("load", [-1], "memory_out_of_bounds"),
        ("load", [131070], "memory_out_of_bounds"),  # straddles the end of the grown memory
        ("recurse", [0], "stack_overflow"),
    ],
)
async def test_a_trap_ends_that_call_only(session, export, args, trap_code) -> None:
    async with session() as (client, _):
        vm_id = await new_vm(client, "faults")
        bystander = await new_vm(client, "faults")
        assert (await call(client, vm_id, "grow", 1))["results"] == [1]  # state to survive the trap
        error = await refused(client, "vm.call", {"vm_id": vm_id, "export": export, "args": args}, code=-32003)
        assert error.kind == "trap" and error.data["trap_code"] == trap_code, error.data
        assert error.data["message"]
        assert (await call(client, vm_id, "pages"))["results"] == [2]  # same instance, still usable
        assert (await call(client, vm_id, "div", 7, 2))["results"] == [3]
        assert (await call(client, bystander, "pages"))["results"] == [1]


async def test_stack_overflow_names_the_stack_budget(session) -> None:
    async with session() as (client, _):
        vm_id = await new_vm(client, "faults")
        error = await refused(client, "vm.call", {"vm_id": vm_id, "export": "recurse", "args": [0]}, code=-32003)
    assert error.data["limit"] == "vm_stack_bytes" and error.data["env"] == "SIDECAR_VM_STACK_BYTES"


@pytest.mark.parametrize(
    "export",
    [
        "bad_input_read",
        "bad_output_write",
        "negative_output_len",
        "bad_host_call",
        "bad_host_method",
        "bad_response_read",
    ],
)
async def test_a_bad_guest_pointer_traps_that_guest_only(session, export) -> None:
    async def host(vm_id: str, method: str, params: object) -> object:
        return {"a long enough answer": True}

    async with session(host_handler=host) as (client, _):
        vm_id = await new_vm(client, "abi")
        other = await new_vm(client, "abi")
        assert (await call(client, vm_id, "count"))["results"] == [1]
        params = {"vm_id": vm_id, "export": export, "input": "some input"}
        error = await refused(client, "vm.call", params, code=-32003)
        assert error.data["trap_code"] == "memory_out_of_bounds", error.data
        assert (await call(client, vm_id, "count"))["results"] == [2]
        assert (await call(client, other, "echo", input="fine"))["output"] == "fine"


async def test_an_abi_call_without_an_exported_memory_traps(session) -> None:
    text = """(module (import "sidecar" "output_write" (func $w (param i32 i32)))
                (memory 1) (func (export "f") (call $w (i32.const 0) (i32.const 1))))"""
    async with session() as (client, _):
        vm_id = (await rpc(client, "vm.create", {"wat": text}))["vm_id"]
        error = await refused(client, "vm.call", {"vm_id": vm_id, "export": "f"}, code=-32003)
        assert error.data["trap_code"] == "abi_violation" and "memory" in error.data["message"]
        assert await rpc(client, "ping") == {}


# -- state and the registry -------------------------------------------------------------------


async def test_a_stateful_vm_keeps_its_state_and_vms_share_nothing(session) -> None:
    async with session() as (client, _):
        first = await new_vm(client, "abi")
        second = await new_vm(client, "abi")
        assert [(await call(client, first, "count"))["results"][0] for _ in range(3)] == [1, 2, 3]
        assert (await call(client, second, "count"))["results"] == [1]
        assert (await call(client, first, "count"))["results"] == [4]


async def test_vm_list_dispose_and_stats_agree(session) -> None:
    async with session() as (client, _):
        assert (await rpc(client, "vm.list"))["vms"] == []
        numeric = await new_vm(client, "numeric")
        faults = await new_vm(client, "faults", mode="stateful")
        for _ in range(3):
            await call(client, numeric, "add", 1, 2)
        await call(client, faults, "grow", 2)
        await refused(client, "vm.call", {"vm_id": faults, "export": "trap"}, code=-32003)
        vms = {vm["vm_id"]: vm for vm in (await rpc(client, "vm.list"))["vms"]}
        assert set(vms) == {numeric, faults}
        assert vms[numeric]["module_id"] == module_id(wasm("numeric"))
        assert vms[numeric]["calls"] == 3 and vms[faults]["calls"] == 2
        assert vms[numeric]["state"] == vms[faults]["state"] == "idle"
        assert vms[numeric]["memory_bytes"] == 65536 and vms[faults]["memory_bytes"] == 3 * 65536
        assert vms[numeric]["instances"] == 1 and vms[numeric]["host_calls_pending"] == 0
        stats = await rpc(client, "sidecar.stats")
        assert stats["vms"] == 2 and stats["host_calls_pending"] == 0 and stats["requests_in_flight"] == 0
        assert await rpc(client, "vm.dispose", {"vm_id": numeric}) == {}
        assert [vm["vm_id"] for vm in (await rpc(client, "vm.list"))["vms"]] == [faults]
        assert (await rpc(client, "sidecar.stats"))["vms"] == 1
        assert await rpc(client, "vm.dispose", {"vm_id": faults}) == {}
        assert (await rpc(client, "vm.list"))["vms"] == []
        assert (await rpc(client, "sidecar.stats"))["vms"] == 0


async def test_a_command_vm_refuses_vm_call_and_a_library_vm_refuses_vm_run(session) -> None:
    command = '(module (memory (export "memory") 1) (func (export "_start")) (func (export "f")))'
    async with session() as (client, _):
        run_only = (await rpc(client, "vm.create", {"wat": command}))["vm_id"]
        assert (await rpc(client, "vm.run", {"vm_id": run_only}))["exit_code"] == 0
        error = await refused(client, "vm.call", {"vm_id": run_only, "export": "f"}, code=-32602)
        assert error.data["path"] == "$.vm_id"
        library = await new_vm(client, "numeric")
        error = await refused(client, "vm.run", {"vm_id": library}, code=-32602)
        assert error.data["path"] == "$.vm_id"


async def test_a_call_is_counted_by_the_time_its_answer_arrives(session) -> None:
    """vm.list right after an answer must already count that call. `ask` waits on the host, so
    the thread running it hands input reading to another thread, which serves the vm.list."""

    async def host(vm_id: str, method: str, params: object) -> object:
        return 1

    async with session(host_handler=host) as (client, _):
        vm_id = await new_vm(client, "abi")
        seen = []
        for _ in range(100):
            await call(client, vm_id, "ask", input="{}")
            seen.append((await vm_info(client, vm_id))["calls"])
        assert seen == list(range(1, 101)), [(i + 1, n) for i, n in enumerate(seen) if n != i + 1][:5]


@pytest.mark.parametrize("mode", ["stateful", "stateless"])
async def test_a_vm_is_idle_by_the_time_its_answer_arrives(session, mode) -> None:
    """`state` is "busy" while a call is in progress; once the host holds the answer, vm.list must
    not still call the VM busy (as `calls` must already count it, above)."""

    async def host(vm_id: str, method: str, params: object) -> object:
        return 1

    async with session(host_handler=host) as (client, _):
        vm_id = await new_vm(client, "abi", mode=mode)
        states = []
        for _ in range(100):
            await call(client, vm_id, "ask", input="{}")
            states.append((await vm_info(client, vm_id))["state"])
        assert states == ["idle"] * 100, [(i + 1, state) for i, state in enumerate(states) if state != "idle"][:5]


async def test_every_worker_thread_comes_to_serve_a_guest_waiting_on_the_host(session) -> None:
    """The pool's first two threads start with the intake and the rest on a helper: with four,
    four guests wait in `host_call` at once, each on its own thread (the last one reading)."""
    threads = 4
    asked, release = anyio.Event(), anyio.Event()
    waiting = 0

    async def host(vm_id: str, method: str, params: object) -> object:
        nonlocal waiting
        waiting += 1
        if waiting == threads:
            asked.set()
        await release.wait()
        return {"ok": True}

    env = {"SIDECAR_RUNNER_WORKER_THREADS": str(threads), "SIDECAR_VM_POOL_INSTANCES": str(threads)}
    async with session(env=env, host_handler=host) as (client, _):
        vm_id = await new_vm(client, "abi", mode="stateless")
        answers = []

        async def ask() -> None:
            answers.append((await call(client, vm_id, "ask", input="{}"))["output"])

        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as group:
                for _ in range(threads):
                    group.start_soon(ask)
                await asked.wait()
                release.set()
        assert answers == ['{"ok":true}'] * threads


async def test_calls_leave_nothing_for_the_cyclic_collector() -> None:
    """A `vm.call`, with or without a `host_call`, frees what it made as it ends: a reference cycle
    per call (its cancel hook held the job that held the reply) kept every call's objects alive
    until the cyclic GC ran, which it then did every few dozen calls on the request path."""

    async def host(vm_id: str, method: str, params: object) -> object:
        return {"v": 1}

    async with memory_session(host_handler=host) as (client, _):
        numeric, asking = await new_vm(client, "numeric"), await new_vm(client, "abi")
        with anyio.fail_after(WAIT):
            await call(client, numeric, "add", 1, 2)
            await call(client, asking, "ask", input="{}")
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds is kept in gc.garbage to look at
        try:
            with anyio.fail_after(WAIT):
                for _ in range(20):
                    assert (await call(client, numeric, "add", 2, 40))["results"] == [42]
                    assert (await call(client, asking, "ask", input="{}"))["output"] == '{"v":1}'
            gc.collect()
            ours = [item for item in gc.garbage if _module_of(item).startswith("sidecar")]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        assert not ours, f"{len(ours)} objects of the sidecar left in cycles, e.g. {ours[:5]}"


def _module_of(item: object) -> str:
    """The module that defined `item`'s class, or a function's own module."""
    return getattr(item, "__module__", None) if callable(item) and hasattr(item, "__code__") \
        else type(item).__module__ or ""
