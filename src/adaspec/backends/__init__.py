"""Backends run one model with its KV cache. The decoding loop talks to models only through `Backend`."""

from adaspec.backends.base import Backend
from adaspec.backends.torch import TorchBackend

__all__ = ["Backend", "TorchBackend"]
