"""kernelevo: autotuned matmul and attention kernels for MLX, steered by `.kevo` heuristics.

    import kernelevo as ke
    y = ke.matmul(a, b)                 # a drop-in for mx.matmul
    o = ke.attention(q, k, v, scale=s, mask="causal")  # for mx.fast.scaled_dot_product_attention
    h = ke.rms_norm(x, w, 1e-6)         # for mx.fast.rms_norm (and ke.rope for mx.fast.rope)
    y = ke.matmul(x, w, transpose_b=True, config="gemm mc=96 nc=1024 kc=256 mr=6 nr=64 threads=2 split=m")
"""

from .config import ConfigError, KernelConfig
from .dsl import DSLError
from .ops import BackendNotSupportedError, explain_matmul, forget_selections, linear, matmul, select_matmul
from .ops import attention, explain_attention, rms_norm, rope, select_attention

__version__ = "0.1.0"

__all__ = [
    "BackendNotSupportedError", "ConfigError", "DSLError", "KernelConfig", "explain_matmul",
    "forget_selections", "linear", "matmul", "select_matmul", "__version__",
    "attention", "explain_attention", "rms_norm", "rope", "select_attention",
]
