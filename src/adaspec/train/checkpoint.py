"""One checkpoint format for every trainer: model and optimizer state, the step reached and the history."""

from __future__ import annotations

from pathlib import Path

import torch


def resume(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[int, list[dict]]:
    """Load `path` into model and opt if it exists; return (step, history) to continue from ((0, []) if not)."""
    if not path.exists():
        return 0, []
    device = next(model.parameters()).device  # a checkpoint written on another device resumes on this one
    state = torch.load(path, weights_only=False, map_location=device)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    return state["step"], state["history"]


def save(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int, history: list[dict]) -> None:
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "history": history}, path)
