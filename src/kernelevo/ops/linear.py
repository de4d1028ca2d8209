"""kernelevo.linear: a linear layer with its epilogue, activation(scale * x @ w.T + bias)
+ residual, fused into the matmul kernel where the chosen configuration says so."""

from __future__ import annotations

import mlx.core as mx

from ..config import KernelConfig
from ..lowering.cuda import ACTIVATIONS, Epilogue
from . import gpu
from ._runtime import stream_backend
from .matmul_op import matmul


def linear(x: mx.array, weight: mx.array, bias: mx.array | None = None, *,
           activation: str | None = None, residual: mx.array | None = None,
           scale: float | None = None, config: KernelConfig | str | None = None,
           stream=None) -> mx.array:
    """activation(scale * x @ weight.T + bias) + residual, for weight [out, in] as
    mlx.nn.Linear stores it. activation is None, relu, silu, gelu (erf) or gelu_tanh.

    On a GPU (Metal or CUDA) the heuristics see the epilogue (the matmul feature `epilogue`) and a
    configuration with `epilogue=fused` applies it in the kernel's output stage; elsewhere
    it runs as MLX ops after kernelevo's matmul."""
    name = activation or "none"
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of "
                         f"{', '.join(a for a in ACTIVATIONS if a != 'none')} or None")
    if weight.ndim != 2:
        raise ValueError(f"weight must be [out, in], got shape {tuple(weight.shape)}")
    ep = Epilogue(bias=bias is not None, activation=name, residual=residual is not None,
                  alpha=None if scale is None else float(scale))
    if stream_backend(stream) in gpu.GPU_BACKENDS:
        return gpu.matmul(x, weight, transpose_b=True, config=config, epilogue=ep, bias=bias,
                          residual=residual, stream=stream)
    y = matmul(x, weight, transpose_b=True, config=config, stream=stream)
    if bias is not None:
        bias = bias.astype(y.dtype)
    if residual is not None:
        residual = residual.astype(y.dtype)
    return gpu.apply_epilogue(y, ep, bias, residual, stream)
