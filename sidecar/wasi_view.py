"""A VM's WASI view as wasmtime configuration.

Owns turning `WasiSettings` (args, env, preopens) into a fresh `WasiConfig`, which wasmtime
consumes with each store. Standard streams are left unset, so a guest's stdout and stderr are
discarded unless a run captures them: the sidecar's stdout carries protocol frames only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import wasmtime

from protocol.methods import WasiSettings


def wasi_config(
    wasi: WasiSettings, args: Sequence[str] = (), env: Mapping[str, str] | None = None
) -> wasmtime.WasiConfig:
    """The VM's WASI view (args, env, preopens) as a fresh config; a run adds its own args and env.
    Standard streams are left unset (discarded): stdout carries protocol frames only."""
    config = wasmtime.WasiConfig()
    config.argv = [*wasi.args, *args]
    config.env = list({**wasi.env, **(env or {})}.items())
    for preopen in wasi.preopens:
        config.preopen_dir(preopen.host_path, preopen.guest_path, fs_mutable=preopen.writable)
    return config
