"""R-Stitch (Chen et al., arXiv 2507.17307): a small model generates; single tokens go to the large model.

Every token is produced by exactly one model. The small model is active by default. When its normalised
entropy H = -sum_i p_i log p_i / log|V| at the next position is above `tau_up`, the large model produces that
token instead, and stays active while its own entropy is at least `tau_down`; after a confident token it hands
the next one back. Nothing is drafted, verified or rolled back: the output is stitched from both models' tokens.

Each model keeps its own KV cache (one backend each) and catches up lazily: `Backend.sync` feeds, in one
forward, exactly the tokens the other model produced since this one last ran. A backend that prefills apart
(`Backend.split_prefill`: llama.cpp with flash attention) takes the prompt up front, as the decoding loop does.

R-Stitch+ replaces the two thresholds by a learned router (`LearnedRouter`, trained by train/router.py): a
logistic regression over confidence features of the active model's distribution, the position, and the
recent routing. `ThresholdRouter` is its special case, and its initialisation (`LearnedRouter.from_thresholds`).
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from adaspec.core.backends.base import Backend
from adaspec.core.config import GenerationConfig
from adaspec.core.decode import ROUTE, GenerationResult, Step, StopCriteria, run_to_end
from adaspec.core.errors import AdaspecError
from adaspec.core.sampling import probs_from_logits, sample

SMALL, LARGE = "small", "large"  # Step.source
WINDOW = 8  # tokens the `recent_large` feature looks back
ROUTER_FILE = "router.json"
ROUTER_KIND = "router"  # core/drafters/shipped/<target>/router/router.json: the default rstitch+ router
ROUTER_FORMAT = "adaspec-router"
FEATURES = ("bias", "entropy", "top1", "softmax_margin", "logit_margin", "position", "recent_large", "large",
            "large_x_entropy", "large_x_top1")


def normalized_entropy(probs: torch.Tensor, vocab_size: int) -> float:
    """H(p) / log|V| of probs [V], clamped to [0, 1]; |V| is the model's full vocabulary, so a reduced head (zero
    probability outside it) is measured on the same scale as the full one."""
    h = float(torch.special.entr(probs.float()).sum())
    return min(1.0, max(0.0, h / math.log(vocab_size)))


@dataclass(frozen=True)
class RouteState:
    """What a router sees at one decision."""

    probs: torch.Tensor  # [V] the active model's next-token distribution (softmax at temperature 1)
    entropy: float  # normalised, of probs
    large: bool  # the active model is the large one
    position: int  # tokens generated so far
    budget: int  # max_new_tokens
    recent: tuple[bool, ...]  # the last <= WINDOW tokens, True where the large model produced them


class Router(Protocol):
    def __call__(self, state: RouteState) -> bool:
        """Whether the large model produces the next token. Asked with the small model's distribution at the
        position about to be produced (True: hand this token over), and with the large model's distribution
        at the token it is producing (False: the next token goes back to the small model)."""


@dataclass(frozen=True)
class ThresholdRouter:
    """R-Stitch: small -> large when the small model's entropy > tau_up; large -> small when the large model's
    entropy < tau_down. tau_up = 1 never calls the large model; tau_up = tau_down = 0 hands the first token
    (of nonzero entropy) to the large model, which then never hands back."""

    tau_up: float
    tau_down: float

    def __post_init__(self) -> None:
        for name, value in (("tau_up", self.tau_up), ("tau_down", self.tau_down)):
            if not 0.0 <= value <= 1.0:
                raise AdaspecError(f"{name} must be in [0, 1] (a normalised entropy), got {value}")

    def __call__(self, state: RouteState) -> bool:
        return state.entropy >= self.tau_down if state.large else state.entropy > self.tau_up


def features(state: RouteState) -> torch.Tensor:
    """The router's inputs [F] (names in FEATURES), each in [0, 1]."""
    p1, p2 = torch.topk(state.probs.float(), 2).values.tolist()
    gap = math.log(p1) - math.log(p2) if p2 > 0 else 40.0  # the logit gap z_1 - z_2
    large = float(state.large)
    recent = sum(state.recent) / len(state.recent) if state.recent else 0.0
    return torch.tensor([1.0, state.entropy, p1, p1 - p2, math.tanh(gap / 4), state.position / max(1, state.budget),
                         recent, large, large * state.entropy, large * p1])


