"""Python objects handed to C callbacks by number: the registry shared by every trampoline.

Owns the slot numbers that travel through wasmtime as a callback's `data` pointer and the
finalizer that frees a slot when wasmtime drops the callback, so a registry holds exactly the
live callbacks. dict get/pop and count() are atomic under the GIL, which is all the locking a
callback and its finalizer need.

A slot lives as long as the store that can call it, so what it holds must not keep that store
alive: the registry is a global, and a store reachable from it is never collected, only closed.
`unbound` splits a bound method (whose object usually owns the store) into its function and a
weak reference to the object.
"""

from __future__ import annotations

import ctypes
import itertools
import weakref
from collections.abc import Callable
from types import MethodType
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")


class Slots(Generic[Item]):
    def __init__(self, finalizer_type: type) -> None:
        self.items: dict[int, Item] = {}  # read directly by trampolines: a method call costs there
        self._numbers = itertools.count(1)  # 0 would arrive from C as NULL/None

        @finalizer_type
        def forget(slot):  # type: ignore[no-untyped-def]
            try:
                self.items.pop(slot or 0, None)
            except BaseException:  # noqa: BLE001 - runs from C, possibly late in interpreter shutdown
                pass

        self.finalizer = forget
        # A store freed during interpreter teardown may still call it: keep it alive for good.
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(forget))

    def add(self, item: Item) -> int:
        slot = next(self._numbers)
        self.items[slot] = item
        return slot

    def get(self, slot: int | None) -> Item | None:
        return self.items.get(slot or 0)

    def discard(self, slot: int) -> None:
        self.items.pop(slot, None)

    def __len__(self) -> int:
        return len(self.items)


def unbound(function: Callable[..., Any]) -> tuple[Callable[..., Any], weakref.ref[Any] | None]:
    """(function, owner) for a slot to hold: a bound method as its plain function and a weak
    reference to its object (call `function(owner(), ...)`), anything else as itself and None."""
    if isinstance(function, MethodType):
        return function.__func__, weakref.ref(function.__self__)
    return function, None


def call_unbound(function: Callable[..., Any], owner: weakref.ref[Any] | None, *args: Any) -> Any:
    """Call what `unbound` split; ReferenceError once the owner is gone."""
    if owner is None:
        return function(*args)
    target = owner()
    if target is None:
        raise ReferenceError("the callback's object is gone")
    return function(target, *args)


def c_text(message: str) -> bytes:
    """A message as C text for wasmtime: UTF-8, no NUL bytes inside."""
    return message.encode("utf-8", "backslashreplace").replace(b"\0", b"\\0")
