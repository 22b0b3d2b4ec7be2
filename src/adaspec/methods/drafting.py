"""Drafting options and the drafters they name: a shipped drafter (`eagle`, `small`), prompt lookup, or a directory
(an EAGLE head, a compact shipped-format drafter, any local Hugging Face causal LM sharing the target's tokenizer)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adaspec.core.backends import Backend, TorchBackend
from adaspec.core.drafters import Drafter, ModelDrafter, PromptLookupDrafter
from adaspec.core.drafters.eagle import EagleArtifact, EagleDrafter, is_eagle_dir
from adaspec.core.drafters.shipped import is_standalone_dir, load_standalone, shipped
from adaspec.core.errors import AdaspecError
from adaspec.core.models import LoadedModel, check_same_tokenizer
from adaspec.methods.options import Options, ServerSide, Spec, option
from adaspec.methods.registry import DrafterChoice

LOOKUP = "lookup"  # the --drafter value for prompt lookup (n-gram) drafting
EAGLE, SMALL = "eagle", "small"  # the drafters shipped for a target (drafters/shipped/)
DRAFTER_NAMES = (EAGLE, SMALL, LOOKUP)
LOOKUP_NGRAM = 3  # the longest n-gram prompt lookup matches, unless a method's ngram= says


@dataclass(frozen=True)
class DrafterOption(Options):
    """drafter: a shipped drafter (eagle, small), prompt lookup, or a directory; None: what --drafter loaded."""

    drafter: str | None = option(None, server_side=ServerSide(DRAFTER_NAMES))


@dataclass(frozen=True)
class Drafting(DrafterOption):
    """ngram: the longest n-gram prompt lookup matches (when it drafts)."""

    ngram: int = option(LOOKUP_NGRAM, least=1)


def drafter_backend(drafter: LoadedModel, target: Backend, target_model: LoadedModel | None) -> Backend:
    """A model drafter runs where its target runs: on llama.cpp as a GGUF in the target's weight format (converted
    once into the cache: drafters/gguf.py, then requantized) when the target does, else on torch (also for a
    drafter llama.cpp cannot run: not Llama-shaped)."""
    from adaspec.core.backends.llamacpp import LlamaCppBackend, requantize

    if isinstance(target, LlamaCppBackend) and target_model is not None:
        from adaspec.core.drafters.gguf import drafter_gguf
        from adaspec.core.models import cache_root

        try:
            f16 = drafter_gguf(drafter.path, target_model.name)
        except AdaspecError:
            return TorchBackend(drafter.model, drafter.draft_vocab)
        return LlamaCppBackend(requantize(f16, target.llm.weights, cache_root() / "gguf"),
                               threads=target.llm.threads, vocab_ids=drafter.draft_vocab)
    return TorchBackend(drafter.model, drafter.draft_vocab)


def make_drafter(spec: Spec, drafter: DrafterChoice | None, target: Backend,
                 target_model: LoadedModel | None = None) -> Drafter:
    """The drafter a method drafts with: its own `drafter=` option (loaded here, which needs
    `target_model`), else `drafter` (what --drafter loaded), else prompt lookup. `target` is the method's
    target backend: a model drafter runs where it runs, an EAGLE head sizes its cache to its context."""
    options = spec.options
    option = options.drafter if isinstance(options, DrafterOption) else None
    if option:
        if target_model is None:
            raise AdaspecError(f"{spec.label}: a drafter= option needs the target model to load it")
        drafter = load_drafter(option, target_model)
    chosen = drafter or LOOKUP
    if chosen == LOOKUP:
        return PromptLookupDrafter(max_ngram=options.ngram if isinstance(options, Drafting) else LOOKUP_NGRAM)
    if isinstance(chosen, EagleArtifact):  # the head needs the target's weights (embeddings, LM head)
        model = target_model.model if target_model is not None else getattr(target, "model", None)
        if model is None:
            raise AdaspecError(f"{spec.label}: an EAGLE head needs the target model's weights")
        return EagleDrafter(chosen, model, target.max_context)
    if isinstance(chosen, LoadedModel):
        return ModelDrafter(drafter_backend(chosen, target, target_model), chosen.name)
    raise AdaspecError(f"{spec.name}: drafter {chosen!r} is unknown; choose {', '.join(DRAFTER_NAMES)} or a directory")


# Where a target's shipped EAGLE head beats prompt lookup in `adaspec bench`, list the target here to make the
# head its default drafter. None does yet: the heads shipped for smollm2 are slower than lookup on the dev split
# (README, "Trained drafters"), so they are used only when named (--drafter eagle|small).
EAGLE_DEFAULT_TARGETS: frozenset[str] = frozenset()


def default_drafter(target_name: str) -> str:
    """The target's shipped EAGLE head where it is measured to beat prompt lookup, else prompt lookup."""
    return EAGLE if target_name in EAGLE_DEFAULT_TARGETS and shipped(target_name, EAGLE) else LOOKUP


def has_standalone(drafter: str | None, target_name: str) -> bool:
    """Whether --drafter (or the target's shipped `small` drafter) gives hf-assisted a model to draft with."""
    return drafter not in (None, LOOKUP, EAGLE) or shipped(target_name, SMALL) is not None


def load_drafter(spec: str | None, target: LoadedModel, dtype: str = "auto") -> DrafterChoice:
    """--drafter: None (the target's default), 'lookup', 'eagle' / 'small' (the drafters shipped for the
    target), or a directory: an EAGLE head, a compact shipped-format drafter, or any local Hugging Face
    causal LM that shares the target's tokenizer."""
    from adaspec.core.models import load_model, resolve_dtype

    spec = spec or default_drafter(target.name)
    if spec == LOOKUP:
        return LOOKUP
    if spec in (EAGLE, SMALL):
        path = shipped(target.name, spec)
        if path is None:
            raise AdaspecError(f"no '{spec}' drafter ships for target '{target.name}'; train one with "
                               "`adaspec train-drafter` and pass --drafter DIR")
    else:
        path = Path(spec).expanduser()
    if is_eagle_dir(path):
        return EagleArtifact.load(path)
    if is_standalone_dir(path):
        return load_standalone(path, target, resolve_dtype(dtype, target.device))
    drafter = load_model(spec, dtype, target.device)  # a drafter runs where its target's weights are
    check_same_tokenizer(target.tokenizer, drafter.tokenizer)
    return drafter

