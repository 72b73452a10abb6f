"""State-space layers (stub, being written)."""
