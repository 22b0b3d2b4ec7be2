"""llama.cpp backend: a GGUF model run by llama.cpp (through llama-cpp-python's C API), behind `Backend`.

One `llama_decode` scores k+1 positions with logits for each of the last `keep`; rollback removes positions
from llama.cpp's KV cache (`llama_memory_seq_rm`).

Exactness: greedy speculative decoding equals plain decoding only if scoring k+1 positions at once gives each the
logits one position at a time would. llama.cpp's tinyBLAS kernels (GGML_LLAMAFILE) and its flash-attention path
round a batch differently (logits differ by up to ~1 here); built without tinyBLAS and run without flash
attention, every format we measured is batch-invariant to the bit. scripts/setup.sh builds it that way;
`batch_invariant()` says whether the installed build is. K-quant weights (q4_k_m, q6_k, Gemma 3's GGUF) take two
more batch-only paths, both chosen at run time: weights repacked at load for multi-row kernels (adaspec's
contexts load without repacking, which was no slower here) and ggml's tiled K-quant matmul from 8 rows on
(turned off for the process unless GGML_CPU_TILED_MM is set: `_init`).
Flash attention (faster prefill) takes three paths on
the CPU: one query row over a long cache splits the cache across threads (a different summation order), a few
rows go row by row, 64 or more rows go in tiles. scripts/setup.sh patches the first path out, and the decoding
loop prefills all but the prompt's last token (`Backend.split_prefill`), so that every position a method
scores after the prefill goes row by row for every method; `flash_attention_exact()` tests a build for that
once (cached) and the backend turns flash attention on only where it holds. With `keep_hidden`, the context
also returns the final (normed) hidden state of every position, as the torch backend does, for drafters that
read target features.

llama-cpp-python is an optional extra (`pip install 'adaspec[llamacpp]'`, a ~10-minute build from source):
every entry point here says so when it is missing.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from adaspec.core.backends.base import Backend, llamacpp_where
from adaspec.core.backends.batched import BatchBackend, Row
from adaspec.core.config import BATCH_CONTEXT, BATCH_PREFILL_CHUNK, LLAMACPP_FORMATS
from adaspec.core.errors import AdaspecError

INSTALL_HINT = ("pip install 'adaspec[llamacpp]', or `bash scripts/setup.sh`, which builds it the batch-invariant "
                "way; llama-cpp-python builds from source, about 10 minutes on 2 cores")
FTYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q4_k_m": 15, "q6_k": 18, "bf16": 32}  # llama_ftype
FTYPE_NAMES = {v: k for k, v in FTYPES.items()} | {  # formats a GGUF may come in, named in records
    8: "q5_0", 9: "q5_1", 10: "q2_k", 11: "q3_k_s", 12: "q3_k_m", 13: "q3_k_l", 14: "q4_k_s", 15: "q4_k_m",
    16: "q5_k_s", 17: "q5_k_m", 18: "q6_k"}


def llama_cpp():
    """The llama_cpp module, or an AdaspecError that says how to install it."""
    try:
        import llama_cpp as module
    except ImportError:
        raise AdaspecError(f"the llama.cpp backend needs llama-cpp-python, which is not installed: {INSTALL_HINT}") \
            from None
    return module


def batch_invariant() -> bool:
    """Whether the installed llama.cpp was built without tinyBLAS (GGML_LLAMAFILE=OFF), which the exactness of
    greedy speculative decoding on this backend needs (flash attention: see flash_attention_exact)."""
    return b"LLAMAFILE = 1" not in llama_cpp().llama_print_system_info()


FA_ROWS = 63  # stock flash attention goes in tiles from 64 query rows on (ggml-cpu's GGML_FA_TILE_Q)
PROBE_CONTEXT = 600  # cache length of the probe: past 512, where the split-cache path starts
PROBE_STEPS = 24  # one-position steps timed after the probe's prefill
PROBE_KEYS = {"works", "flash_exact", "flash_rows_exact", "flash_faster"}  # probe_build's answers


def _build_key() -> str:
    """The installed llama.cpp library: its path, size and modification time."""
    lib = Path(llama_cpp().__file__).parent / "lib"
    files = sorted(lib.glob("libggml-cpu*")) or sorted(lib.glob("*.so")) or [Path(llama_cpp().__file__)]
    return "|".join(f"{f}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in files)


def flash_attention_exact(gguf: Path, threads: int | None = None) -> bool:
    """Whether this llama.cpp build, with flash attention on, gives a position the logits it gets alone also in
    a batch of a few (past a 512-token cache, with `threads` threads): `probe_build`'s answer, cached per build
    (ADASPEC_FLASH_ATTN=0/1 overrides)."""
    forced = _forced_flash()
    if forced is not None:
        return forced
    return probe_build(gguf, threads)["flash_exact"]  # False on a build that is not batch-invariant (_probe)


def use_flash_attention(gguf: Path, threads: int | None = None, exact: bool = True) -> bool:
    """Whether to run with flash attention. adaspec's own decoding (`exact`) runs without it unless
    ADASPEC_FLASH_ATTN=1 asks (and this build keeps it exact, `flash_attention_exact`): its kernels take other paths
    by the number of query rows, so a prompt prefilled in chunks next to other sequences (the batched engine, the
    server) would round differently from one prefilled alone, and a greedy answer would depend on its company. The
    `llamacpp` peer (`exact=False`) takes it where this build and machine run the probe's workload faster with it
    (`probe_build`'s "flash_faster"), as llama.cpp's own CLI would. ADASPEC_FLASH_ATTN=0/1 overrides both."""
    forced = _forced_flash()
    if exact:
        return bool(forced) and flash_attention_exact(gguf, threads)
    if forced is not None:
        return forced
    return probe_build(gguf, threads)["flash_faster"]


def flash_rows_exact(gguf: Path, threads: int | None = None) -> bool:
    """Whether this build's flash attention gives a position the same logits however many positions of its sequence
    share its pass (scripts/patch-llamacpp.py: one kernel for any number of rows). Stock llama.cpp goes row by row up
    to FA_ROWS rows and in tiles beyond, which round apart: a prompt must then be fed in pieces of FA_ROWS."""
    return probe_build(gguf, threads)["flash_rows_exact"]


def use_batch_flash(gguf: Path, threads: int | None = None) -> bool:
    """Whether the batched backend runs with flash attention: where this build keeps a row's result the same alone
    and in a batch (`flash_attention_exact`; on a build without `flash_rows_exact` the batched backend feeds no
    sequence more than FA_ROWS positions a pass) and the probe's workload (a 600-token prompt and 128 steps) runs
    faster with it. On 2 Intel Xeon cores scripts/setup.sh's build prefills 1.15x faster with it and decodes 16
    one-row sequences as fast (88.9 against 88.3 ms a pass at 190 tokens, 115.5 against 118.3 at 600), one sequence
    4-9 % slower; the stock kernel decoded 16 sequences 1.2x-1.4x slower. ADASPEC_FLASH_ATTN=0/1 overrides."""
    forced = _forced_flash()
    if forced is not None:
        return forced
    found = probe_build(gguf, threads)
    return found["flash_exact"] and found["flash_faster"]


def _forced_flash() -> bool | None:
    """ADASPEC_FLASH_ATTN=0/1 as a decision, None where it is not set."""
    forced = os.environ.get("ADASPEC_FLASH_ATTN")
    return forced == "1" if forced in ("0", "1") else None


_probed: dict[tuple[str, str], dict] = {}  # (cache file, build and threads) -> probe_build's answer, this process


def probe_build(gguf: Path, threads: int | None = None) -> dict:
    """What the installed llama.cpp build does with `gguf`: {"works": it scores a batch of positions without
    crashing, "flash_exact": flash attention keeps a position's logits the same alone and in a batch of a few,
    "flash_rows_exact": also in a pass of more than FA_ROWS positions (a prompt chunk),
    "flash_faster": flash attention runs a 600-token prefill and 128 one-position steps after it faster, with the
    times of both}. Flash attention prefills faster; its one-row kernel decodes faster on some CPUs and much slower
    on others (benchmarks/README.md "Backends and weight formats"), so it is measured, not assumed. Probed once per
    build and thread count in a child process, because a build can crash outright (ggml's AMX kernels, compiled
    in by -march=native, take every batch and crash where the kernel hands a process no AMX state, as in some
    VMs), and cached in ~/.cache/adaspec/llamacpp.json. Raises if the build crashes."""
    from adaspec.core.models import cache_root

    if not gguf.is_file():
        raise AdaspecError(f"GGUF file {gguf} not found")
    threads = threads or torch.get_num_threads()
    record = cache_root() / "llamacpp.json"
    key = f"{_build_key()}|threads={threads}"
    # every backend, drafter and peer asks: the file is read once a process
    found = _probed.get((str(record), key)) or _read_probes(record).get(key)
    if not (isinstance(found, dict) and PROBE_KEYS <= found.keys()):
        child = subprocess.run([sys.executable, "-m", __name__, str(gguf), str(threads)], capture_output=True,
                               text=True)
        lines = child.stdout.strip().splitlines()
        if child.returncode == 0 and lines:
            found = json.loads(lines[-1])
            if "error" in found:  # the file, not the build: not cached
                raise AdaspecError(found["error"])
        elif child.returncode < 0:  # killed by a signal: the build crashes
            found = {**dict.fromkeys(PROBE_KEYS, False), "signal": -child.returncode}
        else:
            raise AdaspecError(f"probing llama.cpp with {gguf} failed: {child.stderr.strip()[-500:]}")
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({**_read_probes(record), key: found}, indent=1))
    _probed[str(record), key] = found
    if not found["works"]:
        raise AdaspecError(f"the installed llama.cpp (llama-cpp-python) crashes when it scores several positions at "
                           f"once (signal {found.get('signal')}): typically ggml's AMX kernels on a machine that does "
                           f"not enable AMX. Rebuild it with `bash scripts/setup.sh`, which turns AMX off")
    return found


def _read_probes(record: Path) -> dict:
    """Every cached probe answer in `record` ({} if none or unreadable)."""
    try:
        return json.loads(record.read_text()) if record.is_file() else {}
    except json.JSONDecodeError:
        return {}


def _probe(gguf: Path, threads: int) -> dict:
    """probe_build's test, run in the child process: a batch without flash attention, then flash attention's
    long-cache path alone against in a batch. Any tokens do: the kernels are what is tested."""
    ids = [(17 * i) % 1000 + 100 for i in range(PROBE_CONTEXT + 3)]
    model = LlamaCppModel(gguf, n_ctx=64, threads=threads)
    try:
        model.decode(ids[:16], 0, 16)
    finally:
        model.close()
    found: dict = {"works": True}
    for flash in (False, True):
        model = LlamaCppModel(gguf, n_ctx=PROBE_CONTEXT + PROBE_STEPS + 8, threads=threads, flash_attn=flash)
        try:
            t0 = time.perf_counter()
            model.decode(ids[:PROBE_CONTEXT], 0, 1)
            t1 = time.perf_counter()
            alone = []
            for i in range(3):
                model.decode([ids[PROBE_CONTEXT + i]], PROBE_CONTEXT + i, 1)
                alone.append(model.logits(1))
            for i in range(3, PROBE_STEPS):
                model.decode([ids[i]], PROBE_CONTEXT + i, 1)
            step = (time.perf_counter() - t1) / PROBE_STEPS
            found["flash" if flash else "plain"] = {"prefill_ms": round((t1 - t0) * 1e3, 2),
                                                    "step_ms": round(step * 1e3, 3)}
            if flash:
                model.truncate(PROBE_CONTEXT)
                model.decode(ids[PROBE_CONTEXT: PROBE_CONTEXT + 3], PROBE_CONTEXT, 3)
                found["flash_exact"] = batch_invariant() and bool(torch.equal(torch.cat(alone), model.logits(3)))
                # the same three positions at the end of a pass of FA_ROWS + 3 (a prompt chunk's size)
                model.truncate(PROBE_CONTEXT - FA_ROWS)
                model.decode(ids[PROBE_CONTEXT - FA_ROWS: PROBE_CONTEXT + 3], PROBE_CONTEXT - FA_ROWS, 3)
                found["flash_rows_exact"] = found["flash_exact"] and bool(torch.equal(torch.cat(alone),
                                                                                      model.logits(3)))
        finally:
            model.close()
    cost = {k: found[k]["prefill_ms"] + 128 * found[k]["step_ms"] for k in ("plain", "flash")}
    found["flash_faster"] = cost["flash"] < cost["plain"]
    return found


def available() -> bool:
    try:
        llama_cpp()
    except AdaspecError:
        return False
    return True


_quiet = None  # the log callback must outlive every call into llama.cpp


def _init() -> object:
    """Initialise llama.cpp once, with its logging silenced (it writes to stderr on every model load)."""
    global _quiet
    lc = llama_cpp()
    if _quiet is None:
        # ggml's tiled K-quant matmul (batches of 8 rows and more) rounds a row differently from the one-row kernel,
        # so a verified position would not get the logits it gets alone. Read once per process at the first matmul,
        # so it also holds for the `llamacpp` peer in this process: its prefill of K-quant weights runs ~17 % slower
        # (Gemma 3, 300 tokens, 2 AMD cores); one-row decoding is unchanged. A value the user set is kept.
        os.environ.setdefault("GGML_CPU_TILED_MM", "0")
        _quiet = lc.llama_log_callback(lambda level, text, data: None)
        lc.llama_log_set(_quiet, ctypes.c_void_p(0))
        lc.llama_backend_init()
    return lc


def ftype_name(value: int | str | None) -> str:
    """The weight format named by a GGUF's general.file_type value ('q4_1', 'bf16', ...)."""
    if value is None:
        return "unknown"
    return FTYPE_NAMES.get(int(value), f"ftype-{value}")


def file_type(path: Path) -> str:
    """The weight format of a GGUF file, read from its metadata (general.file_type); a loaded model has it as
    `LlamaCppModel.weights`."""
    import gguf

    field = gguf.GGUFReader(path).get_field("general.file_type")
    return ftype_name(None if field is None else field.parts[field.data[0]][0])


def requantize(source: Path, fmt: str, cache_dir: Path) -> Path:
    """`source` in weight format `fmt` (one of LLAMACPP_FORMATS; 'shipped' is the file as it is): converted once by
    llama.cpp's quantizer into `cache_dir`, written to a temporary name and renamed.

    Every format starts from the same weights, and all but f32 round them: a Q4_1 value d*q + m needs up to ~16
    significant bits, more than f16 (11) or bf16 (8) hold; Q8_0 and Q4_0 re-quantize it."""
    if fmt not in LLAMACPP_FORMATS:
        raise AdaspecError(f"unknown llama.cpp weight format '{fmt}'; choose one of {', '.join(LLAMACPP_FORMATS)}")
    if fmt == "shipped":
        return source
    stat = source.stat()
    out = cache_dir / f"{source.stem}.{stat.st_size}.{fmt}.gguf"
    if out.is_file():
        return out
    lc = _init()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    params = lc.llama_model_quantize_default_params()
    params.ftype = FTYPES[fmt]
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 1
    if lc.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
        tmp.unlink(missing_ok=True)
        raise AdaspecError(f"llama.cpp could not convert {source} to {fmt}")
    shutil.move(tmp, out)
    return out


class LlamaCppModel:
    """A loaded GGUF model and one context (KV cache) on it; freed on close or garbage collection."""

    def __init__(self, path: Path, n_ctx: int | None = None, threads: int | None = None,
                 embeddings: bool = False, flash_attn: bool = False, sequences: int = 1, n_batch: int | None = None,
                 ) -> None:
        """`sequences` > 1: one KV stream of `n_ctx` cells per sequence (llama.cpp's non-unified cache), so that a
        sequence's keys lie in its own cells in the order they would alone, whatever the others do. The weights
        load without repacking (`use_extra_bufts`): llama.cpp repacks K-quant and some other weights for kernels
        that score several rows at once and round them apart from one row; unpacked, verifying 2-4 positions of
        Gemma 3 took 10-12 % less time on 2 AMD cores, and one position the same."""
        self.lc = lc = _init()
        self.path = path
        if not path.is_file():
            raise AdaspecError(f"GGUF file {path} not found")
        model_params = lc.llama_model_default_params()
        model_params.use_extra_bufts = False
        self.model = lc.llama_model_load_from_file(str(path).encode(), model_params)
        if not self.model:
            raise AdaspecError(f"llama.cpp could not load {path}: is it a GGUF model file?")
        self.n_vocab = int(lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model)))
        self.n_embd = int(lc.llama_model_n_embd(self.model))
        self.n_ctx_train = int(lc.llama_model_n_ctx_train(self.model))
        buf = ctypes.create_string_buffer(32)
        found = lc.llama_model_meta_val_str(self.model, b"general.file_type", buf, len(buf)) >= 0
        self.weights = ftype_name(buf.value.decode() if found else None)  # the weight format, from the metadata
        params = lc.llama_context_default_params()
        n_ctx = n_ctx or self.n_ctx_train
        params.n_ctx = n_ctx * sequences
        params.n_batch = n_batch or n_ctx
        params.n_ubatch = min(512, params.n_batch)
        params.n_seq_max = sequences
        if sequences > 1:
            params.kv_unified = False
        self.threads = threads or torch.get_num_threads()
        params.n_threads = params.n_threads_batch = self.threads
        params.embeddings = embeddings
        params.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.pooling_type = lc.LLAMA_POOLING_TYPE_NONE  # hidden states per position, when they are turned on
        self.ctx = lc.llama_init_from_model(self.model, params)
        if not self.ctx:
            lc.llama_model_free(self.model)
            self.model = None
            raise AdaspecError(f"llama.cpp could not create a context of {params.n_ctx} tokens for {path}")
        self.n_ctx = int(lc.llama_n_ctx(self.ctx)) // sequences  # per sequence
        self.n_batch = int(params.n_batch)
        self.memory = lc.llama_get_memory(self.ctx)
        self.batch = lc.llama_batch_init(params.n_batch, 0, 1)
        self.embeddings = embeddings
        self.flash_attn = flash_attn

    def decode(self, ids: list[int], start: int, outputs: int) -> None:
        """Feed `ids` at positions start.. into the cache; the last `outputs` of them get logits."""
        b, n = self.batch, len(ids)
        b.n_tokens = n
        for i, t in enumerate(ids):
            b.token[i] = t
            b.pos[i] = start + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = i >= n - outputs
        rc = self.lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise AdaspecError(f"llama.cpp decode of {n} tokens at position {start} failed (code {rc})")

    def decode_rows(self, rows: list[tuple[int, int, list[int], int]]) -> None:
        """One llama_decode over several sequences: each (seq_id, start, ids, outputs) feeds `ids` at positions
        start.. of that sequence; the last `outputs` of each get logits, in the order of the rows."""
        b, i = self.batch, 0
        for seq, start, ids, outputs in rows:
            n = len(ids)
            for j, t in enumerate(ids):
                b.token[i] = t
                b.pos[i] = start + j
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seq
                b.logits[i] = j >= n - outputs
                i += 1
        b.n_tokens = i
        rc = self.lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise AdaspecError(f"llama.cpp decode of {i} tokens over {len(rows)} sequences failed (code {rc})")

    def truncate_seq(self, seq: int, length: int) -> None:
        if not self.lc.llama_memory_seq_rm(self.memory, seq, length, -1):
            raise AdaspecError(f"llama.cpp could not roll sequence {seq} back to {length} positions")

    def logits(self, outputs: int) -> torch.Tensor:
        """Logits of the last decode's output positions -> [outputs, V] float32 (a copy: one memmove, the cheapest
        way across, as it happens every step)."""
        out = torch.empty(outputs, self.n_vocab)
        ctypes.memmove(out.data_ptr(), self.lc.llama_get_logits(self.ctx), out.numel() * 4)
        return out

    def hidden(self, outputs: int) -> torch.Tensor:
        """Final hidden states of the last decode's output positions -> [outputs, H] (needs embeddings=True)."""
        ptr = self.lc.llama_get_embeddings(self.ctx)
        if not ptr:
            raise AdaspecError("llama.cpp returned no hidden states: the context was made without embeddings")
        return torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(outputs * self.n_embd,)).copy()).view(
            outputs, self.n_embd)

    def set_embeddings(self, on: bool) -> None:
        self.lc.llama_set_embeddings(self.ctx, on)
        self.embeddings = on

    def truncate(self, length: int) -> None:
        if length == 0:  # the positions only: zeroing the buffers too (data=True) writes the whole cache
            self.lc.llama_memory_clear(self.memory, False)
        elif not self.lc.llama_memory_seq_rm(self.memory, 0, length, -1):
            raise AdaspecError(f"llama.cpp could not roll its cache back to {length} positions")

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.lc.llama_batch_free(self.batch)
            self.lc.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            self.lc.llama_model_free(self.model)
            self.model = None

    def __del__(self) -> None:
        self.close()


