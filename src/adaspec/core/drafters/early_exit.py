"""SpecBound's drafter: the target drafts for itself, each token exiting at an intermediate layer.

A drafted position runs the target's layers from the bottom (`LayeredBackend.advance`); after each layer l
of the exit set its exit logits are the target's final norm and LM head over the residual stream there,
optionally through a small trained adapter for that layer (`ExitHeads`, trained by `adaspec train-exits`):

    z_l = W_head · norm(h_l + A_l(h_l))        (A_l = 0 without adapters: the raw exit)

`ExitBound` decides: the token exits at the first l whose annealed confidence passes the threshold, and
a token still unsure at the deepest exit ends the draft. Nothing the draft computed is thrown away: the
positions stay in the backend, partly computed, and verification runs only the layers above them.

With adapters, the exit head may be a reduced vocabulary (the artifact's `vocab.json`): rows of the
target's LM head for the tokens the target emits most, so an exit costs a fraction of the full head.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from adaspec.core.backends.layered import LayeredBackend
from adaspec.core.drafters.base import Draft, DraftContext, Hidden
from adaspec.core.errors import AdaspecError
from adaspec.core.policies import ExitBound
from adaspec.core.sampling import probs_from_logits, sample

CONFIG_FILE = "exits_config.json"
WEIGHTS_FILE = "exits.safetensors"
VOCAB_FILE = "vocab.json"


class ExitAdapter(nn.Module):
    """h -> h + W h + b (rank 0: a full affine map, as the tuned lens) or h + U D h (rank r). Zero-initialised,
    so an untrained adapter is the raw exit."""

    def __init__(self, hidden: int, rank: int = 0) -> None:
        super().__init__()
        self.rank = rank
        if rank == 0:
            self.map = nn.Linear(hidden, hidden)
            nn.init.zeros_(self.map.weight)
            nn.init.zeros_(self.map.bias)
        else:
            self.down = nn.Linear(hidden, rank, bias=False)
            self.up = nn.Linear(rank, hidden)
            nn.init.normal_(self.down.weight, std=hidden ** -0.5)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + (self.map(h) if self.rank == 0 else self.up(self.down(h)))


class ExitHeads(nn.Module):
    """One adapter per exit layer; `forward` gives an exit's logits through the target's final norm and LM head
    rows (both passed in, never owned: the target's own)."""

    def __init__(self, hidden: int, layers: list[int], rank: int = 0) -> None:
        super().__init__()
        self.hidden, self.rank = hidden, rank
        self.adapters = nn.ModuleDict({str(layer): ExitAdapter(hidden, rank) for layer in layers})

    @property
    def layers(self) -> list[int]:
        return sorted(int(k) for k in self.adapters)

    def adapt(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """h [..., H] after `layer` layers through that layer's adapter (unchanged for a layer without one)."""
        adapter = self.adapters[str(layer)] if str(layer) in self.adapters else None
        return h if adapter is None else adapter(h.to(adapter_dtype(adapter))).to(h.dtype)

    def forward(self, h: torch.Tensor, layer: int, norm: nn.Module, rows: torch.Tensor) -> torch.Tensor:
        """Logits [..., v] of the exit after `layer` layers; rows [v, H] of the LM head."""
        return norm(self.adapt(h, layer)) @ rows.T


def adapter_dtype(adapter: nn.Module) -> torch.dtype:
    return next(adapter.parameters()).dtype


class ExitArtifact:
    """Trained exit adapters and their reduced head vocabulary, as saved in a directory (safetensors + json)."""

    def __init__(self, heads: ExitHeads, vocab: list[int] | None, depth: int, card: dict | None = None) -> None:
        self.heads, self.vocab, self.depth, self.card = heads, vocab, depth, card or {}

    def save(self, path: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        meta = {"kind": "exits", "exits": self.heads.layers, "rank": self.heads.rank, "hidden": self.heads.hidden,
                "target_layers": self.depth, **self.card}
        (path / CONFIG_FILE).write_text(json.dumps(meta, indent=1))
        state = {k: v.detach().to(dtype).contiguous() for k, v in self.heads.state_dict().items()}
        save_file(state, str(path / WEIGHTS_FILE))
        (path / VOCAB_FILE).write_text(json.dumps(self.vocab))
        return path

    @classmethod
    def load(cls, path: Path, dtype: torch.dtype = torch.float32) -> ExitArtifact:
        from safetensors.torch import load_file

        if not is_exits_dir(path):
            raise AdaspecError(f"{path} holds no exit adapters ({WEIGHTS_FILE}); train them with `adaspec train-exits`")
        meta = json.loads((path / CONFIG_FILE).read_text())
        heads = ExitHeads(int(meta["hidden"]), [int(x) for x in meta["exits"]], int(meta["rank"]))
        heads.load_state_dict({k: v.to(dtype) for k, v in load_file(str(path / WEIGHTS_FILE)).items()})
        vocab = json.loads((path / VOCAB_FILE).read_text()) if (path / VOCAB_FILE).exists() else None
        card = {k: v for k, v in meta.items() if k not in ("kind", "exits", "rank", "hidden", "target_layers")}
        return cls(heads.to(dtype).eval(), vocab, int(meta["target_layers"]), card)

    def check_fits(self, model) -> None:
        config = model.config
        if self.heads.hidden != config.hidden_size or self.depth != config.num_hidden_layers:
            raise AdaspecError(f"these exit adapters were trained for a target of {self.depth} layers x "
                               f"{self.heads.hidden}, not {config.num_hidden_layers} x {config.hidden_size}")
        if self.vocab is not None and (not self.vocab or max(self.vocab) >= config.vocab_size):
            raise AdaspecError("the exit adapters' vocabulary does not fit the target's")


def is_exits_dir(path: Path) -> bool:
    return (path / WEIGHTS_FILE).is_file()


class EarlyExitDrafter:
    """Drafts with the target's own early exits, writing its partial computation into the target's
    `LayeredBackend` for verification to finish.

    Each proposal starts from the last emitted token, the one position the backend lacks (the loop keeps every
    other token cached), and drafts nothing on a step where the backend is not in that state (the prefill).
    """

    name = "early-exit"
    wants_hidden = False  # it runs the target's own layers (the backend it shares), not its final states

    def __init__(self, backend: LayeredBackend, bound: ExitBound, artifact: ExitArtifact | None = None) -> None:
        if bound.depth != backend.depth:
            raise AdaspecError(f"the exit rule is for {bound.depth} layers, the target has {backend.depth}")
        model = backend.model
        self.backend, self.bound = backend, bound
        self.heads = None if artifact is None else artifact.heads.to(backend.device).eval()  # where the target runs
        if artifact is not None:
            artifact.check_fits(model)
        weight = model.get_output_embeddings().weight.detach()  # [V, H]
        vocab = None if artifact is None else artifact.vocab
        self.vocab = None if vocab is None else torch.tensor(vocab, dtype=torch.long, device=weight.device)
        self.vocab_ids = vocab  # the same on the host: a drafted id is read back once
        self.rows = weight if self.vocab is None else weight[self.vocab].contiguous()  # [v, H]
        self.vocab_size = int(model.config.vocab_size)

    def reset(self) -> None:
        pass  # the backend is the target's: the loop resets it

    def observe(self, accepted: int, ids: list[int], hidden: Hidden | None = None) -> None:
        pass  # the loop's rollback crops the backend to the accepted length

    def exit_logits(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """The exit's logits [v] (the head's vocabulary) from the residual stream h [H] after `layer` layers."""
        norm = self.backend.body.norm
        with torch.inference_mode():
            z = norm(h) @ self.rows.T if self.heads is None else self.heads(h, layer, norm, self.rows)
        return z.float()

    def full_row(self, z: torch.Tensor) -> torch.Tensor:
        """Head logits [v] -> full-vocabulary logits [V] (-inf outside a reduced head)."""
        if self.vocab is None:
            return z
        full = torch.full((self.vocab_size,), float("-inf"), device=z.device)
        full[self.vocab] = z
        return full

    def propose(self, ctx: DraftContext) -> Draft:
        b, bound = self.backend, self.bound
        ids = ctx.ids
        if b.tokens != ids[:-1]:
            return Draft()  # the target has not computed the context yet (the first step is its prefill)
        b.rollback(len(ids) - 1)  # forget positions an earlier proposal left unverified
        tokens: list[int] = []
        probs: list[torch.Tensor] = []
        confidence: list[float] = []
        layers: list[int] = []
        x = ids[-1]
        while True:
            b.push([x])
            exit_layer, z, c = None, None, 0.0
            for layer in bound.exits:
                z = self.exit_logits(b.advance(layer)[-1], layer)  # [v]
                c = bound.confidence(z, layer)
                if bound.exits_at(c):
                    exit_layer = layer
                    break
            if exit_layer is None:
                stop = "bound"  # unsure at the deepest exit: the position stays, verification finishes it
                break
            if ctx.sampling.greedy:
                j = int(z.argmax())
                x = j if self.vocab_ids is None else self.vocab_ids[j]
            else:
                q = probs_from_logits(self.full_row(z), ctx.sampling)  # [V]
                probs.append(q)
                x = sample(q, ctx.generator)
            tokens.append(x)
            confidence.append(c)
            layers.append(exit_layer)
            if len(tokens) >= ctx.k_max:
                stop = "d_max" if ctx.k_max >= bound.d_max else "budget"
                break
            if not ctx.keep_drafting(confidence):
                stop = "policy"
                break
        return Draft(tokens, torch.stack(probs) if probs else None, confidence, None, layers, stop)
