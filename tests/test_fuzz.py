"""Property: whatever arrives, every request gets exactly one well-formed answer and the sidecar serves on."""

from __future__ import annotations

import json

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .campaign import well_formed
from .support import WAIT, memory_session

pytestmark = pytest.mark.anyio

METHODS = ["ping", "initialize", "sidecar.stats", "sidecar.limits", "$/cancelRequest", "vm.list", "no.such", "", "rx"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
param_names = st.sampled_from(["id", "x", "client", "protocol_version"])
params = st.none() | st.dictionaries(param_names, json_values, max_size=2)


@st.composite
def requests(draw: st.DrawFn, index: int) -> tuple[str, bool]:
    """One line, and whether it is a request with an id that must be answered."""
    kind = draw(st.sampled_from(["request", "notification", "junk_bytes", "junk_json"]))
    if kind in ("request", "notification"):
        message = {"jsonrpc": "2.0", "method": draw(st.sampled_from(METHODS))}
        if kind == "request":
            message["id"] = f"r{index}"
        if (p := draw(params)) is not None:
            message["params"] = p
        return json.dumps(message), kind == "request"
    if kind == "junk_json":
        return json.dumps(draw(json_values)), False
    junk = draw(st.binary(min_size=1, max_size=40)).replace(b"\n", b" ")
    return junk.decode("latin-1"), False


@st.composite
def sessions(draw: st.DrawFn) -> list[tuple[str, bool]]:
    size = draw(st.integers(min_value=1, max_value=12))
    return [draw(requests(index)) for index in range(size)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=sessions())
async def test_every_request_answered_exactly_once(lines: list[tuple[str, bool]]) -> None:
    expected = {f"r{i}" for i, (_, answered) in enumerate(lines) if answered}
    async with memory_session() as (client, _):
        payload = "".join(line + "\n" for line, _ in lines) + '{"jsonrpc":"2.0","id":"end","method":"ping"}\n'
        await client.send_frame(payload.encode("utf-8", "surrogateescape"))
        answers: dict[object, int] = {}
        with anyio.fail_after(WAIT):
            while "end" not in answers:
                frame = await client.unsolicited.receive()
                assert well_formed(frame), frame
                for item in frame if isinstance(frame, list) else [frame]:
                    answers[item["id"]] = answers.get(item["id"], 0) + 1
        answered = {key: count for key, count in answers.items() if key not in (None, "end")}
        assert set(answered) == expected
        assert all(count == 1 for count in answered.values())
