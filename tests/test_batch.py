"""The batched engine: a sequence decoded among others gives the tokens it gets alone (greedy, and sampling with its
own seed), whatever joins or leaves around it; lossless sampling stays lossless; the cost rule drafts where it pays
and stops where it does not; bad requests fail alone."""

from __future__ import annotations

import copy

import pytest
from conftest import random_prompt, tiny_llama
from test_lossless import PROMPT, T1, TOKENS, N, V, exact_joint, fit_pvalue

from adaspec.core.backends import TorchBackend
from adaspec.core.backends.batched import TorchBatchBackend
from adaspec.core.batch import BatchEngine, Request
from adaspec.core.config import GenerationConfig, SamplingConfig
from adaspec.core.costmodel import BatchCosts, ContextCost, CostAware, measure_batch_costs, plan_lengths, token_rates
from adaspec.core.decode import Decoding, StopCriteria, generate
from adaspec.core.drafters import PromptLookupDrafter
from adaspec.core.errors import AdaspecError
from adaspec.core.policies import ConfidenceLength, FixedLength
from adaspec.core.verify import TopBetaTau

MAX_NEW = 24
PROMPTS = [random_prompt(seed, length=1 + (7 * seed) % 40) for seed in range(14)]  # lengths 1..40
CHEAP = BatchCosts({1: 10.0, 64: 12.0})  # scoring more positions costs almost nothing: drafting pays
STEEP = BatchCosts({1: 10.0, 2: 20.0, 64: 640.0})  # every position costs a step: drafting never pays
FREE = CostAware({n: 1.0 + 0.01 * n for n in range(1, 10)})  # a free drafter's cost-aware policy
# (drafter, policy, rule) per method: ar, fixed-k lookup, cost-aware lookup, CM-ASD's adaptive length, SpecDec
METHODS = {
    "ar": (None, FixedLength(1), None),
    "sd:k=3": (PromptLookupDrafter(), FixedLength(3), None),
    "sd:k=auto": (PromptLookupDrafter(), FREE, None),
    "cmasd-k": (PromptLookupDrafter(), ConfidenceLength(), None),
    "specdec": (PromptLookupDrafter(), FixedLength(4), TopBetaTau(beta=3, tau_base=0.5)),
}


@pytest.fixture(scope="module")
def model():
    return tiny_llama(0, scale=8.0)


@pytest.fixture(scope="module")
def alone(model) -> dict[str, list[list[int]]]:
    """Every method's greedy output on every prompt, decoded alone by the one-sequence loop."""
    backend = TorchBackend(model)
    config = GenerationConfig(max_new_tokens=MAX_NEW)
    return {name: [generate(backend, p, config, copy.deepcopy(d), copy.deepcopy(pol), rule).token_ids
                   for p in PROMPTS]
            for name, (d, pol, rule) in METHODS.items()}


def request(prompt: list[int], method: str, config: GenerationConfig, tag: object = None, stop=None) -> Request:
    drafter, policy, rule = METHODS[method]

    def start() -> Decoding:
        return Decoding(prompt, config, 256, copy.deepcopy(drafter), copy.deepcopy(policy), rule, stop,
                        __import__("torch").Generator().manual_seed(config.seed))

    return Request(prompt, start, tag=tag)


@pytest.mark.parametrize("slots,chunk,costs", [(1, 256, None), (4, 256, CHEAP), (5, 7, STEEP), (16, 3, CHEAP)])
def test_greedy_sequences_in_a_batch_equal_each_decoded_alone(model, alone, slots, chunk, costs):
    # mixed methods, prompt lengths and budgets; more requests than slots, so sequences join as others leave, and
    # long prompts are prefilled in chunks of `chunk` while the others step
    engine = BatchEngine(TorchBatchBackend(model, slots, context=256), costs, prefill_chunk=chunk)
    config = GenerationConfig(max_new_tokens=MAX_NEW)
    jobs = [(i, name) for name in METHODS for i in range(len(PROMPTS))]
    jobs = jobs[slots % 3:] + jobs[: slots % 3]  # another join order per case
    done = engine.run([request(PROMPTS[i], name, config, (i, name)) for i, name in jobs])
    for s in done:
        i, name = s.request.tag
        assert s.result.token_ids == alone[name][i], (name, i)
        assert sum(len(st.tokens) for st in s.result.steps) == len(s.result.token_ids)
        assert all(1 <= st.batch <= slots for st in s.result.steps)


