"""A layer-truncated copy of a target: its embeddings, first N decoder layers, final norm and LM head,
saved as a standalone Hugging Face model that shares the target's tokenizer. Training-free, weak on its
own (early layers of SmolLM2 rarely agree with its final top-1), and the starting point for distillation."""

from __future__ import annotations

from pathlib import Path

from adaspec.core.errors import AdaspecError
from adaspec.core.models import LoadedModel
from adaspec.train.drafter import init_drafter

TRUNCATE_LAYERS = 4  # `adaspec make-drafter --layers`: decoder layers of the target kept


def truncate_model(source: LoadedModel, layers: int, out: Path) -> Path:
    total = int(source.model.config.num_hidden_layers)
    if not 1 <= layers < total:
        raise AdaspecError(f"--layers must be in 1..{total - 1} for a {total}-layer target, got {layers}")
    model = init_drafter(source.model, tuple(range(layers))).to(source.model.dtype)
    model.generation_config = source.model.generation_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    source.tokenizer.save_pretrained(out)
    return out
