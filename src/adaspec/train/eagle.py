"""Train an EAGLE-style draft head on the target's own features.

1. Features: captured while the corpus is generated (`train.data`, `items_from_corpus`), or for any rows
   by `extract_features`: one batched target forward per group of rows gives, per position, the final
   hidden state f_t and the target's top-1 next token; written as resumable shards.
2. `train_eagle`: the head learns f^_j ~ f_j (smooth L1) and the target's top-1 through the reduced LM head
   (cross-entropy), unrolled `depth` drafting steps deep ("training-time test", as EAGLE-3): at depth d the
   head reads its own depth d-1 prediction of the previous feature, and attends to true-feature positions
   up to j-d+1 plus its own deeper positions, exactly the context it sees when drafting the d-th token.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from adaspec.core.config import DEFAULT_SEED
from adaspec.core.drafters.eagle import EagleArtifact, EagleConfig, EagleHead
from adaspec.core.models import LoadedModel
from adaspec.train import checkpoint
from adaspec.train.drafter import DRAFTER_BATCH_SIZE, DRAFTER_SEQ_LEN, DRAFTER_VOCAB, frequent_tokens, split_rows


@dataclass(frozen=True)
class EagleTrainConfig:
    vocab: int = DRAFTER_VOCAB  # reduced head: the most frequent target output tokens
    depth: int = 3  # drafting steps unrolled in training
    depth_decay: float = 0.8  # loss weight of depth d: decay^(d-1)
    reg_weight: float = 1.0  # smooth-L1 feature regression, next to the cross-entropy
    seq_len: int = DRAFTER_SEQ_LEN
    batch_size: int = DRAFTER_BATCH_SIZE
    lr: float = 1e-3
    warmup: int = 50
    epochs: float = 8.0
    eval_every: int = 100
    holdout: float = 0.05
    init_layer: int = -1  # the target layer the head starts from
    seed: int = DEFAULT_SEED


# ---------------------------------------------------------------- features

def row_ids(row: dict, seq_len: int) -> tuple[list[int], int]:
    """(ids, index of the first completion token), keeping the end of the prompt within seq_len."""
    prompt, completion = row["prompt_ids"], row["completion_ids"]
    keep = max(1, min(len(prompt), seq_len - len(completion)))
    return (prompt[-keep:] + completion)[:seq_len], keep


@torch.inference_mode()
def extract_features(target: LoadedModel, rows: list[dict], out: Path, seq_len: int = 512,
                     tokens_per_batch: int = 8192, rows_per_shard: int = 256, log=print) -> list[Path]:
    """Shards out/features-NNNN.pt, each a list of {ids, start, feats [T, H] bf16, top1 [T]}; resumable."""
    out.mkdir(parents=True, exist_ok=True)
    model = target.model
    head = model.get_output_embeddings()
    shards = []
    t0 = time.time()
    for s, first in enumerate(range(0, len(rows), rows_per_shard)):
        path = out / f"features-{s:04d}.pt"
        shards.append(path)
        if path.exists():
            continue
        items = [row_ids(r, seq_len) for r in rows[first: first + rows_per_shard] if r["completion_ids"]]
        order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
        done: dict[int, dict] = {}
        i = 0
        while i < len(order):
            width = len(items[order[min(len(order) - 1, i + 1)]][0])
            group = order[i: i + max(1, tokens_per_batch // max(1, width))]
            width = max(len(items[g][0]) for g in group)
            ids = torch.zeros(len(group), width, dtype=torch.long)
            mask = torch.zeros(len(group), width, dtype=torch.long)
            for b, g in enumerate(group):
                ids[b, : len(items[g][0])] = torch.tensor(items[g][0])
                mask[b, : len(items[g][0])] = 1
            hidden = model.model(input_ids=ids.to(target.device),
                                 attention_mask=mask.to(target.device)).last_hidden_state  # [B, T, H]
            top1 = head(hidden).argmax(-1).cpu()  # [B, T]
            hidden = hidden.to("cpu", torch.bfloat16)  # the shards live on the host
            for b, g in enumerate(group):
                n = len(items[g][0])
                done[g] = {"ids": items[g][0], "start": items[g][1], "feats": hidden[b, :n].to(torch.bfloat16).clone(),
                           "top1": top1[b, :n].to(torch.int32).clone()}
            i += len(group)
        torch.save([done[g] for g in range(len(items))], path)
        log(f"features: shard {s + 1}/{math.ceil(len(rows) / rows_per_shard)} ({time.time() - t0:.0f}s)")
    return shards


def items_from_corpus(rows: list[dict], features: list[torch.Tensor], seq_len: int = 512,
                      max_prompt: int = 256) -> list[dict]:
    """Training items from corpus rows and the features captured while generating them (`train.data`).

    The completion is greedy, so the target's top-1 after position t is the token at t+1 there; prompt
    positions carry no label (masked in training). Rows keep at most the last `max_prompt` prompt positions
    (the features already carry the whole context) and the last `seq_len` positions in all."""
    items = []
    for row, f in zip(rows, features, strict=True):
        ids = row["prompt_ids"] + row["completion_ids"]
        if not row["completion_ids"] or len(f) != len(ids):
            continue
        cut = max(0, len(ids) - seq_len, len(row["prompt_ids"]) - max_prompt)
        top1 = torch.tensor(ids[1:] + [ids[-1]], dtype=torch.int32)  # [T]; the last one is never used
        items.append({"ids": ids[cut:], "start": max(1, len(row["prompt_ids"]) - cut), "feats": f[cut:],
                      "top1": top1[cut:]})
    return items


# ---------------------------------------------------------------- training

def unroll_mask(length: int, depth: int, device: torch.device | None = None) -> torch.Tensor:
    """Attention mask [T, d*T] of depth d's queries over the keys of depths 1..d (True = may attend).

    Query i at depth d sees depth-1 keys i' <= i - (d-1) (computed from true features) and, for each
    deeper d' in 2..d, the single key i - (d - d'): the tokens drafted before it in the same step."""
    i = torch.arange(length, device=device)
    blocks = [i[None, :] <= (i[:, None] - (depth - 1))]
    for d2 in range(2, depth + 1):
        blocks.append(i[None, :] == (i[:, None] - (depth - d2)))
    mask = torch.cat(blocks, 1)
    mask[:, 0] |= ~mask.any(1)  # a query with nothing to see (i < d-1, loss-masked) reads key 0: no NaN
    return mask


def batch_tensors(items: list[dict], remap: torch.Tensor):
    """Right-padded batch: inputs (features f_{j-1}, tokens x_j), targets (f_j, reduced top-1 label), mask."""
    width = max(len(it["ids"]) for it in items) - 1
    hidden = items[0]["feats"].shape[1]
    feats_in = torch.zeros(len(items), width, hidden)
    feats_out = torch.zeros(len(items), width, hidden)
    tokens = torch.zeros(len(items), width, dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    for b, it in enumerate(items):
        n = len(it["ids"]) - 1
        f = it["feats"].float()
        feats_in[b, :n] = f[:-1]
        feats_out[b, :n] = f[1:]
        tokens[b, :n] = torch.tensor(it["ids"][1:])
        lab = remap[it["top1"][1:].long()]  # position j's label: the target's top-1 after x_j
        keep = torch.arange(1, n + 1) >= it["start"] - 1  # only where the next token is in the completion
        keep &= torch.arange(1, n + 1) < n  # not the prediction after the last token
        labels[b, :n] = torch.where(keep, lab, torch.full_like(lab, -100))
    return feats_in, tokens, feats_out, labels


def unrolled_loss(head: EagleHead, embed: torch.Tensor, lm_rows: torch.Tensor, batch, config: EagleTrainConfig):
    """Sum over depths of decay^(d-1) * (CE + reg_weight * smooth L1); per-depth accuracy [depth]."""
    feats_in, tokens, feats_out, labels = batch
    b, t, _ = feats_in.shape
    positions = torch.arange(1, t + 1, device=feats_in.device)
    embeds = embed[tokens]
    keys, values = [], []
    inputs = feats_in
    total = torch.zeros((), device=feats_in.device)
    correct, counted = [], []
    for d in range(1, config.depth + 1):
        x, q, k, v = head.project(inputs, embeds, positions)
        keys.append(k)
        values.append(v)
        mask = unroll_mask(t, d, feats_in.device)
        out = head.finish(x, q, torch.cat(keys, 2), torch.cat(values, 2), mask)  # [B, T, H]
        valid = labels != -100
        valid[:, : d - 1] = False  # depth d starts at position d (it needs d-1 drafted predecessors)
        if valid.any():
            picked = out[valid]  # [N, H]: the head runs only where there is a label
            logits = picked @ lm_rows.T  # [N, v]
            ce = F.cross_entropy(logits, labels[valid])
            reg = F.smooth_l1_loss(picked, feats_out[valid])
            total = total + config.depth_decay ** (d - 1) * (ce + config.reg_weight * reg)
            correct.append(int((logits.argmax(-1) == labels[valid]).sum()))
        else:
            correct.append(0)
        counted.append(int(valid.sum()))
        inputs = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], 1)  # depth d+1 reads f^_{j-1}
    return total, correct, counted


def to_device(batch: tuple[torch.Tensor, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(device, non_blocking=True) for t in batch)


def train_eagle(target: LoadedModel, rows: list[dict], items: list[dict], out: Path, config: EagleTrainConfig,
                log=print) -> dict:
    """Train on feature items (from `extract_features` over `rows`), checkpointing; save an EagleArtifact. Trains
    on the target's device (--device), batches copied there from the host shards."""
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed + 1)
    train_rows, held_rows = split_rows(rows, config)
    held_keys = {tuple(r["completion_ids"]) for r in held_rows}
    train = [it for it in items if tuple(it["ids"][it["start"]:]) not in held_keys]
    held = [it for it in items if tuple(it["ids"][it["start"]:]) in held_keys]
    vocab = frequent_tokens(train_rows, config.vocab, set(target.eos_ids))
    remap = torch.full((target.model.config.vocab_size,), -100, dtype=torch.long)
    remap[torch.tensor(vocab)] = torch.arange(len(vocab))
    model = target.model
    embed = model.get_input_embeddings().weight.detach().float()
    lm_rows = model.get_output_embeddings().weight[torch.tensor(vocab, device=target.device)].detach().float()
    head = EagleHead(EagleConfig.from_target(model.config))
    head.init_from_target(model, config.init_layer)
    head.to(target.device)
    opt = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=0.0)
    train.sort(key=lambda it: len(it["ids"]))  # length buckets: little padding
    batches = [train[i: i + config.batch_size] for i in range(0, len(train), config.batch_size)]
    steps = max(1, int(config.epochs * len(batches)))
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint.pt"
    step, history = checkpoint.resume(ckpt, head, opt)
    order: list[int] = []
    t0 = time.time()
    head.train()
    while step < steps:
        if not order:
            order = list(range(len(batches)))
            rng.shuffle(order)
        batch = to_device(batch_tensors(batches[order.pop()], remap), target.device)
        lr = config.lr * min(1.0, (step + 1) / config.warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr
        loss, _, _ = unrolled_loss(head, embed, lm_rows, batch, config)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        step += 1
        history.append({"step": step, "loss": round(loss.item(), 4)})
        if step % config.eval_every == 0 or step == steps:
            acc = evaluate(head, embed, lm_rows, held, remap, config)
            history[-1]["heldout_top1"] = acc[0]
            history[-1]["heldout_by_depth"] = acc
            log(f"eagle step {step}/{steps} loss {loss.item():.3f} held-out top-1 by depth "
                f"{' '.join(f'{a:.3f}' for a in acc)} ({time.time() - t0:.0f}s)")
            checkpoint.save(ckpt, head, opt, step, history)
    head.eval()
    report = {"kind": "eagle", "config": asdict(config), "train_rows": len(train_rows), "heldout_rows": len(held_rows),
              "train_tokens": sum(len(it["ids"]) for it in train), "vocab": len(vocab), "history": history}
    EagleArtifact(head, vocab).save(out / "model", {"training": {k: v for k, v in report.items() if k != "history"}})
    (out / "train_report.json").write_text(json.dumps(report, indent=1))
    return report


@torch.no_grad()
def evaluate(head: EagleHead, embed, lm_rows, held: list[dict], remap, config: EagleTrainConfig) -> list[float]:
    """Held-out top-1 agreement with the target, per unrolled depth."""
    was = head.training
    head.eval()
    correct = [0] * config.depth
    counted = [0] * config.depth
    for i in range(0, len(held), config.batch_size):
        batch = to_device(batch_tensors(held[i: i + config.batch_size], remap), embed.device)
        _, c, n = unrolled_loss(head, embed, lm_rows, batch, config)
        correct = [a + b for a, b in zip(correct, c, strict=True)]
        counted = [a + b for a, b in zip(counted, n, strict=True)]
    head.train(was)
    return [round(c / max(1, n), 4) for c, n in zip(correct, counted, strict=True)]
