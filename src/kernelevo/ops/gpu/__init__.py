"""Ops on a GPU stream: select with the same heuristics as everywhere, lower, launch.

MLX exports its custom-kernel launchers but not the primitive behind them, so on a GPU
stream a kernelevo op is the output of the extension's launch (MLX's fast::metal_kernel
or fast::cuda_kernel), wrapped, where a transformation traces it, in `mx.custom_function`
whose VJP is built from kernelevo ops again; the `mlx` family runs MLX's own op. See
docs/architecture.md, "GPU backends".

- launch.py: which GPU back-end this MLX has, launches of lowered kernels, plans
- matmul_op.py, attention_op.py: the two ops, prepared once per call signature
- mlx_ops.py: MLX's own ops for the same computations (the `mlx` family, VJPs)
"""

from .attention_op import attention, describe_attention, select_attention_config
from .launch import GPU_BACKENDS, require_gpu
from .matmul_op import matmul, select_matmul_config
from .mlx_ops import apply_epilogue, mlx_attention

__all__ = ["GPU_BACKENDS", "apply_epilogue", "attention", "describe_attention", "matmul",
           "mlx_attention", "require_gpu", "select_attention_config", "select_matmul_config"]
