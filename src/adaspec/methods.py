"""Named methods: presets of drafter x length policy x acceptance rule, and the peers we measure against.

A method spec is `NAME[:key=value,...]`, e.g. `sd:k=4` or `hf-lookup:k=10`. Every method becomes a
`Runner`: prompt ids in, `GenerationResult` out, so `generate`, `bench` and the server treat ours and
the peers alike.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from adaspec.core.backends import Backend, TorchBackend
from adaspec.core.backends.base import llamacpp_where, torch_where
from adaspec.core.backends.layered import LayeredBackend
from adaspec.core.confidence import ConfidenceEnsemble
from adaspec.core.config import (
    BATCH_K_TABLE,
    CMASD_ALPHA,
    CMASD_COST,
    CMASD_EARLY_STOP,
    CMASD_GAMMA,
    CMASD_K_MAX,
    CMASD_K_MIN,
    CMASD_TAU_BASE,
    CMASD_TAU_MODE,
    DEFAULT_DRAFT_LENGTH,
    RSTITCH_TAU_DOWN,
    RSTITCH_TAU_UP,
    SPECBOUND_A,
    SPECBOUND_D_MAX,
    SPECBOUND_EXITS,
    SPECBOUND_THRESHOLD,
    SPECDEC_BETA,
    SPECDEC_TAU,
    BackendChoice,
    GenerationConfig,
)
from adaspec.core.costmodel import CostCapped, cost_aware
from adaspec.core.decode import Decoding, GenerationResult, Step, StopCriteria, generate
from adaspec.core.drafters import Drafter, ModelDrafter, PromptLookupDrafter
from adaspec.core.drafters.eagle import EagleArtifact, EagleDrafter, is_eagle_dir
from adaspec.core.drafters.early_exit import EarlyExitDrafter, ExitArtifact, is_exits_dir
from adaspec.core.drafters.shipped import is_standalone_dir, load_standalone, shipped
from adaspec.core.errors import AdaspecError
from adaspec.core.models import LoadedModel, check_same_tokenizer
from adaspec.core.policies import (
    BatchTable,
    ConfidenceLength,
    ExitBound,
    FixedLength,
    LengthPolicy,
)
from adaspec.core.verify import AcceptanceRule, TopBetaTau
from adaspec.routing import LearnedRouter, Router, RStitchRunner, ThresholdRouter, router_path

LOOKUP = "lookup"  # the --drafter value for prompt lookup (n-gram) drafting
EAGLE, SMALL = "eagle", "small"  # the drafters shipped for a target (core/drafters/shipped/)
DRAFTER_NAMES = (EAGLE, SMALL, LOOKUP)
HF_LOOKUP_TOKENS = 10  # transformers' documented prompt_lookup_num_tokens


@dataclass(frozen=True)
class ServerSide:
    """The type of a string option that may name a file on the machine running the method (a path) or make it write
    one (`writes`: a weight format converted into the cache). Only the values in `free` do neither. parse_method hands
    every other value to its `server_side` check: the server refuses those from requests unless its operator named
    them at start-up."""

    free: tuple[str, ...] = ()
    writes: bool = False

    @property
    def __name__(self) -> str:  # parse_method names an option's type by it
        return "str"

    def __call__(self, value: object) -> str:
        return str(value)


@dataclass(frozen=True)
class AtLeast:
    """The type of an int option with a least value."""

    least: int

    @property
    def __name__(self) -> str:
        return f"an integer >= {self.least}"

    def __call__(self, value: object) -> int:
        n = int(str(value))
        if n < self.least:
            raise ValueError(n)
        return n


DRAFTER = ServerSide(DRAFTER_NAMES)  # a shipped drafter or prompt lookup, else a directory
NGRAM = AtLeast(1)

# CM-ASD / SpecDec option groups (benchmarks/README.md "CM-ASD and SpecDec"): drafter, adaptive length, relaxed
# verification, confidence
_DRAFTING = {"drafter": (DRAFTER, None), "ngram": (NGRAM, 3)}
_LENGTH = {"alpha": (float, CMASD_ALPHA), "k_min": (int, CMASD_K_MIN), "k_max": (int, CMASD_K_MAX),
           "early_stop": (int, CMASD_EARLY_STOP), "cost": (int, CMASD_COST)}
_TAU = {"beta": (int, SPECDEC_BETA), "tau_base": (float, CMASD_TAU_BASE), "gamma": (float, CMASD_GAMMA),
        "tau_mode": (str, CMASD_TAU_MODE)}
# where the method runs (config.BackendChoice): backend torch | llamacpp, format: llama.cpp weights (shipped, q8_0, ...)
_BACKEND = {"backend": (str, None), "format": (ServerSide(("shipped",), writes=True), None)}
_CONFIDENCE = {"l1": (float, 1 / 3), "l2": (float, 1 / 3), "l3": (float, 1 / 3), "scale": (float, 1.0),
               "metric": (str, None)}

# method -> {option: (type, default)}; a ServerSide type marks the options a server request may not set freely
OPTIONS: dict[str, dict[str, tuple[type, object]]] = {
    "ar": {**_BACKEND},
    # sd: k=auto (costmodel.CostAware: the length the backend's measured costs favour) or a fixed k
    "sd": {"k": (str, DEFAULT_DRAFT_LENGTH), "drafter": (DRAFTER, None), "ngram": (NGRAM, 3), **_BACKEND},
    "hf": {},
    "hf-assisted": {"k": (AtLeast(1), None), "drafter": (DRAFTER, None)},
    "hf-lookup": {"k": (AtLeast(1), HF_LOOKUP_TOKENS), "ngram": (NGRAM, 2)},
    "llamacpp": {"format": _BACKEND["format"]},  # llama.cpp's own plain decoding (llama-cpp-python) of the GGUF
    "specdec": {"k": (str, DEFAULT_DRAFT_LENGTH), "beta": (int, SPECDEC_BETA), "tau": (float, SPECDEC_TAU),
                **_DRAFTING, **_BACKEND},
    "cmasd": {**_LENGTH, **_TAU, **_CONFIDENCE, **_DRAFTING, **_BACKEND},
    "cmasd-k": {**_LENGTH, **_CONFIDENCE, **_DRAFTING, **_BACKEND},
    "cmasd-tau": {"k": (str, DEFAULT_DRAFT_LENGTH), **_TAU, **_CONFIDENCE, **_DRAFTING, **_BACKEND},
    # R-Stitch (routing.py): `drafter` is the small model (`small`, the shipped one, or DIR; default: --drafter
    # if it is a model, else the target's shipped `small`); tau_down None: the same as tau_up
    "rstitch": {"drafter": (DRAFTER, None), "tau_up": (float, RSTITCH_TAU_UP), "tau_down": (float, RSTITCH_TAU_DOWN),
                **_BACKEND},
    # router: a router.json (default: the shipped one)
    "rstitch+": {"drafter": (DRAFTER, None), "router": (ServerSide(), None), **_BACKEND},
    # SpecBound (core/drafters/early_exit.py): exits (layer numbers, comma- or slash-separated; default
    # SPECBOUND_EXITS), adapters: none | shipped | DIR (default: the target's shipped exit adapters if any, else none)
    "specbound": {"exits": (str, None), "threshold": (float, SPECBOUND_THRESHOLD), "a": (float, SPECBOUND_A),
                  "d_max": (int, SPECBOUND_D_MAX), "adapters": (ServerSide(("none", "shipped")), None)},
}
LIST_OPTIONS = ("exits",)  # list values continue over the bare items after them: exits=8,12,16,threshold=0.8
EXITS = "exits"  # the kind of the shipped exit adapters (core/drafters/shipped/<target>/exits/)
CMASD_METHODS = ("specdec", "cmasd", "cmasd-k", "cmasd-tau")
ROUTING_METHODS = ("rstitch", "rstitch+")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    options: dict[str, object] = field(default_factory=dict)
    label: str = ""  # the spec as written; names the method in records

    def get(self, key: str) -> object:
        return self.options.get(key, OPTIONS[self.name][key][1])


def parse_method(spec: str, server_side: Callable[[str, str, ServerSide], str] | None = None) -> MethodSpec:
    """`NAME[:key=value,...]` checked against OPTIONS, before any model loads. `server_side(key, value, type)` sees
    each value of a ServerSide option outside its free values before anything reads it, and returns the value to use
    or raises (the server's check: serve/policy.py)."""
    name, _, rest = spec.strip().partition(":")
    if name not in OPTIONS:
        raise AdaspecError(f"unknown method '{name}'; choose one of: {', '.join(OPTIONS)}")
    allowed = OPTIONS[name]
    options: dict[str, object] = {}
    key = ""
    for item in filter(None, (s.strip() for s in rest.split(","))):
        if "=" not in item and key in LIST_OPTIONS and key in options:
            options[key] = f"{options[key]},{item}"  # exits=8,12,16: the list goes on
            continue
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
        if server_side is not None and isinstance(kind, ServerSide) and options[key] not in kind.free:
            options[key] = server_side(key, str(options[key]), kind)
    method = MethodSpec(name, options, spec.strip())
    backend_choice(method)  # a bad backend or format fails here too
    if name == "sd":
        sd_length(method)
    if name in CMASD_METHODS:
        cmasd_parts(method)  # bad values fail here, before any model loads
    if name == "rstitch" or method.options.get("router") is not None:
        make_router(method)  # bad thresholds or router files fail here, before any model loads
    if name == "specbound":
        specbound_bound(method)  # bad exits, thresholds, lengths or adapter directories fail here too
    return method


def sd_length(spec: MethodSpec) -> LengthPolicy | None:
    """The length policy of sd, specdec and cmasd-tau's k: None for k=auto (CostAware, made once the backend is
    known), a batch-size table for k=table (BatchTable, the vLLM-style baseline), else a fixed draft length (>= 1)."""
    text = str(spec.get("k"))
    if text == "auto":
        return None
    if text == "table":
        return BatchTable(BATCH_K_TABLE)
    try:
        k = int(text)
    except ValueError:
        raise AdaspecError(f"{spec.label}: k must be auto, table or a draft length >= 1, got {text!r}") from None
    if k < 1:
        raise AdaspecError(f"{spec.name}: draft length k must be >= 1 (or auto, or table), got {k}")
    return FixedLength(k)




def backend_choice(spec: MethodSpec, default: BackendChoice | None = None) -> BackendChoice:
    """Where `spec` runs: its backend= and format= options over `default` (the CLI's --backend / --format)."""
    default = default or BackendChoice()
    try:
        return BackendChoice(str(spec.options.get("backend", default.kind)),
                             str(spec.options.get("format", default.format)), default.threads)
    except AdaspecError as e:
        raise AdaspecError(f"{spec.label or spec.name}: {e}") from None


def specbound_bound(spec: MethodSpec, depth: int | None = None) -> ExitBound:
    """SpecBound's exit rule and speculation bound for a target of `depth` layers (None: check the values
    before the model is known, exits against nothing but themselves)."""
    try:
        text = spec.get("exits")
        try:
            exits = SPECBOUND_EXITS if text is None else tuple(int(x) for x in str(text).replace("/", ",").split(","))
        except ValueError:
            raise AdaspecError(f"exits must be layer numbers separated by ',' or '/', got {text!r}") from None
        if any(e < 1 for e in exits):
            raise AdaspecError(f"exits must be layer numbers >= 1 (the first layer is 1), got {text!r}")
        adapters = spec.get("adapters")
        if adapters not in (None, "none", "shipped") and not is_exits_dir(Path(str(adapters)).expanduser()):
            raise AdaspecError(f"adapters={adapters}: not a directory of exit adapters; give none, shipped or a "
                               "directory written by `adaspec train-exits`")
        return ExitBound(exits, depth or max(exits, default=0) + 1, float(spec.get("threshold")),
                         float(spec.get("a")), int(spec.get("d_max")))
    except AdaspecError as e:
        raise AdaspecError(f"{spec.label or spec.name}: {e}") from None


def exit_adapters(spec: MethodSpec, target_name: str) -> ExitArtifact | None:
    """SpecBound's exit adapters: adapters=none, shipped (an error if none ship), DIR, or by default the target's
    shipped ones if any."""
    option = spec.get("adapters")
    if option == "none":
        return None
    if option in (None, "shipped"):
        path = shipped(target_name, EXITS)
        if path is None and option == "shipped":
            raise AdaspecError(f"{spec.label}: no exit adapters ship for target '{target_name}'; train them with "
                               "`adaspec train-exits` and pass adapters=DIR")
        return None if path is None else ExitArtifact.load(path)
    return ExitArtifact.load(Path(str(option)).expanduser())


def make_router(spec: MethodSpec, target_name: str | None = None) -> Router:
    """The router of `rstitch` (the two thresholds) or `rstitch+` (router=, else the one shipped for the target)."""
    try:
        if spec.name == "rstitch":
            up, down = float(spec.get("tau_up")), spec.get("tau_down")
            return ThresholdRouter(up, up if down is None else float(down))
        return LearnedRouter.load(router_path(spec.get("router"), target_name))
    except AdaspecError as e:
        raise AdaspecError(f"{spec.label or spec.name}: {e}") from None


@dataclass(frozen=True)
class CMASDParts:
    policy: LengthPolicy | None  # None: k=auto, CostAware once the backend and drafter are known (build_runner)
    rule: AcceptanceRule | None  # None: the exact rule (greedy, or lossless sampling)
    confidence: ConfidenceEnsemble | None  # None: the method does not rate its drafts
    cost_cap: bool = False  # cap `policy` by CostAware (costmodel.CostCapped), built with the backend


def cmasd_parts(spec: MethodSpec) -> CMASDParts:
    """The length policy, acceptance rule and confidence estimator of `specdec` and the CM-ASD methods:
    specdec = fixed k + top-beta/tau; cmasd-k = adaptive k + exact; cmasd-tau = fixed k + modulated tau;
    cmasd = both adaptations."""
    options = OPTIONS[spec.name]
    get = spec.get
    try:
        confidence = None
        if "metric" in options:
            weights = [w for w in ("l1", "l2", "l3") if w in spec.options]
            if 0 < len(weights) < 3:
                raise AdaspecError(f"give the confidence weights l1, l2 and l3 together (they sum to 1), got only "
                                   f"{', '.join(weights)}")
            metric = get("metric")
            confidence = ConfidenceEnsemble(float(get("l1")), float(get("l2")), float(get("l3")), float(get("scale")),
                                            None if metric is None else str(metric))
        if "alpha" in options:
            early = int(get("early_stop"))
            if early not in (0, 1):
                raise AdaspecError(f"early_stop must be 0 (draft k_max, verify k_j) or 1 (stop at k_j), got {early}")
            policy: LengthPolicy = ConfidenceLength(float(get("alpha")), int(get("k_min")), int(get("k_max")),
                                                    bool(early))
            cost_cap = int(get("cost"))
            if cost_cap not in (0, 1):
                raise AdaspecError(f"cost must be 0 (the paper's length) or 1 (capped by the backend's measured "
                                   f"costs), got {cost_cap}")
        else:
            policy = sd_length(spec)
            cost_cap = 0
        rule = None
        if spec.name == "specdec":
            rule = TopBetaTau(int(get("beta")), float(get("tau")))
        elif "gamma" in options:
            rule = TopBetaTau(int(get("beta")), float(get("tau_base")), float(get("gamma")), str(get("tau_mode")))
    except AdaspecError as e:
        raise AdaspecError(f"{spec.label or spec.name}: {e}") from None
    return CMASDParts(policy, rule, confidence, bool(cost_cap))


def split_specs(text: str) -> list[str]:
    """Comma-separated method specs whose options are comma-separated too: a piece that is key=value and does
    not name a method continues the spec before it ('ar,cmasd:alpha=0.8,gamma=1,sd' -> 3 specs)."""
    specs: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        key = piece.partition("=")[0]
        if specs and ":" not in piece and key not in OPTIONS and ("=" in piece or key.isdigit()):
            specs[-1] += "," + piece  # an option of the spec before, or a further item of a list (exits=8,12)
        else:
            specs.append(piece)
    return specs


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


def resolve_backend(has_gguf: bool, choice: BackendChoice) -> BackendChoice:
    """`auto` made concrete: llamacpp where llama-cpp-python is installed and the target is a GGUF, else torch."""
    from adaspec.core.backends.llamacpp import available

    if choice.kind != "auto":
        return choice
    return BackendChoice("llamacpp" if has_gguf and available() else "torch", choice.format, choice.threads)


def target_backend(target: LoadedModel, choice: BackendChoice) -> Backend:
    """The target's backend for a method that runs on `choice` (an EAGLE drafter turns its `keep_hidden` on)."""
    choice = resolve_backend(target.gguf is not None, choice)
    if choice.kind == "torch":
        return TorchBackend(target.model)
    from adaspec.core.backends.llamacpp import LlamaCppBackend

    return LlamaCppBackend(target_gguf(target, choice.format), threads=choice.threads)


def target_gguf(target: LoadedModel, fmt: str) -> Path:
    """The target's GGUF in weight format `fmt` (converted once into the cache)."""
    from adaspec.core.backends.llamacpp import requantize
    from adaspec.core.models import cache_root

    if target.gguf is None:
        raise AdaspecError(f"llama.cpp runs GGUF files and target '{target.name}' was loaded from a Hugging Face "
                           f"directory ({target.path}): pass its .gguf file as the target, or use the torch backend")
    return requantize(target.gguf, fmt, cache_root() / "gguf")


def stop_criteria(target: LoadedModel, config: GenerationConfig) -> StopCriteria:
    eos = target.eos_ids if config.stop_on_eos else frozenset()
    return StopCriteria(eos, tuple(config.stop), lambda ids: target.tokenizer.decode(ids))


def length_policy(policy: LengthPolicy | None, cap: bool, backend: Backend, drafter: Drafter) -> LengthPolicy:
    """`policy` as the spec gave it, made concrete: None (k=auto) becomes CostAware, and `cap` caps it by CostAware."""
    if policy is not None and not cap:
        return policy
    costs = cost_aware(backend, drafter)
    return costs if policy is None else CostCapped(policy, costs)


def build_runner(
    spec: MethodSpec, target: LoadedModel, drafter: LoadedModel | str | None, config: GenerationConfig,
    backend: BackendChoice | None = None,
) -> Runner:
    """A runner for `spec`. `drafter` is a loaded model, 'lookup', or None (the method's default); `backend` is
    where methods run whose spec does not say (methods without backend options run on torch)."""
    stop = stop_criteria(target, config)
    choice = backend_choice(spec, backend)
    if spec.name == "ar":
        return EngineRunner(spec.label, target_backend(target, choice), stop)
    if spec.name == "sd":
        backend = target_backend(target, choice)
        chosen = make_drafter(spec, drafter, backend, target)
        policy = length_policy(sd_length(spec), False, backend, chosen)
        return EngineRunner(spec.label, backend, stop, chosen, policy=policy)
    if spec.name == "llamacpp":
        fmt = str(spec.options.get("format", "shipped"))  # llama.cpp's own decoding of the GGUF as shipped
        return LlamaCppRunner(spec.label, target_gguf(target, fmt), stop, choice.threads)
    if spec.name in CMASD_METHODS:
        parts = cmasd_parts(spec)
        backend = target_backend(target, choice)
        chosen = make_drafter(spec, drafter, backend, target)
        policy = length_policy(parts.policy, parts.cost_cap, backend, chosen)
        return EngineRunner(spec.label, backend, stop, chosen, policy=policy,
                            rule=parts.rule, confidence=parts.confidence)
    if spec.name == "specbound":  # the target drafts for itself: early exits x bound x the exact rule
        backend = LayeredBackend(target.model)
        bound = specbound_bound(spec, backend.depth)
        drafter = EarlyExitDrafter(backend, bound, exit_adapters(spec, target.name))
        return EngineRunner(spec.label, backend, stop, drafter, policy=bound)
    if spec.name in ROUTING_METHODS:
        router = make_router(spec, target.name)
        large = target_backend(target, choice)  # each model its own cache; the small one runs where the large one does
        return RStitchRunner(spec.label, drafter_backend(small_model(spec, drafter, target), large, target), large,
                             stop, router)
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


def drafter_backend(drafter: LoadedModel, target: Backend, target_model: LoadedModel | None) -> Backend:
    """A model drafter runs where its target runs: on llama.cpp as a GGUF in the target's weight format (converted
    once into the cache: core/drafters/gguf.py, then requantized) when the target does, else on torch (also for a
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


def make_drafter(spec: MethodSpec, drafter: DrafterChoice | None, target: Backend,
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
        return EagleDrafter(chosen, target, None if target_model is None else target_model.model)
    if isinstance(chosen, LoadedModel):
        return ModelDrafter(drafter_backend(chosen, target, target_model), chosen.name)
    raise AdaspecError(f"{spec.name}: drafter {chosen!r} is unknown; choose {', '.join(DRAFTER_NAMES)} or a directory")


# Where a target's shipped EAGLE head beats prompt lookup in `adaspec bench`, list the target here to make the
# head its default drafter. None does yet: the heads shipped for smollm2 are slower than lookup on the dev split
# (benchmarks/README.md, "Trained drafters (shipped)"), so they are used only when named (--drafter eagle|small).
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


def small_model(spec: MethodSpec, drafter: DrafterChoice | None, target: LoadedModel) -> LoadedModel:
    """R-Stitch's small model: the method's `drafter=` option, else --drafter if it is a model, else the target's
    shipped standalone `small` drafter."""
    option = spec.get("drafter")
    chosen = load_drafter(str(option), target) if option else drafter
    if isinstance(chosen, LoadedModel):
        return chosen
    if option:
        raise AdaspecError(f"{spec.label}: drafter={option} is not a language model; R-Stitch needs a small causal LM "
                           f"(`{SMALL}` or a local Hugging Face model directory sharing the target's tokenizer)")
    if shipped(target.name, SMALL) is None:
        raise AdaspecError(f"{spec.label} needs a small model and none ships for target '{target.name}': pass "
                           f"--drafter DIR or {spec.name}:drafter=DIR (a local Hugging Face causal LM sharing the "
                           "target's tokenizer), or train one with `adaspec train-drafter --kind small`")
    chosen = load_drafter(SMALL, target)
    assert isinstance(chosen, LoadedModel)
    return chosen
