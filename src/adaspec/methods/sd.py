"""`ar` and `sd`, and what every method of our decoding loop shares: its parts (a length policy, an acceptance rule,
a confidence estimator) and the build that puts them on the target's backend with a drafter.

A method is one `register` call, e.g. sd's below: a name, an options dataclass (the option groups it inherits and
its own fields), a build, a line of help and what the test suites and cost lookups may assume of it."""

from __future__ import annotations

from dataclasses import dataclass

from adaspec.core.backends import Backend
from adaspec.core.confidence import ConfidenceEnsemble
from adaspec.core.config import BATCH_K_TABLE, DEFAULT_DRAFT_LENGTH
from adaspec.core.costmodel import CostCapped, cost_aware
from adaspec.core.drafters import Drafter
from adaspec.core.errors import AdaspecError
from adaspec.core.policies import BatchTable, FixedLength, LengthPolicy
from adaspec.core.verify import AcceptanceRule
from adaspec.methods.drafting import Drafting, make_drafter
from adaspec.methods.options import Options, option
from adaspec.methods.placement import Placement
from adaspec.methods.registry import BuildContext, Method, MethodSpec, register
from adaspec.methods.runners import EngineRunner


def read_draft_length(value: object) -> int | str:
    text = str(value)
    if text in ("auto", "table"):
        return text
    try:
        return int(text)
    except ValueError:
        raise AdaspecError(f"k must be auto, table or a draft length >= 1, got {text!r}") from None


@dataclass(frozen=True)
class DraftLength(Options):
    """k: auto (policies.CostAware: the length the backend's measured costs favour, made with the runner), table
    (policies.BatchTable: the vLLM-style lengths by batch size) or a fixed draft length >= 1."""

    k: int | str = option(DEFAULT_DRAFT_LENGTH, read=read_draft_length)

    def check(self) -> None:
        self.length()

    def length(self) -> LengthPolicy | None:
        """None for k=auto (CostAware, made once the backend is known)."""
        if self.k == "auto":
            return None
        if self.k == "table":
            return BatchTable(BATCH_K_TABLE)
        if not isinstance(self.k, int) or self.k < 1:
            raise AdaspecError(f"draft length k must be >= 1 (or auto, or table), got {self.k}")
        return FixedLength(self.k)


@dataclass(frozen=True)
class Parts:
    """A method of our decoding loop, besides its drafter."""

    policy: LengthPolicy | None  # None: k=auto, CostAware once the backend and drafter are known (build_engine)
    rule: AcceptanceRule | None = None  # None: the exact rule (greedy, or lossless sampling)
    confidence: ConfidenceEnsemble | None = None  # None: the method does not rate its drafts
    cost_cap: bool = False  # cap `policy` by CostAware (policies.CostCapped), built with the backend


@dataclass(frozen=True)
class SDOptions(Placement, Drafting, DraftLength):  # fields in reverse order of the bases: k, drafter, ngram, ...
    def parts(self) -> Parts:
        return Parts(self.length())


def length_policy(policy: LengthPolicy | None, cap: bool, backend: Backend, drafter: Drafter) -> LengthPolicy:
    """`policy` as the spec gave it, made concrete: None (k=auto) becomes CostAware, and `cap` caps it by CostAware."""
    if policy is not None and not cap:
        return policy
    costs = cost_aware(backend, drafter)
    return costs if policy is None else CostCapped(policy, costs)


def build_engine(spec: MethodSpec, ctx: BuildContext) -> EngineRunner:
    """A method of our decoding loop (its options have `parts()`): on the target's backend where the spec says,
    with the method's drafter (make_drafter) and parts."""
    parts: Parts = spec.options.parts()
    backend = ctx.backend_for(spec)
    drafter = make_drafter(spec, ctx.drafter, backend, ctx.target)
    policy = length_policy(parts.policy, parts.cost_cap, backend, drafter)
    return EngineRunner(spec.label, backend, ctx.stop, drafter, policy=policy, rule=parts.rule,
                        confidence=parts.confidence)


def build_ar(spec: MethodSpec, ctx: BuildContext) -> EngineRunner:
    return EngineRunner(spec.label, ctx.backend_for(spec), ctx.stop)


register(Method("ar", Placement, build_ar, "plain autoregressive decoding, one target forward a token",
                lossless=True, costs=True))
register(Method("sd", SDOptions, build_engine, "speculative decoding: draft k tokens, keep those the target would "
                "have emitted (greedy), or by lossless speculative sampling", lossless=True, costs=True))
