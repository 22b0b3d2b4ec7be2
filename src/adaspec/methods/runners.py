"""Runners: prompt ids in, `GenerationResult` out. Ours (`EngineRunner`: the decoding loop with a drafter, a length
policy and an acceptance rule) and the peers' (transformers `generate`, llama.cpp's own decoding)."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from adaspec.core.backends import Backend
from adaspec.core.backends.base import llamacpp_where, torch_where
from adaspec.core.confidence import ConfidenceEnsemble
from adaspec.core.config import GenerationConfig
from adaspec.core.decode import Decoding, GenerationResult, Step, StopCriteria, generate
from adaspec.core.drafters import Drafter, PromptLookupDrafter
from adaspec.core.errors import AdaspecError
from adaspec.core.models import LoadedModel
from adaspec.core.policies import FixedLength, LengthPolicy
from adaspec.core.verify import AcceptanceRule


class Runner(Protocol):
    label: str
    where: str  # where its target runs ('llamacpp:q4_1', 'torch:float32'): bench records carry it

    def __call__(
        self, prompt_ids: list[int], config: GenerationConfig, on_step: Callable[[Step], None] | None = None
    ) -> GenerationResult: ...


@dataclass
class EngineRunner:
    """Our decoding loop: `ar`, `sd` and every later method that is a drafter/policy/rule composition."""

    label: str
    target: Backend
    stop: StopCriteria
    drafter: Drafter | None = None
    policy: LengthPolicy | None = None  # None: FixedLength(1) (ar: no drafter)
    rule: AcceptanceRule | None = None  # None: exact (greedy, or lossless sampling)
    confidence: ConfidenceEnsemble | None = None  # rates drafts (CM-ASD); steps then record calibration data

    @property
    def where(self) -> str:
        return self.target.where

    def __call__(self, prompt_ids, config, on_step=None) -> GenerationResult:
        policy = self.policy or FixedLength(1)
        return generate(self.target, prompt_ids, config, self.drafter, policy, self.rule, self.stop, on_step,
                        self.confidence)

    @property
    def batchable(self) -> bool:
        """Whether `decoding` can make sequences of this method for the batched engine (its drafter is per sequence
        and needs no model of its own: prompt lookup, or none)."""
        return self.drafter is None or isinstance(self.drafter, PromptLookupDrafter)

    def decoding(self, prompt_ids: list[int], config: GenerationConfig, max_context: int) -> Decoding:
        """A new sequence of this method for the batched engine: its own copies of the drafter and the length policy
        (their state is per sequence), its own generator seeded from config.seed."""
        if not self.batchable:
            raise AdaspecError(f"{self.label}: batched decoding drafts with prompt lookup or nothing so far; the "
                               f"{self.drafter.name} drafter runs one sequence at a time (leave --concurrency at 1)")
        policy = copy.deepcopy(self.policy or FixedLength(1))
        drafter = None if self.drafter is None else copy.deepcopy(self.drafter)
        return Decoding(prompt_ids, config, max_context, drafter, policy, self.rule, self.stop,
                        torch.Generator().manual_seed(config.seed), self.confidence)


@dataclass
class HFRunner:
    """transformers `generate`, plain, assisted or with prompt lookup: the peers, measured in the same run."""

    label: str
    target: LoadedModel
    eos_ids: frozenset[int]
    extra: dict = field(default_factory=dict)

    @property
    def where(self) -> str:
        return torch_where(self.target.model.dtype, self.target.device)

    @torch.inference_mode()
    def __call__(self, prompt_ids, config, on_step=None) -> GenerationResult:
        s = config.sampling
        kwargs = dict(do_sample=False) if s.greedy else dict(
            do_sample=True, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)  # top_k 0: off
        if config.stop:
            kwargs.update(stop_strings=list(config.stop), tokenizer=self.target.tokenizer)
        torch.manual_seed(config.seed)  # transformers samples from the global generator
        x = torch.tensor([prompt_ids], device=self.target.device)
        first = FirstToken()
        t0 = time.perf_counter()
        out = self.target.model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=config.max_new_tokens,
            eos_token_id=sorted(self.eos_ids), pad_token_id=self.target.tokenizer.pad_token_id, streamer=first,
            **kwargs, **self.extra,
        )
        wall = time.perf_counter() - t0
        tokens = out[0, len(prompt_ids):].tolist()
        for i, t in enumerate(tokens):  # one token count for everyone: up to and including EOS
            if t in self.eos_ids:
                tokens = tokens[: i + 1]
                break
        reason = "eos" if tokens and tokens[-1] in self.eos_ids else "length"
        return GenerationResult(list(prompt_ids), tokens, [], wall, reason, first.at and first.at - t0)


class FirstToken:
    """A transformers streamer that notes when the first new token arrives (its first `put` is the prompt)."""

    def __init__(self) -> None:
        self.puts = 0
        self.at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


@dataclass
class LlamaCppRunner:
    """llama.cpp's own plain decoding of the target's GGUF through llama-cpp-python's `Llama.generate`: the peer a
    CPU user would otherwise run, measured in the same run. Its cache is cleared before each prompt (no prefix
    reuse across prompts, as for every other method)."""

    label: str
    path: Path  # the GGUF file
    stop: StopCriteria
    threads: int | None = None

    def __post_init__(self) -> None:
        from adaspec.core.backends.llamacpp import _init, use_flash_attention

        lc = _init()
        threads = self.threads or torch.get_num_threads()  # llama-cpp-python's own default is half the cores
        # flash attention where it is faster on this machine (measured once, as for our backend; llama-cpp-python's
        # default is off, llama.cpp's CLI turns it on): the strongest plain llama.cpp, exact or not
        self.flash_attn = use_flash_attention(self.path, threads, exact=False)
        self.llm = lc.Llama(model_path=str(self.path), n_ctx=0, n_batch=512, n_threads=threads,
                            n_threads_batch=threads, flash_attn=self.flash_attn, verbose=False)

    @property
    def where(self) -> str:
        from adaspec.core.backends.llamacpp import ftype_name

        return llamacpp_where(ftype_name(self.llm.metadata.get('general.file_type')), self.flash_attn)

    def __call__(self, prompt_ids, config, on_step=None) -> GenerationResult:
        s = config.sampling
        if len(prompt_ids) + config.max_new_tokens > self.llm.n_ctx():
            raise AdaspecError(f"prompt of {len(prompt_ids)} tokens + max_new_tokens {config.max_new_tokens} "
                               f"exceeds the model context of {self.llm.n_ctx()} tokens")
        self.llm.reset()
        self.llm.set_seed(config.seed)
        sampling = dict(temp=0.0) if s.greedy else dict(temp=s.temperature, top_k=s.top_k, top_p=s.top_p)
        tokens: list[int] = []
        reason = "length"
        ttft = None
        t0 = time.perf_counter()
        for t in self.llm.generate(list(prompt_ids), repeat_penalty=1.0, min_p=0.0, reset=True, **sampling):
            ttft = time.perf_counter() - t0 if ttft is None else ttft
            tokens.append(int(t))
            keep, why = self.stop.cut(tokens, 1)
            if why is not None:
                del tokens[keep:]
                reason = why
                break
            if len(tokens) >= config.max_new_tokens:
                break
        wall = time.perf_counter() - t0
        return GenerationResult(list(prompt_ids), tokens, [], wall, reason, ttft)


def stop_criteria(target: LoadedModel, config: GenerationConfig) -> StopCriteria:
    eos = target.eos_ids if config.stop_on_eos else frozenset()
    return StopCriteria(eos, tuple(config.stop), lambda ids: target.tokenizer.decode(ids))
