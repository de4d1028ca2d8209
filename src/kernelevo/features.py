"""What a heuristic rule can ask about a call: each op's features, with their types.

The DSL checker, the selection code, `kernelevo explain` and docs/dsl.md all read these
tables; nothing else lists them.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

FeatureType = Literal["int", "bool", "symbol", "number"]

#: dtype symbols as the DSL writes them, and the MLX dtype names they stand for
DTYPES: dict[str, str] = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
DTYPE_SYMBOL: dict[str, str] = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class Feature:
    name: str
    type: FeatureType
    doc: str
    symbols: tuple[str, ...] = ()  # the values a symbol feature can take


MATMUL_FEATURES: tuple[Feature, ...] = (
    Feature("M", "int", "rows of the product (tokens, for a linear layer)"),
    Feature("N", "int", "columns of the product (output features)"),
    Feature("K", "int", "the contracted dimension (input features)"),
    Feature("batch", "int", "number of independent products (broadcast batch axes, multiplied)"),
    Feature("dtype", "symbol", "element type of the operands and the result", tuple(DTYPES)),
    Feature("transpose_a", "bool", "the call asked for a's last two axes transposed"),
    Feature("transpose_b", "bool", "the call asked for b's last two axes transposed (a weight stored [N, K])"),
    Feature("epilogue", "symbol", "what is fused after the product",
            ("none", "bias", "activation", "residual", "scale", "mixed")),
)

ATTENTION_FEATURES: tuple[Feature, ...] = (
    Feature("batch", "int", "batch size"),
    Feature("heads", "int", "query heads"),
    Feature("kv_heads", "int", "key/value heads"),
    Feature("gqa", "int", "query heads per key/value head (heads / kv_heads)"),
    Feature("q_len", "int", "query sequence length"),
    Feature("kv_len", "int", "key/value sequence length"),
    Feature("head_dim", "int", "dimension of each head"),
    Feature("dtype", "symbol", "element type of q, k and v", tuple(DTYPES)),
    Feature("causal", "bool", "causal masking"),
    Feature("mask", "symbol", "kind of mask", ("none", "causal", "bool", "additive")),
    Feature("softcap", "number", "logit soft-capping value (0 when off)"),
    Feature("window", "int", "sliding-window size in tokens (0 when off)"),
)

OP_FEATURES: dict[str, tuple[Feature, ...]] = {
    "matmul": MATMUL_FEATURES,
    "attention": ATTENTION_FEATURES,
}

OPS: tuple[str, ...] = tuple(OP_FEATURES)


def feature(op: str, name: str) -> Feature | None:
    for f in OP_FEATURES[op]:
        if f.name == name:
            return f
    return None


def matmul_features(M: int, N: int, K: int, *, batch: int = 1, dtype: str = "f32",
                    transpose_a: bool = False, transpose_b: bool = False,
                    epilogue: str = "none") -> dict:
    """A matmul call's features, in the order of MATMUL_FEATURES. dtype is a DSL symbol
    (f32/f16/bf16) or an MLX dtype name."""
    dtype = DTYPE_SYMBOL.get(dtype, dtype)
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    return {"M": int(M), "N": int(N), "K": int(K), "batch": int(batch), "dtype": dtype,
            "transpose_a": bool(transpose_a), "transpose_b": bool(transpose_b),
            "epilogue": epilogue}


def attention_features(*, batch: int, heads: int, kv_heads: int, q_len: int, kv_len: int,
                       head_dim: int, dtype: str = "f16", mask: str = "none",
                       softcap: float = 0.0, window: int = 0) -> dict:
    """An attention call's features, in the order of ATTENTION_FEATURES. mask is none,
    causal, bool or additive; softcap and window are 0 when off."""
    dtype = DTYPE_SYMBOL.get(dtype, dtype)
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    if mask not in ("none", "causal", "bool", "additive"):
        raise ValueError(f"unknown mask kind {mask!r}; expected none, causal, bool or additive")
    if kv_heads <= 0 or heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    return {"batch": int(batch), "heads": int(heads), "kv_heads": int(kv_heads),
            "gqa": int(heads) // int(kv_heads), "q_len": int(q_len), "kv_len": int(kv_len),
            "head_dim": int(head_dim), "dtype": dtype, "causal": mask == "causal", "mask": mask,
            "softcap": float(softcap), "window": int(window)}


#: epilogue activations, and the code each GPU template's ACT argument gives them
ACTIVATIONS: dict[str, int] = {"none": 0, "relu": 1, "silu": 2, "gelu": 3, "gelu_tanh": 4}


@dataclass(frozen=True)
class Epilogue:
    """y = activation(alpha * (a @ b) + bias) + residual; bias is [N], residual the shape
    of the product."""

    bias: bool = False
    activation: str = "none"
    residual: bool = False
    alpha: float | None = None
    #: the matmul feature `epilogue`: none, one kind, or mixed (computed once: a GPU call
    #: reads it on every launch)
    kind: str = field(init=False, compare=False, repr=False)

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; expected one of "
                             f"{', '.join(ACTIVATIONS)}")
        parts = [name for name, on in (("bias", self.bias), ("activation", self.activation != "none"),
                                       ("residual", self.residual), ("scale", self.alpha is not None)) if on]
        object.__setattr__(self, "kind", parts[0] if len(parts) == 1 else ("mixed" if parts else "none"))

    @property
    def empty(self) -> bool:
        return self.kind == "none"

    def template_args(self) -> tuple[tuple[str, int | bool], ...]:
        return (("HAS_BIAS", self.bias), ("ACT", ACTIVATIONS[self.activation]),
                ("HAS_RESIDUAL", self.residual), ("HAS_SCALE", self.alpha is not None))

    def tag(self) -> str:
        return f"ep{int(self.bias)}{ACTIVATIONS[self.activation]}{int(self.residual)}{int(self.alpha is not None)}"

    def inputs(self) -> tuple[str, ...]:
        return (("bias",) if self.bias else ()) + (("residual",) if self.residual else ())

    def pointers(self) -> str:
        null = "static_cast<const T*>(nullptr)"
        return f"{'bias' if self.bias else null}, {'residual' if self.residual else null}"


def epilogue_of(bias, activation: str | None, residual, scale: float | None) -> Epilogue:
    """The epilogue of a matmul call's arguments (bias and residual arrays or None, an
    activation name or None, a scale or None; a scale of 1 is none)."""
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a number, not {type(scale).__name__}")
    return _epilogue(bias is not None, activation or "none", residual is not None,
                     None if scale is None or float(scale) == 1.0 else float(scale))


@functools.lru_cache(maxsize=1024)
def _epilogue(bias: bool, activation: str, residual: bool, alpha: float | None) -> Epilogue:
    return Epilogue(bias=bias, activation=activation, residual=residual, alpha=alpha)


def is_causal(call: Mapping) -> bool:
    """Keys after a query's aligned position are hidden: a causal mask, or a window."""
    return call["mask"] == "causal" or call["window"] > 0
