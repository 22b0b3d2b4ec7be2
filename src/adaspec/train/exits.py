"""Train SpecBound's exit adapters: at each exit layer, a small map of the residual stream whose exit logits
(target's final norm and LM head rows) match the target's final distribution.

1. `exit_states`: one batched target forward per group of corpus rows captures, at every completion position,
   the residual stream after each exit layer (hooks on the decoder layers) and the final hidden state; the
   label is the next corpus token (the corpus is the target's own greedy output).
2. `train_exits`: every adapter learns KL(p_final || p_exit) over a reduced vocabulary (the `vocab` tokens the
   target emits most), on random batches of positions (an adapter sees one position at a time, so positions
   need no sequence structure); checkpointed, resumable.
3. The report: held-out top-1 agreement with the target per exit, raw (full head, no adapter) and adapted, and
   the share of positions whose annealed confidence passes the default threshold with the agreement among
   them: what SpecBound will see at each exit.

The data is the self-distillation corpus of `adaspec distill-data` (synthetic prompts, never Spec-Bench).
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from adaspec.core.confidence import annealed_confidence
from adaspec.core.config import (
    DEFAULT_SEED,
    SPECBOUND_A,
    SPECBOUND_RANK,
    SPECBOUND_THRESHOLD,
    SPECBOUND_TRAIN_EXITS,
    SPECBOUND_VOCAB,
)
from adaspec.core.drafters.early_exit import ExitArtifact, ExitHeads
from adaspec.core.errors import AdaspecError
from adaspec.core.models import LoadedModel
from adaspec.train import checkpoint
from adaspec.train.data import read_corpus
from adaspec.train.drafter import frequent_tokens, split_rows
from adaspec.train.eagle import row_ids

CORPUS_FILES = ("passages.jsonl", "direct.jsonl", "context.jsonl")  # what `adaspec distill-data` writes


@dataclass(frozen=True)
class ExitTrainConfig:
    exits: tuple[int, ...] = SPECBOUND_TRAIN_EXITS
    rank: int = SPECBOUND_RANK  # 0: a full affine adapter; r > 0: rank-r
    vocab: int = SPECBOUND_VOCAB  # the exit head's reduced vocabulary
    seq_len: int = 512
    tokens_per_batch: int = 8192  # target forward batches while capturing states
    batch_size: int = 256  # positions per optimizer step
    lr: float = 1e-3
    warmup: int = 50
    epochs: float = 2.0  # 0: no training, zero adapters (raw exits over the reduced head, for comparison)
    eval_every: int = 200
    holdout: float = 0.05  # share of rows held out (the same split as the drafters' for the same seed)
    max_rows: int | None = None  # train on at most this many rows (None: all)
    threshold: float = SPECBOUND_THRESHOLD  # the report's confidence analysis
    a: float = SPECBOUND_A
    seed: int = DEFAULT_SEED

    def __post_init__(self) -> None:
        if not self.exits or list(self.exits) != sorted(set(self.exits)) or self.exits[0] < 1:
            raise AdaspecError(f"exits must be increasing layer numbers >= 1, got {list(self.exits)}")
        if self.rank < 0 or self.vocab < 2 or self.batch_size < 1 or not self.epochs >= 0:
            raise AdaspecError(f"train-exits needs rank >= 0, vocab >= 2, batch size >= 1 and epochs >= 0; got rank "
                               f"{self.rank}, vocab {self.vocab}, batch size {self.batch_size}, epochs {self.epochs}")
        if self.max_rows is not None and self.max_rows < 1:
            raise AdaspecError(f"max rows must be >= 1, got {self.max_rows}")


def read_corpus_dir(path: Path) -> list[dict]:
    """Rows of the self-distillation corpus files in `path`."""
    files = [path / f for f in CORPUS_FILES if (path / f).is_file()]
    if not files:
        raise AdaspecError(f"no self-distillation corpus in {path} ({', '.join(CORPUS_FILES)}); generate it with "
                           "`adaspec distill-data` first")
    return [row for f in files for row in read_corpus(f)]


@dataclass
class ExitStates:
    """Per training position: the residual stream after each exit layer, the final hidden state, the label."""

    exits: tuple[int, ...]
    states: torch.Tensor  # [E, N, H] bf16
    final: torch.Tensor  # [N, H] bf16, after the final norm
    labels: torch.Tensor  # [N] the target's next token (the corpus is its greedy output)

    def __len__(self) -> int:
        return len(self.labels)


@torch.inference_mode()
def exit_states(model, rows: list[dict], exits: tuple[int, ...], seq_len: int = 512,
                tokens_per_batch: int = 8192) -> ExitStates:
    """Run the target over `rows` (right-padded batches of similar length) and keep, for every position whose
    next token is a completion token, its residual stream after each exit layer and its final hidden state."""
    body = model.model
    items = [row_ids(r, seq_len) for r in rows if r["completion_ids"]]
    items = [(ids, start) for ids, start in items if len(ids) > start]
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
    captured: dict[int, torch.Tensor] = {}
    hooks = [body.layers[e - 1].register_forward_hook(
        lambda m, i, o, e=e: captured.__setitem__(e, o[0] if isinstance(o, tuple) else o)) for e in exits]
    states: list[list[torch.Tensor]] = [[] for _ in exits]
    finals: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    try:
        i = 0
        while i < len(order):
            width = len(items[order[i]][0])
            group = order[i: i + max(1, tokens_per_batch // max(1, width))]
            width = max(len(items[g][0]) for g in group)
            ids = torch.zeros(len(group), width, dtype=torch.long)
            mask = torch.zeros(len(group), width, dtype=torch.long)
            keep = torch.zeros(len(group), width, dtype=torch.bool)  # positions that predict a completion token
            for b, g in enumerate(group):
                seq, start = items[g]
                ids[b, : len(seq)] = torch.tensor(seq)
                mask[b, : len(seq)] = 1
                keep[b, start - 1: len(seq) - 1] = True
            device = body.embed_tokens.weight.device  # the target's; the states are kept on the host
            final = body(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state  # [B, T, H]
            for k, e in enumerate(exits):
                states[k].append(captured[e][keep.to(device)].to("cpu", torch.bfloat16))
            finals.append(final[keep.to(device)].to("cpu", torch.bfloat16))
            labels.append(torch.roll(ids, -1, 1)[keep])
            i += len(group)
    finally:
        for h in hooks:
            h.remove()
    hidden = model.config.hidden_size
    return ExitStates(tuple(exits), torch.stack([torch.cat(s) if s else torch.empty(0, hidden) for s in states]),
                      torch.cat(finals) if finals else torch.empty(0, hidden),
                      torch.cat(labels) if labels else torch.empty(0, dtype=torch.long))


def exit_loss(heads: ExitHeads, norm, rows_w: torch.Tensor, data: ExitStates, idx: torch.Tensor) -> torch.Tensor:
    """Sum over exits of KL(p_final || p_exit) over the reduced vocabulary, mean over the positions `idx`; the states
    (on the host) are copied to the device of the head rows `rows_w`."""
    device = rows_w.device
    teacher = torch.log_softmax(data.final[idx].to(device).float() @ rows_w.T, -1)  # [B, v]
    total = torch.zeros((), device=device)
    for k, e in enumerate(data.exits):
        student = torch.log_softmax(heads(data.states[k, idx].to(device).float(), e, norm, rows_w), -1)  # [B, v]
        total = total + F.kl_div(student, teacher, log_target=True, reduction="batchmean")
    return total


@torch.no_grad()
def evaluate(heads: ExitHeads, norm, rows_w: torch.Tensor, vocab: torch.Tensor, full_w: torch.Tensor | None,
             data: ExitStates, config: ExitTrainConfig, depth: int, chunk: int = 1024) -> dict:
    """Per exit on held-out positions: top-1 agreement with the target adapted (reduced head) and, given the full
    head `full_w`, raw (no adapter); and with SpecBound's annealed confidence at the configured threshold and
    slope, the share of positions that would exit there and the agreement among them."""
    out: dict[str, dict] = {}
    for k, e in enumerate(data.exits):
        heads_of = {"adapted": (lambda h, e=e: heads(h, e, norm, rows_w), vocab)}
        if full_w is not None:
            heads_of["raw"] = (lambda h: norm(h) @ full_w.T, None)
        out[str(e)] = {}
        for name, (head, ids) in heads_of.items():
            agree, passes = [], []
            for i in range(0, len(data), chunk):
                z = head(data.states[k, i: i + chunk].to(rows_w.device).float())  # [n, v]
                top = z.argmax(-1)
                agree.append((top if ids is None else ids[top]) == data.labels[i: i + chunk].to(z.device))
                passes.append(annealed_confidence(z, e, depth, config.a) >= config.threshold)
            a, p = (torch.cat(agree), torch.cat(passes)) if agree else (torch.zeros(0, dtype=torch.bool),) * 2
            out[str(e)][name] = {"top1": round(float(a.float().mean()), 4) if len(a) else None,
                                 "exit_share": round(float(p.float().mean()), 4) if len(a) else None,
                                 "top1_when_exiting": round(float(a[p].float().mean()), 4) if p.any() else None}
    return out


def train_exits(target: LoadedModel, rows: list[dict], out: Path, config: ExitTrainConfig, log=print) -> dict:
    """Capture exit states, train the adapters (checkpointed to out/checkpoint.pt, resumable), save the artifact to
    out/model and return the report (also out/train_report.json)."""
    model = target.model
    depth = int(model.config.num_hidden_layers)
    if config.exits[-1] >= depth:
        raise AdaspecError(f"exits must lie in 1..{depth - 1} (the target has {depth} layers), "
                           f"got {list(config.exits)}")
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed + 1)
    train_rows, held_rows = split_rows(rows, config)
    if config.max_rows is not None:
        train_rows = train_rows[: config.max_rows]
    t0 = time.time()
    train = exit_states(model, train_rows, config.exits, config.seq_len, config.tokens_per_batch)
    held = exit_states(model, held_rows, config.exits, config.seq_len, config.tokens_per_batch)
    if not len(train):
        raise AdaspecError("the corpus has no completion tokens to train on")
    log(f"exits: {len(train)} training positions, {len(held)} held out ({time.time() - t0:.0f}s)")
    vocab = frequent_tokens(train_rows, config.vocab, set(target.eos_ids))
    vocab_t = torch.tensor(vocab, device=target.device)
    full_w = model.get_output_embeddings().weight.detach().float()  # [V, H]
    rows_w = full_w[vocab_t].contiguous()  # [v, H]
    norm = copy.deepcopy(model.model.norm).float().requires_grad_(False)  # the target's, frozen
    heads = ExitHeads(model.config.hidden_size, list(config.exits), config.rank).to(target.device)
    opt = torch.optim.AdamW(heads.parameters(), lr=config.lr, weight_decay=0.0)
    steps = math.ceil(config.epochs * len(train) / config.batch_size)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint.pt"
    step, history = checkpoint.resume(ckpt, heads, opt)
    order: list[int] = []
    heads.train()
    while step < steps:
        if len(order) < config.batch_size:
            order = list(range(len(train)))
            rng.shuffle(order)
        idx = torch.tensor([order.pop() for _ in range(min(config.batch_size, len(order)))])
        lr = config.lr * min(1.0, (step + 1) / config.warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr
        loss = exit_loss(heads, norm, rows_w, train, idx)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(heads.parameters(), 1.0)
        opt.step()
        step += 1
        history.append({"step": step, "loss": round(loss.item(), 4)})
        if step % config.eval_every == 0 or step == steps:
            heads.eval()
            if len(held):
                agreement = evaluate(heads, norm, rows_w, vocab_t, None, held, config, depth)
                history[-1]["heldout"] = agreement
                log(f"exits step {step}/{steps} loss {loss.item():.3f} held-out top-1 per exit "
                    + " ".join(f"{e}:{a['adapted']['top1']}" for e, a in agreement.items())
                    + f" ({time.time() - t0:.0f}s)")
            heads.train()
            checkpoint.save(ckpt, heads, opt, step, history)
    heads.eval()
    after = evaluate(heads, norm, rows_w, vocab_t, full_w, held, config, depth)
    report = {"kind": "exits", "config": asdict(config), "train_rows": len(train_rows), "heldout_rows": len(held_rows),
              "train_positions": len(train), "heldout_positions": len(held), "vocab": len(vocab),
              "params": sum(p.numel() for p in heads.parameters()), "heldout": after,
              "minutes": round((time.time() - t0) / 60, 2), "history": history}
    card = {"training": {k: v for k, v in report.items() if k != "history"}}
    ExitArtifact(heads, vocab, depth, card).save(out / "model")
    (out / "train_report.json").write_text(json.dumps(report, indent=1))
    write_exits_report(out, report)
    return report


def write_exits_report(out: Path, report: dict) -> Path:
    """out/report.md: configuration, the held-out table per exit (raw and adapted), the loss curve."""
    from adaspec.train.report import loss_plot

    config = report["config"]
    plotted = loss_plot(report["history"], out / "loss.png")
    lines = ["# Training report: SpecBound exit adapters", "", "```json", json.dumps(config, indent=1), "```", "",
             f"- training rows: {report['train_rows']} ({report['train_positions']} positions), held-out rows: "
             f"{report['heldout_rows']} ({report['heldout_positions']} positions)",
             f"- adapters: {report['params']} parameters (rank {config['rank']}: 0 = full affine); exit head: "
             f"{report['vocab']} tokens", f"- training time: {report['minutes']} min", "",
             f"Held-out, per exit layer: top-1 agreement with the target's next token; the share of positions whose "
             f"annealed confidence (a={config['a']}) reaches {config['threshold']} and the agreement among them.", "",
             "| exit layer | raw top-1 | raw exits / agree | adapted top-1 | adapted exits / agree |",
             "|---|---|---|---|---|"]
    for layer, r in (report.get("heldout") or {}).items():
        raw, ad = r.get("raw") or {}, r["adapted"]
        lines.append(f"| {layer} | {raw.get('top1')} | {raw.get('exit_share')} / {raw.get('top1_when_exiting')} | "
                     f"{ad['top1']} | {ad['exit_share']} / {ad['top1_when_exiting']} |")
    lines += ["", "![loss](loss.png)" if plotted else "(matplotlib not installed: no loss plot)"]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
