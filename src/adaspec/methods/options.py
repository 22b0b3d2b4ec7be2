"""Method options: frozen dataclasses whose fields are a method spec's `key=value` options.

A field's type says how a value is read (int, float, str, or its own `read`), its default is the method's default
(from adaspec.core.config), and its metadata says what the registry's readers need: whether a server request may set it
freely (`ServerSide`), whether its value is a list that goes on over the bare items after it (exits=8,12,16), and
which values `adaspec sweep` tries (`grid`). Option groups are small Options classes that a method's options inherit
from; every class's own `check` runs when an options object is made, so a bad value fails as the spec is parsed,
before any model loads.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any, Protocol


@dataclass(frozen=True)
class ServerSide:
    """An option that may name a file on the machine running the method (a path) or make it write one (`writes`: a
    weight format converted into the cache). Only the values in `free` do neither: a server refuses every other value
    from a request unless its operator named it at start-up (serve/policy.py)."""

    free: tuple[str, ...] = ()
    writes: bool = False


@dataclass(frozen=True)
class Field:
    """One option as the registry's readers see it."""

    name: str
    default: object
    read: Callable[[object], object]  # a spec's text or a request's JSON value -> the value; ValueError: wrong type
    what: str  # what a value that does not read must be ('float', 'an integer >= 1')
    server_side: ServerSide | None  # a path or a weight format: the server checks its values
    items: bool  # a list: it goes on over the bare items after it (exits=8,12,16,threshold=0.8)
    grid: tuple | None  # the values `adaspec sweep` tries by default (None: not swept)


def option(default: object, *, read: Callable[[object], object] | None = None, what: str = "",
           least: int | None = None, server_side: ServerSide | None = None, items: bool = False,
           grid: tuple | None = None) -> Any:
    """A dataclass field that is a method option with more to say than its type and default (a plain field with a
    default is an option too); `least`: an int option's least value."""
    return dataclasses.field(default=default, metadata={"read": read, "what": what, "least": least,
                                                        "server_side": server_side, "items": items, "grid": grid})


def read_int(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(value)
    return value if isinstance(value, int) else int(str(value))


def read_float(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError(value)
    return float(value) if isinstance(value, int | float) else float(str(value))


READERS: dict[type, Callable[[object], object]] = {int: read_int, float: read_float, str: str}


def at_least(least: int) -> Callable[[object], int]:
    def read(value: object) -> int:
        n = read_int(value)
        if n < least:
            raise ValueError(n)
        return n

    return read


def _reader(name: str, hint: object, meta: typing.Mapping[str, Any]) -> tuple[Callable[[object], object], str]:
    """How a field's values are read and what they must be: its own `read`, else by its type (X or X | None)."""
    if meta.get("least") is not None:
        return at_least(meta["least"]), f"an integer >= {meta['least']}"
    if meta.get("read") is not None:
        return meta["read"], meta["what"]
    kinds = [t for t in typing.get_args(hint) if t is not type(None)] if isinstance(hint, types.UnionType) else [hint]
    if len(kinds) != 1 or kinds[0] not in READERS:
        raise TypeError(f"option {name}: give read= for a value of type {hint}")
    return READERS[kinds[0]], kinds[0].__name__


@cache
def fields_of(cls: type[Options]) -> dict[str, Field]:
    """The options of `cls` by name, in the order a spec's help lists them."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        read, what = _reader(f.name, hints[f.name], f.metadata)
        meta = f.metadata
        out[f.name] = Field(f.name, f.default, read, what, meta.get("server_side"), meta.get("items", False),
                            meta.get("grid"))
    return out


@dataclass(frozen=True)
class Options:
    """The options of a method (none here). Subclasses add fields made with `option` and may define `check`: every
    class's own `check` runs, bases first, when an options object is made."""

    def __post_init__(self) -> None:
        for cls in reversed(type(self).__mro__):
            check = vars(cls).get("check")
            if check is not None:
                check(self)


def render(value: object) -> str:
    """An option's value as a spec writes it."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def non_default(options: Options) -> dict[str, object]:
    """The options that differ from their default."""
    return {name: getattr(options, name) for name, f in fields_of(type(options)).items()
            if getattr(options, name) != f.default}


def sweep_grid(cls: type[Options]) -> dict[str, tuple]:
    """The default grid of `adaspec sweep` over a method: each swept option's values (an empty axis is left out)."""
    return {name: f.grid for name, f in fields_of(cls).items() if f.grid is not None}


class Spec(Protocol):
    """What the modules below the registry read of a method spec (registry.MethodSpec is one)."""

    name: str
    label: str
    options: Options
