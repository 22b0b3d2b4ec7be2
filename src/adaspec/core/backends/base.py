"""The backend interface: score positions on top of a KV cache, and roll the cache back."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from adaspec.core.errors import AdaspecError


class Backend(ABC):
    """One model and its KV cache.

    Subclasses implement `_forward` (append positions to the cache, return logits of the last `keep`)
    and `_truncate` (drop cached positions from a length on). The base class keeps the token ids
    whose keys and values are cached, so `sync` can feed exactly the positions a cache is missing:
    that one mechanism serves prefill, verification, drafting and lazy catch-up after another
    model produced tokens.
    """

    vocab_size: int
    max_context: int
    # the decoding loop prefills all but the prompt's last token apart from the steps after it, so that no method
    # scores a position in a long batch that another scores in a short one (llama.cpp with flash attention)
    split_prefill: bool = False

    def __init__(self) -> None:
        self.tokens: list[int] = []  # ids in the cache, batch row 0

    @abstractmethod
    def _forward(self, ids: torch.Tensor, keep: int) -> torch.Tensor:
        """ids [B, n] -> float logits [B, keep, V] of the last `keep` positions; the cache grows by n."""

    @abstractmethod
    def _truncate(self, length: int) -> None:
        """Keep the first `length` cached positions."""

    # where the model's outputs live; ids go there once per forward, and the decoding loop reads back only what it
    # must (the acceptance rule: one read per step for greedy decoding)
    device: torch.device = torch.device("cpu")

    @property
    def where(self) -> str:
        """Where the model runs, as bench records name it: 'torch:<dtype>' ('@cuda' off the CPU) here,
        'llamacpp:<weight type>' there."""
        model = getattr(self, "model", None)
        if model is None:
            return torch_where(None)
        weight = next(model.parameters())
        return torch_where(weight.dtype, weight.device)

    def reset(self) -> None:
        self._truncate(0)
        self.tokens = []

    def start(self, prompt_ids: list[int]) -> bool:
        """Begin a sequence: an empty cache, then, where `split_prefill`, all but the prompt's last token (the first
        step scores that one with whatever follows it). True if it fed the prompt."""
        self.reset()
        if self.split_prefill and len(prompt_ids) > 1:
            self.extend(prompt_ids[:-1])
            return True
        return False

    def rollback(self, length: int) -> None:
        """Forget every cached position at index >= length."""
        if length < len(self.tokens):
            self._truncate(length)
            del self.tokens[length:]

    def extend(self, ids: list[int], keep: int = 1) -> torch.Tensor:
        """Append `ids` to the cache; return logits [keep, V] of the last `keep` of them."""
        if len(self.tokens) + len(ids) > self.max_context:
            raise AdaspecError(
                f"sequence of {len(self.tokens) + len(ids)} tokens exceeds the model context of "
                f"{self.max_context}; shorten the prompt or lower --max-new-tokens"
            )
        self.hidden_start = len(self.tokens)  # position of ids[0], for backends that keep hidden states
        logits = self._forward(self.to_device(torch.tensor([ids], dtype=torch.long)), keep)  # [1, keep, V]
        self.tokens.extend(ids)
        return logits[0]

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A host tensor (token ids) copied to the model's device: the one host-to-device copy of a forward."""
        return t if t.device == self.device else t.to(self.device, non_blocking=True)

    def sync(self, ids: list[int], keep: int = 1) -> torch.Tensor:
        """Make the cache hold exactly `ids`, feeding only what is missing (at least one position);
        return logits [keep, V] of the last `keep` positions of `ids`."""
        n = len(self.tokens)
        if not (n <= len(ids) and ids[:n] == self.tokens):
            n = common_prefix(self.tokens, ids)
        n = min(n, len(ids) - keep)
        self.rollback(n)
        return self.extend(ids[n:], keep)


def torch_where(dtype: torch.dtype | None, device: torch.device | str | None = None) -> str:
    """A torch model's place in bench records: 'torch:<dtype>', with '@<device>' off the CPU ('torch:bfloat16@cuda')."""
    at = "" if device is None or torch.device(device).type == "cpu" else f"@{torch.device(device).type}"
    return f"torch:{str(dtype).removeprefix('torch.')}{at}"


def llamacpp_where(weights: str, flash_attn: bool = False) -> str:
    """A GGUF's place in bench records: 'llamacpp:<weight format>' (ftype_name's names), '+fa' with flash attention."""
    return f"llamacpp:{weights}{'+fa' if flash_attn else ''}"


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