def test_a_sequence_joining_a_running_batch_leaves_the_others_unchanged(model, alone):
    engine = BatchEngine(TorchBatchBackend(model, 4, context=256), CHEAP, prefill_chunk=5)
    config = GenerationConfig(max_new_tokens=MAX_NEW)
    first = engine.submit(request(PROMPTS[3], "sd:k=auto", config))
    for _ in range(3):
        engine.step()
    late = [engine.submit(request(PROMPTS[i], "ar", config)) for i in (9, 13)]
    while not engine.idle:
        engine.step()
    assert first.result.token_ids == alone["sd:k=auto"][3]
    assert [s.result.token_ids for s in late] == [alone["ar"][9], alone["ar"][13]]


def test_sampled_sequences_with_a_fixed_length_equal_themselves_alone(model):
    # each sequence draws from its own generator, seeded by its request: the batch does not change its draws
    backend = TorchBackend(model)
    sampling = SamplingConfig(temperature=0.9, top_k=20)
    configs = [GenerationConfig(max_new_tokens=MAX_NEW, sampling=sampling, seed=s) for s in range(6)]
    expected = [generate(backend, PROMPTS[s], c, PromptLookupDrafter(), FixedLength(3)).token_ids
                for s, c in enumerate(configs)]
    engine = BatchEngine(TorchBatchBackend(model, 3, context=256), None)
    done = engine.run([request(PROMPTS[s], "sd:k=3", c) for s, c in enumerate(configs)])
    assert [s.result.token_ids for s in done] == expected


def test_lossless_sampling_stays_lossless_under_the_batch_cost_rule():
    # the cost rule cuts each draft by what else is in the batch: the law of the tokens must not move
    target = tiny_llama(10, vocab=V, layers=1, scale=10.0)
    joint = exact_joint(target, T1)
    engine = BatchEngine(TorchBatchBackend(target, 16, context=64), CHEAP, learn=False)  # the curve as given
    policy = CostAware({n: 1.0 for n in range(1, 10)})

    def start(seed: int) -> Decoding:
        config = GenerationConfig(max_new_tokens=TOKENS, sampling=T1, seed=seed)
        return Decoding(PROMPT, config, 64, PromptLookupDrafter(), copy.deepcopy(policy), None, None,
                        __import__("torch").Generator().manual_seed(seed))

    done = engine.run([Request(PROMPT, lambda s=seed: start(s)) for seed in range(N)])
    drafted = sum(st.drafted for s in done for st in s.result.steps)
    assert drafted > N // 10  # the rule let drafts through (from the step after the prompt; fewer past its margin)
    assert fit_pvalue([tuple(s.result.token_ids[:TOKENS]) for s in done], joint) > 1e-3


def test_the_cost_rule_drafts_where_scoring_is_cheap_and_not_where_it_is_steep():
    sure = [[0.9, 0.81, 0.73]] * 4
    assert plan_lengths(sure, 4, 4.0, CHEAP) == [3, 3, 3, 3]
    assert plan_lengths(sure, 4, 4.0, STEEP) == [0, 0, 0, 0]
    # in between: each further position costs 10 % of a step; a token pays where its gain beats the tokens per position
    # the call already makes (3.85 / 13 ms with the first two drafts: 0.296 a position)
    mid = BatchCosts({1: 10.0, 64: 10.0 + 63.0})
    assert plan_lengths([[0.95, 0.9, 0.2], [0.25, 0.1, 0.05]], 2, 2.0, mid) == [2, 0]


