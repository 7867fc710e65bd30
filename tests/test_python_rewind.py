"""A stateless Python VM rewinds its instance in place after an eval, and every eval still sees a
pristine interpreter (`sidecar.rewind`), through the real process.

One instance per VM (`vm_pool_instances: 1`), so every eval after the first runs on the instance
the one before it used, rewound or replaced: the next eval cannot start before that is done. The
counts are read after an eval that grows memory (`settled`), which is never rewound: every eval
before it has been counted, and it adds nothing to `rewound`. What an eval could leave behind and must not: names,
module attributes, imported modules, builtins, the `random` stream, files it left open; an eval
that grew memory or was stopped mid-way gets a new instance instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from .guests import refused, vm_info
from .support import process_session
from .test_python_sandbox import TIMEOUT_MS, python_vm, run

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.usefixtures("python_runtime"),
    pytest.mark.skipif(not os.access("/proc/self/pagemap", os.R_OK), reason="no /proc/self/pagemap to rewind by"),
]
ONE = {"vm_pool_instances": 1}


GROW = "block = bytearray(16 << 20)\nlen(block)"


async def settled(client: Any, vm_id: str) -> dict[str, int]:
    """The VM's `recycles` once every eval so far has been rewound or replaced (see above)."""
    assert (await run(client, vm_id, GROW))["value"] == str(16 << 20)
    return (await vm_info(client, vm_id))["recycles"]


async def test_rewound_evals_see_a_pristine_interpreter_and_a_new_random_stream() -> None:
    leave = ("import json, sys, builtins, random, os\nleft = 1\njson.marker = 1\n"
             "builtins.print = None\nsys.modules['planted'] = json\nsys.path.append('/nowhere')\n"
             "(random.random(), os.urandom(8).hex())")
    look = ("import json, sys\n('left' in globals(), hasattr(json, 'marker'), 'planted' in sys.modules, "
            "'/nowhere' in sys.path)")
    async with process_session() as (client, _):
        vm_id = await python_vm(client, mode="stateless", limits=ONE)
        draws = []
        for _ in range(4):
            answer = await run(client, vm_id, leave)
            assert answer["status"] == "ok", answer
            draws.append(eval(answer["value"]))
            assert (await run(client, vm_id, look))["value"] == "(False, False, False, False)"
            assert (await run(client, vm_id, "print('still here')"))["stdout"] == "still here\n"
        counted = await settled(client, vm_id)
    numbers, urandoms = zip(*draws, strict=True)
    assert len(set(numbers)) == len(numbers) and len(set(urandoms)) == len(urandoms)
    assert counted["rewound"] == 12


async def test_files_an_eval_leaves_open_are_closed_by_the_rewind(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("secret")
    wasi = {"preopens": [{"host_path": str(tmp_path), "guest_path": "/data"}]}
    opened = "import os\n(os.open('/data/a.txt', os.O_RDONLY), os.open('/data', os.O_RDONLY))"
    async with process_session() as (client, _):
        vm_id = await python_vm(client, mode="stateless", limits=ONE, wasi=wasi)
        first = eval((await run(client, vm_id, opened))["value"])
        stats = [await run(client, vm_id, f"import os\nos.fstat({fd})") for fd in first]
        again = eval((await run(client, vm_id, opened))["value"])
        counted = await settled(client, vm_id)
    assert [stat["error"]["type"] for stat in stats] == ["OSError", "OSError"]  # bad file descriptor
    assert counted["rewound"] == 4  # every eval's instance, the ones that opened files included
    assert again == first  # a new descriptor table: the same numbers come out


async def test_an_eval_that_grew_memory_gets_a_new_instance() -> None:
    async with process_session() as (client, _):
        vm_id = await python_vm(client, mode="stateless", limits=ONE)
        await run(client, vm_id, "0")
        assert (await run(client, vm_id, GROW))["status"] == "ok"
        after = await run(client, vm_id, "'block' in globals()")
        counted = await settled(client, vm_id)
    assert after["value"] == "False"
    assert counted["rewound"] == 2 and counted["calls"] >= 3  # the first and third evals' instances


async def test_an_eval_stopped_mid_way_gets_a_new_instance() -> None:
    async with process_session() as (client, _):
        vm_id = await python_vm(client, mode="stateless", limits=ONE)
        error = await refused(client, "vm.eval", {"vm_id": vm_id, "code": "left = 1\nwhile True: pass",
                                                  "timeout_ms": TIMEOUT_MS}, code=-32004)
        assert error.data["limit"] == "vm_call_timeout_ms"
        after = await run(client, vm_id, "'left' in globals()")
        counted = await settled(client, vm_id)
    assert after["value"] == "False"
    assert counted["trap"] == 1 and counted["rewound"] == 1  # the second eval's instance


async def test_past_vm_rewind_resident_bytes_an_instance_is_replaced() -> None:
    async with process_session() as (client, _):
        vm_id = await python_vm(client, mode="stateless", limits={**ONE, "vm_rewind_resident_bytes": "64 KiB"})
        for _ in range(3):
            assert (await run(client, vm_id, "left = 1\n'left' in globals()"))["value"] == "True"
            assert (await run(client, vm_id, "'left' in globals()"))["value"] == "False"
        counted = await settled(client, vm_id)
    assert counted["rewound"] == 0 and counted["calls"] >= 6
