"""Many sequences on one model: each call scores new positions of several sequences (slots), each with its own KV
cache rows, and rolls each back on its own. The batched engine (batch.py) talks to models only through this.

`BatchBackend` keeps, per slot, the token ids whose keys and values are cached, so that `sync` feeds exactly the
positions a sequence is missing, as `Backend.sync` does for one sequence. Subclasses implement `_forward` over
`Row`s (one per sequence in the call) and `_truncate` of one slot.

`TorchBatchBackend` runs the lean Llama forward (backends/lean.py) over a ragged batch: row i appends n_i positions
at its own length; rows are padded to the longest n and every row attends only to its own positions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from adaspec.core.backends.base import common_prefix, torch_where
from adaspec.core.backends.lean import LeanLlama, lean_unsupported, rms_norm, rope
from adaspec.core.config import BATCH_CONTEXT
from adaspec.core.errors import AdaspecError


@dataclass(frozen=True)
class Row:
    """One sequence's part of a call: `ids` appended to slot `slot`'s cache at position `start`; logits come back
    for the last `keep` of them (0: none, a prefill chunk)."""

    slot: int
    start: int
    ids: list[int]
    keep: int


class BatchBackend(ABC):
    """One model and `slots` sequences' caches; a call scores new positions of any subset of them."""

    vocab_size: int
    max_context: int  # positions per sequence
    slots: int

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise AdaspecError(f"a batch needs at least one sequence slot, got {slots}")
        self.slots = slots
        self.tokens: list[list[int]] = [[] for _ in range(slots)]  # ids in each slot's cache

    @abstractmethod
    def _forward(self, rows: list[Row]) -> list[torch.Tensor]:
        """Append each row's ids to its slot's cache in one call; logits [keep, V] (float) per row."""

    @abstractmethod
    def _truncate(self, slot: int, length: int) -> None:
        """Keep the first `length` cached positions of `slot`."""

    @property
    def where(self) -> str:
        raise NotImplementedError

    @property
    def pass_ms(self) -> float:
        """What one more pass over the batch costs at least (ms): a call whose rows differ in length may take a
        pass per length (llama.cpp); 0 where a call is one pass whatever its rows."""
        return 0.0

    def reset(self, slot: int) -> None:
        self._truncate(slot, 0)
        self.tokens[slot] = []

    def rollback(self, slot: int, length: int) -> None:
        """Forget every cached position of `slot` at index >= length."""
        if length < len(self.tokens[slot]):
            self._truncate(slot, length)
            del self.tokens[slot][length:]

    def sync(self, wants: list[tuple[int, list[int], int]]) -> list[torch.Tensor]:
        """For each (slot, ids, keep): make the slot's cache hold exactly `ids`, feeding only what is missing (at least
        max(keep, 1) positions), all in one call; logits [keep, V] of the last `keep` positions of each `ids`."""
        rows = []
        if len({slot for slot, _, _ in wants}) != len(wants):
            raise AdaspecError("a batch call names a sequence slot twice")
        for slot, ids, keep in wants:
            if len(ids) > self.max_context:
                raise AdaspecError(f"sequence of {len(ids)} tokens exceeds the context of {self.max_context} "
                                   "positions per sequence; shorten the prompt or lower --max-new-tokens")
            cached = self.tokens[slot]
            n = len(cached) if len(cached) <= len(ids) and ids[: len(cached)] == cached else common_prefix(cached, ids)
            n = min(n, len(ids) - max(keep, 1))
            self.rollback(slot, n)
            rows.append(Row(slot, n, ids[n:], keep))
        logits = self._forward(rows) if rows else []
        for row in rows:
            self.tokens[row.slot].extend(row.ids)
        return logits


