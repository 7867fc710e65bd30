"""The wasm-sidecar wire protocol: pure types, framing, decoding and correlation, no I/O."""

PROTOCOL_VERSION = 1
# The guest ABI `initialize` announces (DESIGN.md): v1; extensions add imports without breaking v1 guests.
GUEST_ABI_VERSION = 1
