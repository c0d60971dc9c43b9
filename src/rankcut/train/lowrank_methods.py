"""Placeholder: filled in by the training-methods work (issue 17)."""