def test_the_cost_rule_drafts_less_as_the_batch_grows():
    # a compute-bound call: 4 positions cost 2 steps, 16 cost 6, 64 cost 22
    costs = BatchCosts({1: 10.0, 4: 20.0, 16: 60.0, 64: 220.0})
    gains = [0.8, 0.64, 0.51, 0.41, 0.33]
    drafted = [sum(plan_lengths([gains] * b, b, float(b), costs)) / b for b in (1, 4, 16)]
    assert drafted[0] > drafted[1] > drafted[2]


def test_the_cost_rule_drafts_less_for_a_sequence_whose_long_context_makes_each_position_dear():
    costs = BatchCosts({1: 10.0, 4: 20.0, 16: 60.0, 64: 220.0})
    sure = [[0.9, 0.81, 0.73]] * 2
    assert plan_lengths(sure, 2, 2.0, costs) == [3, 3]
    assert plan_lengths(sure, 2, 2.0, costs, [0.0, 0.0], 0.0) == [3, 3]  # nothing beyond the curve: the same
    # the second sequence's positions cost 20 ms more each (attention over its long context): only the first drafts
    assert plan_lengths(sure, 2, 2.0, costs, [0.0, 20.0], 20.0) == [3, 0]
    # both dear, as dear as a plain step: nothing drafted pays
    assert plan_lengths(sure, 2, 2.0, costs, [40.0, 40.0], 80.0) == [0, 0]


def test_the_cost_rule_weighs_the_pass_each_further_row_length_costs():
    costs = BatchCosts({1: 10.0, 4: 20.0, 16: 60.0, 64: 220.0})
    sure = [[0.9, 0.81, 0.73]] * 2
    assert plan_lengths(sure, 2, 2.0, costs, split_ms=1000.0) == [3, 3]  # rows of one length: no further pass
    assert plan_lengths(sure, 3, 3.0, costs, split_ms=1000.0, fixed_lengths=[1]) == [0, 0]  # a plain row beside
    assert plan_lengths(sure, 3, 3.0, costs, split_ms=0.0, fixed_lengths=[1]) == [3, 3]


def test_the_context_cost_is_learned_from_what_calls_cost_beyond_the_curve():
    cost = ContextCost(context=256)
    assert cost.beyond(1, 200) == 0 and cost.beyond(4, 1258) == 4 * 1000
    for end in (300, 600, 1200, 2400, 900):  # calls that each cost 0.002 ms per position per context token beyond
        x = sum(cost.beyond(n, end + 10 * n) for n in (1, 3))
        cost.observe(50.0, 50.0 + 0.002 * x, x)
    assert abs(cost.per_token - 0.002) < 1e-9
    cost.observe(50.0, 40.0, 1e9)  # cheaper than the curve says: never below zero
    assert cost.per_token == 0.0
    both = ContextCost(context=256, decay=1.0)
    for x, splits in ((1000, 0), (3000, 1), (500, 2), (8000, 1), (2000, 3)):  # 0.002 ms a token beyond, 7 ms a pass
        both.observe(50.0, 50.0 + 0.002 * x + 7.0 * splits, x, splits)
    assert abs(both.per_token - 0.002) < 1e-6 and abs(both.per_split - 7.0) < 1e-6


def test_token_rates_come_from_cost_aware_policies_only():
    assert token_rates(FixedLength(3), [0.9, 0.9]) is None
    assert token_rates(ConfidenceLength(), [0.9]) is None
    rates = token_rates(copy.deepcopy(FREE), [0.95, 0.2])
    assert len(rates) == 2 and rates[0] > rates[1]


