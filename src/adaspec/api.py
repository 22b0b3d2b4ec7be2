"""The Python entry points above the engine: many prompts at once with any batchable method.

    from adaspec.api import generate_many
    results = generate_many(["Translate to French: good morning", "Summarize: ..."], method="sd", concurrency=8)
    print(results[0].token_ids, results[0].tokens_per_s)
"""

from __future__ import annotations

from collections.abc import Sequence

from adaspec.core.backends.batched import BatchBackend, TorchBatchBackend
from adaspec.core.batch import BatchEngine, Request
from adaspec.core.config import DEFAULT_METHOD, BackendChoice, GenerationConfig
from adaspec.core.costmodel import machine_costs
from adaspec.core.decode import GenerationResult
from adaspec.core.errors import AdaspecError
from adaspec.core.models import LoadedModel, encode_prompt, load_model
from adaspec.methods import build_runner, load_drafter, parse_method, resolve_backend, target_gguf


def batch_engine(target: LoadedModel, choice: BackendChoice, slots: int) -> BatchEngine:
    """A batched engine on the target, on backend `choice` (auto made concrete), with `slots` sequences and the cost
    of one call by positions measured on this machine (cached)."""
    choice = resolve_backend(target.gguf is not None, choice)
    if choice.kind == "torch":
        backend: BatchBackend = TorchBatchBackend(target.model, slots)
    else:
        from adaspec.core.backends.llamacpp import LlamaCppBatchBackend

        backend = LlamaCppBatchBackend(target_gguf(target, choice.format), slots, threads=choice.threads)
    return BatchEngine(backend, machine_costs(backend, target.name))


def generate_many(prompts: Sequence[str | list[int]], method: str = DEFAULT_METHOD,
                  target: str | LoadedModel | None = None, config: GenerationConfig | None = None,
                  concurrency: int = 8, chat: bool = True,
                  backend: BackendChoice | None = None) -> list[GenerationResult]:
    """Generate for every prompt (text, templated as a user message when `chat`, or token ids), `concurrency` at a
    time on one batched engine; the results in the order of the prompts. Each sequence draws from its own generator
    seeded by config.seed; greedy outputs equal the prompt decoded alone by the batched engine."""
    if concurrency < 1:
        raise AdaspecError(f"concurrency must be >= 1, got {concurrency}")
    config = config or GenerationConfig()
    model = target if isinstance(target, LoadedModel) else load_model(target)
    spec = parse_method(method)
    runner = build_runner(spec, model, load_drafter(None, model), config, backend)
    if not hasattr(runner, "decoding"):
        raise AdaspecError(f"{spec.label} cannot run batched: only adaspec's own decoding loop (ar, sd, specdec and "
                           "the CM-ASD methods) can")
    engine = batch_engine(model, backend or BackendChoice(), min(concurrency, max(1, len(prompts))))
    ids = [p if isinstance(p, list) else encode_prompt(model.tokenizer, p, chat) for p in prompts]
    sequences = engine.run([Request(p, lambda p=p: runner.decoding(p, config, engine.backend.max_context))
                            for p in ids])
    for s in sequences:
        if s.error is not None:
            raise s.error
    return [s.result for s in sequences]
