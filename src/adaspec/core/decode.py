"""The decoding loop: autoregressive decoding is speculative decoding with nothing drafted.

Invariant: the target's cache holds every token except the last one emitted, so each step scores
[last token, d_1 .. d_k] in one forward: k+1 positions whose logits verify the draft and give the
correction or bonus token. The first step's forward is the prefill.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from adaspec.core.backends.base import Backend
from adaspec.core.confidence import METRICS, ConfidenceEnsemble
from adaspec.core.config import GenerationConfig
from adaspec.core.drafters.base import Draft, DraftContext, Drafter, Hidden
from adaspec.core.errors import AdaspecError
from adaspec.core.policies import FixedLength, LengthPolicy, Outcome
from adaspec.core.verify import AcceptanceRule, rule_for

# Step.kind, the closed set of what a step is: a target forward that verifies a draft (`ar`'s verify an empty one),
# or one token a router (R-Stitch, routing.py) had a small or a large model produce
VERIFY, ROUTE = "verify", "route"
STEP_KINDS = (VERIFY, ROUTE)


@dataclass
class Step:
    """One target forward (kind VERIFY), or one routed token (kind ROUTE)."""

    drafted: int  # drafted tokens the target verified (the proposal's first ones; `cut` more were paid for)
    accepted: int  # drafted tokens the target kept
    tokens: list[int]  # tokens emitted: the accepted ones, then the correction/bonus (cut at a stop)
    confidence: list[float] = field(default_factory=list)  # drafter confidence per drafted token
    stop: str | None = None  # "eos" | "stop" when this step ended the generation on a stop
    cut: int = 0  # tokens drafted (and paid for) but not verified: the length policy kept only `drafted`
    # with a confidence estimator (CM-ASD methods), per drafted token: every confidence metric, and whether
    # the exact criterion accepts it (it equals the target's argmax there), also past the first rejection
    metrics: dict[str, list[float]] = field(default_factory=dict)
    exact: list[bool] = field(default_factory=list)
    # routing methods (R-Stitch, routing.py): one step per token, produced by "small" or "large", and the
    # normalised entropy H / log|V| of that model's distribution there
    source: str | None = None
    entropy: float | None = None
    # early-exit drafting (SpecBound): the layer each drafted token exited after, and why the draft ended
    # ("bound": a token reached the deepest exit unsure, "d_max": the length bound, "budget", "policy")
    exit_layers: list[int] = field(default_factory=list)
    draft_stop: str | None = None
    # wall ms from the previous step's end to this one's (drafting, the target forward, acceptance; the first
    # step includes the prefill), set by the loop that runs the steps (None: not timed)
    ms: float | None = None
    # batched decoding (batch.py): how many sequences the step's target call decoded together
    batch: int | None = None
    kind: str = VERIFY  # one of STEP_KINDS


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    token_ids: list[int]
    steps: list[Step]
    wall_s: float
    stop_reason: str  # "eos" | "length" | "stop"
    ttft_s: float | None = None  # time to the first new token: prefill and the first step (None: not observed)

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def mean_accepted(self) -> float:
        """Tokens emitted per target forward (bonus included)."""
        return self.new_tokens / max(1, len(self.steps))

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0


@dataclass
class StopCriteria:
    """EOS ids, and stop strings matched on decoded text (needs `decode`)."""

    eos_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    decode: Callable[[list[int]], str] | None = None

    def __post_init__(self) -> None:
        if self.stop_strings and self.decode is None:
            raise AdaspecError("stop strings need a tokenizer to decode the generated text")

    def cut(self, generated: list[int], fresh: int) -> tuple[int, str | None]:
        """Among `generated`, whose last `fresh` tokens are new, return (tokens to keep, reason) at the
        first stop; (len(generated), None) if none. An EOS token is kept, text after a stop string is not."""
        start = len(generated) - fresh
        for i in range(start, len(generated)):
            if generated[i] in self.eos_ids:
                return i + 1, "eos"
        if self.stop_strings:
            assert self.decode is not None
            for i in range(start, len(generated)):
                text = self.decode(generated[: i + 1])
                if any(s in text for s in self.stop_strings):
                    return i + 1, "stop"
        return len(generated), None


class Decoding:
    """One sequence's decoding state, its step split around the target call: `propose` (step 1) returns the draft
    whose [last token, d_1..d_k] the caller scores in one forward, `accept` (steps 3-6) takes those logits [k+1, V].
    `speculative_steps` runs one sequence this way; the batched engine (batch.py) scores many in one call. The
    caller rolls the target's cache back to `cached` after each step (step 4)."""

    def __init__(self, prompt_ids: list[int], config: GenerationConfig, max_context: int,
                 drafter: Drafter | None = None, policy: LengthPolicy | None = None,
                 rule: AcceptanceRule | None = None, stop: StopCriteria | None = None,
                 generator: torch.Generator | None = None, confidence: ConfidenceEnsemble | None = None) -> None:
        check_prompt(prompt_ids, config, max_context)
        self.config = config
        self.drafter = drafter
        self.policy = policy or FixedLength(1)
        self.rule = rule or rule_for(config.sampling)
        self.stop = stop or StopCriteria()
        self.generator = generator
        self.confidence = confidence
        self.score = None if confidence is None else lambda logits: float(confidence(logits))
        self.ids = list(prompt_ids)
        self.generated: list[int] = []
        self.done = False
        self.draft = Draft()  # what the target verifies this step
        self.proposal = Draft()  # the whole draft before any cut
        self.policy.reset()
        if drafter is not None:
            drafter.reset()

    @property
    def cached(self) -> int:
        """Positions the target's cache holds between steps: every token but the last one emitted."""
        return len(self.ids) - 1

    def prefilled(self, hidden: Hidden | None = None) -> None:
        """The target cached all but the prompt's last token apart from the first step (a drafter reading target
        features sees the prompt's)."""
        if self.drafter is not None:
            self.drafter.observe(0, self.ids, hidden)

    def budget(self) -> int:
        """The most tokens a draft may hold this step: the policy's length, never more than the budget can use
        (the step always emits one extra token)."""
        return min(self.policy.draft_length(), self.config.max_new_tokens - len(self.generated) - 1)

    def propose(self, limit: int | None = None) -> Draft:
        """1 draft (at most `limit` tokens, else the policy's length), cut to what the policy verifies."""
        k_max = self.budget() if limit is None else min(limit, self.budget())
        draft = Draft()
        if self.drafter is not None and k_max > 0:
            ctx = DraftContext(self.ids, k_max, self.config.sampling, self.generator, self.score,
                               self.policy.keep_drafting)
            draft = self.drafter.propose(ctx)
        self.proposal = draft
        self.draft = draft.prefix(self.policy.verify_length(draft.confidence))  # CM-ASD's paper variant cuts to k_j
        return self.draft

    def cut(self, n: int) -> None:
        """Verify only the first n drafted tokens (a batch's cost rule)."""
        self.draft = self.draft.prefix(n)

    def accept(self, logits: torch.Tensor, hidden: Hidden | None = None) -> Step:
        """3 accept by the rule from the target's logits [k+1, V] over [last, d_1..d_k]; 5 append the accepted tokens
        and the correction/bonus token, cut at a stop or the budget; 6 record the step. `hidden`: the target's
        hidden states of the forward, for a drafter that `wants_hidden`."""
        draft, proposal = self.draft, self.proposal
        n, x = self.rule(logits, draft.tokens, draft.probs, self.config.sampling, self.generator,
                         confidence=draft.confidence)
        emitted = draft.tokens[:n] + [x]
        self.policy.observe(Outcome(len(draft), n, proposal.tokens, proposal.confidence, emitted))
        if self.drafter is not None:
            self.drafter.observe(n, self.ids + emitted, hidden)
        generated = self.generated
        generated += emitted
        keep, reason = self.stop.cut(generated, len(emitted))
        keep = min(keep, self.config.max_new_tokens)
        emitted = emitted[: len(emitted) - (len(generated) - keep)]
        del generated[keep:]
        self.ids += emitted
        self.done = reason is not None or len(generated) >= self.config.max_new_tokens
        return Step(len(draft), n, emitted, draft.confidence, reason, len(proposal) - len(draft),
                    **calibration_fields(self.confidence, draft, logits), exit_layers=draft.exit_layers,
                    draft_stop=draft.stop)


