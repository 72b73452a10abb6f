"""Shared fixtures.

`shared_data` is the folder of real public datasets (tinyshakespeare, GSM8K, ...) that sits beside
the repository as `../shared/data`, or wherever `LMLAB_SHARED_DATA` points. Tests that need it skip
with the reason when it is absent, except under CI (the `CI` environment variable is set), where
an absent folder is a failure: CI always has it, so a skip there would hide a broken setup.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    return Path(os.environ.get("LMLAB_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        reason = f"real datasets not found at {path} (set LMLAB_SHARED_DATA to the shared data folder)"
        if os.environ.get("CI"):
            pytest.fail(reason + "; CI must have them")
        pytest.skip(reason)
    return path
