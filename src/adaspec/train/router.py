"""R-Stitch+ router training (`adaspec train-router`): REINFORCE over per-token routing decisions with the
paper's latency-aware reward, on arithmetic word problems generated here.

Problems are templated one- and two-step arithmetic word problems with known answers, built from a seed (names
and items from train/prompts.py; nothing from Spec-Bench or GSM8K). An episode runs R-Stitch greedily on one
problem while the router decides stochastically (`LearnedRouter.explore`), and earns, as in R-Stitch+,

    R = acc - lambda * acc * L

with acc 1 when the answer's final number is the problem's (bench.metrics.gsm8k_answer), else 0, and L the
episode's latency relative to the large model decoding every token alone (so L = 1 for `ar`). Only correct
answers are charged for latency: speed never pays for a wrong answer.

Simplifications against the paper (DAPO on measured latencies of 7B-32B models, router over hidden states):
1. Latency from a cost model: L = (large forwards + c * small forwards) / tokens, c = one small-model step's time
   over one large-model step's, measured once (or given). Counted forwards are noise-free on a shared CPU; a
   catch-up prefill counts as one forward.
2. REINFORCE with a group baseline (as GRPO/DAPO): G episodes per problem, advantage = R - the group's mean;
   loss = -sum over episodes of advantage x mean log-probability of its decisions. No clipping, no KL term.
3. The policy is a logistic regression over `routing.FEATURES`, initialised at the R-Stitch thresholds.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from adaspec.bench.metrics import gsm8k_answer
from adaspec.core.backends.base import Backend
from adaspec.core.config import DEFAULT_SEED, ROUTER_LAMBDA, RSTITCH_TAU_DOWN, RSTITCH_TAU_UP, GenerationConfig
from adaspec.core.decode import StopCriteria
from adaspec.core.errors import AdaspecError
from adaspec.routing import FEATURES, ROUTER_FILE, LearnedRouter, Router, ThresholdRouter, forward_counts, stitch
from adaspec.train.prompts import ITEMS, NAMES

SUFFIX = " Give the final answer as a number at the end."


@dataclass(frozen=True)
class Problem:
    text: str
    answer: int


def arithmetic_problem(rng: random.Random) -> Problem:
    """One templated word problem and its answer."""
    name, other = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    a, b, c = rng.randint(2, 30), rng.randint(2, 12), rng.randint(2, 9)
    text, answer = [
        (f"{name} has {a} {item}. {other} gives {name} {b} more. How many {item} does {name} have now?", a + b),
        (f"{name} had {a + b} {item} and gave {b} of them to {other}. How many {item} does {name} have left?", a),
        (f"{name} buys {c} bags of {item}. Each bag holds {b} {item}. How many {item} does {name} buy?", b * c),
        (f"{name} shares {b * c} {item} equally among {c} friends. How many {item} does each friend get?", b),
        (f"{name} has {a} {item}, buys {b} more and then gives {c} to {other}. How many {item} does {name} have "
         "now?", a + b - c),
        (f"One of the {item} costs {c} dollars. {name} buys {b} of them. How many dollars does {name} pay?", b * c),
    ][rng.randrange(6)]
    return Problem(text + SUFFIX, answer)


def make_problems(n: int, seed: int) -> list[Problem]:
    """n distinct problems, reproducible from the seed."""
    rng = random.Random(seed)
    seen: dict[str, Problem] = {}
    for _ in range(50 * n):
        if len(seen) == n:
            break
        p = arithmetic_problem(rng)
        seen.setdefault(p.text, p)
    return list(seen.values())


def is_correct(text: str, problem: Problem) -> bool:
    return gsm8k_answer(text) == str(problem.answer)


@dataclass(frozen=True)
class RouterTrainConfig:
    problems: int = 64  # training problems
    held_out: int = 16  # evaluation problems (learned router vs the thresholds it started from)
    rollouts: int = 4  # episodes per problem (the group of the baseline)
    epochs: int = 2
    lam: float = ROUTER_LAMBDA  # lambda in R = acc - lambda * acc * L
    lr: float = 0.05  # Adam
    max_new_tokens: int = 96
    tau_up: float = RSTITCH_TAU_UP  # the initialisation
    tau_down: float | None = RSTITCH_TAU_DOWN  # None: tau_up
    sharpness: float = 40.0  # slope of the initial logistic around the thresholds (exploration width)
    small_cost: float | None = None  # c; None: measured
    seed: int = DEFAULT_SEED

    def __post_init__(self) -> None:
        for name in ("problems", "epochs", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise AdaspecError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.rollouts < 2:
            raise AdaspecError(f"--rollouts must be >= 2 (the baseline is the group's mean), got {self.rollouts}")
        if self.held_out < 0:
            raise AdaspecError(f"--held-out must be >= 0, got {self.held_out}")
        if self.lam < 0:
            raise AdaspecError(f"--lam must be >= 0, got {self.lam}")
        if self.lr <= 0 or self.sharpness <= 0:
            raise AdaspecError(f"--lr and the sharpness must be > 0, got {self.lr} and {self.sharpness}")
        if self.small_cost is not None and self.small_cost < 0:
            raise AdaspecError(f"--small-cost must be >= 0, got {self.small_cost}")
        ThresholdRouter(self.tau_up, self.tau_down_value)  # thresholds in [0, 1]

    @property
    def tau_down_value(self) -> float:
        return self.tau_up if self.tau_down is None else self.tau_down


@dataclass
class Episode:
    correct: bool
    latency: float  # L: relative to the large model decoding every token
    large_share: float
    tokens: int
    reward: float
    features: torch.Tensor  # [T, F] the router's inputs at its T decisions
    actions: torch.Tensor  # [T] 1.0 where it chose the large model


def latency(sources: list[str], small_cost: float) -> float:
    small, large = forward_counts(sources)
    return (large + small_cost * small) / max(1, len(sources))


def run_episode(small: Backend, large: Backend, prompt: list[int], problem: Problem, router: Router,
                config: RouterTrainConfig, small_cost: float, decode: Callable[[list[int]], str],
                stop: StopCriteria | None, correct: Callable[[str, Problem], bool]) -> Episode:
    trace = router.trace if isinstance(router, LearnedRouter) else []
    trace.clear()
    result = stitch(small, large, prompt, GenerationConfig(max_new_tokens=config.max_new_tokens), router, stop)
    sources = [str(s.source) for s in result.steps]
    ok = correct(decode(result.token_ids), problem)
    lat = latency(sources, small_cost)
    share = sum(s == "large" for s in sources) / max(1, len(sources))
    feats = torch.stack([phi for phi, _ in trace]) if trace else torch.empty(0, len(FEATURES))
    actions = torch.tensor([float(a) for _, a in trace])
    return Episode(ok, lat, share, len(sources), float(ok) * (1 - config.lam * lat), feats, actions)


def step_cost(small: Backend, large: Backend, prompt: list[int], repeats: int = 7) -> float:
    """c: the median time of one decoding step (one position on a cached prompt) of the small model over the
    large model's."""
    def one_step(backend: Backend) -> float:
        backend.reset()
        backend.sync(prompt)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            backend.sync(prompt + [prompt[-1]])
            times.append(time.perf_counter() - t0)
            backend.rollback(len(prompt))
        return statistics.median(times)

    return one_step(small) / one_step(large)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def evaluate(small: Backend, large: Backend, prompts: list[list[int]], problems: list[Problem], router: Router,
             config: RouterTrainConfig, small_cost: float, decode: Callable[[list[int]], str],
             stop: StopCriteria | None, correct: Callable[[str, Problem], bool]) -> dict:
    """Accuracy, large-model share (per token), latency L and reward of a deterministic router."""
    eps = [run_episode(small, large, p, q, router, config, small_cost, decode, stop, correct)
           for p, q in zip(prompts, problems, strict=True)]
    tokens = sum(e.tokens for e in eps)
    return {"problems": len(eps), "accuracy": _mean([float(e.correct) for e in eps]),
            "large_share": sum(e.large_share * e.tokens for e in eps) / max(1, tokens),
            "latency": _mean([e.latency for e in eps]), "reward": _mean([e.reward for e in eps])}