def check_prompt(prompt_ids: list[int], config: GenerationConfig, max_context: int) -> None:
    if not prompt_ids:
        raise AdaspecError("the prompt is empty: give at least one token")
    if len(prompt_ids) + config.max_new_tokens > max_context:
        raise AdaspecError(
            f"prompt of {len(prompt_ids)} tokens + max_new_tokens {config.max_new_tokens} exceeds the "
            f"model context of {max_context} tokens; shorten the prompt or lower --max-new-tokens"
        )


def speculative_steps(
    target: Backend,
    prompt_ids: list[int],
    config: GenerationConfig,
    drafter: Drafter | None = None,
    policy: LengthPolicy | None = None,
    rule: AcceptanceRule | None = None,
    stop: StopCriteria | None = None,
    generator: torch.Generator | None = None,
    confidence: ConfidenceEnsemble | None = None,
) -> Iterator[Step]:
    """Yield one Step per target forward until EOS, a stop string or max_new_tokens.

    drafter=None is plain autoregressive decoding. `confidence` (CM-ASD) rates each drafted token from the
    drafter's logits; the policy and the rule then see it as the draft's confidence, and steps record it.
    """
    seq = Decoding(prompt_ids, config, target.max_context, drafter, policy, rule, stop, generator, confidence)
    wants_hidden = drafter is not None and drafter.wants_hidden
    if wants_hidden:
        target.keep_hidden = True  # the drafter reads the target's final hidden states (EAGLE)

    def hidden() -> Hidden | None:
        return Hidden(target.hidden_start, target.hidden) if wants_hidden else None

    if target.start(seq.ids):  # prefilled apart (Backend.split_prefill): every later forward scores a few positions
        seq.prefilled(hidden())
    while not seq.done:
        draft = seq.propose()  # 1 draft
        logits = target.sync(seq.ids + draft.tokens, keep=len(draft) + 1)  # 2 verify [last, d_1..d_k] -> [k+1, V]
        step = seq.accept(logits, hidden())  # 3 accept, 5 append, 6 record
        target.rollback(seq.cached)  # 4 the cache keeps ids[-1]'s predecessors: the accepted drafts stay
        yield step


