"""Self-distillation data: the target's own greedy answers to synthetic prompts, generated in batches
(left padding, in the dtype this CPU runs fastest) and appended to a JSONL file one batch at a time, so an
interrupted run resumes where it stopped and a rerun with the same seed produces the same prompts in the
same order. With `features=True` the target's final hidden state at every position is captured during
generation (a hook on the final norm) and saved beside the rows, for the EAGLE-style head: no second pass."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from adaspec.core.config import DEFAULT_SEED
from adaspec.core.models import LoadedModel
from adaspec.train.prompts import Prompt


def count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open() as f:
        return sum(1 for line in f if line.strip())


def read_corpus(path: Path) -> list[dict]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def fastest_dtype() -> str:
    """'bfloat16' where this CPU multiplies bf16 faster than fp32 (AMX / AVX512-BF16), else 'float32'.

    Measured, not guessed: a CPU without native bf16 arithmetic (AVX2 only) emulates it, several times slower."""
    import time

    x, w = torch.randn(256, 576), torch.randn(1536, 576)
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = x.to(dtype), w.to(dtype)
        a @ b.T
        t0 = time.perf_counter()
        for _ in range(5):
            a @ b.T
        best[dtype] = time.perf_counter() - t0
    return "bfloat16" if best[torch.bfloat16] < best[torch.float32] else "float32"


def generation_dtype(device: str = "auto") -> str:
    """The dtype the corpus is generated in: on a CPU the one it multiplies fastest, on a GPU its default (bf16)."""
    from adaspec.core.models import default_dtype, resolve_device

    where = resolve_device(device)
    return fastest_dtype() if where.type == "cpu" else default_dtype(where)


@torch.inference_mode()
def answer_batch(model: LoadedModel, prompts: list[Prompt], max_new_tokens: int,
                 features: list | None = None) -> list[dict]:
    """Greedy answers to a batch of chat prompts: prompt ids and completion ids (cut after EOS).

    `features`, if a list, receives per row the final hidden states [len(ids), H] (bf16) of prompt +
    completion positions (the last position, never fed to the model, is zeros)."""
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
    captured: list[torch.Tensor] = []  # per forward: [B, t, H]
    hook = None
    if features is not None:
        hook = model.model.model.norm.register_forward_hook(lambda m, i, o: captured.append(o.to(torch.bfloat16)))
    try:
        out = model.model.generate(**enc.to(model.device), max_new_tokens=max_new_tokens, do_sample=False,
                                   eos_token_id=eos, pad_token_id=tokenizer.pad_token_id).cpu()
    finally:
        if hook is not None:
            hook.remove()
    hidden = torch.cat(captured, 1).cpu() if captured else None  # [B, width + steps - 1, H]
    rows = []
    width = enc["input_ids"].shape[1]
    for i, p in enumerate(prompts):
        keep = enc["attention_mask"][i].bool()
        prompt_ids = enc["input_ids"][i][keep].tolist()
        completion = out[i, width:].tolist()
        for j, t in enumerate(completion):
            if t in model.eos_ids:
                completion = completion[: j + 1]
                break
        rows.append({"kind": p.kind, "prompt": p.text, "prompt_ids": prompt_ids, "completion_ids": completion})
        if features is not None:
            n = len(prompt_ids) + len(completion)
            f = torch.zeros(n, hidden.shape[-1], dtype=torch.bfloat16)
            fed = torch.cat([hidden[i, :width][keep], hidden[i, width: width + len(completion) - 1]])
            f[: len(fed)] = fed
            features.append(f)
    return rows


def features_path(path: Path, start: int) -> Path:
    """The feature shard of the batch whose first row is line `start` of corpus file `path`."""
    return path.parent / "features" / f"{path.stem}-{start:06d}.pt"


def load_features(path: Path, batch_size: int) -> list[torch.Tensor]:
    """Every row's features [T, H] of corpus file `path`, in row order (generated with that batch size)."""
    out: list[torch.Tensor] = []
    for start in range(0, count_lines(path), batch_size):
        out += torch.load(features_path(path, start), weights_only=False)
    return out