def test_measured_costs_cover_every_size_and_grow(model):
    backend = TorchBatchBackend(model, 4, context=128)
    ms = measure_batch_costs(backend, list(range(1, 40)), sizes=(1, 2, 8, 16), repeats=2)
    assert set(ms) == {1, 2, 8, 16} and all(v > 0 for v in ms.values())
    assert backend.tokens == [[]] * 4  # the slots are left empty


def test_a_request_that_does_not_fit_fails_alone(model, alone):
    engine = BatchEngine(TorchBatchBackend(model, 2, context=64), None)
    config = GenerationConfig(max_new_tokens=MAX_NEW)
    too_long = engine.submit(request(list(range(50)), "ar", config))
    fine = engine.submit(request(PROMPTS[2], "ar", config))
    while not engine.idle:
        engine.step()
    assert isinstance(too_long.error, AdaspecError) and "context" in str(too_long.error)
    assert too_long.result is None
    assert fine.result.token_ids == alone["ar"][2]


def test_stop_strings_and_eos_end_a_sequence_in_a_batch(model, alone):
    config = GenerationConfig(max_new_tokens=MAX_NEW)
    target = alone["ar"][4]
    stop = StopCriteria(frozenset({target[5]}))  # the 6th token ends it as EOS
    engine = BatchEngine(TorchBatchBackend(model, 3, context=256), CHEAP)
    s = engine.run([request(PROMPTS[4], "ar", config, stop=stop), request(PROMPTS[5], "ar", config)])
    cut = target.index(target[5]) + 1
    assert s[0].result.token_ids == target[:cut] and s[0].result.stop_reason == "eos"
    assert s[1].result.token_ids == alone["ar"][5]


def test_a_batch_backend_needs_a_slot_and_refuses_a_slot_twice_in_a_call(model):
    with pytest.raises(AdaspecError, match="slot"):
        TorchBatchBackend(model, 0)
    backend = TorchBatchBackend(model, 2, context=32)
    with pytest.raises(AdaspecError, match="twice"):
        backend.sync([(0, [1, 2], 1), (0, [1, 2, 3], 1)])


@pytest.mark.bundled
@pytest.mark.parametrize("flash", [False, True])
def test_greedy_sequences_batched_on_llamacpp_equal_each_decoded_alone(monkeypatch, flash):
    # the bundled GGUF, real prompts of 40-700 tokens, more requests than slots. Flash attention off: alone is the
    # one-sequence loop, which runs without it. On: alone is the batched engine with one slot and whole-prompt chunks
    # (the server's request served alone); the prompts here go in chunks of 64 beside the others' steps
    from test_llamacpp import _have_llama_cpp

    if not _have_llama_cpp():
        pytest.skip("the llamacpp extra is not installed")
    from adaspec.bench.data import DEFAULT_DATA, load_questions
    from adaspec.core.backends.llamacpp import LlamaCppBatchBackend, probe_build
    from adaspec.core.config import BackendChoice
    from adaspec.core.costmodel import machine_costs
    from adaspec.core.models import encode_prompt, load_model
    from adaspec.methods import build_runner, parse_method

    target = load_model()
    if flash and not probe_build(target.gguf)["flash_exact"]:
        pytest.skip("this llama.cpp build does not keep flash attention exact (scripts/setup.sh patches it)")
    monkeypatch.setenv("ADASPEC_FLASH_ATTN", "1" if flash else "0")
    questions = load_questions(DEFAULT_DATA, None, 1)[:7]
    prompts = [encode_prompt(target.tokenizer, q.turns[0]) for q in questions]
    config = GenerationConfig(max_new_tokens=24)
    runners = [build_runner(parse_method(m), target, "lookup", config, BackendChoice("llamacpp"))
               for m in ("ar", "sd", "sd:k=3")]
    backend = LlamaCppBatchBackend(target.gguf, 3, context=1024)
    assert backend.llm.flash_attn == flash
    engine = BatchEngine(backend, machine_costs(backend, target.name), prefill_chunk=64)
    one = LlamaCppBatchBackend(target.gguf, 1, context=1024) if flash else None
    for runner in runners:
        if one is None:
            alone = [runner(p, config).token_ids for p in prompts]
        else:
            single = BatchEngine(one, None, prefill_chunk=1024)
            alone = [single.run([Request(p, lambda p=p, r=runner: r.decoding(p, config, one.max_context))])[0]
                     .result.token_ids for p in prompts]
        done = engine.run([Request(p, lambda p=p, r=runner: r.decoding(p, config, backend.max_context))
                           for p in prompts])
        assert [s.result.token_ids for s in done] == alone, runner.label


