"""Do a patched model's logits agree with the stock model's? Checked before anything is
timed, in the dtype the model runs, with the tolerance the tuner's verification uses."""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..tune.correctness import TOLERANCE, compare, to_f64
from .patching import patch

DTYPE_NAMES = {mx.float32: "f32", mx.float16: "f16", mx.bfloat16: "bf16"}


@dataclass(frozen=True)
class LogitsCheck:
    """Normwise relative errors (max |a - b| / max |b|) of the logits of a prompt (prefill,
    every position) and of decode steps (one token each through the KV cache), worst of
    the two.

    The check passes when the patched logits agree with the stock model's within the
    dtype's tolerance (`vs_stock`). In f16/bf16 two correct implementations can differ by
    more than one rounding after many layers; then the same model is run in f32 (its weights
    cast up exactly) and the check passes when the patched model is no further from that
    f32 run than the stock model is, plus one tolerance (`vs_f32` <= `stock_vs_f32` +
    tolerance). A wrong kernel is off by O(1) under either test."""

    ok: bool
    dtype: str
    tolerance: float
    vs_stock: float
    vs_f32: float | None = None  # None where the f32 run was not needed
    stock_vs_f32: float | None = None
    counts: dict = field(default_factory=dict)  # what the patch replaced

    @property
    def criterion(self) -> str:
        if self.vs_f32 is None:
            return "agrees with stock"
        return "no further from f32 than stock" if self.ok else "disagrees"

    def __str__(self) -> str:
        text = (f"logits {'ok' if self.ok else 'WRONG'} ({self.dtype}, tolerance "
                f"{self.tolerance:.1e}): patched vs stock {self.vs_stock:.2e}")
        if self.vs_f32 is not None:
            text += (f"; vs the f32 run: patched {self.vs_f32:.2e}, stock {self.stock_vs_f32:.2e}"
                     f" ({self.criterion})")
        return text


def model_dtype(model: nn.Module) -> str:
    """The dtype of the model's first floating-point linear weight (f32 if it has none)."""
    for _, module in model.named_modules():
        weight = module.get("weight") if isinstance(module, nn.Module) else None
        if isinstance(weight, mx.array) and weight.dtype in DTYPE_NAMES and weight.ndim == 2:
            return DTYPE_NAMES[weight.dtype]
    return "f32"


def _logits(model: nn.Module, prompt: mx.array, decode: mx.array) -> tuple[mx.array, mx.array]:
    """Logits of the whole prompt (one prefill through a KV cache) and of each decode token
    fed in turn (the same tokens for stock and patched, so errors cannot compound through
    different choices)."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    prefill = model(prompt[None], cache=cache)
    mx.eval(prefill)
    steps = []
    for token in decode.tolist():
        out = model(mx.array([[token]]), cache=cache)
        mx.eval(out)
        steps.append(out[0, -1])
    return prefill[0], mx.stack(steps)


def check_logits(model: nn.Module, prompt_tokens: int = 24, decode_tokens: int = 4,
                 seed: int = 0) -> LogitsCheck:
    """Runs the model stock, then patched (and unpatched again), on the same random tokens
    and compares the logits with kernelevo.tune.correctness.TOLERANCE for the model's dtype (see
    LogitsCheck). The model must be unpatched; it is left as it was."""
    vocab = vocab_size(model)
    rng = np.random.default_rng(seed)
    prompt = mx.array(rng.integers(0, vocab, prompt_tokens), dtype=mx.int32)
    decode = mx.array(rng.integers(0, vocab, max(decode_tokens, 1)), dtype=mx.int32)
    dtype = model_dtype(model)
    tolerance = TOLERANCE[dtype]
    stock = _logits(model, prompt, decode)
    with patch(model) as patched:
        ours = _logits(model, prompt, decode)
        counts = patched.counts
    vs_stock = _error(ours, stock, dtype)
    if vs_stock <= tolerance or dtype == "f32":
        return LogitsCheck(vs_stock <= tolerance, dtype, tolerance, vs_stock, counts=counts)
    reference = _f32_logits(model, prompt, decode)
    vs_f32, stock_vs_f32 = _error(ours, reference, dtype), _error(stock, reference, dtype)
    return LogitsCheck(vs_f32 <= stock_vs_f32 + tolerance, dtype, tolerance, vs_stock, vs_f32,
                       stock_vs_f32, counts)


def _error(got: tuple[mx.array, ...], reference: tuple[mx.array, ...], dtype: str) -> float:
    """The worse normwise relative error of the prefill and the decode logits."""
    return max(compare(g, to_f64(r), dtype).error for g, r in zip(got, reference))


def _f32_logits(model: nn.Module, prompt: mx.array, decode: mx.array):
    """The stock model's logits in f32; its own parameter arrays are put back afterwards."""
    saved = tree_flatten(model.parameters())
    try:
        model.set_dtype(mx.float32)
        return tuple(x.astype(mx.float32) for x in _logits(model, prompt, decode))
    finally:
        model.update(tree_unflatten(saved))


def vocab_size(model: nn.Module) -> int:
    args = getattr(model, "args", None)
    vocab = getattr(args, "vocab_size", None) or getattr(model, "vocab_size", None)
    if not vocab:
        raise ValueError("cannot tell the model's vocabulary size (no args.vocab_size)")
    return int(vocab)
