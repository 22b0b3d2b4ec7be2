"""Named methods: presets of drafter x length policy x acceptance rule, and the peers we measure against.

A method spec is `NAME[:key=value,...]`, e.g. `sd:k=4` or `hf-lookup:k=10`. Every method becomes a
`Runner`: prompt ids in, `GenerationResult` out, so `generate`, `bench` and the server treat ours and
the peers alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from adaspec.backends import TorchBackend
from adaspec.config import DEFAULT_DRAFT_LENGTH, GenerationConfig
from adaspec.decode import GenerationResult, Step, StopCriteria, generate
from adaspec.drafters import Drafter, ModelDrafter, PromptLookupDrafter
from adaspec.drafters.eagle import EagleArtifact, EagleDrafter, is_eagle_dir
from adaspec.drafters.shipped import is_standalone_dir, load_standalone, shipped
from adaspec.errors import AdaspecError
from adaspec.models import LoadedModel, check_same_tokenizer
from adaspec.policies import FixedLength

LOOKUP = "lookup"  # the --drafter value for prompt lookup (n-gram) drafting
EAGLE, SMALL = "eagle", "small"  # the drafters shipped for a target (drafters/shipped/)
DRAFTER_NAMES = (EAGLE, SMALL, LOOKUP)
HF_LOOKUP_TOKENS = 10  # transformers' documented prompt_lookup_num_tokens

# method -> {option: (type, default)}
OPTIONS: dict[str, dict[str, tuple[type, object]]] = {
    "ar": {},
    "sd": {"k": (int, DEFAULT_DRAFT_LENGTH), "drafter": (str, None), "ngram": (int, 3)},
    "hf": {},
    "hf-assisted": {"k": (int, None), "drafter": (str, None)},
    "hf-lookup": {"k": (int, HF_LOOKUP_TOKENS), "ngram": (int, 2)},
}
PEERS = ("hf", "hf-assisted", "hf-lookup")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    options: dict[str, object] = field(default_factory=dict)
    label: str = ""  # the spec as written; names the method in records

    def get(self, key: str) -> object:
        return self.options.get(key, OPTIONS[self.name][key][1])


def parse_method(spec: str) -> MethodSpec:
    name, _, rest = spec.strip().partition(":")
    if name not in OPTIONS:
        raise AdaspecError(f"unknown method '{name}'; choose one of: {', '.join(OPTIONS)}")
    allowed = OPTIONS[name]
    options: dict[str, object] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise AdaspecError(f"method option '{item}' in '{spec}' is not key=value")
        if key not in allowed:
            hint = f"options: {', '.join(allowed)}" if allowed else "it takes no options"
            raise AdaspecError(f"method '{name}' has no option '{key}'; {hint}")
        kind = allowed[key][0]
        try:
            options[key] = kind(value)
        except ValueError:
            raise AdaspecError(f"option {key}={value!r} of '{name}' must be {kind.__name__}") from None
    return MethodSpec(name, options, spec.strip())


class Runner(Protocol):
    label: str

    def __call__(
        self, prompt_ids: list[int], config: GenerationConfig, on_step: Callable[[Step], None] | None = None
    ) -> GenerationResult: ...


@dataclass
class EngineRunner:
    """Our decoding loop: `ar`, `sd` and every later method that is a drafter/policy/rule composition."""

    label: str
    target: TorchBackend
    stop: StopCriteria
    drafter: Drafter | None = None
    k: int = 1

    def __call__(self, prompt_ids, config, on_step=None) -> GenerationResult:
        policy = FixedLength(self.k)
        return generate(self.target, prompt_ids, config, self.drafter, policy, stop=self.stop, on_step=on_step)


@dataclass
class HFRunner:
    """transformers `generate`, plain, assisted or with prompt lookup: the peers, measured in the same run."""

    label: str
    target: LoadedModel
    eos_ids: frozenset[int]
    extra: dict = field(default_factory=dict)

    @torch.inference_mode()
    def __call__(self, prompt_ids, config, on_step=None) -> GenerationResult:
        s = config.sampling
        kwargs = dict(do_sample=False) if s.greedy else dict(
            do_sample=True, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)  # top_k 0: off
        if config.stop:
            kwargs.update(stop_strings=list(config.stop), tokenizer=self.target.tokenizer)
        torch.manual_seed(config.seed)  # transformers samples from the global generator
        x = torch.tensor([prompt_ids])
        t0 = time.perf_counter()
        out = self.target.model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=config.max_new_tokens,
            eos_token_id=sorted(self.eos_ids), pad_token_id=self.target.tokenizer.pad_token_id, **kwargs,
            **self.extra,
        )
        wall = time.perf_counter() - t0
        tokens = out[0, len(prompt_ids):].tolist()
        for i, t in enumerate(tokens):  # one token count for everyone: up to and including EOS
            if t in self.eos_ids:
                tokens = tokens[: i + 1]
                break
        reason = "eos" if tokens and tokens[-1] in self.eos_ids else "length"
        return GenerationResult(list(prompt_ids), tokens, [], wall, reason)


def stop_criteria(target: LoadedModel, config: GenerationConfig) -> StopCriteria:
    eos = target.eos_ids if config.stop_on_eos else frozenset()
    return StopCriteria(eos, tuple(config.stop), lambda ids: target.tokenizer.decode(ids))


def build_runner(
    spec: MethodSpec, target: LoadedModel, drafter: LoadedModel | str | None, config: GenerationConfig
) -> Runner:
    """A runner for `spec`. `drafter` is a loaded model, 'lookup', or None (the method's default)."""
    stop = stop_criteria(target, config)
    if spec.name == "ar":
        return EngineRunner(spec.label, TorchBackend(target.model), stop)
    if spec.name == "sd":
        k = int(spec.get("k"))
        if k < 1:
            raise AdaspecError(f"sd:k must be >= 1, got {k}")
        backend = TorchBackend(target.model)
        return EngineRunner(spec.label, backend, stop, make_drafter(spec, drafter, backend, target), k)
    eos = stop.eos_ids
    if spec.name == "hf":
        return HFRunner(spec.label, target, eos)
    if spec.name == "hf-assisted":
        option = spec.get("drafter")
        model = standalone_drafter(load_drafter(str(option), target) if option else drafter, target)
        extra: dict = {"assistant_model": model.model}
        if spec.get("k") is not None:
            extra.update(num_assistant_tokens=int(spec.get("k")), num_assistant_tokens_schedule="constant")
        return HFRunner(spec.label, target, eos, extra)
    if spec.name == "hf-lookup":
        extra = {"prompt_lookup_num_tokens": int(spec.get("k")), "max_matching_ngram_size": int(spec.get("ngram"))}
        return HFRunner(spec.label, target, eos, extra)
    raise AssertionError(spec.name)


DrafterChoice = LoadedModel | EagleArtifact | str  # a loaded model, an EAGLE head, or 'lookup'


def make_drafter(spec: MethodSpec, drafter: DrafterChoice | None, target: TorchBackend,
                 target_model: LoadedModel | None = None) -> Drafter:
    """The drafter a method drafts with: its own `drafter=` option (loaded here, which needs
    `target_model`), else `drafter` (what --drafter loaded), else prompt lookup. `target` is the method's
    target backend: an EAGLE head reads its hidden states."""
    option = spec.get("drafter") if "drafter" in OPTIONS[spec.name] else None
    if option:
        if target_model is None:
            raise AdaspecError(f"{spec.label}: a drafter= option needs the target model to load it")
        drafter = load_drafter(str(option), target_model)
    chosen = drafter or LOOKUP
    if chosen == LOOKUP:
        ngram = int(spec.get("ngram")) if "ngram" in OPTIONS[spec.name] else 3
        return PromptLookupDrafter(max_ngram=ngram)
    if isinstance(chosen, EagleArtifact):
        return EagleDrafter(chosen, target)
    if isinstance(chosen, LoadedModel):
        return ModelDrafter(TorchBackend(chosen.model, chosen.draft_vocab), chosen.name)
    raise AdaspecError(f"{spec.name}: drafter {chosen!r} is unknown; choose {', '.join(DRAFTER_NAMES)} or a directory")


def default_drafter(target_name: str) -> str:
    """The target's shipped EAGLE head if it has one, else prompt lookup."""
    return EAGLE if shipped(target_name, EAGLE) else LOOKUP


def has_standalone(drafter: str | None, target_name: str) -> bool:
    """Whether --drafter (or the target's shipped `small` drafter) gives hf-assisted a model to draft with."""
    return drafter not in (None, LOOKUP, EAGLE) or shipped(target_name, SMALL) is not None


def load_drafter(spec: str | None, target: LoadedModel, dtype: str = "float32") -> DrafterChoice:
    """--drafter: None (the target's default), 'lookup', 'eagle' / 'small' (the drafters shipped for the
    target), or a directory: an EAGLE head, a compact shipped-format drafter, or any local Hugging Face
    causal LM that shares the target's tokenizer."""
    from adaspec.models import DTYPES, load_model

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
        return load_standalone(path, target, DTYPES[dtype])
    drafter = load_model(spec, dtype)
    check_same_tokenizer(target.tokenizer, drafter.tokenizer)
    return drafter


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
