"""Draft-length policies: how many tokens to draft this step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from adaspec.errors import AdaspecError


class LengthPolicy(Protocol):
    def draft_length(self) -> int:
        """The most tokens to draft this step."""

    def keep_drafting(self, confidences: list[float]) -> bool:
        """Asked by the drafter after each drafted token: draft another one?"""

    def observe(self, drafted: int, accepted: int) -> None:
        """Told the outcome of each verification."""


@dataclass
class FixedLength:
    k: int

    def __post_init__(self) -> None:
        if self.k < 1:
            raise AdaspecError(f"draft length k must be >= 1, got {self.k}")

    def draft_length(self) -> int:
        return self.k

    def keep_drafting(self, confidences: list[float]) -> bool:
        return True

    def observe(self, drafted: int, accepted: int) -> None:
        pass
