"""Drafter construction and training."""
