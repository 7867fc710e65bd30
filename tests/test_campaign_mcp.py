"""MCP campaign: seeded, pipelined MCP frames, valid and not, against `wasm-sidecar mcp`.

The frames mix every MCP method the front serves with unknown ones, tool calls with arguments of
every JSON shape (wrong types, unknown members, bad session names, arrays, nulls, deep nesting),
unknown tools, real Python runs (fresh and in a few sessions: results, exceptions, syntax errors),
notifications, cancels of calls in flight and of ids never used, and non-JSON, all written before
the answers are read. Every request must be answered exactly once with a well-formed frame and no
-32603; a cancelled call may go unanswered, never answered twice; the process then serves on,
exits 0 at end of input, and its logs are clean.

`SIDECAR_FUZZ_SEED` replays a run; every failure names its seed.
"""

from __future__ import annotations

import json
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest

from .campaign import assert_clean_logs, fuzz_seed, raw_sidecar, seed_noted, well_formed
from .mcp_support import initialize

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("python_runtime")]

FRAMES = 1_500
CAMPAIGN_WAIT = 120  # seconds: the whole exchange, Python runs included, on a busy 2-core machine
CODE = ["1 + 1", "print('x')", "raise ValueError('no')", "import json\njson.dumps([1])", "def f(:", "x = 3",
        "x", "exit(2)", "'é' * 3", ""]
# Frames that get no answer, or one with id null.
STRAY = [b"{", b"null", b'{"jsonrpc":"2.0","method":"notifications/initialized"}', b"\xff"]
SESSIONS = ["a", "b", "c", "", " spaced", "-dash", "x" * 65, "ok.name_1"]


def json_value(rng: random.Random, depth: int = 0) -> Any:
    """Any JSON value, small."""
    kinds = ["null", "bool", "int", "float", "str"] + (["list", "dict"] if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "list":
        return [json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if kind == "dict":
        return {rng.choice(["code", "session", "timeout_ms", "k", "_meta"]): json_value(rng, depth + 1)
                for _ in range(rng.randint(0, 3))}
    return {"null": None, "bool": rng.random() < 0.5, "int": rng.randint(-(2**70), 2**70), "float": rng.random(),
            "str": rng.choice(["", "a", "\u2028", "x" * 100])}[kind]


def arguments(rng: random.Random) -> Any:
    roll = rng.random()
    if roll < 0.45:
        args: dict[str, Any] = {"code": rng.choice(CODE)}
        if rng.random() < 0.5:
            args["session"] = rng.choice(SESSIONS)
        if rng.random() < 0.2:
            args["timeout_ms"] = rng.choice([0, 1, 5000, -1, 2**40, "5"])
        return args
    if roll < 0.9:
        return json_value(rng, 1) if rng.random() < 0.3 else {k: json_value(rng, 1) for k in
                                                              rng.sample(["code", "session", "timeout_ms", "x"], 2)}
    return json.loads("[" * 60 + "]" * 60)  # deep, but within what the decoder takes


def frame(rng: random.Random, request_id: int, in_flight: list[int]) -> tuple[bytes, bool]:
    """One frame, and whether it is a request that must be answered."""
    roll = rng.random()
    if roll < 0.55:
        params: dict[str, Any] = {"name": rng.choice(["run_python"] * 6 + ["reset_session", "list_sessions", "nope",
                                                                           ""])}
        if params["name"] == "reset_session":
            params["arguments"] = {"session": rng.choice(SESSIONS)}
        elif params["name"] == "list_sessions":
            params["arguments"] = rng.choice([{}, {"x": 1}, None])
        else:
            params["arguments"] = arguments(rng)
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}
        in_flight.append(request_id)
    elif roll < 0.65:
        message = {"jsonrpc": "2.0", "id": request_id, "method": rng.choice(["ping", "tools/list", "initialize",
                                                                              "resources/list", "vm.create"]),
                   "params": rng.choice([{}, {"_meta": {"progressToken": 1}}, {"cursor": 5}])}
    elif roll < 0.75:
        target = rng.choice(in_flight) if in_flight and rng.random() < 0.7 else 10**9 + request_id
        message = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": target}}
        return json.dumps(message).encode() + b"\n", False
    elif roll < 0.8:
        return rng.choice(STRAY) + b"\n", False
    elif roll < 0.9:
        message = {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": json_value(rng)}
    else:
        message = {"jsonrpc": "2.0", "id": request_id, "method": "tools/call",
                   "params": {"name": "run_python", "arguments": {"code": rng.choice(CODE)}, "extra": [1]}}
    return json.dumps(message).encode() + b"\n", True


def tally(answer: Any, answers: Counter[Any], outcomes: Counter[str]) -> None:
    """Check one answer frame and count it by id and by kind of outcome."""
    assert well_formed(answer), answer
    for item in answer if isinstance(answer, list) else [answer]:
        answers[item["id"]] += 1
        if "error" in item:
            assert item["error"]["code"] != -32603, item
            outcomes["error"] += 1
        else:
            outcomes["tool_error" if item["result"].get("isError") else "result"] += 1


async def test_mcp_campaign(tmp_path: Path) -> None:
    seed = fuzz_seed()
    rng = random.Random(seed)
    with seed_noted(seed):
        cancelled: set[int] = set()
        expected: set[int] = set()
        frames = []
        in_flight: list[int] = []
        for request_id in range(2, FRAMES + 2):
            data, answered = frame(rng, request_id, in_flight)
            frames.append(data)
            if answered:
                expected.add(request_id)
            if data.startswith(b'{"jsonrpc": "2.0", "method": "notifications/cancelled"'):
                cancelled.add(json.loads(data)["params"]["requestId"])
        async with raw_sidecar(tmp_path, command=[sys.executable, "-m", "sidecar", "mcp"]) as peer:
            await peer.request(1, "initialize", initialize()["params"])
            with anyio.fail_after(CAMPAIGN_WAIT):
                await peer.send(b"".join(frames))
                await peer.send(b'{"jsonrpc":"2.0","id":"last","method":"ping"}\n')
                answers: Counter[Any] = Counter()
                outcomes: Counter[str] = Counter()
                while not answers["last"]:
                    tally(json.loads(await peer.line()), answers, outcomes)
            # Answers to guest work may come after the last ping's: collect them at end of input.
            peer.close_input()
            with anyio.fail_after(CAMPAIGN_WAIT):
                for line in await peer.rest_of_output():
                    tally(json.loads(line), answers, outcomes)
                assert await peer.exit_code() == 0
            logs = peer.logs()
        doubled = {key for key, count in answers.items() if count > 1 and key is not None}
        assert not doubled
        unanswered = expected - set(answers)
        assert unanswered <= cancelled, sorted(unanswered - cancelled)[:10]
        # The mix reached every kind of answer: tool results, tool errors, protocol errors.
        assert min(outcomes["result"], outcomes["tool_error"], outcomes["error"]) > 0, outcomes
        assert_clean_logs(logs)
