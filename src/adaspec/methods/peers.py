"""The peers: other projects' decoding of the same model, measured in the same run (config.PEERS names them for the
summaries). transformers `generate` plain (`hf`), assisted by a draft model (`hf-assisted`) or by prompt lookup
(`hf-lookup`), and llama.cpp's own plain decoding of the target's GGUF (`llamacpp`)."""

from __future__ import annotations

from dataclasses import dataclass

from adaspec.core.drafters.shipped import shipped
from adaspec.core.errors import AdaspecError
from adaspec.core.models import LoadedModel
from adaspec.methods.drafting import SMALL, DrafterChoice, DrafterOption, load_drafter
from adaspec.methods.options import Options, option
from adaspec.methods.placement import WeightFormat, backend_choice, target_gguf
from adaspec.methods.registry import BuildContext, Method, MethodSpec, register
from adaspec.methods.runners import HFRunner, LlamaCppRunner

HF_LOOKUP_TOKENS = 10  # transformers' documented prompt_lookup_num_tokens


@dataclass(frozen=True)
class AssistedOptions(DrafterOption):
    """k: tokens the assistant drafts a step (None: transformers' own schedule); drafter: a model (None: --drafter
    if it is one, else the target's shipped `small`)."""

    k: int | None = option(None, least=1)


@dataclass(frozen=True)
class LookupOptions(Options):
    """k: tokens prompt lookup drafts a step; ngram: the longest n-gram it matches."""

    k: int = option(HF_LOOKUP_TOKENS, least=1)
    ngram: int = option(2, least=1)


def standalone_drafter(drafter: DrafterChoice | None, target: LoadedModel) -> LoadedModel:
    """A standalone model drafter for peers that need one (hf-assisted): --drafter if it is a model, else
    the target's shipped `small` drafter."""
    if isinstance(drafter, LoadedModel):
        return drafter
    if shipped(target.name, SMALL) is None:
        raise AdaspecError("hf-assisted needs a model drafter: pass --drafter PATH (a local HF model)")
    chosen = load_drafter(SMALL, target)
    assert isinstance(chosen, LoadedModel)
    return chosen


def build_hf(spec: MethodSpec, ctx: BuildContext) -> HFRunner:
    return HFRunner(spec.label, ctx.target, ctx.stop.eos_ids)


def build_assisted(spec: MethodSpec[AssistedOptions], ctx: BuildContext) -> HFRunner:
    option = spec.options.drafter
    model = standalone_drafter(load_drafter(option, ctx.target) if option else ctx.drafter, ctx.target)
    extra: dict = {"assistant_model": model.model}
    if spec.options.k is not None:
        extra.update(num_assistant_tokens=spec.options.k, num_assistant_tokens_schedule="constant")
    return HFRunner(spec.label, ctx.target, ctx.stop.eos_ids, extra)


def build_lookup(spec: MethodSpec[LookupOptions], ctx: BuildContext) -> HFRunner:
    extra = {"prompt_lookup_num_tokens": spec.options.k, "max_matching_ngram_size": spec.options.ngram}
    return HFRunner(spec.label, ctx.target, ctx.stop.eos_ids, extra)


def build_llamacpp(spec: MethodSpec[WeightFormat], ctx: BuildContext) -> LlamaCppRunner:
    fmt = spec.options.format or "shipped"  # llama.cpp's own decoding of the GGUF as shipped
    return LlamaCppRunner(spec.label, target_gguf(ctx.target, fmt), ctx.stop, backend_choice(spec, ctx.backend).threads)


register(Method("hf", Options, build_hf, "transformers generate, plain", peer=True))
register(Method("hf-assisted", AssistedOptions, build_assisted, "transformers assisted generation with a draft "
                "model", peer=True))
register(Method("hf-lookup", LookupOptions, build_lookup, "transformers prompt-lookup decoding", peer=True))
register(Method("llamacpp", WeightFormat, build_llamacpp, "llama.cpp's own plain decoding of the target's GGUF "
                "(llama-cpp-python)", peer=True))
