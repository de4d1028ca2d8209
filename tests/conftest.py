import sys
from pathlib import Path

import numpy as np
import pytest

# tests/mslemu, the MSL emulator, is imported as `mslemu` under any pytest import mode.
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path, monkeypatch):
    """Each test gets its own data and cache directories (tuned heuristics, database)."""
    monkeypatch.setenv("KERNELEVO_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("KERNELEVO_CACHE_DIR", str(tmp_path / "cache"))
    import kernelevo

    kernelevo.forget_selections()
    yield
    kernelevo.forget_selections()


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