def test_the_batch_size_table_drafts_by_the_number_of_sequences_in_the_call(model):
    from adaspec.core.policies import BatchTable

    table = BatchTable({1: 4, 2: 2, 4: 0})
    assert [BatchTable(table.table, b).draft_length() for b in (1, 2, 3, 4, 9)] == [4, 2, 2, 0, 0]
    engine = BatchEngine(TorchBatchBackend(model, 4, context=256), None)
    prompt = [5, 6, 7, 8] * 6  # repeats: lookup always finds a draft
    configs = [GenerationConfig(max_new_tokens=n) for n in (3, 6, 12, 24)]  # they leave one by one
    starts = [lambda c=c: Decoding(prompt, c, 256, PromptLookupDrafter(), copy.deepcopy(table)) for c in configs]
    done = engine.run([Request(prompt, s) for s in starts])
    steps = [st for s in done for st in s.result.steps]
    assert all(st.drafted == 0 for st in steps if st.batch == 4)
    assert all(st.drafted <= 2 for st in steps if st.batch in (2, 3)) and any(st.drafted for st in steps)
    with pytest.raises(AdaspecError, match="batch size 1"):
        BatchTable({2: 1})


def test_a_cancelled_sequence_frees_its_slot_and_leaves_the_others_unchanged(model, alone):
    engine = BatchEngine(TorchBatchBackend(model, 2, context=256), CHEAP)
    config = GenerationConfig(max_new_tokens=MAX_NEW)
    gone = engine.submit(request(PROMPTS[6], "sd:k=auto", config))
    kept = engine.submit(request(PROMPTS[7], "sd:k=3", config))
    queued = engine.submit(request(PROMPTS[8], "ar", config))  # waits for a slot
    never = engine.submit(request(PROMPTS[9], "ar", config))
    engine.step()
    engine.cancel(gone)
    engine.cancel(never)
    while not engine.idle:
        engine.step()
    assert gone.result is None and never.result is None and never.slot is None
    assert kept.result.token_ids == alone["sd:k=3"][7] and queued.result.token_ids == alone["ar"][8]


def test_llamacpp_rows_go_in_slot_order_and_logits_come_back_in_the_callers_order():
    """llama.cpp's split_equal makes one pass per run of consecutive sequence ids in the batch: rows out of slot order
    would cost a pass each. The backend sorts them, and hands each row its own logits back."""
    import torch

    from adaspec.core.backends.batched import Row
    from adaspec.core.backends.llamacpp import LlamaCppBatchBackend

    class FakeLlm:
        def decode_rows(self, rows):
            self.fed = rows

        def logits(self, outputs):  # row i of the fed batch: logits filled with its slot
            return torch.cat([torch.full((keep, 3), float(slot)) for slot, _, _, keep in self.fed])

    backend = object.__new__(LlamaCppBatchBackend)
    backend.llm, backend.max_call, backend.passes, backend.piece = FakeLlm(), 64, None, 64
    rows = [Row(5, 0, [1, 2], 2), Row(1, 0, [3], 1), Row(3, 4, [4, 5, 6], 0), Row(2, 0, [7], 1)]
    out = backend._forward(rows)
    assert [slot for slot, *_ in backend.llm.fed] == [1, 2, 3, 5]
    assert [o.shape[0] for o in out] == [2, 1, 0, 1]
    assert [o[0, 0].item() for o in out if len(o)] == [5.0, 1.0, 2.0]


