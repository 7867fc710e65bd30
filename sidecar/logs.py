"""Structured logging to stderr, configured once per process.

Owns the structlog setup: JSON lines by default (machines read the sidecar's logs), a console
format for people (`SIDECAR_LOG_FORMAT=console`), the level from `SIDECAR_LOG_LEVEL`. stdout is
the protocol channel, so nothing here may ever write to it.

Owns too when structlog is imported. It imports asyncio, and the two cost a process ~33 ms (a
quarter of the cold start before issue 15), so the daemon answers its first request before
importing either: it calls `hold()` at its first moment, modules log through `log`, which keeps
each event with the moment it happened while events are held, and `configure()`, once the intake
serves, writes them in order, stamped with those moments. Anywhere else (tools, tests, embedders)
`log` is structlog's logger, fetched per event so that a setup made later, or a test's
`capture_logs`, applies (~10 µs more per event than a module's own proxy: none of the events
logged through it is on a hot path).
"""

from __future__ import annotations

import datetime
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import msgspec  # the first answer is built on it anyway

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}  # logging's numbers, without importing it
_FORMATS = ("json", "console")
_HELD_AT = "_sidecar_held_at"  # a held event's moment, taken out again by `_utc_timestamp`
_lock = threading.Lock()
_held: list[tuple[str, tuple[Any, ...], dict[str, Any]]] | None = None  # a list while events are held


class _Logger:
    """What modules log through (`log.info("event", field=value)`), held or not (module docstring)."""

    def __getattr__(self, method: str) -> Callable[..., Any]:
        if _held is not None:
            return lambda *args, **fields: _hold(method, args, fields)
        import structlog

        return getattr(structlog.get_logger(), method)


log = _Logger()


def hold() -> None:
    """Keep every event from now until `configure()` writes them (the daemon's start)."""
    global _held
    with _lock:
        if _held is None:
            _held = []


def _hold(method: str, args: tuple[Any, ...], fields: dict[str, Any]) -> None:
    with _lock:
        if _held is not None:
            if method == "exception":  # the exception being handled now, not when it is written
                fields.setdefault("exc_info", sys.exc_info())
            _held.append((method, args, {_HELD_AT: time.time(), **fields}))
            return
    getattr(log, method)(*args, **fields)  # released meanwhile


def configure(environ: Mapping[str, str] | None = None) -> None:
    """Set structlog up from `environ` (default `os.environ`); then write any held events."""
    global _held
    import structlog

    env = os.environ if environ is None else environ
    level_name = env.get("SIDECAR_LOG_LEVEL", "info").strip().lower() or "info"
    format_name = env.get("SIDECAR_LOG_FORMAT", "json").strip().lower() or "json"
    problems = []
    if level_name not in _LEVELS:
        problems.append(("SIDECAR_LOG_LEVEL", level_name, sorted(_LEVELS)))
        level_name = "info"
    if format_name not in _FORMATS:
        problems.append(("SIDECAR_LOG_FORMAT", format_name, list(_FORMATS)))
        format_name = "json"
    # A line costs what its processors do (the registry logs one per vm.create): the JSON lines are
    # encoded by msgspec straight to bytes and the time is formatted once per second, which took a
    # `vm_created` line from 9.2 to ~5 µs here; no contextvars are merged, since nothing binds any.
    if format_name == "json" and hasattr(sys.stderr, "buffer"):
        renderer: Any = structlog.processors.JSONRenderer(serializer=_json_bytes)
        factory: Any = structlog.BytesLoggerFactory(file=sys.stderr.buffer)
    else:
        renderer = (structlog.processors.JSONRenderer() if format_name == "json"
                    else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
        factory = structlog.WriteLoggerFactory(file=sys.stderr)
    structlog.configure(
        processors=[structlog.processors.add_log_level, _utc_timestamp, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level_name]),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    logger = structlog.get_logger()
    for variable, value, allowed in problems:
        logger.warning("log_setting_ignored", variable=variable, value=value, allowed=allowed)
    with _lock:
        held, _held = _held or [], None
        for method, args, fields in held:
            getattr(logger, method)(*args, **fields)


_encoder = msgspec.json.Encoder(enc_hook=repr)  # what JSON cannot hold is logged as its repr, as structlog's does


def _json_bytes(event: dict[str, Any], **_: Any) -> bytes:
    return _encoder.encode(event)


_second: tuple[int, str] = (0, "")  # the whole second last stamped, and its text up to the seconds


def _utc_timestamp(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    """structlog's `TimeStamper(fmt="iso", utc=True)` text ("2026-01-02T03:04:05.678901Z"), the
    date and time to the second formatted once per second rather than on every line; a held
    event's is the moment it happened."""
    global _second
    now = event.pop(_HELD_AT, None) or time.time()
    whole = int(now)
    second = _second  # one read and one write of a tuple: threads never see half an update
    if second[0] != whole:
        second = _second = (whole, datetime.datetime.fromtimestamp(whole, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    micros = int((now - whole) * 1_000_000)
    event["timestamp"] = f"{second[1]}.{micros:06d}Z" if micros else f"{second[1]}Z"
    return event
