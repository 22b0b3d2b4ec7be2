"""The exactness checks every lossless method passes, and the chi-square helpers they share.

`lossless_methods()` reads the registry (methods.Method.lossless): test_decode checks that each one's greedy output
equals a cache-free decoder's token for token, test_lossless that its sampled output follows the target's exact law.
The checks take a method by name, so a new method is checked by being registered (test_registry's toy is).

On a vocabulary of 8, the exact law of the first three sampled tokens is enumerated from the target (forward passes
on every prefix); samples drawn with fixed seeds must fit it (chi-square goodness of fit), and a biased rule must fail.
The registry's methods run on a six-layer target whose deep layers are damped (so SpecBound's early exits draft),
with its jittered copy as the drafter; TINY holds the options a method needs on these models where its defaults do
not fit them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

from conftest import damped_llama, full_logits, jittered, naive_greedy
from scipy.stats import chisquare

from adaspec.core.config import BackendChoice, GenerationConfig, SamplingConfig
from adaspec.core.costmodel import CostAware
from adaspec.core.decode import GenerationResult
from adaspec.core.models import LoadedModel
from adaspec.core.sampling import probs_from_logits
from adaspec.methods import Runner, build_runner, methods, parse_method

V = 8
N = 3000  # samples per check
PROMPT = [1, 2, 3, 1, 2, 4, 5, 1, 2]  # repeats, so prompt lookup proposes drafts
TOKENS = 3  # the law of the first three generated tokens is checked
PASS = 1e-3  # a lossless method must fit with p-value above this
FAIL = 1e-6  # a biased rule must be rejected with p-value below this
T1 = SamplingConfig(temperature=1.0)
TINY = {"specbound": "exits=1,2,threshold=0.1,d_max=2,adapters=none"}  # the target has 6 layers, no adapters ship

Seq = tuple[int, ...]


def exact_joint(model, sampling: SamplingConfig, prompt: list[int] = PROMPT) -> dict[Seq, float]:
    """P(t1 .. t_TOKENS) under token-by-token sampling from the target, by enumerating every prefix."""
    joint: dict[Seq, float] = {(): 1.0}
    for _ in range(TOKENS):
        longer: dict[Seq, float] = {}
        for prefix, mass in joint.items():
            if mass == 0.0:
                longer.update({prefix + (t,): 0.0 for t in range(V)})
                continue
            probs = probs_from_logits(full_logits(model, prompt + list(prefix))[-1], sampling)  # [V]
            longer.update({prefix + (t,): mass * float(probs[t]) for t in range(V)})
        joint = longer
    assert abs(sum(joint.values()) - 1.0) < 1e-4
    return joint


def chisquare_pvalue(observed: dict, expected: dict) -> float:
    """Goodness of fit of counts to expected counts over the same cells; cells with expected count < 5
    are merged into one; a sample in a cell of probability zero fails outright."""
    if any(observed.get(c, 0) for c in expected if expected[c] == 0.0):
        return 0.0
    assert set(observed) <= set(expected)
    small = [c for c in expected if 0.0 < expected[c] < 5]
    cells = [c for c in expected if expected[c] >= 5]
    exp = [expected[c] for c in cells] + ([sum(expected[c] for c in small)] if small else [])
    obs = [observed.get(c, 0) for c in cells] + ([sum(observed.get(c, 0) for c in small)] if small else [])
    return float(chisquare(obs, exp, sum_check=False).pvalue)


def fit_pvalue(samples: list[Seq], joint: dict[Seq, float]) -> float:
    """The smaller chi-square p-value of the samples' (t1, t2) joint and t3 marginal against the exact law."""
    pvalues = []
    for project in (lambda s: s[:2], lambda s: s[2:3]):
        expected: dict = {}
        for seq, p in joint.items():
            expected[project(seq)] = expected.get(project(seq), 0.0) + p * len(samples)
        observed: dict = {}
        for s in samples:
            observed[project(s)] = observed.get(project(s), 0) + 1
        pvalues.append(chisquare_pvalue(observed, expected))
    return min(pvalues)


@dataclass
class Draws:
    samples: list[Seq] = field(default_factory=list)
    drafted: int = 0
    accepted: int = 0
    rejections: int = 0  # steps that kept fewer tokens than drafted
    full_accepts: int = 0  # steps that kept every drafted token (a bonus token was drawn)
    first_lengths: Counter = field(default_factory=Counter)  # tokens the first step drafted

    def add(self, result: GenerationResult) -> None:
        self.samples.append(tuple(result.token_ids[:TOKENS]))
        self.first_lengths[result.steps[0].drafted] += 1
        for s in result.steps:
            if s.drafted:
                self.drafted += s.drafted
                self.accepted += s.accepted
                self.rejections += s.accepted < s.drafted
                self.full_accepts += s.accepted == s.drafted


def assert_both_paths_ran(draws: Draws) -> None:
    """A fit is only evidence if drafts were both accepted and rejected many times."""
    n = len(draws.samples)
    assert draws.rejections > n // 20 and draws.full_accepts > n // 20 and draws.accepted > n // 10


# -- the registry's lossless methods on tiny models


def lossless_methods() -> list[str]:
    return [m.name for m in methods() if m.lossless]


@dataclass(frozen=True)
class Models:
    target: LoadedModel
    drafter: LoadedModel


def tiny_models() -> Models:
    """A six-layer target (vocabulary V, deep layers damped) and its jittered copy as the drafter."""
    target = damped_llama(12, 0.3, scale=12.0, vocab=V)
    drafter = jittered(damped_llama(12, 0.3, scale=12.0, vocab=V), 0.5)
    return Models(LoadedModel("tiny", Path("."), target, None), LoadedModel("tiny-drafter", Path("."), drafter, None))


def flat_costs(backend, drafter) -> CostAware:
    """What k=auto measures, made up: verifying n positions costs what one does and drafting is free, so the cost
    rule drafts as much as it may (timings of tiny models are noise)."""
    return CostAware({n: 1.0 for n in range(1, 10)})


def method_runner(name: str, models: Models) -> Runner:
    """`name` at its defaults (and TINY's options) on the tiny models, the drafter given as --drafter would be."""
    spec = parse_method(f"{name}:{TINY[name]}" if name in TINY else name)
    with mock.patch("adaspec.methods.sd.cost_aware", flat_costs):
        return build_runner(spec, models.target, models.drafter, GenerationConfig(stop_on_eos=False),
                            BackendChoice("torch"))


def greedy_check(runner: Runner, model, prompts: list[list[int]], n: int = 24) -> tuple[int, int]:
    """The runner's greedy tokens equal a cache-free decoder's for every prompt; (drafted, accepted) in all."""
    drafted = accepted = 0
    for prompt in prompts:
        result = runner(prompt, GenerationConfig(max_new_tokens=n, stop_on_eos=False))
        assert result.token_ids == naive_greedy(model, prompt, n), (runner.label, prompt)
        drafted += sum(s.drafted for s in result.steps)
        accepted += sum(s.accepted for s in result.steps)
    return drafted, accepted


def draw_runner(runner: Runner, n: int = N, sampling: SamplingConfig = T1) -> Draws:
    """n generations of TOKENS tokens from PROMPT, seeds 0..n-1."""
    draws = Draws()
    for seed in range(n):
        draws.add(runner(PROMPT, GenerationConfig(max_new_tokens=TOKENS, sampling=sampling, seed=seed,
                                                  stop_on_eos=False)))
    return draws
