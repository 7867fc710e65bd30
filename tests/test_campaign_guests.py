"""Guest attack catalogue: each attack runs in one VM while another VM keeps answering.

Every case runs in a real `python -m sidecar` whose logs are checked afterwards. The attack is
one request; while it is in flight a bystander VM is called again and again (each answer must
be right), so a guest that could stall the process, a worker or the reader shows up as a
bystander that stops answering. Long attacks must let bystander calls through while they run;
every attack must end with the error the contract names (the limit, its env variable and
capacity) within its budget, leave its own VM usable where the contract says so, and leave the
host's file system untouched.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from protocol.client import RemoteError, SidecarClient

from .campaign import logged_session
from .guests import call, new_vm, output_bytes, rpc, wat
from .support import WAIT

pytestmark = pytest.mark.anyio
BUDGET_MS = 500  # the time budget attacks that never end are given
MIB = 1 << 20

MEMORY_BOMB = """(module
  (memory (export "memory") 1)
  ;; grows 16 pages at a time, touching each new last page, until memory.grow says -1
  (func (export "bomb") (result i32)
    (block $full (loop $more
      (br_if $full (i32.lt_s (memory.grow (i32.const 16)) (i32.const 0)))
      (i32.store8 (i32.sub (i32.mul (memory.size) (i32.const 65536)) (i32.const 1)) (i32.const 1))
      (br $more)))
    (memory.size))
  (func (export "huge") (result i32) (memory.grow (i32.const 65536)))
  (func (export "pages") (result i32) (memory.size)))"""

TABLE_GROWER = """(module (table 1 funcref)
  (func (export "grow") (result i32) (table.grow (ref.null func) (i32.const 1000000)))
  (func (export "size") (result i32) (table.size)))"""

FLOOD = """(module
  (import "sidecar" "host_call_async" (func $hca (param i32 i32 i32 i32) (result i64)))
  (memory (export "memory") 1)
  (data (i32.const 0) "flood{}")
  ;; n async host calls; returns accepted * 1000 + refused
  (func (export "flood") (param $n i32) (result i32) (local $ok i32) (local $no i32)
    (block $done (loop $again
      (br_if $done (i32.eqz (local.get $n)))
      (if (i64.ge_s (call $hca (i32.const 0) (i32.const 5) (i32.const 5) (i32.const 2)) (i64.const 0))
        (then (local.set $ok (i32.add (local.get $ok) (i32.const 1))))
        (else (local.set $no (i32.add (local.get $no) (i32.const 1)))))
      (local.set $n (i32.sub (local.get $n) (i32.const 1)))
      (br $again)))
    (i32.add (i32.mul (local.get $ok) (i32.const 1000)) (local.get $no)))
  (func (export "sidecar_on_response") (param i64 i32 i32)))"""

RIGHTS_READ = 1 << 1
RIGHTS_WRITE = 1 << 6
O_CREAT = 1
SECRET = "the host's secret, never for a guest"


async def vm_of(client: SidecarClient, text: str, **params: Any) -> str:
    """A VM of a guest written here (`new_vm` takes the guests in `tests/guests/` by name)."""
    return (await rpc(client, "vm.create", {"wat": text, **params}))["vm_id"]


class Bystander:
    """A VM whose `count` must answer 1, 2, 3, ... however its neighbour behaves."""

    def __init__(self, client: SidecarClient, vm_id: str) -> None:
        self.client = client
        self.vm_id = vm_id
        self.calls = 0

    @classmethod
    async def start(cls, client: SidecarClient) -> Bystander:
        bystander = cls(client, await new_vm(client, "abi"))
        await bystander.step()
        return bystander

    async def step(self) -> None:
        answer = await call(self.client, self.vm_id, "count")
        self.calls += 1
        assert answer["results"] == [self.calls], answer


class Outcome:
    def __init__(self) -> None:
        self.result: Any = None
        self.error: RemoteError | None = None
        self.elapsed = 0.0
        self.bystander_calls = 0  # bystander answers that arrived while the attack was in flight

    def refused(self, code: int, limit: str | None = None) -> dict[str, Any]:
        assert self.error is not None, f"the attack succeeded: {self.result}"
        error = self.error
        assert error.code == code, (error.code, error.message, error.data)
        assert "Traceback" not in error.message and "Traceback" not in str(error.data)
        if limit is not None:
            assert error.data["limit"] == limit and error.data["env"] == "SIDECAR_" + limit.upper(), error.data
        return error.data


async def attack(bystander: Bystander, method: str, params: dict[str, Any]) -> Outcome:
    """Send the attack, call the bystander until the attack's answer is in, then a few more."""
    outcome = Outcome()
    done = anyio.Event()
    started = time.monotonic()
    _, result = await bystander.client.start_request(method, params)

    async def finish() -> None:
        try:
            outcome.result = await result()
        except RemoteError as error:
            outcome.error = error
        finally:
            outcome.elapsed = time.monotonic() - started
            done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(finish)
        with anyio.fail_after(WAIT):
            while not done.is_set():
                await bystander.step()
                outcome.bystander_calls += not done.is_set()
    for _ in range(3):
        await bystander.step()
    return outcome


