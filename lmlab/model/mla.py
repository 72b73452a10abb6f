"""Multi-head latent attention (stub, being written)."""
