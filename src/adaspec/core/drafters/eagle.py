"""An EAGLE-style draft head: drafts from the target's own last hidden states.

EAGLE (Li et al. 2024) drafts at the feature level: position j reads the target's final hidden state
f_{j-1} and the embedding of token x_j, one decoder layer predicts f_j, and the target's LM head (here its
reduced-vocabulary rows) turns that into the next token. Deeper drafted tokens feed the head its own
predicted feature. The head is ~4M parameters (one layer + a 2H -> H projection); embeddings and LM head
rows are the target's, taken at load time, so the shipped artifact holds only the head.

Alignment, for a sequence x_0 .. x_T with target features f_0 .. f_T (f_t is the hidden state that
predicts x_{t+1}): drafter position j in 1..T consumes (f_{j-1}, x_j) and outputs f^_j ~ f_j.
"""

from __future__ import annotations

import json
from bisect import bisect_left
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from adaspec.core.backends.base import common_prefix
from adaspec.core.backends.lean import causal_mask, rms_norm, rope
from adaspec.core.cache import StaticKV
from adaspec.core.drafters.base import Draft, DraftContext, Hidden
from adaspec.core.errors import AdaspecError
from adaspec.core.sampling import probs_from_logits, sample

CONFIG_FILE = "eagle_config.json"
WEIGHTS_FILE = "eagle_head.safetensors"
VOCAB_FILE = "vocab.json"


