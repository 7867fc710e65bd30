"""wasm-sidecar: runs untrusted WebAssembly guests for a host application over JSON-RPC 2.0."""

# The one place the version is written: the build reads it from here (`[tool.hatch.version]`),
# so the daemon never imports importlib.metadata for it (~35 ms of a ~190 ms cold start).
__version__ = "0.1.0"
# The state directory's variable (`sidecar.state_dir`'s), here because the CLI reads it before its
# first answer, and a daemon without a named directory need not import that module until later.
STATE_DIR_ENV = "SIDECAR_STATE_DIR"
