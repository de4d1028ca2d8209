"""The CUDA kernels' test matrix, shared by the emulated tests (test_cuda_emulated.py, CPU)
and the GPU tests (test_cuda_gpu.py): every family over configurations and shapes — odd
sizes, transposes, batches, GQA ratios, masks, softcap, windows, f16/bf16/f32 — each
checked against a float64 reference in the dtype that runs (tune/correctness.py's tolerances).

Cases run through kernelevo.ops.gpu (the op layer: shapes, batching, epilogues, masks,
lowering, launch); where that launches is the caller's choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from kernelevo.features import Epilogue
from kernelevo.ops import gpu
from kernelevo.tune.correctness import compare, random_operand, to_f64


@dataclass(frozen=True)
class MatmulCase:
    config: str
    M: int
    N: int
    K: int
    dtype: str = "bf16"
    ta: bool = False
    tb: bool = True
    a_batch: tuple[int, ...] = ()
    b_batch: tuple[int, ...] = ()
    epilogue: Epilogue = Epilogue()

    def __str__(self):
        tr = ("T" if self.ta else "N") + ("T" if self.tb else "N")
        return (f"{self.config.split()[0]}-{self.M}x{self.N}x{self.K}-{self.dtype}-{tr}"
                f"-{'x'.join(map(str, self.a_batch)) or '1'}-{'x'.join(map(str, self.b_batch)) or '1'}"
                f"-{self.epilogue.tag()}")


@dataclass(frozen=True)
class AttentionCase:
    config: str
    B: int
    Hq: int
    Hkv: int
    Lq: int
    Lk: int
    D: int
    dtype: str = "bf16"
    mask: str = "none"  # none, causal, bool, additive
    mask_shape: tuple[int, ...] | None = None  # for array masks: broadcastable to [B, Hq, Lq, Lk]
    softcap: float = 0.0
    window: int = 0

    def __str__(self):
        return (f"{self.config.split()[0]}-b{self.B}-h{self.Hq}/{self.Hkv}-L{self.Lq}/{self.Lk}"
                f"-d{self.D}-{self.dtype}-{self.mask}-sc{self.softcap:g}-w{self.window}")


GEMM = "gemm bm={} bn={} bk={} wm={} wn={} stages={} swizzle={} epilogue={}"
SPLITK = "splitk bm={} bn={} bk={} wm={} wn={} stages={} parts={} epilogue={}"
GELU_BIAS = Epilogue(bias=True, activation="gelu")
ALL = Epilogue(bias=True, activation="silu", residual=True, alpha=0.5)

MATMUL_CASES = [
    # every transpose combination, edges in M, N and K, several tile shapes and pipelines
    MatmulCase(GEMM.format(32, 32, 16, 1, 2, 2, 0, "fused"), 37, 45, 40, ta=False, tb=False),
    MatmulCase(GEMM.format(32, 32, 16, 1, 2, 2, 1, "fused"), 37, 45, 40, ta=True, tb=False),
    MatmulCase(GEMM.format(64, 32, 32, 2, 1, 3, 1, "fused"), 100, 70, 75, ta=False, tb=True),
    MatmulCase(GEMM.format(32, 64, 16, 2, 2, 1, 2, "fused"), 70, 130, 64, dtype="f16", ta=True, tb=True),
    MatmulCase(GEMM.format(128, 128, 32, 2, 4, 4, 2, "fused"), 300, 260, 200, dtype="bf16"),
    MatmulCase(GEMM.format(64, 128, 64, 2, 2, 3, 0, "fused"), 129, 127, 131, dtype="f16", ta=True),
    # batches: both operands, a broadcast weight (folded into M), a broadcast a
    MatmulCase(GEMM.format(32, 32, 32, 1, 1, 4, 0, "fused"), 33, 33, 72, tb=False, a_batch=(3,), b_batch=(3,)),
    MatmulCase(GEMM.format(64, 64, 32, 2, 2, 2, 0, "fused"), 17, 40, 48, a_batch=(2, 3)),
    MatmulCase(GEMM.format(32, 32, 32, 1, 2, 2, 0, "fused"), 20, 24, 40, a_batch=(1,), b_batch=(4,)),
    # epilogues: fused and separate
    MatmulCase(GEMM.format(64, 64, 32, 2, 2, 2, 1, "fused"), 70, 90, 64, epilogue=GELU_BIAS),
    MatmulCase(GEMM.format(64, 64, 32, 2, 2, 2, 1, "fused"), 70, 90, 64, dtype="f16", epilogue=ALL),
    MatmulCase(GEMM.format(64, 64, 32, 2, 2, 2, 1, "separate"), 70, 90, 64, epilogue=ALL),
    # split-K
    MatmulCase(SPLITK.format(32, 32, 16, 1, 2, 2, 4, "fused"), 20, 50, 300, epilogue=GELU_BIAS),
    MatmulCase(SPLITK.format(64, 64, 32, 2, 2, 3, 8, "fused"), 64, 96, 1000, dtype="f16", ta=True, tb=False),
    MatmulCase(SPLITK.format(32, 64, 32, 1, 2, 2, 2, "separate"), 16, 64, 256, a_batch=(2,), b_batch=(2,), epilogue=ALL),
    # skinny products: both weight layouts, aligned and not, f32 too
    MatmulCase("gemv warps=4 rows=2 vec=8 epilogue=fused", 3, 50, 264, epilogue=GELU_BIAS),
    MatmulCase("gemv warps=4 rows=2 vec=4 epilogue=fused", 5, 70, 130, dtype="f16", tb=False),
    MatmulCase("gemv warps=2 rows=4 vec=8 epilogue=fused", 1, 33, 77),
    MatmulCase("gemv warps=8 rows=1 vec=4 epilogue=fused", 16, 100, 96, dtype="f32", epilogue=ALL),
    MatmulCase("gemv warps=2 rows=2 vec=2 epilogue=separate", 7, 65, 64, dtype="f32", tb=False, epilogue=ALL),
    MatmulCase("gemv warps=4 rows=4 vec=8 epilogue=fused", 2, 96, 128, a_batch=(3,), b_batch=(3,)),
]

DECODE = "decode warps={} key_lanes={} pack_gqa={} scale_at={}"
SPLIT = "decode_split blocks={} warps={} key_lanes={} pack_gqa={} scale_at={}"
FLASH = "flash bq={} bk={} warps={} stages={} skip_masked_blocks={} scale_at={} pack_gqa={} kv_splits={}"

ATTENTION_CASES = [
    AttentionCase(DECODE.format(2, 8, "yes", "q"), 1, 4, 2, 1, 37, 64, "f16"),
    AttentionCase(DECODE.format(4, 8, "no", "scores"), 2, 4, 1, 1, 100, 64, "bf16"),
    AttentionCase(DECODE.format(2, 16, "yes", "q"), 1, 4, 2, 1, 37, 128, "f32"),
    AttentionCase(DECODE.format(2, 8, "yes", "q"), 1, 4, 2, 2, 150, 64, "f16", mask="additive",
                  mask_shape=(1, 1, 2, 150), window=40),
    AttentionCase(DECODE.format(8, 16, "yes", "scores"), 2, 8, 2, 1, 333, 128, "bf16", mask="bool",
                  mask_shape=(2, 1, 1, 333)),
    AttentionCase(SPLIT.format(4, 2, 16, "yes", "q"), 1, 8, 2, 1, 300, 128, "bf16"),
    AttentionCase(SPLIT.format(8, 1, 8, "yes", "scores"), 2, 4, 2, 3, 200, 64, "f16", mask="causal"),
    AttentionCase(SPLIT.format(8, 2, 16, "no", "q"), 1, 4, 2, 2, 150, 128, "bf16", mask="bool", softcap=20.0),
    AttentionCase(SPLIT.format(16, 4, 32, "yes", "scores"), 1, 6, 3, 1, 517, 128, "f32", mask="additive",
                  mask_shape=(1, 6, 1, 517)),
    # the last slice has fewer keys than the block has lanes: warps and groups without a key
    AttentionCase(SPLIT.format(64, 4, 4, "yes", "q"), 1, 6, 3, 1, 500, 64, "f32"),
    AttentionCase(FLASH.format(32, 16, 2, 2, "yes", "q", "no", 1), 1, 2, 1, 50, 50, 64, "bf16"),
    AttentionCase(FLASH.format(32, 32, 1, 1, "yes", "scores", "no", 1), 1, 2, 2, 70, 90, 64, "f16", mask="causal"),
    AttentionCase(FLASH.format(64, 16, 4, 3, "no", "q", "no", 1), 2, 2, 1, 70, 70, 128, "bf16", mask="causal", window=20),
    AttentionCase(FLASH.format(64, 64, 4, 2, "yes", "q", "no", 1), 1, 4, 1, 100, 130, 128, "bf16", mask="causal", window=37),
    AttentionCase(FLASH.format(16, 32, 1, 2, "yes", "scores", "no", 1), 1, 2, 1, 33, 47, 64, "bf16", mask="bool",
                  softcap=30.0),
    AttentionCase(FLASH.format(32, 32, 2, 2, "yes", "q", "no", 1), 1, 2, 1, 40, 40, 80, "f16", mask="additive",
                  mask_shape=(1, 2, 40, 40)),
    # decode on tensor cores: GQA rows packed into one 16-row tile, keys split across blocks
    AttentionCase(FLASH.format(16, 64, 1, 2, "yes", "q", "yes", 4), 2, 8, 2, 1, 300, 128, "bf16"),
    AttentionCase(FLASH.format(16, 32, 1, 3, "yes", "scores", "yes", 8), 1, 16, 2, 1, 200, 64, "f16",
                  mask="bool", mask_shape=(1, 16, 1, 200)),
    AttentionCase(FLASH.format(16, 16, 1, 2, "yes", "q", "yes", 1), 1, 6, 2, 3, 77, 128, "bf16", mask="causal"),
    AttentionCase(FLASH.format(32, 32, 2, 2, "yes", "q", "yes", 3), 1, 8, 2, 9, 130, 64, "f16", mask="causal",
                  window=50, softcap=10.0),
    AttentionCase(FLASH.format(64, 64, 4, 2, "yes", "scores", "no", 2), 1, 4, 2, 50, 180, 64, "bf16",
                  mask="additive", mask_shape=(1, 4, 50, 180)),
]


# ---- running a case and its float64 reference --------------------------------------


def _operand(rng, shape, dtype):
    return random_operand(tuple(shape), dtype, int(rng.integers(1 << 30)))


def run_matmul_case(case: MatmulCase, rng, stream=None):
    """(output, float64 reference) of a matmul case run by kernelevo's GPU op layer."""
    a_shape = case.a_batch + ((case.K, case.M) if case.ta else (case.M, case.K))
    b_shape = case.b_batch + ((case.N, case.K) if case.tb else (case.K, case.N))
    a, b = _operand(rng, a_shape, case.dtype), _operand(rng, b_shape, case.dtype)
    ep = case.epilogue
    bias = _operand(rng, (case.N,), case.dtype) if ep.bias else None
    out_batch = tuple(np.broadcast_shapes(case.a_batch, case.b_batch))
    residual = _operand(rng, out_batch + (case.M, case.N), case.dtype) if ep.residual else None
    out = gpu.matmul(a, b, transpose_a=case.ta, transpose_b=case.tb, config=case.config,
                     bias=bias, activation=ep.activation, residual=residual, scale=ep.alpha,
                     stream=stream)
    a64, b64 = to_f64(a), to_f64(b)
    ref = (np.swapaxes(a64, -1, -2) if case.ta else a64) @ (np.swapaxes(b64, -1, -2) if case.tb else b64)
    return out, epilogue_reference(ref, ep, bias, residual)


