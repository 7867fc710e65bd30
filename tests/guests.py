"""The WAT test guests in `tests/guests/`, by name, and the few steps every VM test takes.

`wat("abi")` is the text of `guests/abi.wat`; placeholders written in capitals in a guest (e.g.
`PAGES` in `memory.wat`) are filled from keyword arguments: `wat("memory", PAGES=3)`. The async
helpers wrap one request each in `anyio.fail_after(WAIT)`.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from pathlib import Path
from typing import Any

import anyio
import pytest
import wasmtime

from protocol.client import RemoteError, SidecarClient

from .support import WAIT

GUESTS = Path(__file__).with_name("guests")


@functools.cache
def _text(name: str) -> str:
    return (GUESTS / f"{name}.wat").read_text()


def wat(name: str, **fill: object) -> str:
    text = _text(name)
    for key, value in fill.items():
        if key not in text:
            raise KeyError(f"guest {name!r} has no placeholder {key}")
        text = text.replace(key, str(value))
    return text


def wasm(name: str, **fill: object) -> bytes:
    """The guest compiled to a binary, as a host would send it."""
    return bytes(wasmtime.wat2wasm(wat(name, **fill)))


def module_id(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- talking to a sidecar ---------------------------------------------------------------------
# Every wait in these helpers is bounded by `WAIT`, so a hung sidecar fails the test, never the run.


async def rpc(client: SidecarClient, method: str, params: Any = None) -> Any:
    """The result of one request, within `WAIT`."""
    with anyio.fail_after(WAIT):
        return await client.request(method, params)


async def refused(client: SidecarClient, method: str, params: Any = None, *, code: int) -> RemoteError:
    """The error one request must end with: checks its code and that no traceback leaked."""
    with anyio.fail_after(WAIT), pytest.raises(RemoteError) as caught:
        await client.request(method, params)
    error = caught.value
    assert error.code == code, (error.code, error.message, error.data)
    assert "Traceback" not in error.message and "Traceback" not in str(error.data)
    return error


async def new_vm(client: SidecarClient, guest: str, **params: Any) -> str:
    """A VM of one of the test guests, created straight from its text."""
    return (await rpc(client, "vm.create", {"wat": wat(guest), **params}))["vm_id"]


async def call(client: SidecarClient, vm_id: str, export: str, *args: int | float, **params: Any) -> Any:
    return await rpc(client, "vm.call", {"vm_id": vm_id, "export": export, "args": list(args), **params})


def output_bytes(answer: dict[str, Any]) -> bytes:
    """A vm.call's output as bytes, whichever of `output` and `output_base64` carried it."""
    if "output_base64" in answer:
        assert "output" not in answer
        return base64.b64decode(answer["output_base64"])
    return answer["output"].encode()


async def vm_info(client: SidecarClient, vm_id: str) -> dict[str, Any]:
    vms = {vm["vm_id"]: vm for vm in (await rpc(client, "vm.list"))["vms"]}
    return vms[vm_id]


async def until_busy(client: SidecarClient, *vm_ids: str) -> None:
    """Wait (within `WAIT`) until every named VM is running a call at the same moment.

    Nothing on the wire announces that a guest started, so this asks `vm.list` round trip by
    round trip; each one also shows the sidecar serving while the guests run.
    """
    with anyio.fail_after(WAIT):
        while True:
            states = {vm["vm_id"]: vm["state"] for vm in (await client.request("vm.list"))["vms"]}
            if all(states.get(vm_id) == "busy" for vm_id in vm_ids):
                return


async def dropped(client: SidecarClient, reason: str, count: int) -> dict[str, Any]:
    """Wait (within `WAIT`) until `sidecar.stats` counts `count` dropped responses for `reason`."""
    with anyio.fail_after(WAIT):
        while True:
            stats = await client.request("sidecar.stats")
            if stats["responses_dropped"][reason] >= count:
                return stats
