"""The daemon as a process: how it ends (EOF, signals, broken output), backpressure, CLI, logs."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys

import pytest

from .support import WAIT

PING = b'{"jsonrpc":"2.0","id":1,"method":"ping"}\n'


def spawn(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "sidecar", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )


class Lines:
    """Reads the sidecar's stdout line by line with a deadline per line (select on the raw fd)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self._fd = proc.stdout.fileno()
        self._buffer = b""

    def next(self) -> dict:
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([self._fd], [], [], WAIT)
            assert ready, "no answer from the sidecar"
            chunk = os.read(self._fd, 1 << 16)
            assert chunk, "the sidecar closed its output"
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)


def read_line(proc: subprocess.Popen[bytes]) -> dict:
    return Lines(proc).next()


def events(stderr: bytes) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.strip()]


def ping_then_end_input(proc: subprocess.Popen[bytes]) -> list[dict]:
    """One answered ping, then end of input: the exit code must be 0; returns the log events."""
    proc.stdin.write(PING)
    proc.stdin.flush()
    assert read_line(proc)["result"] == {}
    proc.stdin.close()
    assert proc.wait(WAIT) == 0
    return events(proc.stderr.read())


def test_end_of_input_exits_zero_and_logs_why() -> None:
    with spawn() as proc:
        logged = ping_then_end_input(proc)
        assert any(e["event"] == "sidecar_stopped" and e["reason"] == "end_of_input" for e in logged)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_stop_the_daemon_cleanly(signum: int) -> None:
    with spawn() as proc:
        proc.stdin.write(PING)
        proc.stdin.flush()
        read_line(proc)  # serving, so the handlers are installed
        proc.send_signal(signum)
        assert proc.wait(WAIT) == 0
        logged = events(proc.stderr.read())
        assert any(e["event"] == "signal_received" and e["signal"] == signal.Signals(signum).name for e in logged)
        proc.stdin.close()


def test_broken_output_ends_the_process() -> None:
    with spawn() as proc:
        proc.stdin.write(PING)
        proc.stdin.flush()
        read_line(proc)
        proc.stdout.close()  # the host stops listening but keeps stdin open
        proc.stdin.write(PING * 10)
        proc.stdin.flush()
        assert proc.wait(WAIT) == 0
        assert any(e["event"] == "output_closed" for e in events(proc.stderr.read()))
        proc.stdin.close()


def test_slow_reader_backpressure_bounds_queued_output() -> None:
    """With a small outbox the sidecar stops reading once the host stops reading, then catches up."""
    with spawn(env={"SIDECAR_PROTOCOL_OUTBOX_BYTES": "64KiB"}) as proc:
        os.set_blocking(proc.stdin.fileno(), False)
        request = b'{"jsonrpc":"2.0","id":%d,"method":"ping"}\n'
        sent = 0
        pending = b""
        while True:  # write until the sidecar stops taking input
            if not pending:
                pending = request % sent
            _, writable, _ = select.select([], [proc.stdin], [], 1.0)
            if not writable:
                break
            try:
                written = os.write(proc.stdin.fileno(), pending)
            except BlockingIOError:
                continue
            pending = pending[written:]
            if not pending:
                sent += 1
            assert sent < 2_000_000, "the sidecar never pushed back"
        # Bounded: the two pipes (64 KiB each here) plus the outbox plus one read chunk of answers.
        assert 1000 < sent < 40_000
        os.set_blocking(proc.stdin.fileno(), True)
        ids = set()
        lines = Lines(proc)
        while len(ids) < sent:
            ids.add(lines.next()["id"])
        assert ids == set(range(sent))
        proc.stdin.close()
        assert proc.wait(WAIT) == 0


def test_stdout_carries_only_protocol_frames_even_when_code_prints() -> None:
    """fd 1 is redirected to the log stream, so a stray print cannot corrupt the channel."""
    code = (
        "import sys, os; from sidecar import transport; i, o = transport.claim_stdio(); "
        "print('stray print'); os.write(1, b'stray write\\n'); os.write(o, b'{}\\n')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=WAIT, check=True)
    assert done.stdout == b"{}\n"
    assert b"stray print" in done.stderr and b"stray write" in done.stderr


def test_cli_version_help_and_bad_usage() -> None:
    version = subprocess.run([sys.executable, "-m", "sidecar", "--version"], capture_output=True, timeout=WAIT)
    assert version.returncode == 0 and version.stdout.startswith(b"wasm-sidecar ")
    helped = subprocess.run([sys.executable, "-m", "sidecar", "--help"], capture_output=True, timeout=WAIT)
    assert helped.returncode == 0 and b"JSON-RPC 2.0" in helped.stdout
    bad = subprocess.run([sys.executable, "-m", "sidecar", "frobnicate"], capture_output=True, timeout=WAIT)
    assert bad.returncode == 2 and b"invalid choice" in bad.stderr


def test_console_log_format_and_bad_log_settings() -> None:
    with spawn(env={"SIDECAR_LOG_FORMAT": "console"}) as proc:
        proc.stdin.close()
        assert proc.wait(WAIT) == 0
        text = proc.stderr.read().decode()
        assert "sidecar_started" in text and not text.lstrip().startswith("{")
    with spawn(env={"SIDECAR_LOG_LEVEL": "chatty", "SIDECAR_LOG_FORMAT": "xml"}) as proc:
        proc.stdin.close()
        assert proc.wait(WAIT) == 0
        logged = events(proc.stderr.read())
        ignored = {e["variable"] for e in logged if e["event"] == "log_setting_ignored"}
        assert ignored == {"SIDECAR_LOG_LEVEL", "SIDECAR_LOG_FORMAT"}


def test_bad_limit_variable_warns_and_serves() -> None:
    with spawn(env={"SIDECAR_PROTOCOL_FRAME_BYTES": "lots"}) as proc:
        logged = ping_then_end_input(proc)
        assert any(
            e["event"] == "limit_env_ignored" and e["variable"] == "SIDECAR_PROTOCOL_FRAME_BYTES" for e in logged
        )