class LlamaCppBackend(Backend):
    """The `Backend` interface on a GGUF model run by llama.cpp. `keep_hidden`: `hidden` holds the final hidden
    states [n, H] of every position of the last forward (the first at `hidden_start`), as in `TorchBackend`.
    `vocab_ids` (a drafter's reduced vocabulary) leaves only those tokens finite logits, as `TorchBackend`'s
    reduced head does: the GGUF keeps the full head, so the same drafter draws from the same distribution on
    either backend."""

    def __init__(self, path: Path, n_ctx: int | None = None, threads: int | None = None,
                 keep_hidden: bool = False, vocab_ids: list[int] | None = None, flash_attn: bool | None = None) -> None:
        super().__init__()
        probe_build(path, threads)  # a build that crashes on a batch says so here, not by killing the process
        if flash_attn is None:  # off unless asked for (use_flash_attention)
            flash_attn = use_flash_attention(path, threads)
        self.llm = LlamaCppModel(path, n_ctx, threads, embeddings=keep_hidden, flash_attn=flash_attn)
        self.hidden = torch.empty(0)
        self.vocab_size = self.llm.n_vocab
        self.max_context = self.llm.n_ctx
        self.outside: torch.Tensor | None = None  # [V] True where vocab_ids leave a token out
        if vocab_ids is not None:
            self.outside = torch.ones(self.vocab_size, dtype=torch.bool)
            self.outside[torch.tensor(vocab_ids, dtype=torch.long)] = False

    @property
    def split_prefill(self) -> bool:  # flash attention tiles long batches: the prompt is prefilled apart
        return self.llm.flash_attn

    @property
    def where(self) -> str:
        return llamacpp_where(self.llm.weights, self.llm.flash_attn)

    @property
    def keep_hidden(self) -> bool:
        return self.llm.embeddings

    @keep_hidden.setter
    def keep_hidden(self, on: bool) -> None:
        self.llm.set_embeddings(on)

    def _forward(self, ids: torch.Tensor, keep: int) -> torch.Tensor:
        row = ids[0].tolist()
        outputs = len(row) if self.keep_hidden else keep  # hidden states come only for output positions
        start = len(self.tokens)
        # after the prefill, batches stay under flash attention's tiled size, so that a position goes row by row
        # however many others come with it (a catch-up of R-Stitch's large model scores what `ar` scored one by one)
        size = FA_ROWS if self.split_prefill and start > 0 else len(row)
        logits, hidden = [], []
        for i in range(0, len(row), size):
            chunk = row[i: i + size]
            need = max(0, min(len(chunk), outputs - (len(row) - i - len(chunk))))  # output positions in this chunk
            self.llm.decode(chunk, start + i, max(1, need))
            if need:
                logits.append(self.llm.logits(need))  # [need, V]
                if self.keep_hidden:
                    hidden.append(self.llm.hidden(need))  # [need, H]
        if self.keep_hidden:
            self.hidden = hidden[0] if len(hidden) == 1 else torch.cat(hidden)  # [n, H]
        out = logits[0] if len(logits) == 1 else torch.cat(logits)
        out = out[-keep:]
        if self.outside is not None:
            out[:, self.outside] = float("-inf")
        return out.unsqueeze(0)  # [1, keep, V]

    def _truncate(self, length: int) -> None:
        self.llm.truncate(length)


