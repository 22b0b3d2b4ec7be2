"""The training report: loss curve, held-out top-1 agreement, and acceptance at k=5 measured by running
greedy speculative decoding with the trained drafter on held-out prompts."""

from __future__ import annotations

import json
from pathlib import Path

from adaspec.core.backends import TorchBackend
from adaspec.core.config import GenerationConfig
from adaspec.core.decode import StopCriteria, generate
from adaspec.core.models import LoadedModel
from adaspec.core.policies import FixedLength


def acceptance_at_k(target: LoadedModel, drafter, prompts: list[list[int]], k: int = 5,
                    max_new_tokens: int = 64) -> dict:
    """Greedy sd with the drafter (anything `load_drafter` returns): mean drafted tokens accepted per step
    and tokens per target forward (the first, prefill step included)."""
    from adaspec.methods import make_drafter, parse_method

    backend = TorchBackend(target.model)
    draft = make_drafter(parse_method("sd"), drafter, backend, target)
    stop = StopCriteria(target.eos_ids)
    steps = accepted = drafted = emitted = 0
    for ids in prompts:
        result = generate(backend, ids, GenerationConfig(max_new_tokens=max_new_tokens), draft, FixedLength(k),
                          stop=stop)
        steps += len(result.steps)
        accepted += sum(s.accepted for s in result.steps)
        drafted += sum(s.drafted for s in result.steps)
        emitted += result.new_tokens
    return {"k": k, "prompts": len(prompts), "mean_accepted_drafted": accepted / max(1, steps),
            "acceptance_rate": accepted / max(1, drafted), "tokens_per_forward": emitted / max(1, steps)}


def loss_plot(history: list[dict], path: Path) -> bool:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], lw=0.6, label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (reduced vocab)")
    evals = [h for h in history if "heldout_top1" in h]
    if evals:
        twin = ax.twinx()
        twin.plot([h["step"] for h in evals], [h["heldout_top1"] for h in evals], "o-", color="C1",
                  label="held-out top-1")
        twin.set_ylabel("held-out top-1 agreement")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return True


def write_training_report(out: Path, report: dict) -> Path:
    plotted = loss_plot(report["history"], out / "loss.png")
    evals = [h for h in report["history"] if "heldout_top1" in h]
    title = {"eagle": "EAGLE-style head", "small": "standalone drafter"}.get(report.get("kind", ""), "drafter")
    lines = [f"# Training report: {title}", "", "```json", json.dumps(report["config"], indent=1), "```", "",
             f"- training rows: {report['train_rows']}, held-out rows: {report['heldout_rows']}, "
             f"reduced vocabulary: {report['vocab']} tokens",
             f"- held-out top-1 agreement with the target: {evals[-1]['heldout_top1'] if evals else '–'}"]
    if evals and "heldout_by_depth" in evals[-1]:
        lines.append(f"- held-out top-1 agreement by drafting depth: {evals[-1]['heldout_by_depth']}")
    if "minutes" in report:
        lines.append(f"- training time: {report['minutes']:.1f} min")
    if "acceptance" in report:
        a = report["acceptance"]
        lines.append(f"- greedy sd at k={a['k']} on {a['prompts']} held-out prompts: {a['tokens_per_forward']:.2f} "
                     f"tokens per target forward, acceptance rate {a['acceptance_rate']:.3f}")
    lines += ["", "![loss](loss.png)" if plotted else "(matplotlib not installed: no loss plot)"]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