def within_budget(outcome: Outcome, budget_ms: int) -> None:
    """Ended by its budget: not before it, and by 1.3 times it."""
    assert budget_ms / 1000 * 0.95 <= outcome.elapsed <= budget_ms / 1000 * 1.3, outcome.elapsed
    assert outcome.bystander_calls >= 3, "the bystander was not served while the attack ran"


AttackCase = Callable[[SidecarClient, Bystander], Awaitable[None]]


async def infinite_loop(client: SidecarClient, bystander: Bystander) -> None:
    vm_id = await new_vm(client, "faults", limits={"vm_call_timeout_ms": BUDGET_MS})
    outcome = await attack(bystander, "vm.call", {"vm_id": vm_id, "export": "spin"})
    assert outcome.refused(-32004, "vm_call_timeout_ms")["capacity"] == BUDGET_MS
    within_budget(outcome, BUDGET_MS)
    assert (await call(client, vm_id, "div", 84, 2))["results"] == [42]


async def memory_bomb(client: SidecarClient, bystander: Bystander) -> None:
    vm_id = await vm_of(client, MEMORY_BOMB, limits={"vm_memory_bytes": 16 * MIB})
    outcome = await attack(bystander, "vm.call", {"vm_id": vm_id, "export": "bomb"})
    if outcome.error is not None:  # a budget error names the limit...
        assert outcome.refused(-32002, "vm_memory_bytes")["capacity"] == 16 * MIB
    else:  # ...or memory.grow said -1 at the budget, as the spec has it
        pages = outcome.result["results"][0]
        assert 16 * MIB - 16 * 65536 < pages * 65536 <= 16 * MIB, pages
    assert (await call(client, vm_id, "huge"))["results"] == [-1]
    assert (await call(client, vm_id, "pages"))["results"][0] * 65536 <= 16 * MIB


async def deep_recursion(client: SidecarClient, bystander: Bystander) -> None:
    vm_id = await new_vm(client, "faults")
    outcome = await attack(bystander, "vm.call", {"vm_id": vm_id, "export": "recurse", "args": [0]})
    assert outcome.refused(-32003)["trap_code"] == "stack_overflow"
    assert (await call(client, vm_id, "div", 9, 3))["results"] == [3]


async def output_flood(client: SidecarClient, bystander: Bystander) -> None:
    vm_id = await new_vm(client, "abi", limits={"vm_output_bytes": 65536})
    outcome = await attack(bystander, "vm.call", {"vm_id": vm_id, "export": "emit", "args": [60000, 10**6]})
    data = outcome.refused(-32002, "vm_output_bytes")
    assert data["capacity"] == 65536 and data["observed"] > 65536
    assert len(output_bytes(await call(client, vm_id, "emit", 100, 3))) == 300  # the VM serves on


async def host_call_flood(client: SidecarClient, bystander: Bystander) -> None:
    vm_id = await vm_of(client, FLOOD, limits={"vm_host_calls_in_flight": 8})
    outcome = await attack(bystander, "vm.call", {"vm_id": vm_id, "export": "flood", "args": [500]})
    assert outcome.result["results"] == [8 * 1000 + 492], outcome.result  # 8 accepted, the rest refused
    assert (await call(client, vm_id, "flood", 5))["results"] == [5]  # still full: all refused
    listed = {vm["vm_id"]: vm for vm in (await rpc(client, "vm.list"))["vms"]}
    assert listed[vm_id]["host_calls_pending"] == 8
    assert (await rpc(client, "sidecar.stats"))["host_calls_pending"] == 8