KV_PAD = 256  # llama.cpp pads the cells a pass attends over to a multiple of this (llama_kv_cache::get_n_kv)


def kv_cells(end: int) -> int:
    """Cells a stream whose cache ends at position `end` makes a pass attend over."""
    return max(KV_PAD, -(-end // KV_PAD) * KV_PAD)


@dataclass(frozen=True)
class PassCosts:
    """What one llama.cpp pass over a multi-sequence batch costs (ms): `fixed` per pass, `row` per position scored,
    `kv` per position scored per cache cell it attends over. With one KV stream per sequence, every stream in a pass
    attends over as many cells as the longest of them holds, so one long sequence makes the whole batch pay its
    attention (2-core AMD EPYC, bundled model: 16 one-row sequences on 200-token contexts 57 ms a call; with one of
    them at 2000 tokens, 143 ms; the long one apart in a second call, 79 ms). Measured once per model, build and
    thread count (`pass_costs`)."""

    fixed: float
    row: float
    kv: float

    def ms(self, passes: int, positions: int, end: int) -> float:
        return self.fixed * passes + positions * (self.row + self.kv * kv_cells(end))


def plan_passes(rows: list[tuple[int, int, int]], costs: PassCosts) -> list[int]:
    """Where to cut a call's rows, given in slot order as (slot, positions, end), into separate llama_decode calls so
    that the modelled cost is least: the start index of each group after the first. A group costs a pass per run of
    consecutive slots in it and per further row length (llama.cpp's split_equal takes one run of consecutive
    sequence ids, with as many positions of each, a pass), plus its positions' attention over its longest stream."""
    n = len(rows)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        runs, lengths, positions, end = 0, set(), 0, 0
        for i in range(j - 1, -1, -1):  # the group rows[i:j], grown to the front
            slot, count, last = rows[i]
            runs += i == j - 1 or rows[i + 1][0] != slot + 1
            lengths.add(count)
            positions += count
            end = max(end, last)
            total = best[i] + costs.ms(runs + len(lengths) - 1, positions, end)
            if total < best[j]:
                best[j], cut[j] = total, i
    starts, j = [], n
    while j > 0:
        j = cut[j]
        starts.append(j)
    return sorted(starts)[1:]


PASS_SHORT, PASS_LONG = 32, 1024  # contexts (tokens) the pass costs are measured on


def pass_costs(llm: LlamaCppModel, slots: int) -> PassCosts:
    """`PassCosts` of `llm`'s model on this build and thread count: measured on `llm` (its first slots, left empty)
    the first time, about 3 s on 2 cores, then read from ~/.cache/adaspec/llamacpp_passes.json."""
    from adaspec.core.models import cache_root

    record = cache_root() / "llamacpp_passes.json"
    key = (f"{_build_key()}|threads={llm.threads}|{llm.path.resolve()}:{llm.path.stat().st_size}"
           f"{'|fa' if llm.flash_attn else ''}")
    found = _read_probes(record).get(key)
    if isinstance(found, dict) and {"fixed", "row", "kv"} <= found.keys():
        return PassCosts(**{k: float(found[k]) for k in ("fixed", "row", "kv")})
    costs = _measure_passes(llm, min(slots - 1, 8))
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({**_read_probes(record), key: asdict(costs)}, indent=1))
    return costs


def _measure_passes(llm: LlamaCppModel, m: int, repeats: int = 5) -> PassCosts:
    """One position on a short context, one on each of m short contexts, one on a long one (slot m)."""
    ids = [(31 * i) % 1000 + 100 for i in range(PASS_LONG + 1)]
    for slot in range(m):
        llm.truncate_seq(slot, 0)
        llm.decode_rows([(slot, 0, ids[:PASS_SHORT], 0)])
    llm.truncate_seq(m, 0)
    for start in range(0, PASS_LONG, BATCH_PREFILL_CHUNK):
        llm.decode_rows([(m, start, ids[start: min(start + BATCH_PREFILL_CHUNK, PASS_LONG)], 0)])

    def ms(rows: list[tuple[int, int]]) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            llm.decode_rows([(slot, start, [ids[start]], 1) for slot, start in rows])
            times.append(time.perf_counter() - t0)
            for slot, start in rows:
                llm.truncate_seq(slot, start)
        return 1000 * statistics.median(times)

    one, many, long = ms([(0, PASS_SHORT)]), ms([(s, PASS_SHORT) for s in range(m)]), ms([(m, PASS_LONG)])
    for slot in range(m + 1):
        llm.truncate_seq(slot, 0)
    short_kv, long_kv = kv_cells(PASS_SHORT + 1), kv_cells(PASS_LONG + 1)
    kv = max(0.0, (long - one) / (long_kv - short_kv))
    row = max(0.0, (many - one) / max(m - 1, 1) - kv * short_kv)
    return PassCosts(max(0.0, one - row - kv * short_kv), row, kv)


class LlamaCppBatchBackend(BatchBackend):
    """`BatchBackend` on a GGUF model: one `llama_decode` over a batch of several sequences (one seq_id per slot),
    or a few where `plan_passes` finds a long sequence cheaper apart; rollback per sequence (`llama_memory_seq_rm`).

    Flash attention (`use_batch_flash`: on where this build keeps it exact and it runs faster here): stock llama.cpp
    goes row by row for up to FA_ROWS query rows of a sequence in a pass and in tiles from FA_ROWS + 1 on, which
    round a row apart. On such a build a row of more than FA_ROWS positions (a prompt chunk) is fed in pieces of at
    most FA_ROWS, one pass after another; scripts/setup.sh's build takes one kernel for any number of rows
    (`flash_rows_exact`) and needs no pieces. Either way every position gets the result it gets alone, whatever the
    chunking and the company (tests/test_batch.py)."""

    def __init__(self, path: Path, slots: int, context: int = BATCH_CONTEXT, threads: int | None = None,
                 n_batch: int = 1024, split: bool = True, flash_attn: bool | None = None) -> None:
        """`split`: cut a call into several llama_decode calls where `plan_passes` finds that cheaper (a long
        sequence's rows apart from short ones'); off, every call is one llama_decode. `flash_attn`: None decides by
        `use_batch_flash`."""
        super().__init__(slots)
        probe_build(path, threads)
        if flash_attn is None:
            flash_attn = use_batch_flash(path, threads)
        self.llm = LlamaCppModel(path, context, threads, flash_attn=flash_attn, sequences=slots, n_batch=n_batch)
        self.vocab_size = self.llm.n_vocab
        self.max_context = self.llm.n_ctx
        self.max_call = self.llm.n_batch  # positions one call may score in all
        pieces = flash_attn and not flash_rows_exact(path, threads)
        self.piece = FA_ROWS if pieces else self.max_call  # positions of one sequence in one pass
        self.passes = pass_costs(self.llm, slots) if split and slots > 1 and context > PASS_LONG else None

    @property
    def where(self) -> str:
        return llamacpp_where(self.llm.weights, self.llm.flash_attn)

    @property
    def pass_ms(self) -> float:
        return 0.0 if self.passes is None else self.passes.fixed

    def _forward(self, rows: list[Row]) -> list[torch.Tensor]:
        total = sum(len(r.ids) for r in rows)
        if total > self.max_call:
            raise AdaspecError(f"a batch call of {total} positions exceeds llama.cpp's batch of {self.max_call}")
        parts: list[list[torch.Tensor]] = [[] for _ in rows]
        size = self.piece
        for a in range(0, max(len(r.ids) for r in rows), size):  # rounds: every row's next piece
            pieces = [(i, Row(r.slot, r.start + a, ids, max(0, min(len(ids), r.keep - (len(r.ids) - a - len(ids))))))
                      for i, r in enumerate(rows) if a < len(r.ids) for ids in [r.ids[a: a + size]]]
            for i, logits in zip([i for i, _ in pieces], self._call([p for _, p in pieces]), strict=True):
                parts[i].append(logits)
        return [p[0] if len(p) == 1 else torch.cat(p) for p in parts]

    def _call(self, rows: list[Row]) -> list[torch.Tensor]:
        """Rows of at most `piece` positions each: one llama_decode, or a few (`plan_passes`); logits per row."""
        # rows in slot order: with one KV stream per sequence llama.cpp's split_equal takes a pass per run of
        # consecutive sequence ids in the batch, so rows out of order cost a pass each (measured: N=16 at 0.7x)
        order = sorted(range(len(rows)), key=lambda i: rows[i].slot)
        cuts = [] if self.passes is None else plan_passes(
            [(rows[i].slot, len(rows[i].ids), rows[i].start + len(rows[i].ids)) for i in order], self.passes)
        out: list[torch.Tensor] = [torch.empty(0)] * len(rows)
        for a, b in itertools.pairwise([0, *cuts, len(order)]):
            group = order[a:b]
            self.llm.decode_rows([(rows[i].slot, rows[i].start, rows[i].ids, rows[i].keep) for i in group])
            logits = self.llm.logits(sum(rows[i].keep for i in group))  # [outputs, V], rows in slot order
            for i, part in zip(group, logits.split([rows[i].keep for i in group]), strict=True):
                out[i] = part
        return out

    def _truncate(self, slot: int, length: int) -> None:
        self.llm.truncate_seq(slot, length)


if __name__ == "__main__":  # probe_build's child: python -m adaspec.core.backends.llamacpp GGUF THREADS
    try:
        print(json.dumps(_probe(Path(sys.argv[1]), int(sys.argv[2]))))
    except AdaspecError as e:
        print(json.dumps({"error": str(e)}))
