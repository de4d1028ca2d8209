"""A wrong MLX or nanobind combination fails at import, saying what to install."""


import mlx.core as mx
import pytest

from kernelevo import _abi


class FakeExtension:
    def __init__(self, built="0.32.4", runtime="0.32.4", probe_error=None):
        self.info = {"mlx_version_built": built, "mlx_version": runtime, "nanobind_version": "2.9.0"}
        self.probe_error = probe_error

    def build_info(self):
        return self.info

    def abi_probe(self, x):
        if self.probe_error:
            raise self.probe_error
        return 0


def load_with(monkeypatch, fake):
    import kernelevo

    monkeypatch.setattr(kernelevo, "_ext", fake, raising=False)
    monkeypatch.setitem(__import__("sys").modules, "kernelevo._ext", fake)
    return _abi.load_extension()


def test_matching_build_loads(monkeypatch):
    fake = FakeExtension(built=mx.__version__, runtime=mx.__version__)
    assert load_with(monkeypatch, fake) is fake


def test_other_mlx_version_is_refused(monkeypatch):
    with pytest.raises(ImportError, match=r"built against MLX 0\.0\.1.*pip install mlx==0\.0\.1"):
        load_with(monkeypatch, FakeExtension(built="0.0.1", runtime="0.0.1"))


def test_nanobind_abi_mismatch_is_refused(monkeypatch):
    fake = FakeExtension(built=mx.__version__, runtime=mx.__version__,
                         probe_error=TypeError("incompatible function arguments"))
    with pytest.raises(ImportError, match="nanobind==3.1.0"):
        load_with(monkeypatch, fake)


def test_real_extension_reports_its_build():
    import kernelevo

    info = kernelevo.ops._ext.build_info()
    assert info["mlx_version_built"] == mx.__version__ and info["nanobind_version"].startswith("3.")
    assert len(info["cpu_kernel_hash"]) == 16
