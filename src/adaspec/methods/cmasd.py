"""SpecDec and CM-ASD (README "CM-ASD"): specdec = fixed k + top-beta/tau; cmasd-k = adaptive k + the exact rule;
cmasd-tau = fixed k + confidence-modulated tau; cmasd = both adaptations. Their option groups: the adaptive length,
the relaxed verification and the drafter's confidence."""

from __future__ import annotations

from dataclasses import dataclass

from adaspec.core.confidence import ConfidenceEnsemble
from adaspec.core.config import (
    CMASD_ALPHA,
    CMASD_COST,
    CMASD_EARLY_STOP,
    CMASD_GAMMA,
    CMASD_K_MAX,
    CMASD_K_MIN,
    CMASD_TAU_BASE,
    CMASD_TAU_MODE,
    SPECDEC_BETA,
    SPECDEC_TAU,
)
from adaspec.core.errors import AdaspecError
from adaspec.core.policies import ConfidenceLength
from adaspec.core.verify import TopBetaTau
from adaspec.methods.drafting import Drafting
from adaspec.methods.options import Options, option
from adaspec.methods.placement import Placement
from adaspec.methods.registry import Method, register
from adaspec.methods.sd import DraftLength, Parts, SDOptions, build_engine


@dataclass(frozen=True)
class AdaptiveLength(Options):
    """The confidence-adaptive draft length (policies.ConfidenceLength): k_j = floor(alpha * mean confidence * k_max)
    within k_min..k_max; early_stop 1 stops drafting at k_j, 0 drafts k_max and verifies k_j (the paper's); cost 1
    caps it by the length the backend's measured costs favour (policies.CostCapped)."""

    alpha: float = option(CMASD_ALPHA, grid=(0.5, 0.75, 1.0))
    k_min: int = CMASD_K_MIN
    k_max: int = CMASD_K_MAX
    early_stop: int = CMASD_EARLY_STOP
    cost: int = CMASD_COST

    def check(self) -> None:
        if self.early_stop not in (0, 1):
            raise AdaspecError(f"early_stop must be 0 (draft k_max, verify k_j) or 1 (stop at k_j), got "
                               f"{self.early_stop}")
        self.policy()
        if self.cost not in (0, 1):
            raise AdaspecError(f"cost must be 0 (the paper's length) or 1 (capped by the backend's measured costs), "
                               f"got {self.cost}")

    def policy(self) -> ConfidenceLength:
        return ConfidenceLength(self.alpha, self.k_min, self.k_max, bool(self.early_stop))


@dataclass(frozen=True)
class ModulatedTau(Options):
    """The relaxed verification (verify.TopBetaTau): a draft is kept when it is among the target's top beta and within
    tau_t nats of its best, tau_t = tau_base moved by the drafter's confidence with slope gamma (tau_mode: intent or
    literal)."""

    beta: int = SPECDEC_BETA
    gamma: float = option(CMASD_GAMMA, grid=(0.5, 1.0, 2.0))
    tau_base: float = option(CMASD_TAU_BASE, grid=(0.05, 0.1, 0.2))
    tau_mode: str = CMASD_TAU_MODE

    def check(self) -> None:
        self.rule()

    def rule(self) -> TopBetaTau:
        return TopBetaTau(self.beta, self.tau_base, self.gamma, self.tau_mode)


@dataclass(frozen=True)
class Confidence(Options):
    """The drafter's confidence (confidence.ConfidenceEnsemble): weights l1, l2, l3 of entropy, logit margin and
    softmax (given together, they sum to 1; 1/3 each by default), the margin's scale, or one metric alone."""

    l1: float | None = None
    l2: float | None = None
    l3: float | None = None
    scale: float = 1.0
    metric: str | None = None

    def check(self) -> None:
        weights = [name for name in ("l1", "l2", "l3") if getattr(self, name) is not None]
        if 0 < len(weights) < 3:
            raise AdaspecError(f"give the confidence weights l1, l2 and l3 together (they sum to 1), got only "
                               f"{', '.join(weights)}")
        self.ensemble()

    def ensemble(self) -> ConfidenceEnsemble:
        weights = (1 / 3, 1 / 3, 1 / 3) if self.l1 is None else (self.l1, self.l2, self.l3)
        return ConfidenceEnsemble(*weights, self.scale, self.metric)


@dataclass(frozen=True)
class SpecDecOptions(SDOptions):
    beta: int = SPECDEC_BETA
    tau: float = SPECDEC_TAU

    def check(self) -> None:
        self.parts()

    def parts(self) -> Parts:
        return Parts(self.length(), TopBetaTau(self.beta, self.tau))


@dataclass(frozen=True)  # fields in reverse order of the bases: the adaptive length first
class CMASDOptions(Placement, Drafting, Confidence, ModulatedTau, AdaptiveLength):
    def parts(self) -> Parts:
        return Parts(self.policy(), self.rule(), self.ensemble(), bool(self.cost))


@dataclass(frozen=True)
class CMASDKOptions(Placement, Drafting, Confidence, AdaptiveLength):
    def parts(self) -> Parts:
        return Parts(self.policy(), None, self.ensemble(), bool(self.cost))


@dataclass(frozen=True)
class CMASDTauOptions(Placement, Drafting, Confidence, ModulatedTau, DraftLength):
    def parts(self) -> Parts:
        return Parts(self.length(), self.rule(), self.ensemble())


register(Method("specdec", SpecDecOptions, build_engine, "SpecDec: fixed k, relaxed top-beta / tau verification",
                costs=True))
register(Method("cmasd", CMASDOptions, build_engine, "CM-ASD: confidence-adaptive k and confidence-modulated tau",
                costs=True))
register(Method("cmasd-k", CMASDKOptions, build_engine, "CM-ASD's adaptive k alone, exact verification",
                lossless=True, costs=True))
register(Method("cmasd-tau", CMASDTauOptions, build_engine, "CM-ASD's modulated tau alone, fixed k", costs=True))
