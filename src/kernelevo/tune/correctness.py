"""Is a kernel's output right? Compared with a float64 reference in the dtype that runs."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

# Normwise relative error allowed: max|out - ref| / max|ref|. Rounding the output alone
# costs 2^-9 (bf16) and 2^-12 (f16); f32 accumulation of 10^4 terms stays near 1e-6.
# A kernel that drops or repeats a block is off by O(1).
TOLERANCE = {"f32": 1e-4, "f16": 4e-3, "bf16": 1.6e-2}

MX_DTYPES = {"f32": mx.float32, "f16": mx.float16, "bf16": mx.bfloat16}


@dataclass(frozen=True)
class Check:
    ok: bool
    error: float  # normwise relative error (inf when the output has NaN/inf)
    tolerance: float

    @property
    def reason(self) -> str:
        if self.ok:
            return ""
        if not np.isfinite(self.error):
            return "output has NaN or inf"
        return f"relative error {self.error:.3g} exceeds {self.tolerance:.3g}"


def random_operand(shape: tuple[int, ...], dtype: str, seed: int) -> mx.array:
    rng = np.random.default_rng(seed)
    data = rng.standard_normal(shape, dtype=np.float32)
    return mx.array(data).astype(MX_DTYPES[dtype])


def to_f64(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32), dtype=np.float64)


def compare(out: mx.array, reference: np.ndarray, dtype: str) -> Check:
    got = to_f64(out)
    tolerance = TOLERANCE[dtype]
    if got.shape != reference.shape:
        return Check(False, float("inf"), tolerance)
    if not np.all(np.isfinite(got)):
        return Check(False, float("inf"), tolerance)
    scale = float(np.max(np.abs(reference))) if reference.size else 0.0
    diff = float(np.max(np.abs(got - reference))) if reference.size else 0.0
    error = diff / scale if scale > 0 else diff
    return Check(error <= tolerance, error, tolerance)
