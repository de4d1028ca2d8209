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


@pytest.fixture(autouse=True)
def cpu_by_default(request):
    """Tests not marked `gpu` are about the CPU backend (or emulate a GPU at the launch
    boundary): they run with the CPU as MLX's default device on any machine, so a machine
    with a GPU runs the same suite as CI."""
    if request.node.get_closest_marker("gpu"):
        yield
        return
    import mlx.core as mx

    before = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(before)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
