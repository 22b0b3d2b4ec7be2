"""Drafters propose tokens for the target to verify. All share the two-method `Drafter` interface."""

from adaspec.core.drafters.base import Draft, DraftContext, Drafter
from adaspec.core.drafters.lookup import PromptLookupDrafter
from adaspec.core.drafters.model import ModelDrafter

__all__ = ["Draft", "DraftContext", "Drafter", "ModelDrafter", "PromptLookupDrafter"]
