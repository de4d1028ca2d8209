"""The ops users call: drop-ins for their MLX counterparts, run by kernelevo's kernels."""

from ._runtime import BackendNotSupportedError, Explanation, forget_selections
from ._runtime import ext as _ext  # noqa: F401 — the loaded extension, for tests and tools
from .attention_op import attention, attention_launcher, explain_attention, select_attention
from .linear import linear
from .matmul_op import explain_matmul, matmul, matmul_launcher, select_matmul
from .rowwise import rms_norm, rope

__all__ = ["BackendNotSupportedError", "Explanation", "explain_matmul", "forget_selections",
           "linear", "matmul", "matmul_launcher", "select_matmul",
           "attention", "attention_launcher", "explain_attention", "select_attention", "rms_norm", "rope"]
