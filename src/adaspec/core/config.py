"""Configuration dataclasses. Every default lives here and nowhere else."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from adaspec.core.errors import AdaspecError

DEFAULT_MAX_NEW_TOKENS = 128
# the k of sd, specdec and cmasd-tau: `auto` drafts what the backend's measured costs favour (costmodel.CostAware), so
# that no method's default is slower than plain decoding on a CPU where verifying costs nearly a step a position
DEFAULT_DRAFT_LENGTH = "auto"
DEFAULT_SEED = 0
DEFAULT_METHOD = "sd"  # the method spec `adaspec generate`, `adaspec serve` and api.generate_many run unless told
# where torch runs the models (models.resolve_device): auto is a GPU where torch sees one, else the CPU; dtype auto
# goes by the device (models.default_dtype: float32 on a CPU)
DEFAULT_DEVICE = "auto"
DEFAULT_DTYPE = "auto"

# The torch backend's preallocated KV cache (backends/lean.py): positions per sequence, capped by the model's context.
# Keys and values take 2 * layers * kv_heads * head_dim * bytes per value per position (SmolLM2-135M in bf16, 8192
# positions: 189 MB of address space); memory pages are committed only as positions are written (400: 12 MB).
TORCH_CACHE_LEN = 32768

# Batched decoding (batch.py): positions each sequence's cache holds, prompt tokens a step prefills in all (the
# rest of a long prompt waits for the next steps, so that running sequences keep stepping), the sizes (total positions
# scored in one call) at which the batch cost curve is measured, and vLLM-style draft lengths by batch size (the
# `sd:k=table` baseline: batch size -> k, the largest size not above the batch's).
BATCH_CONTEXT = 4096
BATCH_PREFILL_CHUNK = 256
BATCH_LONG_PROMPT = 512  # a prompt this long takes the highest free slot (BatchEngine._slot)
BATCH_REUSE_MIN = 64  # positions of a prompt a free slot must hold beyond the default slot's to be taken instead
# with two or more sequences in a call, the batch cost rule drafts only where that promises this much more tokens per
# ms than not drafting (plan_lengths): a call of unequal rows runs as several passes and its cost strays from the
# curve. At 0 and 0.05 the rule's drafts cost more than they brought: sd at 0.92x-0.96x ar at N = 4, 8 and 16
# (benchmarks/batch-load-4, -5). One sequence alone is the one-sequence rule (sd:k=auto), with no margin.
BATCH_DRAFT_MARGIN = 0.2
BATCH_COST_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
BATCH_COST_CONTEXT = 256  # the context (tokens per sequence) the batch cost curve is measured on
BATCH_K_TABLE = {1: 5, 2: 4, 4: 3, 8: 2, 16: 1, 32: 0}
# `adaspec serve --max-batch`: sequences decoded together. On a CPU a call's cost grows nearly in proportion to the
# positions it scores, so past about 16 sequences a step's wait grows for little more throughput (`adaspec costs
# --batch N` measures the curve of a machine; benchmarks/README.md "Many sequences (batch load)").
DEFAULT_MAX_BATCH = 16

# `adaspec serve` (serve/app.py: ServerOptions, where each is described, and make_server). Here, not there, so that the
# CLI shows them without importing the server, whose fastapi and uvicorn are an optional extra.
SERVE_HOST = "127.0.0.1"
SERVE_PORT = 8000
SERVE_LOG_LEVEL = "info"
SERVE_QUEUE_SIZE = 64
SERVE_TIMEOUT_S = 300.0
SERVE_DRAIN_S = 30.0
SERVE_RUNNER_CACHE = 4
SERVE_RUNNER_CACHE_MIB = 4096.0
SERVE_MAX_BODY_BYTES = 1 << 20
SERVE_BODY_TIMEOUT_S = 30.0

# CM-ASD and SpecDec (benchmarks/README.md "CM-ASD and SpecDec" says how they were chosen). tau is in nats of the
# target's log-probabilities; beta is SpecDec's top-beta.
CMASD_ALPHA = 0.5
CMASD_K_MIN = 1
CMASD_K_MAX = 8
CMASD_GAMMA = 0.05
CMASD_TAU_BASE = 0.02
CMASD_TAU_MODE = "intent"
CMASD_EARLY_STOP = 1
CMASD_COST = 1  # 1: cap the adaptive length by the length the backend's measured costs favour (costmodel.CostCapped)
SPECDEC_BETA = 5
SPECDEC_TAU = 0.1

# R-Stitch (benchmarks/README.md "R-Stitch and R-Stitch+"): thresholds on the normalised entropy H / log|V| of the
# model that is generating. The small model hands a token to the large one when its entropy is above RSTITCH_TAU_UP;
# the large one hands back when its own entropy is below tau_down (None: the same value, the paper's single threshold).
# Starting points, to be tuned on the dev split with `adaspec sweep --base rstitch`.
RSTITCH_TAU_UP = 0.05
RSTITCH_TAU_DOWN: float | None = None
RSTITCH_TAU_GRID = (0.01, 0.02, 0.05, 0.1, 0.2, 0.4)  # `adaspec sweep --base rstitch`: tau_up values
# R-Stitch+: reward = accuracy - lambda * accuracy * latency (latency relative to the large model alone)
ROUTER_LAMBDA = 0.5

# SpecBound (benchmarks/README.md "SpecBound"): early exits of the target itself. A drafted token exits after the first
# layer of SPECBOUND_EXITS whose annealed confidence max softmax(z / T_l), T_l = 1 + a (1 - l / L), reaches the
# threshold; a token that reaches the deepest exit without exiting ends the draft; at most d_max tokens a step.
# `adaspec train-exits` trains adapters for SPECBOUND_TRAIN_EXITS over a SPECBOUND_VOCAB-token exit head.
SPECBOUND_EXITS = (8, 12, 16, 20)
SPECBOUND_THRESHOLD = 0.8
SPECBOUND_A = 1.0
SPECBOUND_D_MAX = 4
SPECBOUND_TRAIN_EXITS = (8, 12, 16, 20, 24)
SPECBOUND_VOCAB = 8192
SPECBOUND_SWEEP = {"threshold": (0.5, 0.6, 0.7, 0.8, 0.9), "d_max": (2, 3, 4, 6)}  # `adaspec sweep --base specbound`
SPECBOUND_RANK = 0  # exit adapter: 0 = a full affine map (as the tuned lens), r > 0 = a rank-r residual update


# Backends (benchmarks/README.md "Backends and weight formats"): where a method's models run. `torch` runs the Hugging
# Face model; `llamacpp` runs the target's GGUF through llama.cpp (the optional extra `adaspec[llamacpp]`) in a
# weight format converted once into the cache; backend `auto` is llamacpp where it is installed and the target is a
# GGUF, else torch. The default format is "shipped", the GGUF file as it is: only it (and f32) hold the shipped
# weights exactly. A Q4_1 block's values d*q + m need up to ~16 significant bits, so f16 keeps about 70 % of them
# exactly and bf16 about 26 %: every other format is a slightly different model, opt-in.
BACKENDS = ("auto", "torch", "llamacpp")
DEFAULT_BACKEND = "auto"
LLAMACPP_FORMATS = ("shipped", "q4_0", "q4_1", "q4_k_m", "q6_k", "q8_0", "f16", "bf16", "f32")
DEFAULT_LLAMACPP_FORMAT = "shipped"


# Temperatures below this are greedy (vLLM's _SAMPLING_EPS): dividing float32 logits by 1e-300 gives inf and a NaN
# distribution, and the limit as the temperature goes to 0 is the argmax anyway.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingConfig:
    """How a next token is chosen from logits. A temperature below GREEDY_BELOW (0 included) means greedy."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise AdaspecError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise AdaspecError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise AdaspecError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass(frozen=True)
