"""R-Stitch (routing.py): a small model generates and hands tokens to the target (the large model) by an entropy
threshold (`rstitch`) or a learned router (`rstitch+`)."""

from __future__ import annotations

from dataclasses import dataclass

from adaspec.core.config import RSTITCH_TAU_DOWN, RSTITCH_TAU_GRID, RSTITCH_TAU_UP
from adaspec.core.errors import AdaspecError
from adaspec.core.models import LoadedModel
from adaspec.methods.drafting import SMALL, DrafterChoice, DrafterOption, load_drafter
from adaspec.methods.options import ServerSide, option
from adaspec.methods.placement import Placement
from adaspec.methods.registry import BuildContext, Method, MethodSpec, register
from adaspec.routing import LearnedRouter, Router, RStitchRunner, ThresholdRouter, router_path


@dataclass(frozen=True)
class RStitchOptions(Placement, DrafterOption):
    """drafter: the small model (`small`, the shipped one, or DIR; None: --drafter if it is a model, else the
    target's shipped `small`); tau_up, tau_down: the entropy thresholds (tau_down None: the same as tau_up)."""

    tau_up: float = option(RSTITCH_TAU_UP, grid=RSTITCH_TAU_GRID)
    tau_down: float | None = option(RSTITCH_TAU_DOWN, grid=())  # swept only when given: tau_down = tau_up

    def check(self) -> None:
        self.router()

    def router(self) -> ThresholdRouter:
        return ThresholdRouter(self.tau_up, self.tau_up if self.tau_down is None else self.tau_down)


@dataclass(frozen=True)
class LearnedOptions(Placement, DrafterOption):
    """router: a router.json written by `adaspec train-router` (None: the one shipped for the target)."""

    router: str | None = option(None, server_side=ServerSide())

    def check(self) -> None:
        if self.router is not None:
            self.learned(None)

    def learned(self, target_name: str | None) -> LearnedRouter:
        return LearnedRouter.load(router_path(self.router, target_name))


def make_router(spec: MethodSpec, target_name: str | None = None) -> Router:
    """The router of `rstitch` (the two thresholds) or `rstitch+` (router=, else the one shipped for the target)."""
    options = spec.options
    try:
        return options.router() if isinstance(options, RStitchOptions) else options.learned(target_name)
    except AdaspecError as e:
        raise AdaspecError(f"{spec.label or spec.name}: {e}") from None


def small_model(spec: MethodSpec, drafter: DrafterChoice | None, target: LoadedModel) -> LoadedModel:
    """R-Stitch's small model: the method's `drafter=` option, else --drafter if it is a model, else the target's
    shipped standalone `small` drafter."""
    from adaspec.core.drafters.shipped import shipped

    option = spec.options.drafter
    chosen = load_drafter(option, target) if option else drafter
    if isinstance(chosen, LoadedModel):
        return chosen
    if option:
        raise AdaspecError(f"{spec.label}: drafter={option} is not a language model; R-Stitch needs a small causal LM "
                           f"(`{SMALL}` or a local Hugging Face model directory sharing the target's tokenizer)")
    if shipped(target.name, SMALL) is None:
        raise AdaspecError(f"{spec.label} needs a small model and none ships for target '{target.name}': pass "
                           f"--drafter DIR or {spec.name}:drafter=DIR (a local Hugging Face causal LM sharing the "
                           "target's tokenizer), or train one with `adaspec train-drafter --kind small`")
    chosen = load_drafter(SMALL, target)
    assert isinstance(chosen, LoadedModel)
    return chosen


def build_rstitch(spec: MethodSpec, ctx: BuildContext) -> RStitchRunner:
    from adaspec.methods.drafting import drafter_backend

    router = make_router(spec, ctx.target.name)
    large = ctx.backend_for(spec)  # each model its own cache; the small one runs where the large one does
    small = drafter_backend(small_model(spec, ctx.drafter, ctx.target), large, ctx.target)
    return RStitchRunner(spec.label, small, large, ctx.stop, router)


register(Method("rstitch", RStitchOptions, build_rstitch, "R-Stitch: a small model generates, the target takes over "
                "where the small one's entropy is high"))
register(Method("rstitch+", LearnedOptions, build_rstitch, "R-Stitch+: the hand-offs decided by a learned router"))
