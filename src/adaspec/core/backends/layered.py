"""The target run layer by layer: positions can stop at an intermediate layer and be finished later.

An early-exit drafter (SpecBound) runs a drafted token through the target's first layers only; the
verification pass then runs only the layers above that, over the hidden states the draft left behind.
`LayeredBackend` owns that bookkeeping for a Llama-style causal LM (`model.model.embed_tokens`,
`.layers`, `.norm`, `.rotary_emb`, `model.lm_head`).

State: `tokens` are positions computed through every layer. After them come `pending` positions, each
computed through its first `depth[i]` layers, its residual stream after those layers kept in
`hidden[i]`. Depths never increase along the pending positions, so layer j's KV cache (transformers'
`DynamicCache` is per layer) holds exactly len(tokens) + #{i: depth[i] > j} positions, contiguous.

`advance(d)` brings every pending position to depth >= d, one layer at a time from the shallowest:
at layer j it runs, in one batch, the suffix of positions whose depth is j; positions deeper than j are
not recomputed, their KV at layer j is already cached. Every computed value is the model's own (no
approximation): a position only runs layer j once every earlier position has its KV at layer j.
Verification is `advance(L)` (with the positions the draft did not run appended at depth 0); rollback
crops every layer to the kept length.

Where the lean forward can run the model (`backends/lean.py`: Llama), a layer is its ops over a preallocated
`LayerKV` (per-layer lengths, rollback by length, no concatenation); otherwise transformers' decoder layer over
a `DynamicCache`. A step that drafts nothing then costs about what `ar`'s lean step does, not transformers'
per-layer plumbing on top of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel

from adaspec.core.backends.base import Backend, common_prefix
from adaspec.core.backends.lean import LeanLlama, lean_unsupported, rms_norm
from adaspec.core.backends.lean import causal_mask as lean_mask
from adaspec.core.cache import StaticKV, new_cache
from adaspec.core.config import TORCH_CACHE_LEN
from adaspec.core.errors import AdaspecError

LAYERED_MODEL_TYPES = ("llama", "qwen2", "qwen3")  # embeddings unscaled, pre-norm decoder layers, one RoPE


@dataclass
class Pending:
    """Positions computed through only their first `depth[i]` layers (depth non-increasing along them)."""

    tokens: list[int] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)
    hidden: torch.Tensor | None = None  # [m, H] residual stream after depth[i] layers

    def __len__(self) -> int:
        return len(self.tokens)

    def keep(self, m: int) -> None:
        del self.tokens[m:], self.depth[m:]
        self.hidden = None if m == 0 or self.hidden is None else self.hidden[:m]


class LayerKV(StaticKV):
    """A `StaticKV` whose layers hold different numbers of positions (`lengths`): pending positions have run
    only their first layers. `write` appends at the layer's own length."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | None = None) -> None:
        super().__init__(layers, kv_heads, head_dim, capacity, dtype, 1, device)
        self.lengths = [0] * layers

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v [1, kv, n, D] to `layer`; its keys and values [1, kv, length, D] (views)."""
        start = self.lengths[layer]
        end = start + k.shape[2]
        self.keys[layer, :, :, start: end] = k
        self.values[layer, :, :, start: end] = v
        self.lengths[layer] = end
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


class LayeredBackend(Backend):
    """A Llama-style causal LM whose positions advance through the layers on demand. `lean`: None runs the lean
    layers when the architecture allows it, False transformers' (as `TorchBackend`)."""

    def __init__(self, model: PreTrainedModel, lean: bool | None = None, cache_len: int = TORCH_CACHE_LEN) -> None:
        super().__init__()
        model_type = getattr(model.config, "model_type", "")
        if model_type not in LAYERED_MODEL_TYPES:
            raise AdaspecError(f"layer-wise decoding (specbound) supports {', '.join(LAYERED_MODEL_TYPES)} targets, "
                               f"not '{model_type}'")
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.body = model.model  # embed_tokens, layers, norm, rotary_emb
        self.depth = int(model.config.num_hidden_layers)
        self.vocab_size = int(model.config.vocab_size)
        self.max_context = int(getattr(model.config, "max_position_embeddings", 1 << 30))
        use_lean = lean is not False and lean_unsupported(model) is None
        self.lean = LeanLlama(model, min(cache_len, self.max_context)) if use_lean else None
        if self.lean is not None:
            self.max_context = self.lean.capacity
        self.cache = self._new_cache()
        self.pending = Pending()
        self.layer_runs = 0  # layer calls so far (one per layer per batch): a cost counter for tests and benches

    # -- lengths and cropping

    def _new_cache(self) -> LayerKV | DynamicCache:
        lean = self.lean
        if lean is None:
            return new_cache(self.model)
        return LayerKV(self.depth, lean.kv_heads, lean.head_dim, lean.capacity, lean.dtype, lean.device)

    def cached(self, layer: int) -> int:
        """Positions in layer `layer`'s KV cache."""
        return self.cache.lengths[layer] if self.lean else self.cache.layers[layer].get_seq_length()

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s cached keys and values [1, kv, cached, D]."""
        if self.lean:
            n = self.cache.lengths[layer]
            return self.cache.keys[layer, :, :, :n], self.cache.values[layer, :, :, :n]
        return self.cache.layers[layer].keys, self.cache.layers[layer].values

    def _crop(self, layer: int, length: int) -> None:
        """Keep at most `length` positions of layer `layer`'s cache."""
        have = self.cached(layer)
        if have > length:
            if self.lean:
                self.cache.lengths[layer] = length
            else:
                self.cache.layers[layer].crop(length - have)

    def _crop_layers(self) -> None:
        """Crop each layer's cache to what `tokens` and `pending` say it holds."""
        for j in range(self.depth):
            self._crop(j, len(self.tokens) + sum(d > j for d in self.pending.depth))

    def _truncate(self, length: int) -> None:
        self.pending = Pending()
        if length == 0 and self.lean is None:
            self.cache = new_cache(self.model)
            return
        for j in range(self.depth):
            self._crop(j, length)

    def rollback(self, length: int) -> None:
        """Forget every position at index >= length, fully computed or pending."""
        if length < len(self.tokens):
            super().rollback(length)
        elif length < len(self.tokens) + len(self.pending):
            self.pending.keep(length - len(self.tokens))
            self._crop_layers()

    # -- running layers

    def push(self, ids: list[int]) -> None:
        """Append positions for `ids`, computed through no layer yet (their embeddings)."""
        if len(self.tokens) + len(self.pending) + len(ids) > self.max_context:
            raise AdaspecError(
                f"sequence of {len(self.tokens) + len(self.pending) + len(ids)} tokens exceeds the model context "
                f"of {self.max_context}; shorten the prompt or lower --max-new-tokens"
            )
        with torch.inference_mode():
            embeds = self.body.embed_tokens(self.to_device(torch.tensor(ids, dtype=torch.long)))  # [n, H]
        p = self.pending
        p.hidden = embeds if p.hidden is None else torch.cat([p.hidden, embeds])
        p.tokens += ids
        p.depth += [0] * len(ids)

    @torch.inference_mode()
    def advance(self, depth: int) -> torch.Tensor:
        """Run every pending position through the layers below `depth` it has not run; return the residual
        stream [m, H] of the pending positions (position i after max(depth, its depth) layers)."""
        p = self.pending
        if not len(p):
            raise AdaspecError("nothing to advance: push positions first")
        base = len(self.tokens)
        positions = torch.arange(base, base + len(p), device=self.device)[None]  # [1, m]
        rope = None
        while p.depth[-1] < depth:
            j = p.depth[-1]
            s = p.depth.index(j)  # the suffix s..m-1 sits at depth j; positions before it are deeper
            x = p.hidden[None, s:]  # [1, n, H]
            if self.lean is not None:
                out = self._lean_layer(j, x, base + s)
            else:
                if rope is None:
                    rope = self.body.rotary_emb(p.hidden[None], position_ids=positions)  # (cos, sin) [1, m, D]
                cos, sin = (r[:, s:] for r in rope)
                out = self.body.layers[j](x, attention_mask=causal_mask(base + s, x.shape[1], x.dtype, self.device),
                                          position_embeddings=(cos, sin), position_ids=positions[:, s:],
                                          cache=self.cache, use_cache=True)
            self.layer_runs += 1
            p.hidden = torch.cat([p.hidden[:s], out[0]])
            p.depth[s:] = [j + 1] * (len(p) - s)
        return p.hidden

    def _lean_layer(self, j: int, x: torch.Tensor, start: int) -> torch.Tensor:
        """Layer j (the lean ops) over x [1, n, H] at positions start..; its keys and values appended to layer j."""
        lean, w = self.lean, self.lean.layers[j]
        n = x.shape[1]
        if self.cache.lengths[j] != start:
            raise RuntimeError(f"layer {j} holds {self.cache.lengths[j]} positions, not the {start} before these")
        cos, sin = lean.cos[start: start + n, None], lean.sin[start: start + n, None]  # [n, 1, D]
        mask = lean_mask(start, n, lean.heads // lean.kv_heads, lean.device)
        x = x + lean.attention(j, w, rms_norm(x, w.attn_norm, lean.eps), cos, sin, mask, self.cache)
        return x + lean.mlp(w, rms_norm(x, w.mlp_norm, lean.eps))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-layer residual stream [n, H] -> float logits [n, V] (final norm, LM head)."""
        with torch.inference_mode():
            return self.model.get_output_embeddings()(self.body.norm(hidden)).float()

    def finish(self) -> torch.Tensor:
        """Run every pending position through all layers and make them full positions; their final residual
        stream [m, H]."""
        hidden = self.advance(self.depth)
        self.tokens += self.pending.tokens
        self.pending = Pending()
        return hidden

    # -- the Backend interface

    def _forward(self, ids: torch.Tensor, keep: int) -> torch.Tensor:
        """Append `ids` after the pending positions and finish them all: logits [1, keep, V] of the last `keep`
        (the cache grows by the pending positions and ids; `tokens` already counts the pending ones)."""
        self.push(ids[0].tolist())  # a host tensor (extend builds it there): no read from the device
        return self.logits(self.finish()[-keep:])[None]

    def extend(self, ids: list[int], keep: int = 1) -> torch.Tensor:
        """Append `ids` after any pending positions and finish every one of them; logits [keep, V] of the last
        `keep` positions (which may be pending ones when `ids` is shorter)."""
        if keep > len(self.pending) + len(ids):
            raise ValueError(f"keep={keep} exceeds the {len(self.pending) + len(ids)} positions being computed")
        self.hidden_start = len(self.tokens)
        return self._forward(torch.tensor([ids], dtype=torch.long), keep)[0]

    def sync(self, ids: list[int], keep: int = 1) -> torch.Tensor:
        """Make the cache hold exactly `ids`, reusing pending positions that match them (a draft's partial
        computation is finished, not redone); logits [keep, V] of the last `keep` positions of `ids`."""
        n = common_prefix(self.tokens + self.pending.tokens, ids)
        n = min(n, len(ids) - keep) if len(ids) - keep < len(self.tokens) else n
        self.rollback(n)
        return self.extend(ids[n:], keep)


def causal_mask(start: int, n: int, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor | None:
    """Additive mask [1, 1, n, start+n] for n queries at positions start.. over keys 0..start+n-1, on `device`; None
    for one query (it sees every key)."""
    if n == 1:
        return None
    keys = torch.arange(start + n, device=device)[None, :]
    queries = torch.arange(start, start + n, device=device)[:, None]
    mask = torch.zeros(n, start + n, dtype=dtype, device=device)
    mask.masked_fill_(keys > queries, torch.finfo(dtype).min)
    return mask[None, None]