def epilogue_reference(y, ep: Epilogue, bias, residual):
    if ep.alpha is not None:
        y = y * ep.alpha
    if bias is not None:
        y = y + to_f64(bias)
    if ep.activation == "relu":
        y = np.maximum(y, 0)
    elif ep.activation == "silu":
        y = y / (1 + np.exp(-y))
    elif ep.activation == "gelu":
        erf = np.vectorize(math.erf)
        y = 0.5 * y * (1 + erf(y / math.sqrt(2)))
    elif ep.activation == "gelu_tanh":
        y = 0.5 * y * (1 + np.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y**3)))
    if residual is not None:
        y = y + to_f64(residual)
    return y


def attention_reference(q, k, v, scale, mask_kind, mask, softcap, window):
    """softmax over keys in float64 with MLX's semantics: causal aligned to the last key, a
    window of keys at or before that position, a boolean mask's False hiding a key (a row
    that sees no key averages v), an additive mask added after softcapping."""
    q, k, v = to_f64(q), to_f64(k), to_f64(v)
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    g = Hq // k.shape[1]
    k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    s = np.einsum("bhqd,bhkd->bhqk", q, k) * scale
    if softcap:
        s = softcap * np.tanh(s / softcap)
    keep = np.ones(s.shape, bool)
    if mask_kind == "causal" or window:
        i = np.arange(Lq)[:, None] + Lk - Lq
        j = np.arange(Lk)[None, :]
        visible = j <= i
        if window:
            visible &= j > i - window
        keep &= visible
    if mask_kind == "bool":
        keep &= np.broadcast_to(np.array(mask), s.shape)
    if mask_kind == "additive":
        s = s + np.broadcast_to(to_f64(mask), s.shape)
    s = np.where(keep, s, -1e30)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def run_attention_case(case: AttentionCase, rng, stream=None):
    q = _operand(rng, (case.B, case.Hq, case.Lq, case.D), case.dtype)
    k = _operand(rng, (case.B, case.Hkv, case.Lk, case.D), case.dtype)
    v = _operand(rng, (case.B, case.Hkv, case.Lk, case.D), case.dtype)
    mask = "causal" if case.mask == "causal" else None
    if case.mask == "bool":
        mask = mx.array(rng.random(case.mask_shape) > 0.3)
    elif case.mask == "additive":
        mask = _operand(rng, case.mask_shape, case.dtype)
    scale = 1 / math.sqrt(case.D)
    out = gpu.attention(q, k, v, scale=scale, mask=mask, softcap=case.softcap or None,
                        window=case.window or None, config=case.config, stream=stream)
    ref = attention_reference(q, k, v, scale, case.mask, mask, case.softcap, case.window)
    return out, ref


