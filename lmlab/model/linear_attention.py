"""Linear attention (stub, being written)."""
