"""Structured logging to stderr, configured once per process.

Owns the structlog setup: JSON lines by default (machines read the sidecar's logs), a console
format for people (`SIDECAR_LOG_FORMAT=console`), the level from `SIDECAR_LOG_LEVEL`. stdout is
the protocol channel, so nothing here may ever write to it.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_FORMATS = ("json", "console")


def configure(environ: Mapping[str, str] | None = None) -> None:
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
    renderer = (
        structlog.processors.JSONRenderer()
        if format_name == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level_name]),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    log = structlog.get_logger()
    for variable, value, allowed in problems:
        log.warning("log_setting_ignored", variable=variable, value=value, allowed=allowed)
