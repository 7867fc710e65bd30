"""The wasm-sidecar wire protocol: pure types, framing, decoding and correlation, no I/O."""

PROTOCOL_VERSION = 1