class GenerationConfig:
    """Budget and stopping rules for one generation."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop: tuple[str, ...] = ()  # stop strings; the output is cut before the first one
    stop_on_eos: bool = True
    seed: int = DEFAULT_SEED

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise AdaspecError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass(frozen=True)
class BackendChoice:
    """Where a method's models run unless its spec says otherwise (`sd:backend=llamacpp,format=q8_0`)."""

    kind: str = DEFAULT_BACKEND  # one of BACKENDS
    format: str = DEFAULT_LLAMACPP_FORMAT  # llama.cpp weight format, one of LLAMACPP_FORMATS
    threads: int | None = None  # llama.cpp threads (None: torch's thread count)

    def __post_init__(self) -> None:
        if self.kind not in BACKENDS:
            raise AdaspecError(f"unknown backend '{self.kind}'; choose one of {', '.join(BACKENDS)}")
        if self.format not in LLAMACPP_FORMATS:
            raise AdaspecError(f"unknown llama.cpp weight format '{self.format}'; choose one of "
                               f"{', '.join(LLAMACPP_FORMATS)}")

    @property
    def label(self) -> str:
        """'torch', or 'llamacpp:FORMAT': the key of this backend's measured costs."""
        return self.kind if self.kind == "torch" else f"{self.kind}:{self.format}"

# the peers: other projects' decoding of the same model, measured in the same run (methods.build_runner builds them;
# summaries compare every method with each one that ran)
PEERS = ("hf", "hf-assisted", "hf-lookup", "llamacpp")
