"""Backends run one model with its KV cache. The decoding loop talks to models only through `Backend`."""

from adaspec.core.backends.base import Backend
from adaspec.core.backends.torch import TorchBackend

__all__ = ["Backend", "TorchBackend"]
