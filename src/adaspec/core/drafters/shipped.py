"""Drafters trained by `adaspec train-drafter` and shipped inside the package, per target.

Two kinds, each in `shipped/<target>/<kind>/` (see shipped/<target>/CARD.md for how they were trained):
- `eagle`: an EAGLE-style head (drafters/eagle.py) over the target's hidden states;
- `small`: a standalone causal LM in Hugging Face format, stored compactly: its decoder layers and norms
  in bf16, without the embedding matrix, which is the target's own (tied, frozen in training) and is
  filled in at load time. `load_standalone` returns an ordinary transformers model, so transformers'
  assisted generation and R-Stitch can use it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from adaspec.core.errors import AdaspecError
from adaspec.core.models import DRAFT_VOCAB_FILE, LoadedModel

SHIPPED_DIR = Path(__file__).parent / "shipped"
STANDALONE_MARKER = "adaspec_drafter.json"
WEIGHTS = "model.safetensors"


def shipped(target_name: str, kind: str) -> Path | None:
    """The shipped drafter of `kind` for a target, or None."""
    path = SHIPPED_DIR / target_name / kind
    return path if path.is_dir() and any(path.iterdir()) else None


def is_standalone_dir(path: Path) -> bool:
    return (path / STANDALONE_MARKER).is_file()


def save_standalone(model: PreTrainedModel, vocab: list[int], out: Path, card: dict | None = None) -> Path:
    """Write the compact form: config, non-embedding weights in bf16, reduced vocabulary, marker."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    embed = model.get_input_embeddings().weight
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()
             if v.data_ptr() != embed.data_ptr() and "embed_tokens" not in k}
    save_file(state, str(out / WEIGHTS))
    (out / DRAFT_VOCAB_FILE).write_text(json.dumps(vocab))
    (out / STANDALONE_MARKER).write_text(json.dumps({"kind": "small", "embeddings": "target", **(card or {})},
                                                    indent=1))
    return out


def load_standalone(path: Path, target: LoadedModel, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """The compact drafter as a full transformers model, with a copy of the target's embeddings, on the target's
    device."""
    from safetensors.torch import load_file

    config = AutoConfig.from_pretrained(path)
    if config.vocab_size != target.model.config.vocab_size or config.hidden_size != target.model.config.hidden_size:
        raise AdaspecError(f"the drafter in {path} does not fit target {target.name}: vocabulary or width differ")
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {k: v.to(dtype) for k, v in load_file(str(path / WEIGHTS)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any("embed_tokens" not in k and "lm_head" not in k for k in missing):
        raise AdaspecError(f"the drafter in {path} is incomplete: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(target.model.get_input_embeddings().weight.to(dtype))
    model.tie_weights()
    vocab = json.loads((path / DRAFT_VOCAB_FILE).read_text())
    return LoadedModel(f"{target.name}-{path.name}", path, model.to(target.device).eval(), target.tokenizer, vocab)