@dataclass
class LearnedRouter:
    """R-Stitch+: P(large produces the next token) = sigmoid(w . features). Deterministic (p >= 0.5) unless
    `explore` is given: then decisions are drawn with it, and `trace` keeps (features, decision) for training."""

    weights: torch.Tensor  # [F]
    explore: torch.Generator | None = None
    trace: list[tuple[torch.Tensor, bool]] = field(default_factory=list)
    meta: dict = field(default_factory=dict)  # how it was trained (saved with it)

    def __post_init__(self) -> None:
        if self.weights.shape != (len(FEATURES),) or not torch.isfinite(self.weights).all():
            raise AdaspecError(f"a router needs {len(FEATURES)} finite weights, got shape {tuple(self.weights.shape)}")

    def probability(self, phi: torch.Tensor) -> float:
        return float(torch.sigmoid(self.weights @ phi))

    def __call__(self, state: RouteState) -> bool:
        phi = features(state)
        p = self.probability(phi)
        if self.explore is None:
            return p >= 0.5
        large = float(torch.rand((), generator=self.explore)) < p
        self.trace.append((phi, large))
        return large

    @classmethod
    def from_thresholds(cls, tau_up: float, tau_down: float, sharpness: float = 40.0) -> LearnedRouter:
        """The logistic router that decides exactly as ThresholdRouter(tau_up, tau_down) when deterministic:
        logit = s * (H - tau_up) for the small model, s * (H - tau_down) for the large one."""
        ThresholdRouter(tau_up, tau_down)  # validates
        w = torch.zeros(len(FEATURES))
        w[FEATURES.index("entropy")] = sharpness
        w[FEATURES.index("bias")] = -sharpness * tau_up
        w[FEATURES.index("large")] = sharpness * (tau_up - tau_down)
        return cls(w, meta={"init": {"tau_up": tau_up, "tau_down": tau_down, "sharpness": sharpness}})

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {"format": ROUTER_FORMAT, "version": 1, "features": list(FEATURES), "window": WINDOW,
                "weights": [round(float(w), 6) for w in self.weights], **self.meta}
        path.write_text(json.dumps(body, indent=1))
        return path

    @classmethod
    def load(cls, path: Path) -> LearnedRouter:
        hint = "train one with `adaspec train-router`"
        try:
            body = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise AdaspecError(f"cannot read the router {path}: {e}; {hint}") from None
        if not isinstance(body, dict) or body.get("format") != ROUTER_FORMAT:
            raise AdaspecError(f"{path} is not an adaspec router; {hint}")
        if body.get("features") != list(FEATURES) or body.get("window") != WINDOW:
            raise AdaspecError(f"the router {path} was trained on other features ({body.get('features')}); {hint}")
        meta = {k: v for k, v in body.items() if k not in ("format", "version", "features", "window", "weights")}
        try:
            weights = torch.tensor([float(w) for w in body["weights"]])
        except (KeyError, TypeError, ValueError):
            raise AdaspecError(f"the router {path} has no valid weights; {hint}") from None
        return cls(weights, meta=meta)


def router_path(option: str | None, target_name: str | None) -> Path:
    """rstitch+'s router file: `router=` (a router.json or its directory), else the one shipped for the target."""
    if option:
        path = Path(option).expanduser()
        path = path / ROUTER_FILE if path.is_dir() else path
        if not path.is_file():
            raise AdaspecError(f"router '{option}' not found: give a {ROUTER_FILE} written by `adaspec train-router` "
                               "(or its directory)")
        return path
    from adaspec.core.drafters.shipped import SHIPPED_DIR

    path = SHIPPED_DIR / str(target_name) / ROUTER_KIND / ROUTER_FILE
    if target_name is None or not path.is_file():
        raise AdaspecError(
            f"rstitch+ needs a learned router and none ships for target '{target_name}': train one with "
            f"`adaspec train-router --out runs/router` (add --ship {SHIPPED_DIR / str(target_name)} to make it the "
            "default), or pass rstitch+:router=runs/router/router.json")
    return path


