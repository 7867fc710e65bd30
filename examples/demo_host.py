"""A host application in a few lines: spawn wasm-sidecar, run a guest, answer its questions.

Run `python examples/demo_host.py` after installing the package. It drives the sidecar over
stdin/stdout exactly as a host in any language would, through `protocol.client`.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import anyio

from protocol.client import RemoteError, SidecarClient

GUEST = Path(__file__).with_name("guests") / "greeter.wat"


async def answer_guest(vm_id: str, method: str, params: object) -> object:
    """The host's side of `host.call`: guests may only ask what the host chooses to answer."""
    if method == "clock.part_of_day":
        hour = time.localtime().tm_hour
        return "morning" if hour < 12 else "afternoon" if hour < 18 else "evening"
    raise LookupError(method)


async def main() -> int:
    async with SidecarClient.spawn(host_handler=answer_guest) as sidecar:
        info = await sidecar.request("initialize", {"protocol_version": 1, "client": {"name": "demo", "version": "1"}})
        server = info["server"]
        print(f"connected to {server['name']} {server['version']} (protocol {info['protocol_version']})")

        loaded = await sidecar.request("module.load", {"wat": GUEST.read_text()})
        print(f"loaded {GUEST.name}: {loaded['module_id'][:19]}..., compiled in {loaded['compile_ms']} ms")
        vm = (await sidecar.request("vm.create", {"module_id": loaded["module_id"]}))["vm_id"]

        for name in ["Ada", "Grace", "Linus"]:
            result = await sidecar.request("vm.call", {"vm_id": vm, "export": "greet", "input": name})
            print(f"  greet({name!r}) -> {result['output']!r} in {result['elapsed_ms']} ms")
        total = await sidecar.request("vm.call", {"vm_id": vm, "export": "add", "args": [2**40, 2]})
        print(f"  add(2**40, 2) -> {total['results'][0]}")

        for export, params in [("crash", {}), ("spin", {"timeout_ms": 100})]:
            try:
                await sidecar.request("vm.call", {"vm_id": vm, "export": export, **params})
            except RemoteError as error:
                print(f"  {export}() -> error {error.code} {error.kind}: {error.message}")

        with tempfile.TemporaryDirectory() as scratch:
            snapshot = Path(scratch) / "greeter.snapshot"
            saved = await sidecar.request("vm.snapshot", {"vm_id": vm, "path": str(snapshot)})
            print(f"snapshot: {saved['size_bytes']} bytes")
            async with SidecarClient.spawn(host_handler=answer_guest) as second:
                restored = (await second.request("vm.restore", {"path": str(snapshot)}))["vm_id"]
                result = await second.request("vm.call", {"vm_id": restored, "export": "greet", "input": "again"})
                print(f"  in a second sidecar process: {result['output']!r}")

        stats = await sidecar.request("sidecar.stats")
        print(f"served {stats['requests_served']} requests; dropped host responses: {stats['responses_dropped']}")
        await sidecar.request("vm.dispose", {"vm_id": vm})
    return 0


if __name__ == "__main__":
    sys.exit(anyio.run(main))
