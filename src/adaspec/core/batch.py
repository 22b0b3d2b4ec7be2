"""Batched speculative decoding: many sequences advance together, each step scoring every active sequence's
[last token, d_1..d_k_i] in one target call.

Each sequence is a `decode.Decoding` with its own drafter state, length policy, acceptance rule, stop criteria and
sampling generator; the engine only decides which rows go into a call:

    0 admit     queued requests take free cache slots (a finished sequence frees its slot for the next, and its keys
                serve the next prompt that starts the same way)
    1 draft     every decoding sequence proposes (`Decoding.propose`)
    2 plan      the cost rule cuts the drafts of cost-aware sequences (`plan_lengths`): k_i from the measured cost
                of one call by total positions and each sequence's per-token acceptance, so that drafting shrinks
                as the batch grows and stops where it does not pay
    3 score     one call: the decoding rows, and chunks of long prompts still prefilling (at most `prefill_chunk`
                prompt positions a step, so that running sequences keep stepping)
    4 accept    per sequence (`Decoding.accept`), then its cache rolls back on its own

Greedy output of a sequence does not depend on what else is in its batch where the backend's kernels give a row
the same result whatever the other rows are (tests/test_batch.py checks both backends).
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from adaspec.core.backends.base import common_prefix
from adaspec.core.backends.batched import BatchBackend
from adaspec.core.config import (
    BATCH_COST_CONTEXT,
    BATCH_COST_SIZES,
    BATCH_DRAFT_MARGIN,
    BATCH_LONG_PROMPT,
    BATCH_PREFILL_CHUNK,
    BATCH_REUSE_MIN,
)
from adaspec.core.costmodel import BatchCosts, ContextCost, plan_lengths, token_rates
from adaspec.core.decode import Decoding, GenerationResult, Step
from adaspec.core.errors import AdaspecError
from adaspec.core.policies import BatchTable


@dataclass
class Request:
    """One generation for the engine: `start` builds its `Decoding` (own drafter, policy, generator) when it is
    admitted; `on_step` sees each of its steps as it lands."""

    prompt_ids: list[int]
    start: Callable[[], Decoding]
    on_step: Callable[[Step], None] | None = None
    tag: object = None  # the caller's


@dataclass
class Sequence:
    """A request inside the engine, and its result once done."""

    request: Request
    submitted: float
    slot: int | None = None
    seq: Decoding | None = None
    steps: list[Step] = field(default_factory=list)
    first: float | None = None  # when its first token landed
    result: GenerationResult | None = None
    error: AdaspecError | None = None


class BatchEngine:
    """Runs many `Request`s on one `BatchBackend`, at most `max_batch` at once (default: every slot).

    `costs`: the measured cost of one call by total positions (costmodel.BatchCosts, measured on a context of
    `cost_context` tokens); without it the drafts of cost-aware sequences are verified as their own policy says (no
    batch rule). What longer contexts and unequal rows add to it is learned from the engine's own calls
    (`ContextCost`) unless `learn` is off (`costs` then stand as given)."""

    def __init__(self, backend: BatchBackend, costs: BatchCosts | None = None, max_batch: int | None = None,
                 prefill_chunk: int = BATCH_PREFILL_CHUNK, cost_context: int = BATCH_COST_CONTEXT,
                 learn: bool = True) -> None:
        if prefill_chunk < 1:
            raise AdaspecError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.backend = backend
        self.costs = costs
        self.max_batch = min(max_batch or backend.slots, backend.slots)
        if self.max_batch < 1:
            raise AdaspecError(f"max_batch must be >= 1, got {max_batch}")
        self.prefill_chunk = prefill_chunk
        self.context_cost = ContextCost(cost_context)
        self.learn = learn
        self.queue: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # free slots, lowest first: llama.cpp splits a call into one pass per run of consecutive sequence ids, so the
        # running sequences are kept on the lowest slots (and the backend feeds rows in slot order)
        self.free = list(range(backend.slots))

    def submit(self, request: Request) -> Sequence:
        s = Sequence(request, time.perf_counter())
        self.queue.append(s)
        return s

    @property
    def idle(self) -> bool:
        return not self.queue and not self.running

    def _admit(self) -> list[Sequence]:
        failed = []
        while self.queue and len(self.running) < self.max_batch and self.free:
            s = self.queue.popleft()
            try:
                s.seq = s.request.start()
                if len(s.seq.ids) + s.seq.config.max_new_tokens > self.backend.max_context:
                    raise AdaspecError(f"prompt of {len(s.seq.ids)} tokens + max_new_tokens "
                                       f"{s.seq.config.max_new_tokens} exceeds the context of "
                                       f"{self.backend.max_context} positions per sequence in a batch")
            except AdaspecError as e:
                s.error = e
                failed.append(s)
                continue
            s.slot, reuse = self._slot(s.seq.ids)
            self.backend.rollback(s.slot, reuse)  # the slot keeps the start of the prompt it already holds
            self.running.append(s)
        return failed

    def _slot(self, ids: list[int]) -> tuple[int, int]:
        """A free slot for a prompt, and how many of its first positions that slot's cache already holds (a finished
        sequence's keys stay until overwritten: a shared system prompt, a conversation's earlier turns). The lowest
        free slot, or the highest for a long prompt: long sequences gather at the top, so that a backend that runs a
        long sequence's rows apart from short ones' (llama.cpp: `plan_passes`) cuts a call once between two runs of
        consecutive slots rather than around each long one. Another free slot is taken where it holds at least
        BATCH_REUSE_MIN more of the prompt."""
        held = {slot: min(common_prefix(self.backend.tokens[slot], ids), len(ids) - 1) for slot in self.free}
        slot = min(self.free) if len(ids) < BATCH_LONG_PROMPT else max(self.free)
        best = max(self.free, key=lambda f: (held[f], -f))
        if held[best] >= held[slot] + BATCH_REUSE_MIN:
            slot = best
        self.free.remove(slot)
        heapq.heapify(self.free)
        return slot, held[slot]

    def step(self) -> list[Sequence]:
        """One call over every running sequence; returns the sequences that ended in it (or failed to start)."""
        ended = self._admit()
        if not self.running:
            return ended
        budget = self.prefill_chunk
        decoding: list[Sequence] = []
        prefilling: list[tuple[Sequence, int]] = []
        for s in self.running:  # oldest first: a long prompt is prefilled in chunks while the others step
            missing = s.seq.cached - len(self.backend.tokens[s.slot])
            if missing <= budget:
                decoding.append(s)
                budget -= max(0, missing)
            else:
                prefilling.append((s, missing))
        for s in decoding:
            if isinstance(s.seq.policy, BatchTable):
                s.seq.policy.batch = len(decoding)
            s.seq.propose()
        chunks = []
        for s, missing in prefilling:
            if budget <= 0:
                break
            n = min(budget, missing)
            budget -= n
            chunks.append((s.slot, s.seq.ids[: len(self.backend.tokens[s.slot]) + n], 0))
        self._plan(decoding, [len(c[1]) - len(self.backend.tokens[c[0]]) for c in chunks])
        wants = [(s.slot, s.seq.ids + s.seq.draft.tokens, len(s.seq.draft) + 1) for s in decoding] + chunks
        new = [(len(ids) - len(self.backend.tokens[slot]), len(ids)) for slot, ids, _ in wants]  # (positions, end)
        t0 = time.perf_counter()
        logits = self.backend.sync(wants)
        now = time.perf_counter()
        decoding_only = not chunks and max(n for n, _ in new) <= BATCH_COST_SIZES[-1]
        if self.learn and self.costs is not None and decoding_only:
            self.context_cost.observe(self.costs.ms(sum(n for n, _ in new)), 1000 * (now - t0),
                                      sum(self.context_cost.beyond(n, end) for n, end in new),
                                      len({n for n, _ in new}) - 1)
        for s, row in zip(decoding, logits, strict=False):
            step = s.seq.accept(row)
            self.backend.rollback(s.slot, s.seq.cached)
            step.ms, step.batch = 1000 * (time.perf_counter() - t0), len(decoding)
            s.first = s.first or now
            s.steps.append(step)
            if s.request.on_step is not None:
                s.request.on_step(step)
            if s.seq.done:
                ended.append(self._finish(s))
        return ended

    def _plan(self, decoding: list[Sequence], chunk_lengths: list[int]) -> None:
        """2 plan: cut the drafts of cost-aware sequences to the lengths the batch's costs favour."""
        if self.costs is None or not decoding:
            return
        adaptive, gains, extra, lengths = [], [], [], list(chunk_lengths)
        fixed_positions, fixed_tokens, fixed_extra = sum(chunk_lengths), 0.0, 0.0
        per_token = self.context_cost.per_token
        for s in decoding:
            fixed = s.seq.cached + 1 - len(self.backend.tokens[s.slot])  # the prompt left, the last token
            rates = token_rates(s.seq.policy, s.seq.draft.confidence)
            if rates is not None and fixed > 1:  # its prompt is scored in this call: it drafts from the next
                s.seq.cut(0)
            if rates is None or fixed > 1:  # a fixed length: its row is scored as it is
                fixed += len(s.seq.draft)
                fixed_tokens += 1 + 0.5 * len(s.seq.draft)
                lengths.append(fixed)
            else:
                fixed_tokens += 1
                adaptive.append(s)
                gains.append(list(itertools.accumulate(rates, lambda a, b: a * b)))
                extra.append(per_token * self.context_cost.beyond(1, s.seq.cached + 1))
            fixed_positions += fixed
            fixed_extra += per_token * self.context_cost.beyond(fixed, s.seq.cached + 1)
        split_ms = max(self.context_cost.per_split, self.backend.pass_ms)  # learned, or what a pass costs at least
        ks = plan_lengths(gains, fixed_positions, fixed_tokens, self.costs, extra, fixed_extra, split_ms, lengths,
                          BATCH_DRAFT_MARGIN)
        for s, k in zip(adaptive, ks, strict=True):
            s.seq.cut(k)

    def cancel(self, s: Sequence) -> None:
        """Drop a queued or running sequence between steps (its client went away, its deadline passed): its slot
        frees for the next; it gets no result."""
        if s in self.running:
            self.running.remove(s)
            heapq.heappush(self.free, s.slot)
        elif s in self.queue:
            self.queue.remove(s)

    def _finish(self, s: Sequence) -> Sequence:
        self.running.remove(s)
        heapq.heappush(self.free, s.slot)
        seq = s.seq
        end = time.perf_counter()
        reason = s.steps[-1].stop or "length"
        s.result = GenerationResult(list(s.request.prompt_ids), list(seq.generated), s.steps, end - s.submitted,
                                    reason, None if s.first is None else s.first - s.submitted)
        return s

    def run(self, requests: Iterable[Request]) -> list[Sequence]:
        """Submit `requests` and step until all are done; the sequences in the order given."""
        sequences = [self.submit(r) for r in requests]
        while not self.idle:
            self.step()
        return sequences