async def table_bomb(client: SidecarClient, bystander: Bystander) -> None:
    outcome = await attack(bystander, "vm.create", {"wat": "(module (table 200000 funcref))"})
    data = outcome.refused(-32002, "vm_table_elements")
    assert data["capacity"] == 100000 and data["observed"] == 200000
    vm_id = await vm_of(client, TABLE_GROWER)
    grown = await attack(bystander, "vm.call", {"vm_id": vm_id, "export": "grow"})
    assert grown.result["results"] == [-1], grown.result  # table.grow past the budget fails in the guest
    assert (await call(client, vm_id, "size"))["results"] == [1]


async def memory_count_bomb(client: SidecarClient, bystander: Bystander) -> None:
    outcome = await attack(bystander, "vm.create", {"wat": "(module" + " (memory 1)" * 5 + ")"})
    data = outcome.refused(-32002, "vm_memories")
    assert data["capacity"] == 4 and data["observed"] == 5


async def table_count_bomb(client: SidecarClient, bystander: Bystander) -> None:
    outcome = await attack(bystander, "vm.create", {"wat": "(module" + " (table 1 funcref)" * 17 + ")"})
    data = outcome.refused(-32002, "vm_tables")
    assert data["capacity"] == 16 and data["observed"] == 17


async def endless_start(client: SidecarClient, bystander: Bystander) -> None:
    outcome = await attack(bystander, "vm.create", {"wat": wat("start_spin"),
                                                    "limits": {"vm_call_timeout_ms": BUDGET_MS}})
    assert outcome.refused(-32004, "vm_call_timeout_ms")["capacity"] == BUDGET_MS
    within_budget(outcome, BUDGET_MS)
    assert [vm["vm_id"] for vm in (await rpc(client, "vm.list"))["vms"]] == [bystander.vm_id]


ATTACKS: dict[str, AttackCase] = {
    "infinite-loop": infinite_loop,
    "memory-bomb": memory_bomb,
    "deep-recursion": deep_recursion,
    "output-flood": output_flood,
    "host-call-flood": host_call_flood,
    "table-bomb": table_bomb,
    "memory-count-bomb": memory_count_bomb,
    "table-count-bomb": table_count_bomb,
    "endless-start": endless_start,
}


async def hold(vm_id: str, method: str, params: Any) -> Any:
    """A host that never answers: the flooded calls stay in flight."""
    await anyio.sleep_forever()


@pytest.mark.parametrize("name", list(ATTACKS))
async def test_an_attack_ends_in_its_budget_and_the_neighbour_is_served(tmp_path: Path, name: str) -> None:
    with anyio.fail_after(4 * WAIT):
        async with logged_session(tmp_path, host_handler=hold) as client:
            bystander = await Bystander.start(client)
            await ATTACKS[name](client, bystander)
            await bystander.step()
            assert await rpc(client, "ping") == {}


# -- escaping a preopen -------------------------------------------------------------------------


def sandbox(tmp_path: Path) -> tuple[Path, list[dict[str, Any]]]:
    """A preopened `box` holding one file and two symlinks out of it, next to a secret."""
    box = tmp_path / "box"
    (box / "sub").mkdir(parents=True)
    (box / "allowed.txt").write_text("inside the box")
    (tmp_path / "secret.txt").write_text(SECRET)
    (box / "link_out").symlink_to("../secret.txt")
    (box / "abs_link").symlink_to(tmp_path / "secret.txt")
    return box, [{"host_path": str(box), "guest_path": "/box"}]


