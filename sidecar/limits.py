"""The classified limits inventory: every bound the sidecar enforces, its value, and its errors.

Owns loading the inventory (`sidecar/limits.toml` in the wheel, `config/limits.toml` in a source
tree), resolving each entry from its `SIDECAR_*` variable, per-VM tightening for `vm.create`,
and the shape of a bound biting: the `limit_exceeded` error plus the `limit_exhausted` log event.
Knows nothing about what the bounds guard: callers read a value (`limits.vm_memory_bytes`),
enforce it themselves, and come back here to report it.

Environment rules: a valid value wins. An empty, zero (unless the entry says 0 means off),
negative, malformed or out-of-range value falls back to the default with a `limit_env_ignored`
warning; startup never fails over a variable. Byte values take the binary suffixes `B`, `KiB`,
`MiB`, `GiB`, `TiB`; `K`, `KB`, `M`, `MB`... are refused because readers disagree on whether
they mean 1000 or 1024. Time values take `ms`, `s`, `min`, `h`. Counts take bare numbers.
Invariants are not tunable: setting their variable only logs the warning.
"""

from __future__ import annotations

import functools
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal, get_args

from protocol.errors import InvalidParamsError, LimitExceededError, env_var_for

from .logs import log

LimitClass = Literal["guest", "runner", "protocol", "invariant"]
Source = Literal["default", "env", "vm"]

# Binary multiples only; each table is one unit kind, keyed by the entry `unit` it applies to.
_SCALES: dict[str, dict[str, int]] = {
    "bytes": {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40},
    "ms": {"ms": 1, "s": 1000, "min": 60_000, "h": 3_600_000},
    "us": {"us": 1, "ms": 1000, "s": 1_000_000},
}
# Dimensionless units: the name only says what is counted, so values are bare numbers.
COUNT_UNITS = frozenset(
    {"count", "requests", "ids", "fuel", "calls", "elements", "instances", "tables", "memories",
     "vms", "modules", "threads", "engines", "sessions"}
)
_AMBIGUOUS = frozenset({"k", "K", "kB", "KB", "M", "MB", "G", "GB", "T", "TB", "m", "b", "kb", "mb", "gb"})
# Every value must survive an int64 on the way into wasmtime.
_LARGEST = 2**63 - 1
_NUMBER = re.compile(r"(-?)([0-9]+(?:_[0-9]+)*(?:\.[0-9]+)?)\s*([A-Za-z]*)")
_NAME = re.compile(r"[a-z][a-z0-9_]*")
_REQUIRED_KEYS = frozenset({"name", "class", "default", "unit", "rationale", "zero_means_off"})
_OPTIONAL_KEYS = frozenset({"env", "min", "max"})


@dataclass(frozen=True)
class LimitSpec:
    """One inventory entry, as written in the TOML (amounts already converted to `unit`)."""

    name: str
    limit_class: LimitClass
    env: str | None
    default: int
    unit: str
    rationale: str
    min: int | None = None
    max: int | None = None
    zero_means_off: bool = False


class InventoryError(ValueError):
    """The inventory file itself is wrong: a packaging bug, so it fails loudly (unlike env)."""


class LimitValueError(ValueError):
    """A value a limit cannot take; the message is the reason logged or sent back to the host."""


def _parse_amount(text: str, *, name: str, unit: str) -> int:
    """A number with an optional suffix of `unit`'s kind, in `unit`; sign kept for the caller."""
    text = text.strip()
    if not text:
        raise LimitValueError("empty")
    if len(text) > 64:  # longer than any int64 with a unit; also keeps int() parsing cheap
        raise LimitValueError("too long")
    match = _NUMBER.fullmatch(text)
    if match is None:
        raise LimitValueError("not a number")
    sign, digits, suffix = match.groups()
    scales = _SCALES.get(unit, {})
    accepted = f"one of {', '.join(scales)}" if scales else "a bare number"
    if not suffix:
        scale = 1
    elif suffix in scales:
        scale = scales[suffix]
    elif suffix in _AMBIGUOUS:
        raise LimitValueError(f"unit {suffix!r} is ambiguous: {name} takes {accepted}")
    elif any(suffix in table for table in _SCALES.values()):
        raise LimitValueError(f"unit {suffix!r} is the wrong kind: {name} is in {unit}")
    else:
        raise LimitValueError(f"unknown unit {suffix!r}: {name} takes {accepted}")
    amount = Fraction(digits.replace("_", "")) * scale
    if amount.denominator != 1:
        raise LimitValueError(f"not a whole number of {unit}")
    return -int(amount) if sign else int(amount)