def test_a_sequence_takes_the_lowest_free_slot(model):
    engine = BatchEngine(TorchBatchBackend(model, 4, context=256), CHEAP)
    long = GenerationConfig(max_new_tokens=MAX_NEW)
    runs = [engine.submit(request(PROMPTS[i], "ar", GenerationConfig(max_new_tokens=n) if n else long))
            for i, n in enumerate((0, 2, 0, 4))]
    engine.step()
    assert [s.slot for s in runs] == [0, 1, 2, 3]
    while runs[3].result is None:  # slot 1 frees first, then slot 3
        engine.step()
    joining = engine.submit(request(PROMPTS[4], "ar", long))
    engine.step()
    assert joining.slot == 1  # the lowest hole, not the slot freed last


def test_a_long_sequence_goes_in_a_call_of_its_own_where_its_attention_costs_more_than_a_pass():
    from adaspec.core.backends.llamacpp import PassCosts, plan_passes

    costs = PassCosts(fixed=4.6, row=2.5, kv=0.003)  # measured on the bundled model, 2-core AMD EPYC
    rows = [(slot, 1, 2000 if slot == 5 else 200) for slot in range(16)]
    assert plan_passes(rows, costs) == [5, 6]  # slots 0-4, slot 5, slots 6-15
    assert plan_passes([(slot, 1, 200) for slot in range(16)], costs) == []
    assert plan_passes(rows, PassCosts(4.6, 2.5, 0.0)) == []  # attention free: one call
    assert plan_passes([(0, 1, 200), (1, 1, 2000)], PassCosts(50.0, 2.5, 0.003)) == []  # a pass dearer than it saves
    verify = [(0, 4, 300), (1, 1, 300), (2, 4, 300)]  # unequal rows cost passes whether cut or not
    assert plan_passes(verify, costs) in ([], [1, 2])


def test_llamacpp_calls_cut_in_groups_return_each_rows_logits():
    import torch

    from adaspec.core.backends.batched import Row
    from adaspec.core.backends.llamacpp import LlamaCppBatchBackend, PassCosts

    class FakeLlm:
        calls: list = []

        def decode_rows(self, rows):
            self.calls.append([slot for slot, *_ in rows])
            self.fed = rows

        def logits(self, outputs):
            return torch.cat([torch.full((keep, 3), float(slot)) for slot, _, _, keep in self.fed])

    backend = object.__new__(LlamaCppBatchBackend)
    backend.llm, backend.max_call, backend.passes, backend.piece = FakeLlm(), 64, PassCosts(4.6, 2.5, 0.003), 64
    rows = [Row(3, 100, [1], 1), Row(0, 100, [2], 1), Row(1, 1900, [3, 4], 2), Row(2, 100, [5], 1)]
    out = backend._forward(rows)
    assert backend.llm.calls == [[0], [1], [2, 3]]
    assert [o[:, 0].tolist() for o in out] == [[3.0], [0.0], [1.0, 1.0], [2.0]]


