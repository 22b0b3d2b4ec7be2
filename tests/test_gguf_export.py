"""GGUF export of Llama drafters: the file loads back (transformers, gguf's reader, llama.cpp if installed)
with the original model's logits and the target's tokenizer metadata; bad input gets a clear error."""

from __future__ import annotations

import sys
from pathlib import Path

import gguf
import pytest
import torch
from conftest import full_logits, tiny_llama
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from adaspec.core.drafters import gguf as export
from adaspec.core.errors import AdaspecError

VOCAB = 64
SEQUENCES = [[1, 5, 9, 13, 2, 40, 7], [3, 3, 3, 60, 61, 62], [0, 17, 33, 48, 12, 11, 10, 9]]


def tokenizer_gguf(path: Path, n: int = VOCAB) -> Path:
    """A tensor-free GGUF holding only tokenizer metadata for `n` tokens: a stand-in target, fast to parse."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([f"tok{i}" for i in range(n)])
    writer.add_token_types([gguf.TokenType.NORMAL] * n)
    writer.add_token_merges(["t o", "to k"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template("{{ messages }}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tied_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def reload(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def tensor_names(path: Path) -> set[str]:
    return {t.name for t in gguf.GGUFReader(path).tensors}


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    return tokenizer_gguf(tmp_path_factory.mktemp("tok") / "target.gguf")


@pytest.mark.parametrize(("ftype", "atol"), [("f32", 1e-5), ("f16", 2e-2), ("bf16", 1e-1)])
def test_untied_llama_round_trips_through_transformers(tok, tmp_path, ftype, atol):
    model = tiny_llama(0, scale=4.0)
    path = export.export_gguf(model, tmp_path / f"tiny.{ftype}.gguf", tok, ftype)
    assert "output.weight" in tensor_names(path)
    loaded = reload(path)
    for ids in SEQUENCES:
        torch.testing.assert_close(full_logits(loaded, ids), full_logits(model, ids), atol=atol, rtol=0)


def test_tied_llama_writes_token_embd_only(tok, tmp_path):
    model = tied_llama(1)
    path = export.export_gguf(model, tmp_path / "tied.gguf", tok, "f32")
    assert "output.weight" not in tensor_names(path) and "token_embd.weight" in tensor_names(path)
    loaded = reload(path)
    assert loaded.config.tie_word_embeddings
    for ids in SEQUENCES:
        torch.testing.assert_close(full_logits(loaded, ids), full_logits(model, ids), atol=1e-5, rtol=0)


def test_q8_0_greedy_tokens_mostly_agree(tok, tmp_path):
    model = tiny_llama(2, scale=4.0)
    path = export.export_gguf(model, tmp_path / "tiny.q8_0.gguf", tok, "q8_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32  # 1-D tensors stay f32
    loaded = reload(path)
    agree = [full_logits(loaded, ids).argmax(-1).eq(full_logits(model, ids).argmax(-1)).float().mean()
             for ids in SEQUENCES]
    assert sum(agree) / len(agree) >= 0.8


def test_tokenizer_metadata_and_hparams_are_written(tok, tmp_path):
    model = tiny_llama(3)
    path = export.export_gguf(model, tmp_path / "tiny.gguf", tok, "f16")
    assert export.read_tokenizer(path) == export.read_tokenizer(tok)
    fields = gguf.GGUFReader(path).fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["llama.block_count"].contents() == 2
    assert fields["llama.attention.head_count_kv"].contents() == 2
    assert fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_F16
    assert not list(tmp_path.glob("*.tmp"))  # written under a temporary name, then renamed


def test_bad_inputs_are_adaspec_errors(tok, tmp_path):
    model = tiny_llama(4)
    with pytest.raises(AdaspecError, match="unknown GGUF type 'q4'"):
        export.export_gguf(model, tmp_path / "x.gguf", tok, "q4")
    with pytest.raises(AdaspecError, match="vocabulary"):
        export.export_gguf(tiny_llama(4, vocab=VOCAB + 1), tmp_path / "x.gguf", tok)
    with pytest.raises(AdaspecError, match="only Llama-architecture"):
        export.export_gguf(GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2)),
                           tmp_path / "x.gguf", tok)
    (tmp_path / "file").write_text("")
    with pytest.raises(AdaspecError, match="cannot write the GGUF"):
        export.export_gguf(model, tmp_path / "file" / "x.gguf", tok)
    with pytest.raises(AdaspecError, match="target's .gguf"):
        export.export_gguf(model, tmp_path / "x.gguf", tmp_path / "file")


def test_a_failed_export_leaves_no_file(tok, tmp_path, monkeypatch):
    def disk_full(self, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)  # after the header is on disk
    with pytest.raises(AdaspecError, match="No space left"):
        export.export_gguf(tiny_llama(5), tmp_path / "x.gguf", tok)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nope"], "unknown drafter 'nope'"),
        (["eagle"], "EAGLE head is not a standalone model"),
        (["{gpt2}"], "only Llama-architecture"),
        (["small", "--type", "q4"], "unknown GGUF type 'q4'"),
        (["small", "--target", "/no/such.gguf"], "the target must be 'smollm2' or a .gguf file"),
        (["small", "--out", "{file}/x.gguf"], "cannot write the GGUF"),
    ],
)
def test_cli_bad_input_gets_a_clear_error(tmp_path, monkeypatch, capsys, args, message):
    from adaspec.cli import main

    GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2).save_pretrained(tmp_path / "gpt2")
    (tmp_path / "file").write_text("")
    argv = [a.format(gpt2=tmp_path / "gpt2", file=tmp_path / "file") for a in args]
    monkeypatch.setattr(sys, "argv", ["adaspec", "export-gguf", *argv])
    with pytest.raises(SystemExit) as exit_info:  # any other exception is a traceback for the user
        main()
    assert exit_info.value.code == 2
    assert message in " ".join(capsys.readouterr().err.split())


# The shipped `small` drafter on the bundled target: real tokenizer, real weights.


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The shipped drafter, converted through the cache helper into a temporary cache."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(export, "cache_root", lambda: cache)
        path = export.drafter_gguf("small", "smollm2", "f16")
        again = export.drafter_gguf("small", "smollm2", "f16")
    return path, again


@pytest.mark.bundled
def test_small_is_converted_once_into_the_cache(small):
    path, again = small
    assert again == path and path.parent.name == "gguf" and path.name.endswith(".f16.gguf")
    assert path.stat().st_size > 50e6


@pytest.mark.bundled
def test_small_gguf_carries_the_targets_tokenizer(small):
    from adaspec.core.models import bundled_gguf

    reader = gguf.GGUFReader(small[0])
    assert export.tokenizer_fields(reader) == export.read_tokenizer(bundled_gguf())
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names and len(names) == 2 + 2 * 9  # tied head: token_embd is the output


@pytest.fixture(scope="module")
def small_torch():
    return export.load_for_export("small").model


@pytest.mark.bundled
def test_small_gguf_logits_match_the_torch_drafter(small, small_torch):
    loaded = reload(small[0])
    for ids in ([1, 504, 3458, 282, 4649, 314, 253, 1345], [1, 9690, 198, 2683, 359, 253, 5356, 2]):
        ours, theirs = full_logits(loaded, ids), full_logits(small_torch, ids)
        torch.testing.assert_close(ours, theirs, atol=0.1, rtol=0)
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.bundled
def test_small_gguf_runs_in_llama_cpp(small, small_torch):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(small[0]), logits_all=True, n_ctx=256, verbose=False)
    for ids in ([1, 504, 3458, 282, 4649, 314, 253, 1345], [1, 9690, 198, 2683, 359, 253, 5356, 2], [1, 28, 29]):
        llm.reset()
        llm.eval(ids)
        assert int(llm.scores[len(ids) - 1].argmax()) == int(full_logits(small_torch, ids)[-1].argmax())
