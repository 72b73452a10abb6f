"""Mixture of experts (stub, being written)."""
