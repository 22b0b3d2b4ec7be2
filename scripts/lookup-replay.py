"""Replay prompt lookup over a run's greedy `ar` outputs, offline (no model): where lookup's acceptance table
(core/drafters/lookup.py ACCEPTANCE) comes from, and what a length policy would gain, in tokens per verify cost.

  python scripts/lookup-replay.py RUN [--data QUESTIONS.jsonl] [--table]

RUN is an `adaspec bench` directory with `ar` records (their token ids are what greedy speculative decoding emits,
whatever is drafted); its costs.json gives the verify curve. Each turn is rebuilt as the bench built it (the chat
prompt with earlier answers as assistant turns). --table prints the measured chance that the target keeps a copied
token, given it kept the ones before, by match-length bin and agreement bin (the shipped table was made this way
from benchmarks/full-dev). Then, for the shipped drafter and CostAware, and for an oracle that knows each draft's
fate: tokens emitted per unit of verify cost (1.0 = `ar`) and tokens per forward, drafting and overhead left out.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from adaspec.bench.data import load_questions
from adaspec.core.config import SamplingConfig
from adaspec.core.costmodel import CostAware
from adaspec.core.drafters import DraftContext, PromptLookupDrafter
from adaspec.core.drafters.lookup import AGREEMENT_BINS, MATCH_BINS, acceptance_bin
from adaspec.core.models import encode_prompt, load_model
from adaspec.core.policies import Outcome


def turns(run: Path, data: Path) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, ar's new tokens) for every turn of every `ar` record."""
    config = json.loads((run / "config.json").read_text())
    tokenizer = load_model(config.get("target")).tokenizer
    questions = {q.question_id: q for q in load_questions(data)}
    out = []
    for line in (run / "records.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["method"] != "ar":
            continue
        messages, at = [], 0
        for turn, text, n in zip(questions[r["question_id"]].turns, r["turns"], r["turn_new_tokens"], strict=True):
            messages.append({"role": "user", "content": turn})
            out.append((encode_prompt(tokenizer, messages, config.get("chat", True)), r["token_ids"][at: at + n]))
            messages.append({"role": "assistant", "content": text})
            at += n
    return out


def bins(drafter: PromptLookupDrafter, ids: list[int], draft: list[int]) -> list[tuple[int, int]]:
    """(match-length bin, agreement bin) of each drafted token, as core/drafters/lookup.acceptance bins them."""
    _, match = drafter.source(ids)
    return [acceptance_bin(match + i, drafter.agreement(ids[-drafter.max_ngram:] + draft[:i], token))
            for i, token in enumerate(draft)]


def table(data: list[tuple[list[int], list[int]]], k: int) -> dict[tuple[int, int], list[int]]:
    counts: dict[tuple[int, int], list[int]] = defaultdict(lambda: [0, 0])
    for prompt, gen in data:
        drafter = PromptLookupDrafter()
        for t in range(len(gen)):
            ids = prompt + gen[:t]
            draft = drafter.propose(DraftContext(ids, k, SamplingConfig())).tokens[: len(gen) - t]
            if not draft:
                continue
            for i, (b, token) in enumerate(zip(bins(drafter, ids, draft), draft, strict=True)):
                kept = token == gen[t + i]
                counts[b][0] += kept
                counts[b][1] += 1
                if not kept:
                    break
    return counts


def replay(data: list[tuple[list[int], list[int]]], ratios: dict[int, float], oracle: bool) -> tuple[float, float]:
    tokens = cost = forwards = 0.0
    for prompt, gen in data:
        policy, drafter = CostAware(ratios, 0.0, k_max=8), PromptLookupDrafter()
        ids, t = list(prompt), 0
        while t < len(gen):
            draft = drafter.propose(DraftContext(ids, min(policy.draft_length(), len(gen) - t), SamplingConfig(),
                                                 keep_drafting=policy.keep_drafting))
            k = policy.verify_length(draft.confidence)
            kept = next((i for i, d in enumerate(draft.tokens) if d != gen[t + i]), len(draft))
            if oracle:
                k = max(range(kept + 1), key=lambda j: (j + 1) / policy.cost[j])
            emitted = gen[t: t + min(kept, k) + 1]
            policy.observe(Outcome(k, min(kept, k), draft.tokens, draft.confidence, emitted))
            ids += emitted
            t += len(emitted)
            tokens, cost, forwards = tokens + len(emitted), cost + policy.cost[k], forwards + 1
    return tokens / cost, tokens / forwards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--data", type=Path, default=None, help="the questions (default: the run's config)")
    parser.add_argument("--table", action="store_true", help="print the measured acceptance table")
    args = parser.parse_args()
    config = json.loads((args.run / "config.json").read_text())
    data = turns(args.run, args.data or Path(config["data"]))
    costs = json.loads((args.run / "costs.json").read_text())
    ratios = {int(n): r for n, r in costs["verify_ratio"].items()}
    print(f"{len(data)} turns, {sum(len(g) for _, g in data)} tokens; verify curve {ratios}")
    if args.table:
        counts = table(data, 8)
        print("P(kept | the ones before kept) by match length (rows, upper bounds) and agreement (< 0.5, < 0.75, "
              ">= 0.75), with counts:")
        for row, top in enumerate([*MATCH_BINS, "inf"]):
            cells = [f"{counts[(row, a)][0] / counts[(row, a)][1]:.3f} ({counts[(row, a)][1]})"
                     if counts[(row, a)][1] else "-" for a in range(len(AGREEMENT_BINS) + 1)]
            print(f"  m <= {top}: " + "  ".join(cells))
    for name, oracle in (("lookup + CostAware", False), ("oracle length", True)):
        per_cost, per_forward = replay(data, ratios, oracle)
        print(f"{name}: {per_cost:.3f} tokens per verify cost, {per_forward:.3f} tokens per forward")


if __name__ == "__main__":
    main()
