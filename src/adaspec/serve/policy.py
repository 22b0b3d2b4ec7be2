"""What a request may ask of the server: which methods, and which values of the options the registry marks
server-side (methods.ServerSide: paths, weight formats that convert) -- only the names its operator allowed at
start-up, never a path."""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from adaspec.core.errors import AdaspecError
from adaspec.methods import MethodSpec, ServerSide, methods, names, parse_method
from adaspec.methods.options import non_default
from adaspec.serve.errors import ApiError
from adaspec.serve.requests import Speculative

ARTIFACT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class RequestPolicy:
    """`methods`: the method names a request may choose (None: all). `artifacts`: NAME -> PATH, the names a request
    may give a path option (drafter=, router=, adapters=); the server uses PATH. `formats`: the llama.cpp weight
    formats a request may name besides `shipped` (each converted once into the cache)."""

    methods: tuple[str, ...] | None = None
    artifacts: dict[str, Path] = field(default_factory=dict)
    formats: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods or () if m not in names()]
        if unknown:
            raise AdaspecError(f"unknown request method {unknown[0]!r}; choose from {', '.join(names())}")
        reserved = {v for m in methods() for f in m.fields.values() if f.server_side for v in f.server_side.free}
        for name, path in self.artifacts.items():
            if not ARTIFACT_NAME.match(name) or name in reserved:
                raise AdaspecError(f"artifact name {name!r}: use letters, digits, '_', '.', '-' (not "
                                   f"{', '.join(sorted(reserved))})")
            if not Path(path).expanduser().exists():
                raise AdaspecError(f"artifact {name}={path}: no such file or directory")

    def server_side(self, key: str, value: str, kind: ServerSide) -> str:
        """parse_method's check of a ServerSide value from a request: an allowed name, or an error that depends on
        the value only (never on what the server's disk holds)."""
        if kind.writes:
            if value in self.formats:
                return value
            allowed = ", ".join(["shipped", *self.formats])
            raise AdaspecError(f"{key}={value}: a request may not make the server convert weights; this server allows "
                               f"{key}= {allowed}")
        if value in self.artifacts:
            return str(Path(self.artifacts[value]).expanduser())
        names = [*kind.free, *sorted(self.artifacts)]
        raise AdaspecError(f"{key}={value}: a request may not name a file on the server; give "
                           f"{' or '.join(names) if names else 'no value'} (artifacts are named by the operator: "
                           "adaspec serve --artifact NAME=PATH)")

    def spec(self, speculative: Speculative | None, default: MethodSpec) -> MethodSpec:
        """The method a request asks for: its `speculative` object checked against the registry and this policy (its
        options object read by the options' types, not rendered into the spec)."""
        if speculative is None or (speculative.method is None and not speculative.options):
            return default
        text = speculative.method if speculative.method is not None else default.name
        name, _, rest = text.strip().partition(":")
        if self.methods is not None and name not in self.methods and name != default.name:
            raise ApiError(400, f"method '{name}' is not served here; a request may choose "
                                f"{', '.join(dict.fromkeys([default.name, *self.methods]))}",
                           param="speculative.method", code="invalid_method")
        given = {item.partition("=")[0].strip() for item in rest.split(",") if "=" in item}
        for key, value in speculative.options.items():
            if any(c in f"{key}{value}" for c in ",=:"):  # the label (method:key=value,...) must read back
                raise ApiError(400, f"speculative option {key}={value!r} may not contain ',', '=' or ':'",
                               param="speculative.options")
            if key in given:
                raise ApiError(400, f"speculative option {key} is given twice (in the method and in options)",
                               param="speculative.options")
        try:
            spec = parse_method(text, self.server_side, speculative.options)
        except AdaspecError as e:
            raise ApiError(400, str(e), param="speculative", code="invalid_method") from None
        bad = [k for k in spec.given if isinstance(v := getattr(spec.options, k), float) and not math.isfinite(v)]
        if bad:
            raise ApiError(400, f"speculative option {bad[0]} must be a finite number", param="speculative",
                           code="invalid_method")
        return spec


def runner_key(spec: MethodSpec, stop_on_eos: bool) -> tuple:
    """One runner per distinct configuration: options at their default value are left out."""
    return spec.name, tuple(sorted(non_default(spec.options).items())), stop_on_eos


class Redactor:
    """Replaces server paths in messages sent to clients by what the client may know (an artifact's name)."""

    def __init__(self, paths: Iterable[tuple[Path | str, str]]) -> None:
        pairs = {str(Path(p).expanduser()): name for p, name in paths if str(p) not in ("", ".", "/")}
        self.pairs = sorted(pairs.items(), key=lambda kv: -len(kv[0]))  # the longest path first

    def __call__(self, message: str) -> str:
        for path, name in self.pairs:
            message = message.replace(path, name)
        return message


def server_paths(model_path: Path, artifacts: dict[str, Path]) -> Redactor:
    """The paths a message could leak: artifacts (by name), the model, the model cache, this package, Python's
    prefix and the home directory."""
    import adaspec
    from adaspec.core.models import cache_root

    return Redactor([*((p, name) for name, p in artifacts.items()), (model_path, "<model>"),
                     (cache_root(), "<cache>"), (Path(adaspec.__file__).parent, "<adaspec>"),
                     (sys.prefix, "<python>"), (Path.home(), "~")])
