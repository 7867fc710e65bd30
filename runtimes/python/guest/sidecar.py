"""Calls from guest Python to the host application, through the sidecar guest ABI's `host_call`.

`host_call(method, params)` sends the host a `host.call` request and blocks until it answers,
under the same limits as any guest's `host_call` (payload size, the host-call timeout, the
eval's own deadline). Every failure is a `HostError`:

- the host answered with an error: `HostError` with the host's `code`, `message` and `data`;
- no answer in time: `HostCallTimeout`, also a `TimeoutError` (`code` -2);
- the sidecar refused the call (a limit, a payload that is not JSON): `HostCallRefused`
  (`code` -3), whose `data` holds the refusal's details, such as the limit it names.
"""

from __future__ import annotations

import json

import _sidecar

__all__ = ["HostCallRefused", "HostCallTimeout", "HostError", "host_call"]

_TIMEOUT = -2
_REFUSED = -3


class HostError(Exception):
    """The host call failed; `code`, `message` and `data` say how."""

    def __init__(self, code: int, message: str, data: object = None) -> None:
        super().__init__(code, message, data)
        self.code = code
        self.message = message
        self.data = data

    def __str__(self) -> str:
        return f"{self.message} (code {self.code})"


class HostCallTimeout(HostError, TimeoutError):
    """The host did not answer before the host-call timeout or the eval's deadline."""


class HostCallRefused(HostError):
    """The sidecar did not send the call, or dropped it: `data` says why (and names any limit)."""


def host_call(method: str, params: object = None) -> object:
    """The host's JSON result for `method` called with `params` (anything `json.dumps` takes)."""
    status, payload = _sidecar.host_call(method.encode("utf-8"), json.dumps(params, separators=(",", ":")).encode())
    if status >= 0:
        return json.loads(payload)
    if status == _TIMEOUT:
        raise HostCallTimeout(_TIMEOUT, f"host call {method!r} was not answered in time")
    error = json.loads(payload) if payload else {}
    if status == _REFUSED:
        details = {key: value for key, value in error.items() if key not in ("code", "message")}
        raise HostCallRefused(_REFUSED, error.get("message", "host call refused"), details or None)
    raise HostError(error.get("code", status), error.get("message", "host call failed"), error.get("data"))