def test_with_flash_attention_no_sequence_feeds_more_than_its_row_by_row_size_a_pass():
    """Flash attention tiles a sequence's query rows from FA_ROWS + 1 on (rounding each by its neighbours): the
    backend feeds a longer row in pieces, one pass after another, and hands back the logits of the row's last
    `keep` positions whichever pieces they fall in."""
    import torch

    from adaspec.core.backends.batched import Row
    from adaspec.core.backends.llamacpp import LlamaCppBatchBackend

    class FakeLlm:
        calls: list = []

        def decode_rows(self, rows):
            self.calls.append([(slot, start, len(ids), keep) for slot, start, ids, keep in rows])
            self.fed = rows

        def logits(self, outputs):  # the position of each output
            return torch.cat([torch.arange(start + len(ids) - keep, start + len(ids), dtype=torch.float)[:, None]
                              .expand(keep, 3) for _, start, ids, keep in self.fed])

    backend = object.__new__(LlamaCppBatchBackend)
    backend.llm, backend.max_call, backend.passes, backend.piece = FakeLlm(), 512, None, 63
    rows = [Row(0, 10, list(range(130)), 66), Row(1, 0, [1, 2], 2), Row(2, 5, list(range(64)), 0)]
    out = backend._forward(rows)
    assert backend.llm.calls == [[(0, 10, 63, 0), (1, 0, 2, 2), (2, 5, 63, 0)],
                                 [(0, 73, 63, 62), (2, 68, 1, 0)],
                                 [(0, 136, 4, 4)]]
    assert out[0][:, 0].tolist() == list(range(74, 140)) and out[1][:, 0].tolist() == [0, 1]
    assert out[2].shape == (0, 3)


@pytest.mark.bundled
@pytest.mark.parametrize("rows_exact", [False, True])
def test_flash_attention_feeds_pieces_only_on_a_build_that_needs_them(monkeypatch, rows_exact):
    # stock llama.cpp rounds a pass of more than FA_ROWS rows of a sequence apart; scripts/setup.sh's build does not
    from test_llamacpp import _have_llama_cpp

    if not _have_llama_cpp():
        pytest.skip("the llamacpp extra is not installed")
    from adaspec.core.backends import llamacpp
    from adaspec.core.models import bundled_gguf

    monkeypatch.setattr(llamacpp, "flash_rows_exact", lambda *_: rows_exact)
    flash = llamacpp.LlamaCppBatchBackend(bundled_gguf(), 2, context=256, flash_attn=True)
    plain = llamacpp.LlamaCppBatchBackend(bundled_gguf(), 2, context=256, flash_attn=False)
    assert flash.piece == (flash.max_call if rows_exact else llamacpp.FA_ROWS) and plain.piece == plain.max_call


