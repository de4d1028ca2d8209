"""Workloads: the op calls a tuning run measures.

Built-in presets are the shapes of real model layers (no weights needed): a linear
layer y = x W^T with W stored [out, in] is a matmul with M = tokens, N = out, K = in and
transpose_b set, exactly as `ke.matmul(x, w, transpose_b=True)` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..features import DTYPES, matmul_features


@dataclass(frozen=True)
class MatmulShape:
    M: int
    N: int
    K: int
    dtype: str = "bf16"
    batch: int = 1
    transpose_b: bool = True
    label: str = ""

    op = "matmul"

    def features(self) -> dict:
        return matmul_features(self.M, self.N, self.K, batch=self.batch, dtype=self.dtype,
                               transpose_b=self.transpose_b)

    @property
    def key(self) -> str:
        """Stable identity in the database."""
        return (f"M{self.M}_N{self.N}_K{self.K}_b{self.batch}_{self.dtype}"
                f"_t{int(self.transpose_b)}")

    @property
    def flops(self) -> float:
        return 2.0 * self.M * self.N * self.K * self.batch

    def __str__(self) -> str:
        return (f"{self.M}x{self.N}x{self.K} {self.dtype}"
                + (f" batch {self.batch}" if self.batch > 1 else "")
                + (" (b transposed)" if self.transpose_b else ""))


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    shapes: tuple[MatmulShape, ...]


def linear_layers(hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int,
                  tokens: tuple[int, ...], dtypes: tuple[str, ...]) -> tuple[MatmulShape, ...]:
    """The projections of one transformer block (q, k/v, o, gate/up, down)."""
    layers = {
        "q_proj": (heads * head_dim, hidden),
        "kv_proj": (kv_heads * head_dim, hidden),
        "o_proj": (hidden, heads * head_dim),
        "gate_up_proj": (intermediate, hidden),
        "down_proj": (hidden, intermediate),
    }
    shapes, seen = [], set()
    for dtype in dtypes:
        assert dtype in DTYPES
        for m in tokens:
            for name, (n, k) in layers.items():
                if (m, n, k, dtype) in seen:
                    continue
                seen.add((m, n, k, dtype))
                shapes.append(MatmulShape(m, n, k, dtype, label=name))
    return tuple(shapes)


PRESETS: dict[str, Workload] = {
    "qwen3-0.6b": Workload(
        "qwen3-0.6b",
        "Qwen3-0.6B projections (hidden 1024, 16/8 heads of 128, MLP 3072) at 1, 16 and 128 "
        "tokens, in bf16 and f32",
        linear_layers(1024, 3072, 16, 8, 128, tokens=(1, 16, 128), dtypes=("bf16", "f32"))),
    "tiny": Workload(
        "tiny", "three small shapes: a quick check of the machinery, not a tuning workload",
        (MatmulShape(1, 256, 128, "f32", label="decode"),
         MatmulShape(33, 96, 80, "f32", label="odd"),
         MatmulShape(64, 128, 256, "bf16", label="small")),
    ),
}
DEFAULT_WORKLOAD = "qwen3-0.6b"
