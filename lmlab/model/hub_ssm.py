"""Hugging Face families: (stub, being written)."""

FAMILIES: tuple = ()
