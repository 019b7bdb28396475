import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _placement_cache(tmp_path, monkeypatch):
    """Each test's measured-placement decisions go to a cache of its own, never the user's."""
    monkeypatch.setenv("PTQ_CACHE", str(tmp_path / "ptq-cache"))
