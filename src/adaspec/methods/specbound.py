"""SpecBound (drafters/early_exit.py): the target drafts for itself through its early exits, within a speculation
bound, and verifies with the exact rule."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adaspec.core.backends.layered import LayeredBackend
from adaspec.core.config import SPECBOUND_A, SPECBOUND_D_MAX, SPECBOUND_EXITS, SPECBOUND_SWEEP, SPECBOUND_THRESHOLD
from adaspec.core.drafters.early_exit import EarlyExitDrafter, ExitArtifact, is_exits_dir
from adaspec.core.drafters.shipped import shipped
from adaspec.core.errors import AdaspecError
from adaspec.core.policies import ExitBound
from adaspec.methods.options import Options, ServerSide, option, render
from adaspec.methods.registry import BuildContext, Method, MethodSpec, register
from adaspec.methods.runners import EngineRunner

EXITS = "exits"  # the kind of the shipped exit adapters (drafters/shipped/<target>/exits/)


def read_layers(value: object) -> tuple[int, ...]:
    text = str(value)
    try:
        return tuple(int(x) for x in text.replace("/", ",").split(","))
    except ValueError:
        raise AdaspecError(f"exits must be layer numbers separated by ',' or '/', got {text!r}") from None


@dataclass(frozen=True)
class SpecBoundOptions(Options):
    """exits: the exit layers, comma- or slash-separated (None: config.SPECBOUND_EXITS); threshold, a: a token exits
    at the first exit whose annealed confidence reaches the threshold (temperature slope a); d_max: tokens drafted a
    step at most; adapters: none | shipped | DIR (None: the target's shipped exit adapters if any, else none)."""

    exits: tuple[int, ...] | None = option(None, read=read_layers, items=True)
    threshold: float = option(SPECBOUND_THRESHOLD, grid=SPECBOUND_SWEEP["threshold"])
    a: float = SPECBOUND_A
    d_max: int = option(SPECBOUND_D_MAX, grid=SPECBOUND_SWEEP["d_max"])
    adapters: str | None = option(None, server_side=ServerSide(("none", "shipped")))

    def check(self) -> None:
        if self.exits is not None and any(e < 1 for e in self.exits):
            raise AdaspecError(f"exits must be layer numbers >= 1 (the first layer is 1), got {render(self.exits)!r}")
        if self.adapters not in (None, "none", "shipped") and not is_exits_dir(Path(self.adapters).expanduser()):
            raise AdaspecError(f"adapters={self.adapters}: not a directory of exit adapters; give none, shipped or a "
                               "directory written by `adaspec train-exits`")
        self.bound()

    def bound(self, depth: int | None = None) -> ExitBound:
        """The exit rule and speculation bound for a target of `depth` layers (None: the exits checked against
        nothing but themselves, before the model is known)."""
        exits = SPECBOUND_EXITS if self.exits is None else self.exits
        return ExitBound(exits, depth or max(exits, default=0) + 1, self.threshold, self.a, self.d_max)


def exit_adapters(spec: MethodSpec[SpecBoundOptions], target_name: str) -> ExitArtifact | None:
    """adapters=none, shipped (an error if none ship), DIR, or by default the target's shipped ones if any."""
    option = spec.options.adapters
    if option == "none":
        return None
    if option in (None, "shipped"):
        path = shipped(target_name, EXITS)
        if path is None and option == "shipped":
            raise AdaspecError(f"{spec.label}: no exit adapters ship for target '{target_name}'; train them with "
                               "`adaspec train-exits` and pass adapters=DIR")
        return None if path is None else ExitArtifact.load(path)
    return ExitArtifact.load(Path(option).expanduser())


def build_specbound(spec: MethodSpec[SpecBoundOptions], ctx: BuildContext) -> EngineRunner:
    backend = LayeredBackend(ctx.target.model)  # torch only: the layers run one by one
    try:
        bound = spec.options.bound(backend.depth)
    except AdaspecError as e:
        raise AdaspecError(f"{spec.label}: {e}") from None
    drafter = EarlyExitDrafter(backend, bound, exit_adapters(spec, ctx.target.name))
    return EngineRunner(spec.label, backend, ctx.stop, drafter, policy=bound)


register(Method("specbound", SpecBoundOptions, build_specbound, "SpecBound: the target drafts through its own early "
                "exits within a speculation bound, exact verification", lossless=True))
