import numpy as np
import pytest


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
