"""Shared test helpers: random operands and an independent float64 reference."""

import mlx.core as mx
import numpy as np

MX = {"f32": mx.float32, "f16": mx.float16, "bf16": mx.bfloat16}

# Normwise relative error allowed (max |out - ref| / max |ref|): output rounding of the
# dtype plus f32 accumulation; a wrong tile or edge is off by O(1).
TOL = {"f32": 2e-5, "f16": 2e-3, "bf16": 1e-2}


def operand(rng, shape, dtype):
    return mx.array(rng.standard_normal(shape).astype(np.float32)).astype(MX[dtype])


def f64(x):
    return np.array(x.astype(mx.float32), dtype=np.float64)


def relative_error(out, ref):
    got = f64(out) if isinstance(out, mx.array) else out
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert np.all(np.isfinite(got)), "output has NaN/inf"
    scale = np.max(np.abs(ref)) if ref.size else 1.0
    return float(np.max(np.abs(got - ref)) / scale) if ref.size else 0.0
