"""The method registry: every method registered once, with its options dataclass and its `build`.

A method spec is `NAME[:key=value,...]`, e.g. `sd:k=4` or `hf-lookup:k=10`. `parse_method` reads it into a
`MethodSpec` (its typed options, checked, before any model loads); `build_runner` turns that into a `Runner`: prompt
ids in, `GenerationResult` out, so `generate`, `bench` and the server treat ours and the peers alike. The CLI's
method lists, the server's request checks, the sweep grids, the cost lookups and the exactness test suites read the
registry, so a method is added by registering it (see methods/sd.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from adaspec.core.backends import Backend
from adaspec.core.config import BackendChoice, GenerationConfig
from adaspec.core.decode import StopCriteria
from adaspec.core.drafters.eagle import EagleArtifact
from adaspec.core.errors import AdaspecError
from adaspec.core.models import LoadedModel
from adaspec.methods.options import Field, Options, ServerSide, fields_of, sweep_grid
from adaspec.methods.placement import backend_choice, target_backend
from adaspec.methods.runners import Runner, stop_criteria

DrafterChoice = LoadedModel | EagleArtifact | str  # what --drafter loaded: a model, an EAGLE head, or 'lookup'

Opts = TypeVar("Opts", bound=Options)
ServerCheck = Callable[[str, str, ServerSide], str]  # (key, value, its ServerSide) -> the value to use, or raise


@dataclass(frozen=True)
class MethodSpec(Generic[Opts]):
    name: str
    options: Opts  # every option at its value: the spec's, else the default
    label: str = ""  # the spec as written; names the method in records
    given: tuple[str, ...] = ()  # the options the spec set, in its order

    @property
    def method(self) -> Method:
        return get(self.name)


@dataclass(frozen=True)
class BuildContext:
    """What a method's build gets besides its spec."""

    target: LoadedModel
    drafter: DrafterChoice | None  # what --drafter loaded; None: the method's default
    config: GenerationConfig
    backend: BackendChoice | None = None  # where methods run unless their spec says (None: the defaults)

    @property
    def stop(self) -> StopCriteria:
        return stop_criteria(self.target, self.config)

    def backend_for(self, spec: MethodSpec) -> Backend:
        """The target's backend where `spec` runs: its backend= and format= options over the run's."""
        return target_backend(self.target, backend_choice(spec, self.backend))


@dataclass(frozen=True)
class Method:
    """A registered method. `lossless`: at its defaults, greedy output equals ar's and sampled output follows the
    target's law (the exactness suites check every such method: tests/exactness.py). `peer`: another project's
    decoding of the same model, measured against ours. `costs`: its cost is the target's verify cost plus its
    drafter's, as costs.json measures them (bench/bound.py's expected speedup applies)."""

    name: str
    options: type[Options]
    build: Callable[[MethodSpec, BuildContext], Runner]
    about: str  # one line: what it is (`adaspec methods`)
    lossless: bool = False
    peer: bool = False
    costs: bool = False

    @property
    def fields(self) -> dict[str, Field]:
        return fields_of(self.options)

    @property
    def grid(self) -> dict[str, tuple]:
        """`adaspec sweep --base NAME`'s default grid: each swept option's values."""
        return sweep_grid(self.options)


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in REGISTRY:
        raise ValueError(f"method '{method.name}' is registered twice")
    fields_of(method.options)  # every option's type must be readable
    REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    REGISTRY.pop(name, None)


def get(name: str) -> Method:
    method = REGISTRY.get(name)
    if method is None:
        raise AdaspecError(f"unknown method '{name}'; choose one of: {', '.join(REGISTRY)}")
    return method


def names() -> list[str]:
    return list(REGISTRY)


def methods() -> list[Method]:
    return list(REGISTRY.values())


def _items(method: Method, rest: str, text: str) -> list[tuple[str, str]]:
    """The `key=value` items after the method's name; a list option goes on over the bare items after it."""
    fields = method.fields
    items: list[tuple[str, str]] = []
    for item in filter(None, (s.strip() for s in rest.split(","))):
        if "=" not in item and items and items[-1][0] in fields and fields[items[-1][0]].items:
            items[-1] = (items[-1][0], f"{items[-1][1]},{item}")  # exits=8,12,16: the list goes on
            continue
        key, eq, value = item.partition("=")
        if not eq:
            raise AdaspecError(f"method option '{item}' in '{text}' is not key=value")
        items.append((key, value))
    return items


def _read(method: Method, field: Field | None, key: str, value: object, label: str,
          server_side: ServerCheck | None) -> object:
    if field is None:
        hint = f"options: {', '.join(method.fields)}" if method.fields else "it takes no options"
        raise AdaspecError(f"method '{method.name}' has no option '{key}'; {hint}")
    try:
        out = field.read(value)
    except ValueError:
        raise AdaspecError(f"option {key}={str(value)!r} of '{method.name}' must be {field.what}") from None
    except AdaspecError as e:
        raise AdaspecError(f"{label}: {e}") from None
    if server_side is not None and field.server_side is not None and out not in field.server_side.free:
        out = server_side(key, str(out), field.server_side)
    return out


def parse_method(text: str, server_side: ServerCheck | None = None,
                 options: Mapping[str, object] | None = None) -> MethodSpec:
    """`NAME[:key=value,...]` read and checked against the registry, before any model loads; `options` adds typed
    values (a server request's JSON). `server_side(key, value, kind)` sees each value of a ServerSide option outside
    its free values before anything reads it, and returns the value to use or raises (the server's check)."""
    text = text.strip()
    name, _, rest = text.partition(":")
    method = get(name)
    extra = list((options or {}).items())
    label = text + ("," if ":" in text else ":") + ",".join(f"{k}={v}" for k, v in extra) if extra else text
    given: Iterable[tuple[str, object]] = [*_items(method, rest, text), *extra]
    values = {key: _read(method, method.fields.get(key), key, value, label, server_side) for key, value in given}
    try:
        return MethodSpec(name, method.options(**values), label, tuple(values))
    except AdaspecError as e:
        raise AdaspecError(f"{label}: {e}") from None


def split_specs(text: str) -> list[str]:
    """Comma-separated method specs whose options are comma-separated too: a piece that is key=value and does
    not name a method continues the spec before it ('ar,cmasd:alpha=0.8,gamma=1,sd' -> 3 specs)."""
    specs: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        key = piece.partition("=")[0]
        if specs and ":" not in piece and key not in REGISTRY and ("=" in piece or key.isdigit()):
            specs[-1] += "," + piece  # an option of the spec before, or a further item of a list (exits=8,12)
        else:
            specs.append(piece)
    return specs


def build_runner(spec: MethodSpec, target: LoadedModel, drafter: DrafterChoice | None, config: GenerationConfig,
                 backend: BackendChoice | None = None) -> Runner:
    """A runner for `spec`. `drafter` is what --drafter loaded (a model, an EAGLE head, 'lookup', or None: the
    method's default); `backend` is where methods run whose spec does not say (methods without backend options run
    on torch)."""
    return spec.method.build(spec, BuildContext(target, drafter, config, backend))