def parse_value(spec: LimitSpec, raw: object) -> int:
    """An env string or a `vm.create` value turned into a valid value of `spec`, or why not."""
    if isinstance(raw, str):
        value = _parse_amount(raw, name=spec.name, unit=spec.unit)
    elif isinstance(raw, int) and not isinstance(raw, bool):
        value = raw
    elif isinstance(raw, float) and raw.is_integer():
        value = int(raw)
    else:
        raise LimitValueError(f"not a whole number of {spec.unit}")
    return _check_range(spec, value)


def _check_range(spec: LimitSpec, value: int) -> int:
    if value < 0:
        raise LimitValueError("negative")
    if value == 0:
        if spec.zero_means_off:
            return 0
        raise LimitValueError("zero is not allowed (it does not mean off for this limit)")
    if spec.min is not None and value < spec.min:
        raise LimitValueError(f"below the minimum {format_value(spec, spec.min)}")
    highest = _LARGEST if spec.max is None else spec.max
    if value > highest:
        raise LimitValueError(f"above the maximum {format_value(spec, highest)}")
    return value


def format_value(spec: LimitSpec, value: int) -> str:
    """A value in the largest unit that shows it exactly (`16 MiB`, `30 s`); it parses back."""
    scales = _SCALES.get(spec.unit)
    if not scales:
        return str(value)
    # Every table has a scale of 1, so some suffix always fits.
    suffix, scale = next(
        (suffix, scale) for suffix, scale in sorted(scales.items(), key=lambda item: -item[1])
        if value % scale == 0 and (value or scale == 1)
    )
    return f"{value // scale} {suffix}"


