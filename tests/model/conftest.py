"""Fixtures of the model tests."""

from hf_parity import quiet_transformers  # noqa: F401  (a fixture, used by the HF parity tests)
