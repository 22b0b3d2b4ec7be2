"""The EAGLE-style head: its cached drafting equals its training-time unroll, and speculative decoding with
it is exactly greedy / lossless whatever the head predicts."""

from __future__ import annotations

import torch
from conftest import naive_greedy, random_prompt, tiny_llama

from adaspec.core.backends import TorchBackend
from adaspec.core.config import GenerationConfig, SamplingConfig
from adaspec.core.decode import generate
from adaspec.core.drafters.base import Hidden
from adaspec.core.drafters.eagle import EagleArtifact, EagleConfig, EagleDrafter, EagleHead
from adaspec.core.policies import FixedLength
from adaspec.train.eagle import (
    EagleTrainConfig,
    batch_tensors,
    extract_features,
    train_eagle,
    unroll_mask,
    unrolled_loss,
)


def make_head(model, seed: int = 0) -> EagleHead:
    torch.manual_seed(seed)
    head = EagleHead(EagleConfig.from_target(model.config))
    head.init_from_target(model)
    return head.eval()


def test_unroll_mask_gives_each_depth_the_context_it_has_when_drafting():
    m = unroll_mask(5, 3)  # depth 3: true keys <= i-2, depth-2 key i-1, depth-3 key i
    assert m.shape == (5, 15)
    assert m[4, :5].tolist() == [True, True, True, False, False]
    assert m[4, 5:10].tolist() == [False, False, False, True, False]
    assert m[4, 10:].tolist() == [False, False, False, False, True]


def test_cached_drafting_equals_the_training_unroll():
    """Depth d of the parallel unroll at index i == drafting d tokens after true positions <= i-d+1."""
    torch.manual_seed(0)
    model = tiny_llama(1)
    head = make_head(model)
    t, depth = 9, 3
    feats = torch.randn(1, t + 1, 32)
    ids = torch.randint(0, 64, (1, t + 1))
    embed = model.get_input_embeddings().weight.detach()
    lm_rows = torch.randn(64, 32)
    item = {"ids": ids[0].tolist(), "start": 1, "feats": feats[0], "top1": torch.zeros(t + 1, dtype=torch.int32)}
    batch = batch_tensors([item], torch.arange(64))
    config = EagleTrainConfig(depth=depth)
    outs = []  # capture each depth's output through the loss function's own path
    feats_in, tokens, _, _ = batch
    positions = torch.arange(1, t + 1)
    keys, values, inputs = [], [], feats_in
    with torch.no_grad():
        for d in range(1, depth + 1):
            x, q, k, v = head.project(inputs, embed[tokens], positions)
            keys.append(k)
            values.append(v)
            out = head.finish(x, q, torch.cat(keys, 2), torch.cat(values, 2), unroll_mask(t, d))
            outs.append(out)
            inputs = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], 1)
        i = 7  # index i <-> drafter position j = i + 1
        for d in range(1, depth + 1):
            cache = head.new_cache(t + 1)
            last_true = i - (d - 1)  # index of the last position computed from true features
            out = head.step(feats_in[:, : last_true + 1], embed[tokens[:, : last_true + 1]], 1, cache)[:, -1:]
            for extra in range(1, d):
                out = head.step(out, embed[tokens[:, last_true + extra: last_true + extra + 1]],
                                last_true + extra + 1, cache)
            torch.testing.assert_close(out[0, 0], outs[d - 1][0, i], atol=1e-5, rtol=1e-5)
    loss, _, _ = unrolled_loss(head, embed, lm_rows, batch, config)
    assert torch.isfinite(loss)


def eagle_pair(seed: int = 3):
    target = tiny_llama(seed, scale=4.0)
    backend = TorchBackend(target)
    artifact = EagleArtifact(make_head(target), list(range(0, 64, 2)) + [63])  # a reduced vocab (sorted)
    artifact.vocab = sorted(set(artifact.vocab))
    return target, backend, EagleDrafter(artifact, target, backend.max_context)


def test_eagle_speculative_decoding_equals_greedy():
    target, backend, drafter = eagle_pair()
    for seed in range(3):
        prompt = random_prompt(seed)
        result = generate(backend, prompt, GenerationConfig(max_new_tokens=24), drafter, FixedLength(4))
        assert result.token_ids == naive_greedy(target, prompt, 24)
        assert result.steps[0].drafted == 0  # the prefill step has no features to draft from
        # every later step drafts, after a rejection too (features of rejected positions are dropped), all but
        # a last step whose budget leaves room for the one token it emits anyway
        assert all(s.drafted > 0 for s in result.steps[1:-1])


def test_a_repeated_proposal_on_the_same_ids_drafts_the_same_tokens():
    """bench's drafter cost proposes again on unchanged ids: nothing new to catch up on must still draft."""
    from adaspec.core.drafters.base import DraftContext

    _, backend, drafter = eagle_pair()
    prompt = random_prompt(2)
    backend.keep_hidden = True
    backend.sync(prompt[:-1])  # as after a step: features for every position but the last token
    drafter.observe(0, prompt, Hidden(backend.hidden_start, backend.hidden))
    ctx = DraftContext(prompt, 4, GenerationConfig().sampling)
    first = drafter.propose(ctx)
    again = drafter.propose(ctx)
    assert len(first) == 4 and again.tokens == first.tokens


def test_eagle_sampling_runs_and_is_reproducible():
    _, backend, drafter = eagle_pair()
    config = GenerationConfig(max_new_tokens=16, sampling=SamplingConfig(temperature=1.0), seed=5)
    a = generate(backend, random_prompt(1), config, drafter, FixedLength(3))
    b = generate(backend, random_prompt(1), config, drafter, FixedLength(3))
    assert a.token_ids == b.token_ids and len(a.token_ids) == 16


def test_artifact_round_trips(tmp_path):
    target, backend, drafter = eagle_pair()
    artifact = EagleArtifact(drafter.head, [1, 5, 9])
    artifact.save(tmp_path / "head", {"note": "test"}, dtype=torch.float32)
    loaded = EagleArtifact.load(tmp_path / "head")
    assert loaded.vocab == [1, 5, 9]
    for (k, a), (_, b) in zip(artifact.head.state_dict().items(), loaded.head.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_features_and_training_run_end_to_end(tmp_path):
    from adaspec.core.models import LoadedModel

    target = tiny_llama(2, scale=4.0)
    model = LoadedModel("tiny", tmp_path, target, None)
    rows = []
    for s in range(12):
        prompt = random_prompt(s, 6)
        rows.append({"prompt": str(s), "prompt_ids": prompt, "completion_ids": naive_greedy(target, prompt, 10)})
    shards = extract_features(model, rows, tmp_path / "feats", rows_per_shard=5, log=lambda *_: None)
    assert len(shards) == 3
    items = [it for p in shards for it in torch.load(p, weights_only=False)]
    assert all(it["top1"][it["start"] - 1:-1].tolist() == it["ids"][it["start"]:] for it in items)  # greedy rows
    config = EagleTrainConfig(vocab=40, batch_size=4, epochs=3, eval_every=5, holdout=0.2, warmup=2, lr=3e-3)
    report = train_eagle(model, rows, items, tmp_path / "run", config, log=lambda *_: None)
    assert report["history"][-1]["loss"] < report["history"][0]["loss"]
    assert (tmp_path / "run" / "model" / "eagle_head.safetensors").exists()
