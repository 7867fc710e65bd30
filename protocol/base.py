"""The one base every wire message is built on.

Owns the msgspec configuration shared by all wire types (frozen, keyword-only, unknown fields
refused, absent optional fields left out of the output). Knows nothing about methods.
"""

from __future__ import annotations

import msgspec


class Wire(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """Base of every wire message: strict on input, compact on output.

    msgspec applies `kw_only` only to the fields a class declares itself, so a subclass that puts
    a required field after a defaulted one repeats `kw_only=True` in its own header.
    """
