"""Drafter distillation learns the target's next token (tiny target, patterned data)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from conftest import tiny_llama

from adaspec.core.models import LoadedModel
from adaspec.train.drafter import DrafterTrainConfig, frequent_tokens, sequences, train_drafter


def patterned_rows(n: int, seed: int) -> list[dict]:
    """Completions continue a fixed cycle from the prompt's last token: learnable from context alone."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = [rng.randrange(3, 40) for _ in range(6)]
        completion = [(prompt[-1] + 3 * (i + 1)) % 37 + 3 for i in range(12)] + [2]
        rows.append({"prompt": str(prompt), "prompt_ids": prompt, "completion_ids": completion})
    return rows


def test_distillation_raises_heldout_agreement(tmp_path: Path):
    target = LoadedModel("tiny", tmp_path, tiny_llama(0, layers=2), None)  # no tokenizer: nothing to save there
    config = DrafterTrainConfig(layers=(0, -1), vocab=48, seq_len=32, batch_size=16, lr=3e-3, warmup=5, steps=120,
                                eval_every=60, holdout=0.1)
    report = train_drafter(target, patterned_rows(300, 0), tmp_path / "run", config, log=lambda *_: None)
    evals = [h["heldout_top1"] for h in report["history"] if "heldout_top1" in h]
    assert evals[-1] > 0.8 > evals[0] - 0.3, evals
    vocab = json.loads((tmp_path / "run" / "model" / "adaspec_vocab.json").read_text())
    assert 2 in vocab and len(vocab) <= 48


def test_resume_continues_from_the_checkpoint(tmp_path: Path):
    target = LoadedModel("tiny", tmp_path, tiny_llama(0, layers=2), None)
    rows = patterned_rows(60, 1)
    short = DrafterTrainConfig(layers=(0,), vocab=48, seq_len=32, batch_size=4, steps=4, eval_every=2, warmup=1)
    train_drafter(target, rows, tmp_path / "run", short, log=lambda *_: None)
    longer = DrafterTrainConfig(layers=(0,), vocab=48, seq_len=32, batch_size=4, steps=6, eval_every=2, warmup=1)
    report = train_drafter(target, rows, tmp_path / "run", longer, log=lambda *_: None)
    assert [h["step"] for h in report["history"]] == [1, 2, 3, 4, 5, 6]


def test_sequences_keep_the_end_of_the_prompt_and_frequent_tokens_include_eos():
    rows = [{"prompt_ids": list(range(10)), "completion_ids": [7, 7, 8]}]
    assert sequences(rows, 6) == [([7, 8, 9, 7, 7, 8], 3)]
    assert frequent_tokens(rows, 2, {2}) == [2, 7]
    assert frequent_tokens(rows, 1, {2}) == [2]


def test_training_report_measures_acceptance_and_plots(tmp_path: Path):
    from adaspec.train.report import acceptance_at_k, write_training_report

    target = LoadedModel("tiny", tmp_path, tiny_llama(0, scale=8.0), None)
    same = LoadedModel("same", tmp_path, tiny_llama(0, scale=8.0), None)  # identical weights: all accepted
    result = acceptance_at_k(target, same, [[5, 6, 7], [9, 9, 1]], k=5, max_new_tokens=13)
    assert result["acceptance_rate"] == 1.0 and result["tokens_per_forward"] > 4
    report = {"config": {"steps": 2}, "train_rows": 9, "heldout_rows": 1, "vocab": 48, "acceptance": result,
              "history": [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0, "heldout_top1": 0.5}]}
    text = write_training_report(tmp_path, report).read_text()
    assert "held-out top-1 agreement with the target: 0.5" in text and "tokens per target forward" in text
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_compact_standalone_round_trips_with_the_target_embeddings(tmp_path: Path):
    import torch

    from adaspec.core.drafters.shipped import is_standalone_dir, load_standalone, save_standalone
    from adaspec.train.drafter import init_drafter

    target = LoadedModel("tiny", tmp_path, tiny_llama(0, layers=3), None)
    target.model.config.tie_word_embeddings = True
    target.model.tie_weights()
    draft = init_drafter(target.model, (0, -1))
    with torch.no_grad():
        draft.model.layers[0].mlp.up_proj.weight.mul_(1.5)  # trained: no longer the target's layer
    save_standalone(draft, [1, 2, 3], tmp_path / "compact")
    assert is_standalone_dir(tmp_path / "compact")
    assert "embed_tokens" not in (tmp_path / "compact" / "model.safetensors").read_bytes()[:4096].decode("latin1")
    loaded = load_standalone(tmp_path / "compact", target)
    assert loaded.draft_vocab == [1, 2, 3]
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        want, got = draft(ids).logits, loaded.model(ids).logits
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.02)  # bf16 storage of the layers
