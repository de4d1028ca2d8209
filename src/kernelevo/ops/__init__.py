"""The ops users call: drop-ins for their MLX counterparts, run by kernelevo's kernels."""

from ._runtime import BackendNotSupportedError, Explanation, forget_selections
from ._runtime import ext as _ext  # noqa: F401 — the loaded extension, for tests and tools
from .linear import linear
from .matmul_op import explain_matmul, matmul, matmul_launcher, select_matmul

__all__ = ["BackendNotSupportedError", "Explanation", "explain_matmul", "forget_selections",
           "linear", "matmul", "matmul_launcher", "select_matmul"]
