"""Pieces the GPU backends' families share: element sizes, thread limits, the family that
routes a call to MLX's own kernel."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..features import is_causal
from .schema import Constraint, Family, Param

ITEMSIZE = {"f32": 4, "f16": 2, "bf16": 2}


def itemsize(call: Mapping[str, Any]) -> int:
    """Bytes per element of the call's dtype; without a call (a static check), the largest."""
    return ITEMSIZE.get(call.get("dtype", "f32"), 4)


def threads_fit(threads_of, text: str) -> Constraint:
    """threads per threadgroup/block within the chip's limit (1024 when not known)."""
    return Constraint(f"{text} <= chip.max_threads",
                      lambda p, chip, call: threads_of(p) <= (chip.max_threads or 1024))


def memory_fit(bytes_of, text: str) -> Constraint:
    """Threadgroup/shared memory within the chip's limit; with no call, for f32 (the most)."""
    return Constraint(f"{text} <= chip.threadgroup_memory",
                      lambda p, chip, call: bytes_of(p, call) <= chip.threadgroup_memory)


def builtin(op: str, backend: str) -> Family:
    what = "mx.matmul" if op == "matmul" else "mx.fast.scaled_dot_product_attention"
    return Family(op=op, backend=backend, name="mlx", params=(),
                  doc=f"Run MLX's own kernel ({what}): the choice that is never slower than "
                      f"stock MLX, for calls where no kernelevo kernel is known to be faster.")


SCALE_AT = Param("scale_at", "choice", "multiply the queries by the softmax scale as they are "
                 "loaded (q: once per query element) or every score (scores: no rounding of "
                 "scaled low-precision queries)", choices=("q", "scores"))

CAUSAL_ALIGNMENT = Constraint(
    "q_len <= kv_len when causal or windowed (every query sees a key)",
    lambda p, chip, call: not is_causal(call) or call["q_len"] <= call["kv_len"], on_call=True)