class TorchBatchBackend(BatchBackend):
    """The lean Llama forward over `slots` cache rows of `context` positions each, every row at its own length.

    Exactness: a sequence's logits equal those it gets alone only where the kernels give a row the same result
    whatever else is in the batch; `tests/test_batch.py` checks it for this build (fp32 matrix products on a CPU
    are row-independent; attention runs per row over its own keys)."""

    def __init__(self, model: PreTrainedModel, slots: int, context: int = BATCH_CONTEXT) -> None:
        super().__init__(slots)
        reason = lean_unsupported(model)
        if reason is not None:
            raise AdaspecError(f"batched decoding on torch runs the lean forward, which cannot run this model "
                               f"({reason}); use the llama.cpp backend")
        self.model = model.eval()
        self.vocab_size = int(model.config.vocab_size)
        capacity = min(context, int(getattr(model.config, "max_position_embeddings", context)))
        self.lean = LeanLlama(model, capacity)
        self.max_context = capacity
        lean = self.lean
        self.device = dev = lean.device  # the model's: the call's index tensors are built there
        # one column past the capacity takes the padding's keys and values (never read)
        shape = (len(lean.layers), slots, lean.kv_heads, capacity + 1, lean.head_dim)
        self.keys = torch.zeros(shape, dtype=lean.dtype, device=dev)  # [L, S, kv, T + 1, D]
        self.values = torch.zeros(shape, dtype=lean.dtype, device=dev)
        self.lengths = [0] * slots
        self.head = lean.head()

    @property
    def where(self) -> str:
        return torch_where(self.lean.dtype, self.device)

    def _truncate(self, slot: int, length: int) -> None:
        self.lengths[slot] = length

    @torch.inference_mode()
    def _forward(self, rows: list[Row]) -> list[torch.Tensor]:
        lean = self.lean
        b, n = len(rows), max(len(r.ids) for r in rows)
        ids = torch.zeros(b, n, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r.ids)] = torch.tensor(r.ids)
        # built on the host, copied to the device once each (no read back)
        dev = self.device
        slots = torch.tensor([r.slot for r in rows]).to(dev)  # [B]
        starts = torch.tensor([r.start for r in rows]).to(dev)  # [B]
        sizes = torch.tensor([len(r.ids) for r in rows]).to(dev)  # [B]
        ids = ids.to(dev)
        positions = starts[:, None] + torch.arange(n, device=dev)[None, :]  # [B, n]
        padding = torch.arange(n, device=dev)[None, :] >= sizes[:, None]  # [B, n] True past a row's own ids
        positions = positions.masked_fill(padding, self.max_context - 1)  # any valid RoPE row for the padding
        total = max(r.start + len(r.ids) for r in rows)  # keys any row can see (from the host's copy)
        keys_pos = torch.arange(total, device=dev)  # [T]
        # row i, query j (at positions[i, j]) sees its own keys up to its position: [B, 1, n, T], repeated per group
        mask = (keys_pos[None, None, :] <= positions[:, :, None])[:, None]
        mask = mask.repeat(1, 1, lean.heads // lean.kv_heads, 1)  # [B, 1, g n, T]
        cos, sin = lean.cos[positions][:, :, None], lean.sin[positions][:, :, None]  # [B, n, 1, D]
        x = torch.nn.functional.embedding(ids, lean.embed)  # [B, n, H]
        h, kv, d = lean.heads, lean.kv_heads, lean.head_dim
        g = h // kv
        write = (slots[:, None], positions.masked_fill(padding, self.max_context))  # [B, n] into [S, T + 1]
        for li, layer in enumerate(lean.layers):
            y = rms_norm(x, layer.attn_norm, lean.eps)
            qkv = lean.linear(y, layer.qkv).view(b, n, h + 2 * kv, d)
            qk = rope(qkv[:, :, : h + kv], cos, sin)  # [B, n, h + kv, D]
            q = qk[:, :, :h].view(b, n, kv, g, d).permute(0, 2, 3, 1, 4).reshape(b, kv, g * n, d)  # [B, kv, g n, D]
            keys, values = self.keys[li], self.values[li]  # [S, kv, T, D]
            keys.permute(0, 2, 1, 3)[write] = qk[:, :, h:]  # [B, n, kv, D] into [S, T, kv, D]
            values.permute(0, 2, 1, 3)[write] = qkv[:, :, h + kv:]
            k_rows, v_rows = keys[slots, :, :total], values[slots, :, :total]  # [B, kv, T, D]
            out = torch.nn.functional.scaled_dot_product_attention(q, k_rows, v_rows, attn_mask=mask,
                                                                   scale=lean.scaling)  # [B, kv, g n, D]
            out = out.view(b, kv, g, n, d).permute(0, 3, 1, 2, 4).reshape(b, n, h * d)
            x = x + lean.linear(out, layer.o)
            x = x + lean.mlp(layer, rms_norm(x, layer.mlp_norm, lean.eps))
        x = rms_norm(x, lean.norm, lean.eps)  # [B, n, H]
        out = []
        for i, r in enumerate(rows):
            if r.keep:
                end = len(r.ids)
                out.append(lean.linear(x[i, end - r.keep: end], self.head).float())  # [keep, V]
            else:
                out.append(torch.empty(0, self.vocab_size, device=dev))
            self.lengths[r.slot] = r.start + len(r.ids)
        return out