@pytest.mark.bundled
def test_llamacpp_logits_are_the_same_with_calls_cut_or_whole(monkeypatch):
    """A long sequence beside short ones: the backend cuts the call in two (its pass costs say so), and every row
    gets the logits it gets in one whole call and alone."""
    import torch
    from test_llamacpp import _have_llama_cpp

    if not _have_llama_cpp():
        pytest.skip("the llamacpp extra is not installed")
    from adaspec.core.backends.llamacpp import LlamaCppBatchBackend, PassCosts
    from adaspec.core.models import bundled_gguf

    monkeypatch.setenv("ADASPEC_FLASH_ATTN", "0")
    cut = LlamaCppBatchBackend(bundled_gguf(), 4, context=2048, threads=2)
    whole = LlamaCppBatchBackend(bundled_gguf(), 4, context=2048, threads=2, split=False)
    assert cut.passes is not None and whole.passes is None  # measured (and cached) for the first
    cut.passes = PassCosts(2.9, 3.0, 0.0023)  # as measured on a quiet 2-core AMD EPYC: a busy CI machine may differ
    contexts = [[(7 * i + s) % 5000 + 100 for i in range(n)] for s, n in enumerate((60, 1500, 80, 70))]
    got = {}
    for name, backend in (("cut", cut), ("whole", whole)):
        calls = []
        backend.llm.decode_rows = lambda rows, f=backend.llm.decode_rows, c=calls: (c.append(len(rows)), f(rows))[1]
        for slot, ids in enumerate(contexts):  # prefill each alone
            for end in range(256, len(ids) + 256, 256):
                backend.sync([(slot, ids[: min(end, len(ids))], 0)])
        calls.clear()
        got[name] = backend.sync([(s, ids + [11, 12][: 1 + s % 2], 1 + s % 2) for s, ids in enumerate(contexts)])
        got[name + " calls"] = list(calls)
        alone = []
        for s, ids in enumerate(contexts):
            backend.rollback(s, len(ids))
            alone.append(backend.sync([(s, ids + [11, 12][: 1 + s % 2], 1 + s % 2)])[0])
        got[name + " alone"] = alone
    assert len(got["cut calls"]) > 1 and got["whole calls"] == [4]
    for a, b, c in zip(got["cut"], got["whole"], got["cut alone"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_a_prompt_reuses_the_keys_a_finished_sequence_left_of_its_start(model):
    # as a shared system prompt or a conversation's earlier turns: only the rest is prefilled, and the answer is the
    # one decoded alone; a free slot holding 64 more of the prompt than the lowest free slot is taken instead of it
    engine = BatchEngine(TorchBatchBackend(model, 3, context=256), CHEAP)
    fed = []
    forward = engine.backend._forward
    engine.backend._forward = lambda rows: (fed.append({r.slot: len(r.ids) for r in rows}), forward(rows))[1]
    config = GenerationConfig(max_new_tokens=6)
    system = random_prompt(99, length=100)
    engine.run([request(p, "ar", config) for p in (PROMPTS[1], PROMPTS[2], system + PROMPTS[3])])
    fed.clear()
    again = system + random_prompt(13, length=7)
    done = engine.run([request(again, "sd:k=3", config)])[0]
    assert done.slot == 2 and fed[0] == {2: 7 + done.result.steps[0].drafted}  # its first 100 positions reused
    drafter, policy, _ = METHODS["sd:k=3"]
    assert done.result.token_ids == generate(TorchBackend(model), again, config, copy.deepcopy(drafter),
                                             copy.deepcopy(policy)).token_ids
    fed.clear()
    short = engine.run([request(system[:60] + [1, 2], "ar", config)])[0]  # 60 held: not worth leaving slot 0
    assert short.slot == 0 and fed[0] == {0: 62}


def test_a_long_prompt_takes_the_highest_free_slot(model, monkeypatch):
    monkeypatch.setattr("adaspec.core.batch.BATCH_LONG_PROMPT", 40)  # the tiny model's context is short
    engine = BatchEngine(TorchBatchBackend(model, 4, context=256), CHEAP)
    config = GenerationConfig(max_new_tokens=4)
    long = [5, 6, 7, 8] * 12
    runs = [engine.submit(request(p, "ar", config)) for p in (PROMPTS[0][:20], long, PROMPTS[1][:20])]
    engine.step()
    assert [s.error for s in runs] == [None] * 3
    assert [s.slot for s in runs] == [0, 3, 1]


def test_the_cost_rule_drafts_only_where_that_beats_not_drafting_by_the_margin():
    costs = BatchCosts({1: 10.0, 2: 15.0, 8: 45.0})  # a position beyond the first costs 5 ms
    just = [[0.7], [0.0]]  # two sequences: 2.7 tokens for 20 ms, 1 % more tokens per ms than 2 for 15
    assert plan_lengths(just, 2, 2.0, costs) == [1, 0]
    assert plan_lengths(just, 2, 2.0, costs, margin=0.05) == [0, 0]
    sure = [[1.0, 1.0, 1.0]] * 2  # 8 tokens for 45 ms: 33 % more
    assert plan_lengths(sure, 2, 2.0, costs, margin=0.05) == [3, 3]
    alone = BatchCosts({1: 10.0, 2: 19.0, 4: 37.0})  # one sequence: 1.95 tokens for 19 ms, 3 % more than 1 for 10
    assert plan_lengths([[0.95]], 1, 1.0, alone, margin=0.05) == [1]  # sd:k=auto's case: no margin
    assert plan_lengths([[0.95]], 2, 2.0, alone, fixed_lengths=[1]) == [1]  # beside another row,
    assert plan_lengths([[0.95]], 2, 2.0, alone, margin=0.05, fixed_lengths=[1]) == [0]  # the margin holds it back