def assert_close(out, ref, dtype):
    check = compare(out, ref, dtype)
    assert check.ok, check.reason


GRAD_CASES = [
    MatmulCase(GEMM.format(32, 32, 32, 1, 2, 2, 0, "fused"), 20, 24, 32, a_batch=(3,)),
    MatmulCase(GEMM.format(32, 32, 32, 1, 2, 2, 0, "fused"), 20, 24, 40, ta=True, tb=False,
               a_batch=(2,), b_batch=(2,)),
    MatmulCase(GEMM.format(32, 32, 32, 1, 2, 2, 0, "fused"), 20, 24, 32, b_batch=(2,),
               epilogue=Epilogue(bias=True, activation="silu", residual=True, alpha=2.0)),
    MatmulCase("gemv warps=2 rows=2 vec=4 epilogue=separate", 3, 40, 48,
               epilogue=Epilogue(bias=True, activation="relu")),
]


def run_matmul_grad_case(case: MatmulCase, rng, stream=None):
    """[(gradient, float64 reference)] of sum(g * y) for y the case's product and epilogue,
    with respect to a, b and (when present) bias and residual."""
    a_shape = case.a_batch + ((case.K, case.M) if case.ta else (case.M, case.K))
    b_shape = case.b_batch + ((case.N, case.K) if case.tb else (case.K, case.N))
    out_batch = tuple(np.broadcast_shapes(case.a_batch, case.b_batch))
    ep = case.epilogue
    a, b = _operand(rng, a_shape, case.dtype), _operand(rng, b_shape, case.dtype)
    bias = _operand(rng, (case.N,), case.dtype) if ep.bias else None
    residual = _operand(rng, out_batch + (case.M, case.N), case.dtype) if ep.residual else None
    g = _operand(rng, out_batch + (case.M, case.N), case.dtype)
    args = [a, b] + ([bias] if ep.bias else []) + ([residual] if ep.residual else [])

    def loss(*xs):
        it = iter(xs[2:])
        y = gpu.matmul(xs[0], xs[1], transpose_a=case.ta, transpose_b=case.tb, config=case.config,
                       activation=ep.activation, scale=ep.alpha, bias=next(it) if ep.bias else None,
                       residual=next(it) if ep.residual else None, stream=stream)
        return (y.astype(mx.float32) * g.astype(mx.float32)).sum()

    grads = mx.grad(loss, argnums=tuple(range(len(args))))(*args)
    A = to_f64(a)
    A = np.swapaxes(A, -1, -2) if case.ta else A
    B = to_f64(b)
    B = np.swapaxes(B, -1, -2) if case.tb else B
    z = A @ B * (ep.alpha if ep.alpha is not None else 1.0) + (to_f64(bias) if ep.bias else 0.0)
    dz = to_f64(g)
    if ep.activation == "relu":
        dz = dz * (z > 0)
    elif ep.activation == "silu":
        sig = 1 / (1 + np.exp(-z))
        dz = dz * sig * (1 + z * (1 - sig))
    dp = dz * (ep.alpha if ep.alpha is not None else 1.0)
    dA = dp @ np.swapaxes(B, -1, -2)
    dB = np.swapaxes(A, -1, -2) @ dp
    da = np.swapaxes(dA, -1, -2) if case.ta else dA
    db = np.swapaxes(dB, -1, -2) if case.tb else dB
    da = _reduce_to(da, a_shape)
    db = _reduce_to(db, b_shape)
    refs = [da, db]
    if ep.bias:
        refs.append(dz.reshape(-1, case.N).sum(0))
    if ep.residual:
        refs.append(to_f64(g))
    return list(zip(grads, refs))


def _reduce_to(x, shape):
    while x.ndim > len(shape):
        x = x.sum(0)
    return x
