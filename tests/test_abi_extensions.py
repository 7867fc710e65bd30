"""Extensions to guest ABI v1, and errors that must not name what never existed."""

from __future__ import annotations

import json

import anyio
import pytest

from protocol.client import HostError, RemoteError

from .support import WAIT

pytestmark = pytest.mark.anyio

# `ask` calls the host; on a negative status it copies the answer with the length `response_len`
# reports and returns that length, so the test sees exactly the bytes the guest could read.
GUEST = """(module
  (import "sidecar" "host_call" (func $host_call (param i32 i32 i32 i32) (result i32)))
  (import "sidecar" "response_len" (func $response_len (result i32)))
  (import "sidecar" "response_read" (func $response_read (param i32)))
  (import "sidecar" "output_write" (func $output_write (param i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "fail{}")
  (func (export "ask") (result i32) (local $status i32) (local $len i32)
    (local.set $status (call $host_call (i32.const 0) (i32.const 4) (i32.const 4) (i32.const 2)))
    (local.set $len (call $response_len))
    (call $response_read (i32.const 1024))
    (call $output_write (i32.const 1024) (local.get $len))
    (local.get $status)))"""


async def test_response_len_sizes_a_host_error(session) -> None:
    async def host(vm_id: str, method: str, params: object) -> object:
        raise HostError(42, "no such thing", {"method": method})

    async with session(host_handler=host) as (client, _):
        with anyio.fail_after(WAIT):
            vm_id = (await client.request("vm.create", {"wat": GUEST}))["vm_id"]
            answer = await client.request("vm.call", {"vm_id": vm_id, "export": "ask"})
        assert answer["results"] == [-1]
        error = json.loads(answer["output"])
        assert error["code"] == 42 and error["data"] == {"method": "fail"}


async def test_a_failed_create_names_no_vm(session) -> None:
    trapping_start = '(module (func $boom unreachable) (start $boom))'
    async with session() as (client, _):
        with anyio.fail_after(WAIT):
            with pytest.raises(RemoteError) as caught:
                await client.request("vm.create", {"wat": trapping_start})
            assert (await client.request("vm.list"))["vms"] == []
        assert caught.value.code == -32003 and caught.value.data["trap_code"] == "unreachable"
        assert "vm_id" not in caught.value.data
