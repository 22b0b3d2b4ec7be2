"""A layer-truncated copy of a target: its embeddings, first N decoder layers, final norm and LM head,
saved as a standalone Hugging Face model that shares the target's tokenizer. Training-free, weak on its
own (early layers of SmolLM2 rarely agree with its final top-1), and the starting point for distillation."""

from __future__ import annotations

import copy
from pathlib import Path

from transformers import AutoModelForCausalLM

from adaspec.errors import AdaspecError
from adaspec.models import LoadedModel


def truncate_model(source: LoadedModel, layers: int, out: Path) -> Path:
    total = int(source.model.config.num_hidden_layers)
    if not 1 <= layers < total:
        raise AdaspecError(f"--layers must be in 1..{total - 1} for a {total}-layer target, got {layers}")
    config = copy.deepcopy(source.model.config)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    model = AutoModelForCausalLM.from_config(config, dtype=source.model.dtype)
    missing, unexpected = model.load_state_dict(source.model.state_dict(), strict=False)
    dropped = [k for k in unexpected if not any(f"layers.{i}." in k for i in range(layers, total))]
    if [k for k in missing if "lm_head" not in k] or dropped:
        raise AdaspecError(f"cannot truncate {source.name}: unmatched weights {missing[:3]} {dropped[:3]}")
    model.tie_weights()
    model.generation_config = source.model.generation_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    source.tokenizer.save_pretrained(out)
    return out