def load_inventory(path: str | os.PathLike[str] | None = None) -> tuple[LimitSpec, ...]:
    """The inventory in file order; the packaged copy wins over the source tree's."""
    if path is None:
        packaged = Path(__file__).with_name("limits.toml")  # the wheel's copy (importlib.resources: +5 ms at start)
        source = packaged if packaged.is_file() else Path(__file__).resolve().parents[1] / "config" / "limits.toml"
    else:
        source = Path(path)
    try:
        data = tomllib.loads(source.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise InventoryError(f"{source}: {exc}") from exc
    if set(data) != {"limit"} or not isinstance(data["limit"], list) or not data["limit"]:
        raise InventoryError(f"{source}: expected only a non-empty [[limit]] array")
    specs = tuple(_spec_from(entry) for entry in data["limit"])
    names = [spec.name for spec in specs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise InventoryError(f"duplicate limits: {', '.join(duplicates)}")
    return specs


def _spec_from(entry: object) -> LimitSpec:
    if not isinstance(entry, dict):
        raise InventoryError(f"not a table: {entry!r}")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name) or hasattr(Limits, name):
        raise InventoryError(f"bad limit name {name!r}")
    keys = set(entry)
    if missing := _REQUIRED_KEYS - keys:
        raise InventoryError(f"{name}: missing {', '.join(sorted(missing))}")
    if unknown := keys - _REQUIRED_KEYS - _OPTIONAL_KEYS:
        raise InventoryError(f"{name}: unknown keys {', '.join(sorted(unknown))}")
    limit_class, unit = entry["class"], entry["unit"]
    if not isinstance(limit_class, str) or limit_class not in get_args(LimitClass):
        raise InventoryError(f"{name}: unknown class {limit_class!r}")
    if not isinstance(unit, str) or (unit not in _SCALES and unit not in COUNT_UNITS):
        raise InventoryError(f"{name}: unknown unit {unit!r}")
    expected_env = None if limit_class == "invariant" else env_var_for(name)
    if entry.get("env") != expected_env:
        raise InventoryError(f"{name}: env must be {expected_env!r}, not {entry.get('env')!r}")
    if not isinstance(entry["rationale"], str) or not entry["rationale"].strip():
        raise InventoryError(f"{name}: rationale must be a sentence")
    if not isinstance(entry["zero_means_off"], bool):
        raise InventoryError(f"{name}: zero_means_off must be true or false")
    amounts = {key: _amount(entry[key], name=name, unit=unit) for key in ("default", "min", "max") if key in entry}
    spec = LimitSpec(
        name=name, limit_class=limit_class, env=expected_env, unit=unit, rationale=entry["rationale"].strip(),
        zero_means_off=entry["zero_means_off"], **amounts,
    )
    try:
        _check_range(spec, spec.default)
    except LimitValueError as exc:
        raise InventoryError(f"{name}: default is {exc}") from None
    if spec.min is not None and spec.max is not None and spec.min > spec.max:
        raise InventoryError(f"{name}: min is above max")
    return spec


def _amount(raw: object, *, name: str, unit: str) -> int:
    try:
        if isinstance(raw, bool) or not isinstance(raw, int | str):
            raise LimitValueError("not a number")
        amount = _parse_amount(raw, name=name, unit=unit) if isinstance(raw, str) else raw
        if amount < 0:
            raise LimitValueError("negative")
        return amount
    except LimitValueError as exc:
        raise InventoryError(f"{name}: amount {raw!r} is {exc}") from None


class Limits:
    """The value of every inventory entry for one process, or one VM after tightening.

    Frozen; read a value as an attribute (`limits.protocol_frame_bytes`). A `guest` value is the
    ceiling for `tightened()`, which is how `vm.create` narrows budgets for one VM.
    """

    def __init__(self, specs: Mapping[str, LimitSpec], values: Mapping[str, int], sources: Mapping[str, Source]):
        # The values also live in the instance dict: a hot path reads a few limits per request,
        # and a plain attribute costs ~30 ns where a `__getattr__` fallback costs ~1 µs.
        self.__dict__.update(values)
        object.__setattr__(self, "_specs", dict(specs))
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "_sources", dict(sources))

    def __getattr__(self, name: str) -> int:  # only reached for names that are not limits
        raise AttributeError(f"no limit named {name!r}")

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Limits is frozen; use tightened() for a narrower copy")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("Limits is frozen")

    def __repr__(self) -> str:
        changed = ", ".join(f"{n}={v}" for n, v in self._values.items() if self._sources[n] != "default")
        return f"Limits({changed or 'defaults'})"

    def spec(self, name: str) -> LimitSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise KeyError(f"no limit named {name!r}") from None

    def source(self, name: str) -> Source:
        return self._sources[self.spec(name).name]

    def rows(self) -> list[dict[str, Any]]:
        """The inventory with values in effect, JSON-ready, for `sidecar.limits` and `initialize`."""
        return [
            {"name": spec.name, "class": spec.limit_class, "env": spec.env, "default": spec.default,
             "value": self._values[spec.name], "source": self._sources[spec.name], "unit": spec.unit}
            for spec in self._specs.values()
        ]

    def tightened(self, overrides: Mapping[str, object]) -> Limits:
        """A copy with some guest budgets lowered; a VM may narrow its budgets, never widen them."""
        if not isinstance(overrides, Mapping):
            raise InvalidParamsError("limits must be an object of limit names to values", path="$.limits")
        values, sources = dict(self._values), dict(self._sources)
        for name, raw in overrides.items():
            path = f"$.limits.{name}"
            spec = self._specs.get(name)
            if spec is None:
                raise InvalidParamsError(f"unknown limit {name!r}", path=path)
            if spec.limit_class != "guest":
                raise InvalidParamsError(
                    f"{name} is a {spec.limit_class} limit; only guest limits are set per VM", path=path
                )
            try:
                value = parse_value(spec, raw)
            except LimitValueError as exc:
                raise InvalidParamsError(f"{name}: {exc}", path=path) from None
            ceiling = self._values[name]
            if spec.zero_means_off and value == 0 and ceiling != 0:
                raise self.exceeded(name, value, message=f"{name}=0 turns the limit off, above the ceiling "
                                    f"{format_value(spec, ceiling)} (allow it with {spec.env}=0)")
            # A ceiling of 0 on a zero-means-off limit is no ceiling: any value narrows it.
            if value > ceiling and not (spec.zero_means_off and ceiling == 0):
                raise self.exceeded(name, value, message=f"{name} {format_value(spec, value)} is above the ceiling "
                                    f"{format_value(spec, ceiling)}; a VM may only lower it (raise with {spec.env})")
            values[name], sources[name] = value, "vm"
        return Limits(self._specs, values, sources)

    def exceeded(
        self, name: str, observed: int | float, *, capacity: int | float | None = None, message: str | None = None,
        **details: Any,
    ) -> LimitExceededError:
        """The -32002 error for a bound that bit, logged as `limit_exhausted`; the caller raises it."""
        spec = self.spec(name)
        capacity = self._values[name] if capacity is None else capacity
        if message is None and spec.env is None:
            message = f"{name} exceeded: {observed} > {capacity} (an invariant, not tunable)"
        elif message is None and self._sources[name] == "vm":
            message = f"{name} exceeded: {observed} > {capacity} (lowered for this VM by vm.create; ceiling {spec.env})"
        error = LimitExceededError(name, capacity=capacity, observed=observed, message=message, **details)
        if spec.env is None:
            error.details["env"] = None  # no variable raises an invariant; do not name one that does not exist
        self.exhausted(name, observed, capacity=capacity, **details)
        return error

    def exhausted(
        self, name: str, observed: int | float, *, capacity: int | float | None = None, **fields: Any
    ) -> None:
        """Only the `limit_exhausted` warning, for bounds that truncate or refuse instead of failing."""
        spec = self.spec(name)
        capacity = self._values[name] if capacity is None else capacity
        fill = round(100 * observed / capacity, 1) if capacity else None
        log.warning(
            "limit_exhausted", limit=name, observed=observed, capacity=capacity, fill_percent=fill, env=spec.env,
            source=self._sources[name], **{"class": spec.limit_class}, **fields,
        )