@pytest.mark.parametrize("mode", ["stateful", "stateless"])
async def test_a_wat_guest_cannot_leave_its_preopen(tmp_path: Path, mode: str) -> None:
    box, preopens = sandbox(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with anyio.fail_after(4 * WAIT):
        async with logged_session(tmp_path) as client:
            bystander = await Bystander.start(client)
            vm_id = await new_vm(client, "opener", mode=mode, wasi={"preopens": preopens})

            async def open_(path: str, *, directory: int = 3, oflags: int = 0, rights: int = RIGHTS_READ) -> Any:
                outcome = await attack(bystander, "vm.call", {"vm_id": vm_id, "export": "open", "input": path,
                                                              "args": [directory, oflags, rights]})
                assert outcome.error is None, (path, outcome.error)
                assert SECRET.encode() not in output_bytes(outcome.result)
                return outcome.result["results"][0], output_bytes(outcome.result)

            # The preopen works (fd 3 is /box), so the refusals below are about leaving it.
            assert await open_("allowed.txt") == (0, b"inside the box")
            assert await open_("sub/../allowed.txt") == (0, b"inside the box")
            escapes = ["../secret.txt", "sub/../../secret.txt", "./../secret.txt", "link_out", "abs_link",
                       "/etc/passwd", str(tmp_path / "secret.txt"), "/box/../secret.txt", "..", "../box/../secret.txt"]
            for path in escapes:
                errno, output = await open_(path)
                assert errno != 0 and output == b"", (path, errno, output)
            for directory in (0, 1, 2, 4, 99, -1):  # no other descriptor is a directory of the host
                errno, _ = await open_("secret.txt", directory=directory)
                assert errno != 0, (directory, errno)
            for path in ("new.txt", "../escaped.txt", "link_out"):  # read-only: nothing is created or written
                errno, _ = await open_(path, oflags=O_CREAT, rights=RIGHTS_WRITE)
                assert errno != 0, (path, errno)
    assert sorted(p.name for p in tmp_path.rglob("*") if not p.name.startswith("sidecar-")) == before
    assert (tmp_path / "secret.txt").read_text() == SECRET


ESCAPES = r"""
import json, os
found = {}
for name, path in [("dotdot", "/box/../secret.txt"), ("absolute", SECRET_PATH), ("link", "/box/link_out"),
                   ("abslink", "/box/abs_link"), ("etc", "/etc/passwd"), ("relative", "../secret.txt")]:
    try:
        with open(path) as handle:
            found[name] = "READ " + handle.read()
    except Exception as exc:
        found[name] = type(exc).__name__
for name, path in [("root", "/"), ("parent", "/box/..")]:
    try:
        found[name] = "LISTED " + ",".join(os.listdir(path))
    except Exception as exc:
        found[name] = type(exc).__name__
try:
    with open("/box/new.txt", "w") as handle:
        handle.write("x")
    found["write"] = "WROTE"
except Exception as exc:
    found["write"] = type(exc).__name__
found["allowed"] = open("/box/allowed.txt").read()
print(json.dumps(found))
"""


@pytest.mark.slow
async def test_cpython_cannot_leave_its_preopen(tmp_path: Path, cpython: Path) -> None:
    box, preopens = sandbox(tmp_path)
    code = ESCAPES.replace("SECRET_PATH", repr(str(tmp_path / "secret.txt")))
    with anyio.fail_after(4 * WAIT):
        async with logged_session(tmp_path) as client:
            bystander = await Bystander.start(client)
            vm_id = (await rpc(client, "vm.create", {"path": str(cpython),
                                                     "wasi": {"args": ["python"], "preopens": preopens}}))["vm_id"]
            outcome = await attack(bystander, "vm.run", {"vm_id": vm_id, "args": ["-c", code]})
    assert outcome.error is None, outcome.error
    assert outcome.result["exit_code"] == 0, outcome.result["stderr"]
    assert SECRET not in outcome.result["stdout"] + outcome.result["stderr"]
    found = json.loads(outcome.result["stdout"])
    assert found.pop("allowed") == "inside the box"
    assert all(not value.startswith(("READ", "WROTE")) for value in found.values()), found
    assert not any("secret" in value for value in found.values()), found
    assert not (box / "new.txt").exists()


@pytest.mark.slow
async def test_cpython_that_never_ends_is_stopped_by_its_budget(tmp_path: Path, cpython: Path) -> None:
    budget = 3000  # CPython's own start-up takes part of it
    with anyio.fail_after(4 * WAIT):
        async with logged_session(tmp_path) as client:
            bystander = await Bystander.start(client)
            vm_id = (await rpc(client, "vm.create", {"path": str(cpython), "wasi": {"args": ["python"]},
                                                     "limits": {"vm_call_timeout_ms": budget}}))["vm_id"]
            outcome = await attack(bystander, "vm.run", {"vm_id": vm_id, "args": ["-c", "while True: pass"]})
            assert outcome.refused(-32004, "vm_call_timeout_ms")["capacity"] == budget
            within_budget(outcome, budget)
            after = await rpc(client, "vm.run", {"vm_id": vm_id, "args": ["-c", "print('next')"]})
            assert after["stdout"] == "next\n"