def _state(rows: torch.Tensor, vocab_size: int, large: bool, position: int, budget: int,
           recent: deque[bool]) -> RouteState:
    probs = torch.softmax(rows[-1].float(), dim=-1)  # [V]
    return RouteState(probs, normalized_entropy(probs, vocab_size), large, position, budget, tuple(recent))


def _choose(rows: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None) -> int:
    """Next token from logits [1, V], exactly as `ar` picks it (the exact acceptance rules with nothing drafted)."""
    if config.sampling.greedy:
        return int(rows[-1].argmax())
    return sample(probs_from_logits(rows, config.sampling)[-1], generator)


def stitch_steps(
    small: Backend,
    large: Backend,
    prompt_ids: list[int],
    config: GenerationConfig,
    router: Router,
    stop: StopCriteria | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[Step]:
    """Yield one Step per token (source "small" or "large") until EOS, a stop string or max_new_tokens."""
    if not prompt_ids:
        raise AdaspecError("the prompt is empty: give at least one token")
    context = min(small.max_context, large.max_context)
    if len(prompt_ids) + config.max_new_tokens > context:
        raise AdaspecError(
            f"prompt of {len(prompt_ids)} tokens + max_new_tokens {config.max_new_tokens} exceeds the context of "
            f"{context} tokens (the smaller of the two models'); shorten the prompt or lower --max-new-tokens")
    stop = stop or StopCriteria()
    ids = list(prompt_ids)
    generated: list[int] = []
    recent: deque[bool] = deque(maxlen=WINDOW)
    small.start(ids)  # as the decoding loop starts (Backend.split_prefill): the same kernels as `ar`
    large.start(ids)
    active = small
    budget = config.max_new_tokens
    while len(generated) < budget:
        # 1 the active model scores the next position, first catching up on what the other one produced
        rows = active.sync(ids)  # [1, V]
        state = _state(rows, active.vocab_size, active is large, len(generated), budget, recent)
        # 2 an unsure small model hands this token to the large one
        if active is small and router(state):
            active = large
            rows = large.sync(ids)  # [1, V]
            state = _state(rows, large.vocab_size, True, len(generated), budget, recent)
        # 3 the active model produces it
        x = _choose(rows, config, generator)
        source = LARGE if active is large else SMALL
        generated.append(x)
        ids.append(x)
        recent.append(active is large)
        _, reason = stop.cut(generated, 1)
        # 4 a confident large model hands the next token back
        if active is large and reason is None and len(generated) < budget and not router(state):
            active = small
        yield Step(0, 0, [x], stop=reason, source=source, entropy=round(state.entropy, 5), kind=ROUTE)
        if reason is not None:
            return


def stitch(
    small: Backend,
    large: Backend,
    prompt_ids: list[int],
    config: GenerationConfig,
    router: Router,
    stop: StopCriteria | None = None,
    on_step: Callable[[Step], None] | None = None,
) -> GenerationResult:
    """Run `stitch_steps` to the end with a generator seeded from config.seed (sampling draws from it). The TTFT is
    the small model's prefill (and the large one's where backends prefill apart, else it comes later)."""
    generator = torch.Generator().manual_seed(config.seed)
    return run_to_end(prompt_ids, stitch_steps(small, large, prompt_ids, config, router, stop, generator), on_step)


def large_share(steps: list[Step]) -> float:
    """Share of the tokens the large model produced."""
    return sum(s.source == LARGE for s in steps) / max(1, len(steps))


def forward_counts(sources: list[str]) -> tuple[int, int]:
    """(small forwards, large forwards) of a stitched generation: one forward of its producer per token, plus
    one of the small model for each large token that the small model scored first (after a small token, or the
    first token)."""
    small = large = 0
    for i, source in enumerate(sources):
        if source == LARGE:
            large += 1
            small += i == 0 or sources[i - 1] == SMALL
        else:
            small += 1
    return small, large


@dataclass
class RStitchRunner:
    """`rstitch` and `rstitch+`: the method runner (methods.Runner)."""

    label: str
    small: Backend
    large: Backend
    stop: StopCriteria
    router: Router

    @property
    def where(self) -> str:
        return self.large.where

    def __call__(self, prompt_ids, config, on_step=None) -> GenerationResult:
        return stitch(self.small, self.large, prompt_ids, config, self.router, self.stop, on_step)
