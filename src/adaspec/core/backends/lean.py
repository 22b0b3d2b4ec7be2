"""A lean forward for Llama-architecture models on a preallocated KV cache.

transformers' forward pays a fixed cost per step (mask and cache plumbing, a dozen Python calls per layer,
`DynamicCache` growth by concatenation) that dwarfs the arithmetic of a one-token step on a small model.
`LeanLlama` computes the same logits with the fewest ops: it reads the Hugging Face model's weights (the
only copies: the fused QKV and gate-up matrices), takes RoPE from a table precomputed by the model's own
rotary embedding, and writes keys and values into a `StaticKV`.

In bf16 the matrices are repacked once for oneDNN (`Linear`, a copy of every matrix): the same products, bit
for bit, read at a higher memory bandwidth than `F.linear` reaches on one-row inputs (a decoding step's cost is
reading the weights).

One decoder layer (pre-norm, as `LlamaDecoderLayer`):
    x = x + o(attention(rope(q), rope(k), v))      q, k, v = split(qkv @ rms_norm(x))
    x = x + down(silu(gate) * up)                  gate, up = split(gate_up @ rms_norm(x))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from adaspec.core.cache import StaticKV

LEAN_MODEL_TYPES = ("llama",)
LEAN_ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # one table for every position (no dynamic scaling)


def lean_unsupported(model: PreTrainedModel) -> str | None:
    """Why the lean forward cannot run `model` (None: it can)."""
    config = model.config
    if config.model_type not in LEAN_MODEL_TYPES:  # before reading fields other architectures may not have
        return f"model type '{config.model_type}' is not one of {', '.join(LEAN_MODEL_TYPES)}"
    checks = {
        "attention or MLP biases": getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False),
        f"activation '{config.hidden_act}' (only silu)": config.hidden_act != "silu",
        "pretraining_tp > 1": getattr(config, "pretraining_tp", 1) != 1,
        f"RoPE type '{model.model.rotary_emb.rope_type}'": model.model.rotary_emb.rope_type not in LEAN_ROPE_TYPES,
    }
    return next((reason for reason, failed in checks.items() if failed), None)


class Linear:
    """x @ W.T for one dtype. bf16 on a CPU with oneDNN: W repacked once into oneDNN's blocked layout (a copy)
    and multiplied by oneDNN (bit-identical to `F.linear`, and faster on a one-row input, where
    `F.linear` goes through a generic bf16 GEMM); otherwise `F.linear` on W itself."""

    def __init__(self, dtype: torch.dtype, device: torch.device | None = None) -> None:
        on_cpu = device is None or device.type == "cpu"
        self.packed = on_cpu and dtype == torch.bfloat16 and onednn_bf16_works()

    def prepare(self, w: torch.Tensor) -> torch.Tensor:
        """W [out, in] -> the operand `__call__` takes."""
        return torch.ops.mkldnn._reorder_linear_weight(w, 1) if self.packed else w

    def __call__(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x [..., in], prepared W [out, in] -> [..., out]."""
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
        return F.linear(x, w)


def onednn_bf16_works() -> bool:
    """Whether this torch build and CPU run oneDNN's packed bf16 linear (and it agrees with `F.linear`)."""
    if not torch.backends.mkldnn.is_available():
        return False
    x, w = torch.ones(1, 32, dtype=torch.bfloat16), torch.eye(32, dtype=torch.bfloat16)
    try:
        y = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w, 1), None, "none", [], "")
    except (RuntimeError, AttributeError):
        return False
    return bool(torch.equal(y, x))


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [H]
    qkv: torch.Tensor  # [(heads + 2 kv_heads) D, H]: q, k, v projections stacked (prepared by `Linear`)
    o: torch.Tensor  # [H, heads D]
    mlp_norm: torch.Tensor  # [H]
    gate_up: torch.Tensor  # [2 I, H]: gate, up projections stacked
    down: torch.Tensor  # [H, I]


