"""Gates for issue 20 (the denoiser zoo learns): slow, short synthetic trainings that pin the measured wins.

Each gate compares a setting against its named baseline at the same budget and seed, and must hold for any
seed: the seed comes from the environment variable ``DIFFSEG_SEED`` (default 0) through ``zoo_seed``, and
each gate was checked for seeds 0, 1 and 2 (margins in its docstring). Run by ``make test-full``.
"""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture
def zoo_seed() -> int:
    """The gate's seed: ``DIFFSEG_SEED`` from the environment, 0 when unset."""
    return int(os.environ.get("DIFFSEG_SEED", "0"))