@dataclass(frozen=True)
class EagleConfig:
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    rope_theta: float
    eps: float
    target_layers: int  # the target's depth, to check an artifact matches its target

    @classmethod
    def from_target(cls, config) -> EagleConfig:
        rope = getattr(config, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        return cls(config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                   config.intermediate_size, float(theta), float(config.rms_norm_eps), config.num_hidden_layers)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (Llama's rotate-half convention) at `positions` from the base `theta`: the head computes
    its angles itself, the rotation is the lean forward's. x [B, heads, T, D], positions [T]."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d))  # [D/2]
    angles = positions.float()[:, None] * inv[None]  # [T, D/2]
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(x.dtype)  # [T, D]
    sin = torch.cat([-angles.sin(), angles.sin()], -1).to(x.dtype)  # [T, D], first half negated (lean.rope)
    return rope(x, cos, sin)


class EagleHead(nn.Module):
    """fc([feature; embedding]) -> one Llama decoder layer -> final norm -> predicted next feature [B, T, H]."""

    def __init__(self, config: EagleConfig) -> None:
        super().__init__()
        h, kvd = config.hidden, config.kv_heads * config.head_dim
        self.config = config
        self.fc = nn.Linear(2 * h, h)
        self.input_layernorm = RMSNorm(h, config.eps)
        self.q_proj = nn.Linear(h, h, bias=False)
        self.k_proj = nn.Linear(h, kvd, bias=False)
        self.v_proj = nn.Linear(h, kvd, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)
        self.post_attention_layernorm = RMSNorm(h, config.eps)
        self.gate_proj = nn.Linear(h, config.intermediate, bias=False)
        self.up_proj = nn.Linear(h, config.intermediate, bias=False)
        self.down_proj = nn.Linear(config.intermediate, h, bias=False)
        self.norm = RMSNorm(h, config.eps)  # the target's features are normed: so is the prediction

    def init_from_target(self, model: nn.Module, layer: int = -1) -> None:
        """Start from one of the target's decoder layers and its final norm."""
        self.init_from_layer(model.model.layers[layer])
        with torch.no_grad():
            self.norm.weight.copy_(model.model.norm.weight.float())

    def init_from_layer(self, layer: nn.Module) -> None:
        """Start from one of the target's decoder layers (the fc keeps its random initialisation)."""
        with torch.no_grad():
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(self, name).weight.copy_(getattr(layer.self_attn, name).weight.float())
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(self, name).weight.copy_(getattr(layer.mlp, name).weight.float())
            self.input_layernorm.weight.copy_(layer.input_layernorm.weight.float())
            self.post_attention_layernorm.weight.copy_(layer.post_attention_layernorm.weight.float())

    def project(self, features: torch.Tensor, embeds: torch.Tensor, positions: torch.Tensor):
        """Inputs [B, T, H] x2 -> (residual x [B, T, H], q [B, heads, T, D], k, v [B, kv_heads, T, D])."""
        c = self.config
        x = self.fc(torch.cat([features, embeds], -1))
        h = self.input_layernorm(x)
        b, t, _ = h.shape
        q = self.q_proj(h).view(b, t, c.heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, t, c.kv_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, t, c.kv_heads, c.head_dim).transpose(1, 2)
        return x, rotary(q, positions, c.rope_theta), rotary(k, positions, c.rope_theta), v

    def finish(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of q over (k, v) under `mask` (True = may attend; None = no restriction), then the MLP."""
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # [B, heads, T, D]
        x = x + self.o_proj(a.transpose(1, 2).flatten(2))
        h = self.post_attention_layernorm(x)
        return self.norm(x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h)))

    def step(self, features: torch.Tensor, embeds: torch.Tensor, start: int, cache: StaticKV) -> torch.Tensor:
        """Run rotary positions start .. start+T-1 on top of `cache` (one layer, one row: the positions before
        them); [1, T, H]. The cache grows by T."""
        t = features.shape[1]
        cache.check_room(1, t)
        positions = torch.arange(start, start + t, device=features.device)
        x, q, k, v = self.project(features, embeds, positions)
        mask = causal_mask(cache.length, t, device=features.device)  # [T, S], None for one position
        k, v = cache.write(0, k, v)  # [1, kv_heads, S, D] each
        cache.advance(t)
        return self.finish(x, q, k, v, mask)

    def new_cache(self, capacity: int, device: torch.device | str | None = None) -> StaticKV:
        """An empty cache for `step` of up to `capacity` positions."""
        c = self.config
        return StaticKV(1, c.kv_heads, c.head_dim, capacity, next(self.parameters()).dtype, 1, device)


@dataclass
class EagleArtifact:
    """A trained head and its reduced vocabulary, as saved in a directory."""

    head: EagleHead
    vocab: list[int]  # the reduced head's token ids (rows of the target's LM head)

    def save(self, path: Path, card: dict | None = None, dtype: torch.dtype = torch.bfloat16) -> Path:
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_FILE).write_text(json.dumps({**asdict(self.head.config), **(card or {})}, indent=1))
        state = {k: v.detach().to(dtype).contiguous() for k, v in self.head.state_dict().items()}
        save_file(state, str(path / WEIGHTS_FILE))
        (path / VOCAB_FILE).write_text(json.dumps(self.vocab))
        return path

    @classmethod
    def load(cls, path: Path, dtype: torch.dtype = torch.float32) -> EagleArtifact:
        from safetensors.torch import load_file

        if not (path / WEIGHTS_FILE).exists():
            raise AdaspecError(f"{path} is not an EAGLE drafter directory (no {WEIGHTS_FILE})")
        meta = json.loads((path / CONFIG_FILE).read_text())
        fields = EagleConfig.__dataclass_fields__
        head = EagleHead(EagleConfig(**{k: meta[k] for k in fields}))
        head.load_state_dict({k: v.to(dtype) for k, v in load_file(str(path / WEIGHTS_FILE)).items()})
        head.to(dtype).eval()
        return cls(head, json.loads((path / VOCAB_FILE).read_text()))


def is_eagle_dir(path: Path) -> bool:
    return (path / WEIGHTS_FILE).exists()


class EagleDrafter:
    """Drafts with an `EagleHead` from the target's features: the final hidden states the loop hands to `observe`
    (`wants_hidden`: the loop has the target's backend keep them).

    The head's KV cache holds only positions computed from true target features; positions drafted from
    predicted features are cropped after every proposal. The first step of a generation drafts nothing:
    the target's prefill is what produces the first features.

    It runs where the target model's weights are (`model`: the head is moved there); features a llama.cpp target
    returns on the host are copied there. A drafted token costs one read back to the host (its id and confidence
    together).
    """

    name = "eagle"
    wants_hidden = True

    def __init__(self, artifact: EagleArtifact, model: PreTrainedModel, max_context: int) -> None:
        if artifact.head.config != EagleConfig.from_target(model.config):
            raise AdaspecError("this EAGLE head was trained for a different target (its shape does not match)")
        self.embed = model.get_input_embeddings().weight.detach()  # [V, H] (rows cast when used)
        self.device = self.embed.device
        self.head = artifact.head.to(self.device).eval()
        dtype = next(self.head.parameters()).dtype
        self.vocab = torch.tensor(artifact.vocab, dtype=torch.long, device=self.device)
        self.vocab_ids = list(artifact.vocab)  # the same ids on the host: a drafted id is read back once
        self.lm_rows = model.get_output_embeddings().weight[self.vocab].detach().to(dtype).contiguous()  # [v, H]
        self.dtype = dtype
        self.vocab_size = int(model.config.vocab_size)
        self.cache = self.head.new_cache(max_context, self.device)  # the target's context fits
        self.reset()

    def reset(self) -> None:
        self.cache.crop(0)
        self.features = torch.empty(0, self.head.config.hidden, device=self.device)  # [F, H] target features f_0..
        self.seen: list[int] = []  # the sequence whose positions 0..F-1 the features are of
        self.consumed: list[int] = []  # tokens x_1..x_C behind the cached positions 1..C

    def observe(self, accepted: int, ids: list[int], hidden: Hidden | None = None) -> None:
        if hidden is None:
            raise AdaspecError("the EAGLE drafter needs the target's hidden states: run it in a loop that passes them")
        states = hidden.states.to(self.device, torch.float32)
        # every position the step kept: the sequence's all but its last (a rejected draft's positions are dropped)
        self.features = torch.cat([self.features[: hidden.start], states])[: len(ids) - 1]
        self.seen = list(ids)

    def _embed(self, tokens: list[int]) -> torch.Tensor:
        return self.embed[torch.tensor(tokens, dtype=torch.long, device=self.device)].to(self.dtype)[None]  # [1, T, H]

    @torch.inference_mode()
    def propose(self, ctx: DraftContext) -> Draft:
        ids = ctx.ids
        n_feat = len(self.features)
        if n_feat == 0 or n_feat != len(ids) - 1 or ids[: n_feat] != self.seen[: n_feat]:
            return Draft()  # no features for this sequence yet (the first step is the target's prefill)
        # catch up: positions C+1 .. F from true features, F = n_feat
        # recompute at least the last position: its output is where drafting starts (a repeated proposal on the
        # same ids has nothing new to catch up on)
        c = min(common_prefix(self.consumed, ids[1: n_feat + 1]), n_feat - 1)
        self.cache.crop(c)
        del self.consumed[c:]
        feats = self.features[c: n_feat].to(self.dtype)[None]  # [1, F-C, H]
        out = self.head.step(feats, self._embed(ids[c + 1: n_feat + 1]), c + 1, self.cache)[:, -1:]  # [1, 1, H]
        self.consumed += ids[c + 1: n_feat + 1]
        tokens: list[int] = []
        probs: list[torch.Tensor] = []
        rows: list[torch.Tensor] = []  # full-vocabulary logits, built only when sampling or a scorer needs them
        confidence: list[float] = []
        while True:
            logits = (out[0, -1] @ self.lm_rows.T).float()  # [v]
            p_reduced = torch.softmax(logits, -1)
            if not ctx.sampling.greedy or ctx.score is not None:
                full = torch.full((self.vocab_size,), float("-inf"), device=self.device)
                full[self.vocab] = logits
                rows.append(full)  # [V]
            if ctx.sampling.greedy:
                top = logits.argmax()
                # the id and its probability in one read (float64 holds any id exactly)
                j, c = torch.stack([top.double(), p_reduced[top].double()]).tolist()
                j = int(j)
            else:
                q = probs_from_logits(full, ctx.sampling)  # [V]
                probs.append(q)
                j = bisect_left(self.vocab_ids, sample(q, ctx.generator))
                c = None if ctx.score else float(p_reduced[j])
            tokens.append(self.vocab_ids[j])
            # every confidence metric of the reduced logits equals that of the full row (-inf elsewhere)
            confidence.append(ctx.score(logits) if ctx.score else c)
            if len(tokens) >= ctx.k_max or not ctx.keep_drafting(confidence):
                break
            out = self.head.step(out, self._embed(tokens[-1:]), n_feat + len(tokens), self.cache)  # [1, 1, H]
        self.cache.crop(len(self.consumed))  # forget positions drafted from predicted features
        return Draft(tokens, None if ctx.sampling.greedy else torch.stack(probs), confidence,
                     torch.stack(rows) if rows else None)  # logits [k, V]
