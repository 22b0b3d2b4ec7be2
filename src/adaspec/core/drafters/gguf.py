"""Export a Llama-architecture drafter (the shipped `small`, or any local HF Llama) as a GGUF for llama.cpp.

The tensors are named and the q/k projections permuted as llama.cpp's `convert_hf_to_gguf.py` does for
`llama`; the tokenizer metadata (`tokenizer.*`) is copied verbatim from the target's own GGUF, so token
ids are the target's. `drafter_gguf` converts a drafter once into the user cache, like `models.convert_gguf`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import PreTrainedModel

from adaspec.core.errors import AdaspecError
from adaspec.core.models import BUNDLED, LoadedModel, bundled_gguf, cache_root

ARCH = "llama"
FTYPES: dict[str, tuple[gguf.LlamaFileType, gguf.GGMLQuantizationType]] = {
    "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
}
EXPORT_FTYPE = "f16"  # an exported drafter's type unless told (`adaspec export-gguf --type`)
TOKENIZER_PREFIX = "tokenizer."
Fields = dict[str, tuple[object, gguf.GGUFValueType, gguf.GGUFValueType | None]]  # key -> (value, type, item type)
SHIPPED_KINDS = ("small",)  # the shipped standalone drafter; an EAGLE head is not a model llama.cpp can run


def export_gguf(model: LoadedModel | PreTrainedModel, out: Path, tokenizer_source: Path,
                ftype: str = EXPORT_FTYPE) -> Path:
    """Write `model` (a Llama, e.g. `load_standalone`'s result) as a llama-architecture GGUF at `out`.

    `tokenizer_source` is the target's GGUF: its `tokenizer.*` keys are copied, so token ids match the
    target's. 1-D tensors (norms) stay f32, as llama.cpp's converter keeps them; with q8_0 a matrix whose
    rows are not a multiple of 32 falls back to f16. Tied embeddings write `token_embd` only (llama.cpp
    then uses it as the output head), untied ones `output.weight` too. A trained drafter's reduced-vocabulary
    head (`adaspec_vocab.json`) is not representable in GGUF: the full-vocabulary head is written, so
    llama.cpp drafts over all tokens where the torch path drafts over the reduced list.
    Written to a temporary name and renamed, so an interrupted export never leaves a partial file.
    """
    if ftype not in FTYPES:
        raise AdaspecError(f"unknown GGUF type '{ftype}'; choose one of {', '.join(FTYPES)}")
    hf = model.model if isinstance(model, LoadedModel) else model
    check_llama(hf)
    tokenizer = read_tokenizer(Path(tokenizer_source))
    check_vocab(hf, tokenizer, model.tokenizer if isinstance(model, LoadedModel) else None)
    file_type, qtype = FTYPES[ftype]
    name = model.name if isinstance(model, LoadedModel) else getattr(hf.config, "_name_or_path", "") or "drafter"
    out = prepare_out(out)
    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, ARCH)
    try:
        write_hparams(writer, hf.config, str(name), file_type)
        for key, (value, vtype, sub_type) in tokenizer.items():
            writer.add_key_value(key, value, vtype, sub_type)
        for tensor_name, tensor in llama_tensors(hf):
            data, data_type = encode(tensor, qtype)
            writer.add_tensor(tensor_name, data, raw_dtype=data_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except OSError as e:
        raise AdaspecError(f"cannot write the GGUF to {out}: {e}; choose a writable --out") from e
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)  # left behind only by a failed export
    return out


def check_llama(model: PreTrainedModel) -> None:
    """Only plain Llama decoders map onto llama.cpp's `llama` architecture as written here."""
    config = model.config
    if config.model_type != ARCH:
        raise AdaspecError(f"only Llama-architecture models export to GGUF here; this one is "
                           f"'{config.model_type}' (use llama.cpp's convert_hf_to_gguf.py for others)")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise AdaspecError("this Llama has attention or MLP biases, which the GGUF export does not write")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise AdaspecError(f"rope scaling '{rope['rope_type']}' is not supported by the GGUF export")


def read_tokenizer(source: Path) -> Fields:
    """The `tokenizer.*` keys of a GGUF file: key -> (value, type, array element type)."""
    if source.suffix != ".gguf" or not source.is_file():
        raise AdaspecError(f"the tokenizer source must be the target's .gguf file; {source} is not one")
    fields = tokenizer_fields(gguf.GGUFReader(source))
    if f"{TOKENIZER_PREFIX}ggml.tokens" not in fields:
        raise AdaspecError(f"{source} has no tokenizer (tokenizer.ggml.tokens); give the target's own GGUF")
    return fields


def tokenizer_fields(reader: gguf.GGUFReader) -> Fields:
    fields = {}
    for key, field in reader.fields.items():
        if key.startswith(TOKENIZER_PREFIX):
            vtype = field.types[0]
            sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            fields[key] = (field.contents(), vtype, sub_type)
    return fields


def check_vocab(model: PreTrainedModel, tokenizer: dict, hf_tokenizer=None) -> None:
    """The drafter's vocabulary must be the tokenizer source's, size and (where known) token for token."""
    tokens = tokenizer[f"{TOKENIZER_PREFIX}ggml.tokens"][0]
    if model.config.vocab_size != len(tokens):
        raise AdaspecError(f"the model's vocabulary ({model.config.vocab_size}) differs from the target "
                           f"tokenizer's ({len(tokens)} tokens); a drafter must share the target's tokenizer")
    if hf_tokenizer is not None:
        vocab = hf_tokenizer.get_vocab()
        wrong = [(i, t) for i, t in enumerate(tokens) if vocab.get(t, i) != i][:3]
        if wrong:
            raise AdaspecError(f"the model's tokenizer differs from the target's (e.g. id, token: {wrong})")


def write_hparams(writer: gguf.GGUFWriter, config, name: str, file_type: gguf.LlamaFileType) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def llama_tensors(model: PreTrainedModel):
    """(GGUF name, fp32 tensor) pairs in llama.cpp's naming, q/k permuted for its rotary layout."""
    config = model.config
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    embed = model.get_input_embeddings().weight
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and is_tied(tensor, embed):
            continue  # llama.cpp uses token_embd as the output head when output.weight is absent
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise AdaspecError(f"no GGUF name for the tensor '{key}'; is this a plain Llama?")
        tensor = tensor.detach().float().cpu()
        if key.endswith("q_proj.weight"):
            tensor = permute(tensor, n_head)
        elif key.endswith("k_proj.weight"):
            tensor = permute(tensor, n_kv)
        yield name, tensor


def is_tied(head: torch.Tensor, embed: torch.Tensor) -> bool:
    return head.data_ptr() == embed.data_ptr() or (head.shape == embed.shape and torch.equal(head, embed))


def permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotate-half q/k rows -> llama.cpp's interleaved pairs (convert_hf_to_gguf.py, LlamaModel.permute)."""
    rows = weight.shape[0]  # [n_head * head_dim, hidden]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def encode(tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """(data, its GGML type): 1-D tensors in f32, q8_0 rows that are not a multiple of 32 in f16."""
    data = tensor.numpy()
    if data.ndim == 1:
        qtype = gguf.GGMLQuantizationType.F32
    elif qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(data, qtype), qtype


def target_gguf(target_name: str) -> Path:
    """The target's GGUF file (the tokenizer source): the bundled model's, or a given .gguf path."""
    if target_name == BUNDLED:
        return bundled_gguf()
    path = Path(target_name).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path
    raise AdaspecError(f"the target must be '{BUNDLED}' or a .gguf file (its tokenizer is copied into the "
                       f"drafter's GGUF); got '{target_name}'")


def drafter_source(spec: str, target_name: str) -> Path:
    """DRAFTER -> its directory: 'small' (shipped for the target) or a local Hugging Face model directory."""
    from adaspec.core.drafters.shipped import shipped

    if spec in SHIPPED_KINDS:
        path = shipped(Path(target_name).stem if target_name != BUNDLED else BUNDLED, spec)
        if path is None:
            raise AdaspecError(f"no '{spec}' drafter ships for target '{target_name}'; give a model directory")
        return path
    if spec == "eagle":
        raise AdaspecError("an EAGLE head is not a standalone model; export 'small' or a Llama model directory")
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise AdaspecError(f"unknown drafter '{spec}': give 'small' (the shipped drafter) or a local Hugging "
                           "Face Llama model directory (one with config.json)")
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type != ARCH:
        raise AdaspecError(f"only Llama-architecture models export to GGUF here; {path} is '{model_type}' "
                           "(use llama.cpp's convert_hf_to_gguf.py for others)")
    return path


def prepare_out(out: Path) -> Path:
    """Create the output's folder up front, so an unwritable --out fails before any model loads."""
    out = Path(out).expanduser()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AdaspecError(f"cannot write the GGUF to {out}: {e}; choose a writable --out") from e
    if out.is_dir():
        raise AdaspecError(f"--out {out} is a directory; give a file name ending in .gguf")
    return out


def load_for_export(spec: str, target_name: str = BUNDLED) -> LoadedModel:
    """The drafter as a full fp32 model: a compact shipped-format one gets the target's embeddings."""
    from adaspec.core.drafters.shipped import is_standalone_dir, load_standalone
    from adaspec.core.models import load_model

    path = drafter_source(spec, target_name)
    if is_standalone_dir(path):
        return load_standalone(path, load_model(target_name))
    return load_model(str(path))


def drafter_gguf(path_or_name: str | Path, target_name: str = BUNDLED, ftype: str = EXPORT_FTYPE) -> Path:
    """The drafter's GGUF in the user cache (<cache>/gguf/), converted once and redone when the source's
    files (size, mtime) or the target's GGUF change."""
    if ftype not in FTYPES:
        raise AdaspecError(f"unknown GGUF type '{ftype}'; choose one of {', '.join(FTYPES)}")
    source, tokenizer_source = drafter_source(str(path_or_name), target_name), target_gguf(target_name)
    stamp = {"source": str(source.resolve()), "files": file_stamps(source), "target": str(tokenizer_source),
             "target_size": tokenizer_source.stat().st_size, "ftype": ftype}
    key = hashlib.sha1(stamp["source"].encode()).hexdigest()[:8]
    out = cache_root() / "gguf" / f"{Path(target_name).stem}-{source.name}-{key}.{ftype}.gguf"
    marker = out.with_name(out.name + ".json")
    if out.is_file() and marker.is_file() and json.loads(marker.read_text()) == stamp:
        return out
    export_gguf(load_for_export(str(path_or_name), target_name), out, tokenizer_source, ftype)
    marker.write_text(json.dumps(stamp))
    return out


def file_stamps(directory: Path) -> dict[str, list[int]]:
    """Name -> [size, mtime_ns] of a model directory's config and weights."""
    files = sorted(p for p in directory.iterdir() if p.suffix in (".json", ".safetensors", ".bin") and p.is_file())
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}