def generate_corpus(model: LoadedModel, prompts: list[Prompt], path: Path, batch_size: int = 32,
                    max_new_tokens: int = 192, label: str = "data", features: bool = False) -> Path:
    """Append answers for prompts[done:] to `path` (done = lines already there); with `features`, save each
    batch's hidden states to `features_path(path, start)` before its rows (so rows never lack features)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    done = count_lines(path)
    if done > len(prompts):
        raise ValueError(f"{path} has {done} rows but only {len(prompts)} prompts: it belongs to another run")
    columns = (TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns) as progress, path.open("a") as sink:
        task = progress.add_task(label, total=len(prompts), completed=done)
        for start in range(done, len(prompts), batch_size):
            batch = prompts[start: start + batch_size]
            captured: list | None = [] if features else None
            rows = answer_batch(model, batch, max_new_tokens, captured)
            if captured is not None:
                features_path(path, start).parent.mkdir(exist_ok=True)
                torch.save(captured, features_path(path, start))
            for row in rows:
                sink.write(json.dumps(row) + "\n")
            sink.flush()
            progress.advance(task, len(batch))
    return path


def context_batch(batch_size: int) -> int:
    return max(1, batch_size // 2)  # long passage prompts: half the batch


PASSAGE_TOKENS = 256  # longer passages cost more than they teach: batched generation slows with length


# build_corpus (`adaspec distill-data`, `adaspec train-drafter`): prompts per round, prompts a batch, tokens an answer
CORPUS_DIRECT = 1000  # direct prompts, before removing repeats
CORPUS_PASSAGES = 120  # passages the target writes for the summarization/RAG prompts
CORPUS_BATCH = 32
CORPUS_NEW_TOKENS = 160  # a direct or summarization/RAG answer (a passage: PASSAGE_TOKENS)


def build_corpus(model: LoadedModel, workdir: Path, seed: int = DEFAULT_SEED, direct: int = CORPUS_DIRECT,
                 passages: int = CORPUS_PASSAGES, batch_size: int = CORPUS_BATCH,
                 max_new_tokens: int = CORPUS_NEW_TOKENS) -> list[Path]:
    """Round 1: passages written by the target; round 2: direct prompts, then summarization/RAG prompts over
    the round-1 passages. Each round is a resumable JSONL in `workdir`, with its feature shards.

    The defaults make about 150k completion tokens, what the shipped drafters were trained on (benchmarks/README.md
    "Trained drafters (shipped)" says how long that took)."""
    from adaspec.train.prompts import context_prompts, direct_prompts, passage_prompts

    first = generate_corpus(model, passage_prompts(passages, seed), workdir / "passages.jsonl", batch_size,
                            max_new_tokens=PASSAGE_TOKENS, label="passages", features=True)
    written = [(r["prompt"], model.tokenizer.decode(r["completion_ids"], skip_special_tokens=True).strip())
               for r in read_corpus(first)]
    unique = list({p.text: p for p in direct_prompts(direct, seed)}.values())  # first occurrence of each text
    direct_path = generate_corpus(model, unique, workdir / "direct.jsonl",
                                  batch_size, max_new_tokens, label="direct", features=True)
    context_path = generate_corpus(model, context_prompts([w for w in written if w[1]], seed),
                                   workdir / "context.jsonl", context_batch(batch_size), max_new_tokens,
                                   label="context", features=True)
    return [first, direct_path, context_path]


def load_corpus(paths: list[Path], batch_size: int) -> tuple[list[dict], list[torch.Tensor]]:
    """Rows of every corpus file `build_corpus` wrote, and their features, in the same order."""
    rows: list[dict] = []
    feats: list[torch.Tensor] = []
    for path in paths:
        rows += read_corpus(path)
        feats += load_features(path, context_batch(batch_size) if path.stem == "context" else batch_size)
    return rows, feats
