"""ke.rms_norm and ke.rope (the CPU primitives) against float64 references computed here,
in the dtype that runs, on odd sizes, strided inputs, offsets per batch and given
frequencies; gradients against MLX's own ops'; bad arguments get clear errors."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

import kernelevo as ke
from kernelevo.tune.correctness import compare, to_f64

DTYPES = {"f32": mx.float32, "f16": mx.float16, "bf16": mx.bfloat16}


def operand(shape, dtype, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return mx.array((rng.standard_normal(shape) * scale).astype(np.float32)).astype(DTYPES[dtype])


def rms_reference(x, w, eps):
    x = to_f64(x)
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y if w is None else y * to_f64(w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1024), (3, 77), (2, 5, 4, 33), (129,)])
@pytest.mark.parametrize("weighted", [True, False])
def test_rms_norm_matches_a_float64_reference(dtype, shape, weighted):
    x = operand(shape, dtype, 1, scale=3.0)
    w = operand(shape[-1:], dtype, 2) + 1 if weighted else None
    out = ke.rms_norm(x, w, 1e-5)
    assert out.dtype == x.dtype and out.shape == x.shape
    check = compare(out, rms_reference(x, w, 1e-5), dtype)
    assert check.ok, check.reason


def test_rms_norm_reads_strided_rows_and_promotes_like_mlx():
    x = operand((4, 6, 40), "bf16", 3).transpose(1, 0, 2)  # rows not contiguous
    w = operand((40,), "f32", 4)
    out = ke.rms_norm(x, w, 1e-6)
    want = mx.fast.rms_norm(x, w, 1e-6)
    assert out.dtype == want.dtype == mx.float32
    assert compare(out, rms_reference(x, w, 1e-6), "bf16").ok
    x_last = operand((40, 6), "f32", 5).T  # the normalised axis itself strided
    assert compare(ke.rms_norm(x_last, None, 1e-6), rms_reference(x_last, None, 1e-6), "f32").ok


def rope_reference(x, dims, traditional, base, scale, offsets, freqs=None):
    x = to_f64(x)
    out = x.copy()
    half = dims // 2
    inv = 1.0 / np.asarray(freqs, dtype=np.float64) if freqs is not None else \
        base ** (-np.arange(half, dtype=np.float64) * 2 / dims)
    T = x.shape[-2]
    offsets = np.broadcast_to(np.asarray(offsets, dtype=np.float64).reshape(-1), (x.shape[0],))
    pos = scale * (offsets[:, None] + np.arange(T)[None, :])  # [B, T]
    theta = pos[..., None] * inv  # [B, T, half]
    theta = theta.reshape((x.shape[0],) + (1,) * (x.ndim - 3) + theta.shape[1:])
    c, s = np.cos(theta), np.sin(theta)
    if traditional:
        x1, x2 = x[..., 0:dims:2], x[..., 1:dims:2]
        out[..., 0:dims:2], out[..., 1:dims:2] = x1 * c - x2 * s, x1 * s + x2 * c
    else:
        x1, x2 = x[..., :half], x[..., half:dims]
        out[..., :half], out[..., half:dims] = x1 * c - x2 * s, x1 * s + x2 * c
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("shape,dims", [((1, 16, 1, 128), 128), ((2, 3, 7, 64), 48), ((2, 5, 96), 96),
                                        ((1, 2, 3, 9, 32), 32)])
def test_rope_matches_a_float64_reference(dtype, traditional, shape, dims):
    x = operand(shape, dtype, 6)
    out = ke.rope(x, dims, traditional=traditional, base=10000.0, scale=1.0, offset=37)
    assert out.dtype == x.dtype and out.shape == x.shape
    check = compare(out, rope_reference(x, dims, traditional, 10000.0, 1.0, 37), dtype)
    assert check.ok, check.reason
    # what rope leaves alone (features past dims) is copied exactly
    assert mx.array_equal(out[..., dims:], x[..., dims:])


def test_rope_with_offsets_per_batch_frequencies_scale_and_a_strided_input():
    q = operand((3, 6, 4, 64), "bf16", 7).transpose(0, 2, 1, 3)  # [B, L, H, D] -> [B, H, L, D]
    offsets = mx.array([0, 5, 300], dtype=mx.int32)
    freqs = mx.array(np.linspace(1.0, 5000.0, 32).astype(np.float32))
    out = ke.rope(q, 64, traditional=False, base=None, scale=0.5, offset=offsets, freqs=freqs)
    want = rope_reference(q, 64, False, None, 0.5, [0, 5, 300], np.array(freqs))
    check = compare(out, want, "bf16")
    assert check.ok, check.reason
    mlx = mx.fast.rope(q, 64, traditional=False, base=None, scale=0.5, offset=offsets, freqs=freqs)
    assert compare(mlx, want, "bf16").ok  # the reference is MLX's function


@pytest.mark.parametrize("op", ["rms_norm", "rope"])
def test_gradients_are_mlx_ops_gradients(op):
    x = operand((2, 4, 3, 32), "f32", 8)
    w = operand((32,), "f32", 9) + 1
    cot = operand((2, 4, 3, 32), "f32", 10)
    if op == "rms_norm":
        ours = lambda x, w: (ke.rms_norm(x, w, 1e-5) * cot).sum()  # noqa: E731
        theirs = lambda x, w: (mx.fast.rms_norm(x, w, 1e-5) * cot).sum()  # noqa: E731
        args = (x, w)
    else:
        ours = lambda x: (ke.rope(x, 24, traditional=False, base=1e4, scale=1.0, offset=3) * cot).sum()  # noqa: E731
        theirs = lambda x: (mx.fast.rope(x, 24, traditional=False, base=1e4, scale=1.0, offset=3) * cot).sum()  # noqa: E731
        args = (x,)
    argnums = tuple(range(len(args)))
    got = mx.grad(ours, argnums=argnums)(*args)
    want = mx.grad(theirs, argnums=argnums)(*args)
    for g, h in zip(got, want):
        assert np.allclose(np.array(g), np.array(h), rtol=1e-4, atol=1e-5)


def test_bad_arguments_say_what_is_wrong():
    x = operand((1, 2, 3, 8), "f32", 11)
    with pytest.raises(ValueError, match="weight must be one-dimensional"):
        ke.rms_norm(x, mx.ones((7,)), 1e-5)
    with pytest.raises(ValueError, match="dims must be even"):
        ke.rope(x, 5, traditional=False, base=1e4, scale=1.0, offset=0)
    with pytest.raises(ValueError, match="at least 3 dimensions"):
        ke.rope(x[0, 0], 8, traditional=False, base=1e4, scale=1.0, offset=0)
    with pytest.raises(ValueError, match="exactly one of base and freqs"):
        ke.rope(x, 8, traditional=False, base=None, scale=1.0, offset=0)
    with pytest.raises(ValueError, match="one element per batch"):
        ke.rope(x, 8, traditional=False, base=1e4, scale=1.0, offset=mx.array([1, 2], dtype=mx.int32))
    assert math.isfinite(float(ke.rms_norm(x, None, 1e-5).sum()))
