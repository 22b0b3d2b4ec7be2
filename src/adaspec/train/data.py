"""Self-distillation data: the target's own greedy answers to synthetic prompts, generated in batches
(bf16, left padding) and appended to a JSONL file one batch at a time, so an interrupted run resumes
where it stopped and a rerun with the same seed produces the same prompts in the same order."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from adaspec.models import LoadedModel
from adaspec.train.prompts import Prompt


def count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open() as f:
        return sum(1 for line in f if line.strip())


def read_corpus(path: Path) -> list[dict]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


@torch.inference_mode()
def answer_batch(model: LoadedModel, prompts: list[Prompt], max_new_tokens: int) -> list[dict]:
    """Greedy answers to a batch of chat prompts: prompt ids and completion ids (cut after EOS)."""
    tokenizer = model.tokenizer
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p.text}], add_generation_prompt=True,
                                           tokenize=False) for p in prompts]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    eos = sorted(model.eos_ids)
    out = model.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                               pad_token_id=tokenizer.pad_token_id)
    rows = []
    width = enc["input_ids"].shape[1]
    for i, p in enumerate(prompts):
        prompt_ids = enc["input_ids"][i][enc["attention_mask"][i].bool()].tolist()
        completion = out[i, width:].tolist()
        for j, t in enumerate(completion):
            if t in model.eos_ids:
                completion = completion[: j + 1]
                break
        rows.append({"kind": p.kind, "prompt": p.text, "prompt_ids": prompt_ids, "completion_ids": completion})
    return rows


def generate_corpus(model: LoadedModel, prompts: list[Prompt], path: Path, batch_size: int = 32,
                    max_new_tokens: int = 192, label: str = "data") -> Path:
    """Append answers for prompts[done:] to `path` (done = lines already there)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    done = count_lines(path)
    if done > len(prompts):
        raise ValueError(f"{path} has {done} rows but only {len(prompts)} prompts: it belongs to another run")
    columns = (TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns) as progress, path.open("a") as sink:
        task = progress.add_task(label, total=len(prompts), completed=done)
        for start in range(done, len(prompts), batch_size):
            batch = prompts[start: start + batch_size]
            for row in answer_batch(model, batch, max_new_tokens):
                sink.write(json.dumps(row) + "\n")
            sink.flush()
            progress.advance(task, len(batch))
    return path


PASSAGE_TOKENS = 256  # longer passages cost more than they teach: batched generation slows with length


def build_corpus(model: LoadedModel, workdir: Path, seed: int = 0, direct: int = 4000, passages: int = 300,
                 batch_size: int = 32, max_new_tokens: int = 192) -> list[Path]:
    """Round 1: passages written by the target; round 2: direct prompts, then summarization/RAG prompts over
    the round-1 passages. Each round is a resumable JSONL in `workdir`."""
    from adaspec.train.prompts import context_prompts, direct_prompts, passage_prompts

    first = generate_corpus(model, passage_prompts(passages, seed), workdir / "passages.jsonl", batch_size,
                            max_new_tokens=PASSAGE_TOKENS, label="passages")
    written = [(r["prompt"], model.tokenizer.decode(r["completion_ids"], skip_special_tokens=True).strip())
               for r in read_corpus(first)]
    unique = list({p.text: p for p in direct_prompts(direct, seed)}.values())  # first occurrence of each text
    direct_path = generate_corpus(model, unique, workdir / "direct.jsonl",
                                  batch_size, max_new_tokens, label="direct")
    context_path = generate_corpus(model, context_prompts([w for w in written if w[1]], seed),
                                   workdir / "context.jsonl", max(1, batch_size // 2), max_new_tokens,
                                   label="context")
    return [first, direct_path, context_path]