def train_router(
    small: Backend,
    large: Backend,
    encode: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
    out: Path,
    config: RouterTrainConfig,
    stop: StopCriteria | None = None,
    correct: Callable[[str, Problem], bool] = is_correct,
    log: Callable[[str], None] = print,
) -> dict:
    """Train a router from the R-Stitch thresholds; write out/router.json, train_report.json and report.md and
    return the report."""
    t0 = time.time()
    problems = make_problems(config.problems + config.held_out, config.seed)
    if len(problems) < config.problems + config.held_out:
        raise AdaspecError(f"only {len(problems)} distinct problems exist; lower --problems or --held-out")
    train, held = problems[: config.problems], problems[config.problems:]
    prompts = {p.text: encode(p.text) for p in problems}
    cost = config.small_cost if config.small_cost is not None else step_cost(small, large, prompts[train[0].text])
    log(f"train-router: {len(train)} problems x {config.rollouts} rollouts x {config.epochs} epochs; "
        f"small step = {cost:.3f} large steps; lambda = {config.lam}")
    start = LearnedRouter.from_thresholds(config.tau_up, config.tau_down_value, config.sharpness)
    w = start.weights.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([w], lr=config.lr)
    explore = torch.Generator().manual_seed(config.seed)
    order_rng = random.Random(config.seed)
    history: list[dict] = []
    for epoch in range(config.epochs):
        order = list(train)
        order_rng.shuffle(order)
        for problem in order:
            episodes = []
            for _ in range(config.rollouts):
                policy = LearnedRouter(w.detach().clone(), explore=explore)
                episodes.append(run_episode(small, large, prompts[problem.text], problem, policy, config, cost,
                                            decode, stop, correct))
            rewards = torch.tensor([e.reward for e in episodes])
            advantages = rewards - rewards.mean()  # [G]
            loss = torch.zeros(())
            for e, a in zip(episodes, advantages.tolist(), strict=True):
                if a != 0.0 and len(e.actions):
                    # log pi(decision) of a Bernoulli(sigmoid(w . phi)) policy, per decision: [T]
                    logp = -torch.nn.functional.binary_cross_entropy_with_logits(e.features @ w, e.actions,
                                                                                 reduction="none")
                    loss = loss - a * logp.mean()
            if loss.requires_grad:
                optimizer.zero_grad()
                (loss / config.rollouts).backward()
                optimizer.step()
            history.append({"epoch": epoch, "reward": _mean([e.reward for e in episodes]),
                            "accuracy": _mean([float(e.correct) for e in episodes]),
                            "large_share": _mean([e.large_share for e in episodes]),
                            "latency": _mean([e.latency for e in episodes])})
        last = history[-len(order):]
        log(f"epoch {epoch + 1}/{config.epochs}: reward {_mean([h['reward'] for h in last]):.3f}, accuracy "
            f"{_mean([h['accuracy'] for h in last]):.3f}, large share {_mean([h['large_share'] for h in last]):.3f}, "
            f"latency {_mean([h['latency'] for h in last]):.3f} ({(time.time() - t0) / 60:.1f} min)")
    meta = {"lambda": config.lam, "small_cost": round(cost, 4), "init": start.meta["init"],
            "train": {k: v for k, v in asdict(config).items() if k != "small_cost"}}
    router = LearnedRouter(w.detach().clone(), meta=meta)
    evaluation = {}
    if held:
        held_prompts = [prompts[p.text] for p in held]
        for name, r in (("thresholds", ThresholdRouter(config.tau_up, config.tau_down_value)), ("learned", router)):
            evaluation[name] = evaluate(small, large, held_prompts, held, r, config, cost, decode, stop, correct)
    router.meta["held_out"] = evaluation
    out.mkdir(parents=True, exist_ok=True)
    path = router.save(out / ROUTER_FILE)
    report = {"router": str(path), "config": asdict(config), "small_cost": cost, "history": history,
              "held_out": evaluation, "weights": dict(zip(FEATURES, router.weights.tolist(), strict=True)),
              "init_weights": dict(zip(FEATURES, start.weights.tolist(), strict=True)),
              "minutes": (time.time() - t0) / 60}
    (out / "train_report.json").write_text(json.dumps(report, indent=1))
    write_report(report, out / "report.md")
    return report


