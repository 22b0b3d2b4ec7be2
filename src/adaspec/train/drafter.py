"""Distil a standalone drafter from a target on the target's own greedy outputs.

The drafter is a Hugging Face causal LM with the target's width and tokenizer, a few decoder layers
initialised from the target's, and the target's (frozen, shared) embeddings. It is trained to predict the
target's next token on self-distillation data, with the loss over a reduced vocabulary: the `vocab` tokens
the target emits most often. The reduced head is what makes drafting cheap (a small
model's full-vocabulary head is a large share of its step); the full-vocabulary model stays a valid standalone LM
for peers.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from adaspec.core.config import DEFAULT_SEED
from adaspec.core.models import DRAFT_VOCAB_FILE, LoadedModel
from adaspec.train import checkpoint

# what both drafters (this standalone model and train/eagle.py's head) train with by default: `adaspec train-drafter`
# trains them from one corpus with one --vocab, --seq-len and --batch-size
DRAFTER_VOCAB = 8192  # reduced head: the most frequent target output tokens
DRAFTER_SEQ_LEN = 512
DRAFTER_BATCH_SIZE = 8


@dataclass(frozen=True)
class DrafterTrainConfig:
    layers: tuple[int, ...] = (0, 1)  # target layers copied as the drafter's initial layers (negative: from the end)
    vocab: int = DRAFTER_VOCAB
    seq_len: int = DRAFTER_SEQ_LEN
    batch_size: int = DRAFTER_BATCH_SIZE
    lr: float = 5e-4
    warmup: int = 50
    steps: int = 2000
    eval_every: int = 200
    holdout: float = 0.05  # share of rows held out for agreement and acceptance
    seed: int = DEFAULT_SEED


def frequent_tokens(rows: list[dict], size: int, always: set[int]) -> list[int]:
    """`always` (e.g. EOS) and then the most frequent completion tokens, `size` in all, sorted by id."""
    chosen = set(always)
    for token, _ in Counter(t for r in rows for t in r["completion_ids"]).most_common():
        if len(chosen) >= size:
            break
        chosen.add(token)
    return sorted(chosen)


def init_drafter(target: PreTrainedModel, layers: tuple[int, ...]) -> PreTrainedModel:
    """A len(layers)-layer copy of the target, its layers taken from `layers`, embeddings tied and frozen, in float32
    on the target's device."""
    total = target.config.num_hidden_layers
    picks = [i % total for i in layers]
    config = copy.deepcopy(target.config)
    config.num_hidden_layers = len(picks)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in picks]
    draft = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = target.state_dict()
    own = draft.state_dict()
    for key in own:
        source = key
        if ".layers." in key:
            head, rest = key.split(".layers.", 1)
            index, tail = rest.split(".", 1)
            source = f"{head}.layers.{picks[int(index)]}.{tail}"
        own[key] = state[source].detach().float().cpu().clone()
    draft.load_state_dict(own)
    draft.to(next(target.parameters()).device)
    draft.model.embed_tokens.weight.requires_grad_(False)
    return draft


def sequences(rows: list[dict], seq_len: int, max_prompt: int = 256) -> list[tuple[list[int], int]]:
    """(ids, first completion position) per row, cut to seq_len keeping the end of the prompt (at most
    `max_prompt` of its tokens: the loss is on the completion, long passages only cost time)."""
    out = []
    for r in rows:
        prompt, completion = r["prompt_ids"], r["completion_ids"]
        if not completion:
            continue
        keep_prompt = max(1, min(len(prompt), seq_len - len(completion), max_prompt))
        ids = (prompt[-keep_prompt:] + completion)[:seq_len]
        out.append((ids, keep_prompt))
    return out


