"""Configuration dataclasses. Every default lives here and nowhere else."""

from __future__ import annotations

from dataclasses import dataclass, field

from adaspec.errors import AdaspecError

DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_DRAFT_LENGTH = 5
DEFAULT_SEED = 0

# CM-ASD and SpecDec (issue 5; README "CM-ASD" says how they were chosen). tau is in nats of the target's
# log-probabilities; beta is SpecDec's top-beta.
CMASD_ALPHA = 1.0
CMASD_K_MIN = 1
CMASD_K_MAX = 8
CMASD_GAMMA = 0.5
CMASD_TAU_BASE = 0.05
CMASD_TAU_MODE = "intent"
CMASD_EARLY_STOP = 1
SPECDEC_BETA = 5
SPECDEC_TAU = 0.1


@dataclass(frozen=True)
class SamplingConfig:
    """How a next token is chosen from logits. temperature == 0 means greedy."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise AdaspecError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise AdaspecError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise AdaspecError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class GenerationConfig:
    """Budget and stopping rules for one generation."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop: tuple[str, ...] = ()  # stop strings; the output is cut before the first one
    stop_on_eos: bool = True
    seed: int = DEFAULT_SEED

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise AdaspecError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