class LeanLlama:
    """The forward of a Hugging Face `LlamaForCausalLM` (same logits), over a `StaticKV`.

    It runs in the model's dtype on the model's device; `capacity` is the most positions a cache holds."""

    @torch.no_grad()
    def __init__(self, model: PreTrainedModel, capacity: int) -> None:
        reason = lean_unsupported(model)
        if reason is not None:
            raise ValueError(f"the lean forward does not support this model: {reason}")
        config, body = model.config, model.model
        self.dtype = body.embed_tokens.weight.dtype
        self.device = body.embed_tokens.weight.device
        attn = body.layers[0].self_attn
        self.heads, self.kv_heads = int(config.num_attention_heads), int(config.num_key_value_heads)
        self.head_dim, self.scaling = int(attn.head_dim), float(attn.scaling)
        self.eps = float(body.norm.variance_epsilon)
        self.capacity = capacity
        self.linear = Linear(self.dtype, self.device)
        pack = self.linear.prepare
        self.layers = [LayerWeights(
            layer.input_layernorm.weight.detach(),
            pack(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])),
            pack(a.o_proj.weight.detach()),
            layer.post_attention_layernorm.weight.detach(),
            pack(torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight])),
            pack(layer.mlp.down_proj.weight.detach()),
        ) for layer in body.layers for a in [layer.self_attn]]
        self.embed = body.embed_tokens.weight.detach()  # [V, H]
        self.norm = body.norm.weight.detach()  # [H]
        self.head_weight = model.get_output_embeddings().weight.detach()  # [V, H] (the embedding when tied)
        self.cos, self.sin = rope_table(model, capacity, self.dtype)  # [T, D] each; sin sign-folded

    def new_cache(self, batch: int = 1) -> StaticKV:
        return StaticKV(len(self.layers), self.kv_heads, self.head_dim, self.capacity, self.dtype, batch, self.device)

    def hidden(self, ids: torch.Tensor, cache: StaticKV) -> torch.Tensor:
        """ids [B, n] at positions cache.length.. -> final hidden states [B, n, H] (after the final norm);
        the cache grows by n."""
        b, n = ids.shape
        cache.check_room(b, n)
        start = cache.length
        cos, sin = self.cos[start: start + n, None], self.sin[start: start + n, None]  # [n, 1, D]
        mask = causal_mask(start, n, self.heads // self.kv_heads, self.device)  # [g n, T] or None
        x = F.embedding(ids, self.embed)  # [B, n, H]
        for i, layer in enumerate(self.layers):
            x = x + self.attention(i, layer, rms_norm(x, layer.attn_norm, self.eps), cos, sin, mask, cache)
            x = x + self.mlp(layer, rms_norm(x, layer.mlp_norm, self.eps))
        cache.advance(n)
        return rms_norm(x, self.norm, self.eps)

    def attention(self, i: int, layer: LayerWeights, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  mask: torch.Tensor | None, cache: StaticKV) -> torch.Tensor:
        """Normed x [B, n, H] -> attention output [B, n, H]; layer i's keys and values go into the cache.

        The g = heads / kv_heads query heads sharing a kv head attend as one head with g n queries (query
        head j uses kv head j // g, as transformers' `repeat_kv`): no repeated keys."""
        b, n, _ = x.shape
        h, kv, d = self.heads, self.kv_heads, self.head_dim
        g = h // kv
        qkv = self.linear(x, layer.qkv).view(b, n, h + 2 * kv, d)  # [B, n, h + 2kv, D]
        qk = rope(qkv[:, :, : h + kv], cos, sin)  # [B, n, h + kv, D]
        q = qk[:, :, :h].view(b, n, kv, g, d).permute(0, 2, 3, 1, 4).reshape(b, kv, g * n, d)  # [B, kv, g n, D]
        keys, values = cache.write(i, qk[:, :, h:].transpose(1, 2), qkv[:, :, h + kv:].transpose(1, 2))  # [B, kv, T, D]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling)  # [B, kv, g n, D]
        out = out.view(b, kv, g, n, d).permute(0, 3, 1, 2, 4).reshape(b, n, h * d)  # [B, n, h D]
        return self.linear(out, layer.o)

    def mlp(self, layer: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.linear(x, layer.gate_up).chunk(2, dim=-1)  # [B, n, I] each
        return self.linear(F.silu(gate) * up, layer.down)  # [B, n, H]

    def head(self, vocab_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The LM head's rows (all, or `vocab_ids`) prepared for `self.linear`: [V or v, H]."""
        rows = self.head_weight if vocab_ids is None else self.head_weight[vocab_ids].contiguous()
        return self.linear.prepare(rows)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`LlamaRMSNorm`: normalise in float32, cast back, then scale."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, n, heads, D] rotated: x cos + rotate_half(x) sin, with rotate_half(x) sin = roll(x) sin' where
    sin' is sin with its first half negated (so the products equal transformers' exactly)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


def rope_table(model: PreTrainedModel, capacity: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin' [capacity, D] from the model's own rotary embedding (scaling included); sin' has its first
    half negated (see `rope`)."""
    device = model.model.embed_tokens.weight.device
    dummy = torch.empty(0, dtype=dtype, device=device)
    with torch.inference_mode():
        cos, sin = model.model.rotary_emb(dummy, position_ids=torch.arange(capacity, device=device)[None])  # [1, T, D]
    half = cos.shape[-1] // 2
    sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)
    return cos[0].clone(), sin


def causal_mask(start: int, n: int, groups: int = 1, device: torch.device | None = None) -> torch.Tensor | None:
    """Boolean mask [groups n, start + n] (True: attend) for n queries at positions start.., repeated for
    `groups` query heads, made on `device`; None for one query (it sees every key)."""
    if n == 1:
        return None
    keys = torch.arange(start + n, device=device)[None, :]  # [1, T]
    queries = torch.arange(start, start + n, device=device)[:, None]  # [n, 1]
    return (keys <= queries).repeat(groups, 1)
