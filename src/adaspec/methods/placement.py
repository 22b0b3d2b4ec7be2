"""Where a method's models run: the backend and weight-format options, and the target's backend they choose."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adaspec.core.backends import Backend, TorchBackend
from adaspec.core.config import DEFAULT_BACKEND, DEFAULT_LLAMACPP_FORMAT, BackendChoice
from adaspec.core.errors import AdaspecError
from adaspec.core.models import LoadedModel
from adaspec.methods.options import Options, ServerSide, Spec, option


@dataclass(frozen=True)
class WeightFormat(Options):
    """format: the llama.cpp weight format the target runs in (config.LLAMACPP_FORMATS; all but `shipped` are
    converted once into the cache); None: the run's (--format)."""

    format: str | None = option(None, server_side=ServerSide(("shipped",), writes=True))

    def check(self) -> None:
        BackendChoice(format=DEFAULT_LLAMACPP_FORMAT if self.format is None else self.format)


@dataclass(frozen=True)
class Placement(WeightFormat):
    """backend: torch | llamacpp | auto (config.BackendChoice); None: the run's (--backend)."""

    backend: str | None = None

    def check(self) -> None:
        BackendChoice(DEFAULT_BACKEND if self.backend is None else self.backend)


def backend_choice(spec: Spec, default: BackendChoice | None = None) -> BackendChoice:
    """Where `spec` runs: its backend= and format= options over `default` (the CLI's --backend / --format)."""
    default = default or BackendChoice()
    options = spec.options
    kind = options.backend if isinstance(options, Placement) and options.backend is not None else default.kind
    fmt = options.format if isinstance(options, WeightFormat) and options.format is not None else default.format
    return BackendChoice(kind, fmt, default.threads)


def resolve_backend(has_gguf: bool, choice: BackendChoice) -> BackendChoice:
    """`auto` made concrete: llamacpp where llama-cpp-python is installed and the target is a GGUF, else torch."""
    from adaspec.core.backends.llamacpp import available

    if choice.kind != "auto":
        return choice
    return BackendChoice("llamacpp" if has_gguf and available() else "torch", choice.format, choice.threads)


def target_backend(target: LoadedModel, choice: BackendChoice) -> Backend:
    """The target's backend for a method that runs on `choice`."""
    choice = resolve_backend(target.gguf is not None, choice)
    if choice.kind == "torch":
        return TorchBackend(target.model)
    from adaspec.core.backends.llamacpp import LlamaCppBackend

    return LlamaCppBackend(target_gguf(target, choice.format), threads=choice.threads)


def target_gguf(target: LoadedModel, fmt: str) -> Path:
    """The target's GGUF in weight format `fmt` (converted once into the cache)."""
    from adaspec.core.backends.llamacpp import requantize
    from adaspec.core.models import cache_root

    if target.gguf is None:
        raise AdaspecError(f"llama.cpp runs GGUF files and target '{target.name}' was loaded from a Hugging Face "
                           f"directory ({target.path}): pass its .gguf file as the target, or use the torch backend")
    return requantize(target.gguf, fmt, cache_root() / "gguf")
