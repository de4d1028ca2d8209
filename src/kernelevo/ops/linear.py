"""kernelevo.linear: a linear layer, activation(scale * x @ w.T + bias) + residual, as
mlx.nn.Linear stores its weight — one kernelevo.matmul with a fused epilogue."""

from __future__ import annotations

import mlx.core as mx

from ..config import KernelConfig
from .matmul_op import matmul


def linear(x: mx.array, weight: mx.array, bias: mx.array | None = None, *,
           activation: str | None = None, residual: mx.array | None = None,
           scale: float | None = None, config: KernelConfig | str | None = None,
           stream=None) -> mx.array:
    """activation(scale * x @ weight.T + bias) + residual for weight [out, in].

    activation is None, "relu", "silu", "gelu" (erf) or "gelu_tanh". The heuristics see the
    epilogue (the matmul feature `epilogue`); a configuration with `epilogue=fused` applies
    it in the kernel's output stage on every backend."""
    if weight.ndim != 2:
        raise ValueError(f"weight must be [out, in], got shape {tuple(weight.shape)}")
    return matmul(x, weight, transpose_b=True, bias=bias, activation=activation,
                  residual=residual, scale=scale, config=config, stream=stream)
