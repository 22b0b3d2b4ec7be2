"""Drafters propose tokens for the target to verify. All share the two-method `Drafter` interface."""

from adaspec.drafters.base import Draft, DraftContext, Drafter
from adaspec.drafters.lookup import PromptLookupDrafter
from adaspec.drafters.model import ModelDrafter

__all__ = ["Draft", "DraftContext", "Drafter", "ModelDrafter", "PromptLookupDrafter"]
