"""Pieces the GPU backends' families share: element sizes, thread limits, the family that
routes a call to MLX's own kernel."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .schema import MLX_BUILTIN, Constraint, Family, Param

ITEMSIZE = {"f32": 4, "f16": 2, "bf16": 2}


def itemsize(call: Mapping[str, Any] | None) -> int:
    """Bytes per element of the call's dtype; without a call (a static check), the largest."""
    return ITEMSIZE.get((call or {}).get("dtype", "f32"), 4)


def threads_fit(threads_of, text: str) -> Constraint:
    """threads per threadgroup/block within the chip's limit (1024 when not known)."""
    return Constraint(f"{text} <= chip.max_threads",
                      lambda p, chip, call: threads_of(p) <= (chip.max_threads or 1024))


def memory_fit(bytes_of, text: str, expr: str) -> tuple[Constraint, Constraint]:
    """Threadgroup/shared memory within the chip's limit: statically (bytes_of(p, None),
    the most any call needs, or a stated typical call) and for the call (`expr`, the same
    sum as a constraint on the call)."""
    return (Constraint(f"{text} <= chip.threadgroup_memory (the largest layout)",
                       lambda p, chip, call: bytes_of(p, None) <= chip.threadgroup_memory,
                       without_call=True),
            Constraint.on_call_expr(f"{expr} <= chip.threadgroup_memory"))


def builtin(op: str, backend: str) -> Family:
    what = "mx.matmul" if op == "matmul" else "mx.fast.scaled_dot_product_attention"
    return Family(op=op, backend=backend, name=MLX_BUILTIN, params=(),
                  doc=f"Run MLX's own kernel ({what}): the choice that is never slower than "
                      f"stock MLX, for calls where no kernelevo kernel is known to be faster.")


SCALE_AT = Param("scale_at", "choice", "multiply the queries by the softmax scale as they are "
                 "loaded (q: once per query element) or every score (scores: no rounding of "
                 "scaled low-precision queries)", choices=("q", "scores"))

CAUSAL_ALIGNMENT = Constraint.on_call_expr("not (causal or window > 0) or q_len <= kv_len",
                                           "every query of a causal or windowed call sees a key")

#: bytes per element of the call's dtype, in a constraint
ITEMSIZE_EXPR = "(4 if dtype == f32 else 2)"