def calibration_fields(confidence: ConfidenceEnsemble | None, draft: Draft, target_logits: torch.Tensor) -> dict:
    """Step.metrics and Step.exact for a verified draft (empty without an estimator or a draft). A drafter
    without logits (prompt lookup: a copy, one-hot) rates every token with its own confidence in every metric."""
    if confidence is None or not len(draft):
        return {}
    top1 = target_logits[: len(draft)].argmax(-1).tolist()  # [k]
    if draft.logits is None:
        metrics = {m: list(draft.confidence) for m in METRICS}
    else:
        metrics = {m: v.tolist() for m, v in confidence.components(draft.logits).items()}  # [k] each
    return {"metrics": metrics, "exact": [d == t for d, t in zip(draft.tokens, top1, strict=True)]}


def generate(
    target: Backend,
    prompt_ids: list[int],
    config: GenerationConfig,
    drafter: Drafter | None = None,
    policy: LengthPolicy | None = None,
    rule: AcceptanceRule | None = None,
    stop: StopCriteria | None = None,
    on_step: Callable[[Step], None] | None = None,
    confidence: ConfidenceEnsemble | None = None,
) -> GenerationResult:
    """Run `speculative_steps` to the end with a generator seeded from config.seed."""
    generator = torch.Generator().manual_seed(config.seed)
    steps = speculative_steps(target, prompt_ids, config, drafter, policy, rule, stop, generator, confidence)
    return run_to_end(prompt_ids, steps, on_step)


def run_to_end(prompt_ids: list[int], steps: Iterator[Step],
               on_step: Callable[[Step], None] | None = None) -> GenerationResult:
    """The result of a generation's steps (a loop not started yet: its work is timed from here). Each step gets
    `Step.ms`, the wall ms since the previous one (the first: since the start, prefill included, so it gives the
    TTFT), and is handed to `on_step` as it lands; the stop reason is the last step's, else "length"."""
    done: list[Step] = []
    start = last = time.perf_counter()
    for step in steps:
        now = time.perf_counter()
        step.ms, last = 1000 * (now - last), now
        done.append(step)
        if on_step is not None:
            on_step(step)
    wall = time.perf_counter() - start
    reason = done[-1].stop if done and done[-1].stop is not None else "length"
    return GenerationResult(list(prompt_ids), [t for s in done for t in s.tokens], done, wall, reason,
                            done[0].ms / 1000 if done else None)
