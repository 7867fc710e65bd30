"""wasm-sidecar: runs untrusted WebAssembly guests for a host application over JSON-RPC 2.0."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("wasm-sidecar")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