def batch_loss(draft: PreTrainedModel, batch: list[tuple[list[int], int]], head: torch.Tensor,
               remap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Cross-entropy over the reduced vocab on completion positions: (loss, correct count, counted)."""
    width = max(len(ids) for ids, _ in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for i, (seq, start) in enumerate(batch):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        target = torch.tensor(seq[start:])
        labels[i, start - 1: len(seq) - 1] = remap[target]  # position p predicts token p+1
    device = head.device  # the drafter's: the batch is built on the host and copied there once
    ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
    hidden = draft.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, T, H]
    valid = labels != -100
    logits = hidden[valid] @ head.T  # [N, vocab]: the head runs only where there is a label
    loss = torch.nn.functional.cross_entropy(logits, labels[valid])
    correct = logits.argmax(-1) == labels[valid]
    return loss, correct.sum(), int(valid.sum())


def split_rows(rows: list[dict], config: DrafterTrainConfig) -> tuple[list[dict], list[dict]]:
    """(train, held-out), the same for the same rows and seed whatever order the rows come in."""
    rows = sorted(rows, key=lambda r: (r["prompt"], r["completion_ids"]))
    random.Random(config.seed).shuffle(rows)
    n_hold = max(1, int(len(rows) * config.holdout))
    return rows[n_hold:], rows[:n_hold]


def train_drafter(target: LoadedModel, rows: list[dict], out: Path, config: DrafterTrainConfig,
                  log=print) -> dict:
    """Train, checkpoint to out/checkpoint.pt every eval (resumable), save the drafter and a report dict."""
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed + 1)
    train, held = split_rows(rows, config)
    vocab = frequent_tokens(train, config.vocab, set(target.eos_ids))
    remap = torch.full((target.model.config.vocab_size,), -100, dtype=torch.long)  # out-of-vocab: not counted
    remap[torch.tensor(vocab)] = torch.arange(len(vocab))
    draft = init_drafter(target.model, config.layers)
    head_rows = torch.tensor(vocab, device=target.device)
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint.pt"
    step, history = checkpoint.resume(ckpt, draft, opt)
    data = sequences(train, config.seq_len)
    held_data = sequences(held, config.seq_len)
    t0 = time.time()
    draft.train()
    while step < config.steps:
        lr = config.lr * min(1.0, (step + 1) / config.warmup) * 0.5 * (1 + math.cos(math.pi * step / config.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        batch = [data[rng.randrange(len(data))] for _ in range(config.batch_size)]
        head = draft.model.embed_tokens.weight[head_rows]
        loss, _, _ = batch_loss(draft, batch, head, remap)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        history.append({"step": step, "loss": round(loss.item(), 4)})
        if step % config.eval_every == 0 or step == config.steps:
            agreement = evaluate(draft, held_data, head_rows, remap)
            history[-1]["heldout_top1"] = round(agreement, 4)
            log(f"step {step}/{config.steps} loss {loss.item():.3f} held-out top-1 {agreement:.3f} "
                f"({time.time() - t0:.0f}s)")
            checkpoint.save(ckpt, draft, opt, step, history)
    draft.eval()
    draft.save_pretrained(out / "model")
    if target.tokenizer is not None:
        target.tokenizer.save_pretrained(out / "model")
    (out / "model" / DRAFT_VOCAB_FILE).write_text(json.dumps(vocab))
    report = {"config": asdict(config), "train_rows": len(train), "heldout_rows": len(held),
              "vocab": len(vocab), "history": history}
    (out / "train_report.json").write_text(json.dumps(report, indent=1))
    return report


@torch.no_grad()
def evaluate(draft: PreTrainedModel, held: list[tuple[list[int], int]], head_rows: torch.Tensor,
             remap: torch.Tensor, batch_size: int = 8) -> float:
    """Held-out top-1 agreement with the target's next token (out-of-vocab targets count as misses)."""
    was = draft.training
    draft.eval()
    head = draft.model.embed_tokens.weight[head_rows]
    correct = total = 0
    for i in range(0, len(held), batch_size):
        batch = held[i: i + batch_size]
        _, c, _ = batch_loss(draft, batch, head, remap)
        correct += int(c)
        total += sum(len(seq) - start for seq, start in batch)
    draft.train(was)
    return correct / max(1, total)