def write_report(report: dict, path: Path) -> Path:
    """report.md: what was trained, per-epoch means, the held-out comparison and the weights."""
    config = report["config"]
    lines = ["# R-Stitch+ router training", "",
             f"{config['problems']} templated arithmetic problems (never Spec-Bench or GSM8K) x {config['rollouts']} "
             f"rollouts x {config['epochs']} epochs, greedy tokens, stochastic routing; reward = acc - "
             f"{config['lam']} x acc x latency, latency relative to the large model alone (one small step = "
             f"{report['small_cost']:.3f} large steps). REINFORCE with the group's mean reward as baseline, from "
             f"the thresholds tau_up = {config['tau_up']}, tau_down = {config['tau_down'] or config['tau_up']}. "
             f"{report['minutes']:.1f} min.", "", "## Training (means per epoch)", "",
             "| epoch | reward | accuracy | large share | latency |", "|---|---|---|---|---|"]
    epochs = sorted({h["epoch"] for h in report["history"]})
    for e in epochs:
        rows = [h for h in report["history"] if h["epoch"] == e]
        lines.append(f"| {e + 1} | " + " | ".join(f"{_mean([h[k] for h in rows]):.3f}"
                                                  for k in ("reward", "accuracy", "large_share", "latency")) + " |")
    if report["held_out"]:
        lines += ["", "## Held-out problems (deterministic routing)", "",
                  "| router | accuracy | large share | latency | reward |", "|---|---|---|---|---|"]
        for name, m in report["held_out"].items():
            lines.append(f"| {name} | " + " | ".join(f"{m[k]:.3f}" for k in ("accuracy", "large_share", "latency",
                                                                             "reward")) + " |")
    lines += ["", "## Weights (logit of P(large model produces the next token))", "",
              "| feature | initial | learned |", "|---|---|---|"]
    lines += [f"| {f} | {report['init_weights'][f]:.3f} | {report['weights'][f]:.3f} |" for f in FEATURES]
    path.write_text("\n".join(lines) + "\n")
    return path