def _resolve(spec: LimitSpec, environ: Mapping[str, str]) -> tuple[int, Source]:
    variable = env_var_for(spec.name)
    raw = environ.get(variable)
    if raw is None:
        return spec.default, "default"
    reason = "invariant: fixed by a spec or the code, not tunable"
    if spec.limit_class != "invariant":
        try:
            return parse_value(spec, raw), "env"
        except LimitValueError as exc:
            reason = str(exc)
    log.warning(
        "limit_env_ignored", variable=variable, value=raw, reason=reason, default=spec.default, limit=spec.name
    )
    return spec.default, "default"


def load_limits(environ: Mapping[str, str] | None = None) -> Limits:
    """Every limit resolved from `environ` (default `os.environ`); bad variables only warn."""
    environ = os.environ if environ is None else environ
    specs = load_inventory()
    resolved = {spec.name: _resolve(spec, environ) for spec in specs}
    return Limits(
        {spec.name: spec for spec in specs},
        {name: value for name, (value, _) in resolved.items()},
        {name: source for name, (_, source) in resolved.items()},
    )


@functools.cache
def process_limits() -> Limits:
    """The running process's limits, read from the environment once (warnings logged once)."""
    return load_limits()


@dataclass(frozen=True, slots=True)
class CallBudget:
    """The guest limits every call reads, looked up once per VM instead of once per call."""

    input_bytes: int
    output_bytes: int
    fuel: int

    @classmethod
    def of(cls, limits: Limits) -> CallBudget:
        return cls(limits.vm_input_bytes, limits.vm_output_bytes, limits.vm_fuel)
