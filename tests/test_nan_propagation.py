"""NaN and Inf propagate through ke.attention and ke.matmul as they do through MLX's own
ops (mx.fast.scaled_dot_product_attention, mx.matmul): every CPU family, f32/f16/bf16, and
the Metal and CUDA kernels in their emulators. The pattern of NaN and of Inf per output
element must be MLX's, and the finite elements must agree with MLX's within the dtype's
tolerance.

MLX's CPU attention is unfused: softmax(q k^T * scale + mask) then a product with v. So a
NaN in q, in a key a row sees, or in the row's additive mask makes the whole row NaN; a key
scoring +inf makes the rows that see it NaN (inf - inf), one scoring -inf is ignored; a NaN
in v at a key every row sees makes that column NaN; a row whose additive mask is -inf on
every key is NaN (exp(-inf - -inf)), while a row a boolean or causal mask hides fully is
the mean of v (MLX masks with the type's lowest finite value, so the scores tie).
"""

from __future__ import annotations

import math
import random
import shutil

import mlx.core as mx
import numpy as np
import pytest

import kernelevo as ke
from kernelevo import KernelConfig, chips
from kernelevo.families import CPU_GEMM, CPU_GEMV
from kernelevo.families.cpu_attention import CPU_ATTENTION_FAMILIES
from kernelevo.features import attention_features

from helpers import MX, TOL

CHIP = chips.detect("cpu")
DTYPES = ["f32", "f16", "bf16"]
NAN, INF = float("nan"), float("inf")


# ---- comparing with MLX ----------------------------------------------------------------


def as_f64(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32), dtype=np.float64)


def assert_same_specials(out: mx.array, ref: mx.array, dtype: str, what: str = ""):
    """NaN where MLX has NaN, +-Inf where MLX has +-Inf, and the rest within tolerance."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, ref.shape, out.dtype, ref.dtype)
    got, want = as_f64(out), as_f64(ref)
    nan_got, nan_want = np.isnan(got), np.isnan(want)
    assert np.array_equal(nan_got, nan_want), (
        f"{what}: NaN pattern differs: {int(nan_want.sum())} NaN in MLX's output, {int(nan_got.sum())} here, "
        f"{int((nan_want & ~nan_got).sum())} of MLX's missing (first rows here: {np.argwhere(nan_want ^ nan_got)[:4].tolist()})")
    assert np.array_equal(np.isposinf(got), np.isposinf(want)), f"{what}: +Inf pattern differs"
    assert np.array_equal(np.isneginf(got), np.isneginf(want)), f"{what}: -Inf pattern differs"
    finite = np.isfinite(want)
    if finite.any():
        scale = max(float(np.max(np.abs(want[finite]))), 1e-30)
        err = float(np.max(np.abs(got[finite] - want[finite]))) / scale
        assert err < 2 * TOL[dtype], f"{what}: finite elements off by {err:.3g} (relative)"


def _array(x: np.ndarray, dtype: str) -> mx.array:
    return mx.array(x.astype(np.float32)).astype(MX[dtype])


# ---- attention inputs with one special value -----------------------------------------
#
# Shapes: prefill (flash) and few-query (decode families) calls with GQA (4 query heads on
# 2 key/value heads) and key counts that are not a multiple of any block.

ATTN_CASES = ["q_nan", "k_nan", "k_inf", "v_nan", "v_inf", "mask_nan", "mask_neginf_row",
              "causal_k_nan", "causal_v_nan", "bool_masked_row"]


def attention_inputs(case: str, dtype: str, B=1, H=4, Hkv=2, Lq=20, Lk=37, D=32, seed=0):
    """(q, k, v, mask) as mx arrays of `dtype` with the case's special value planted."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, Lq, D))
    k = rng.standard_normal((B, Hkv, Lk, D))
    v = rng.standard_normal((B, Hkv, Lk, D))
    mask = None
    last = Lq - 1
    if case == "q_nan":
        q[0, 1, last // 2, 3] = NAN  # one row of one head
    elif case == "k_nan":
        k[0, 1, 5, 7] = NAN  # every row of query heads 2 and 3
    elif case == "k_inf":
        k[0, 0, Lk - 2, 4] = INF  # +inf for rows with q[..., 4] > 0, -inf (ignored) for the others
    elif case in ("v_nan", "v_inf"):
        v[0, 0, min(9, Lk - 1), 5] = NAN if case == "v_nan" else INF  # column 5 of heads 0 and 1
    elif case == "mask_nan":
        mask = rng.standard_normal((Lq, Lk))
        mask[last, 11] = NAN
    elif case == "mask_neginf_row":
        mask = rng.standard_normal((Lq, Lk))
        mask[0, :] = -INF  # the first query row sees no key
        mask[last, : Lk // 2] = -INF  # the last sees half of them
    elif case == "causal_k_nan":
        k[0, 0, Lk - 1, 2] = NAN  # only the last query row sees the last key
        mask = "causal"
    elif case == "causal_v_nan":
        v[0, 1, 0, 6] = NAN  # a key every row sees under the causal mask
        mask = "causal"
    elif case == "bool_masked_row":
        keep = rng.random((1, H, Lq, Lk)) > 0.3
        keep[0, 2, last, :] = False  # MLX outputs the mean of v here
        mask = mx.array(keep)
    else:
        raise ValueError(case)
    if isinstance(mask, np.ndarray):
        mask = _array(mask, dtype)
    return _array(q, dtype), _array(k, dtype), _array(v, dtype), mask


def mlx_attention(q, k, v, scale, mask):
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


# ---- the CPU families ----------------------------------------------------------------

PREFILL = dict(Lq=20, Lk=37)
DECODE = dict(Lq=2, Lk=37)


def _shape(family: str) -> dict:
    return PREFILL if family == "flash" else DECODE


def _cpu_attention_configs() -> list[KernelConfig]:
    """A seeded sample of each CPU family's search space on this chip, for the call the
    tests make (bf16 features: the widest space; f32/f16 configs are the same there)."""
    configs = []
    for family in CPU_ATTENTION_FAMILIES:
        s = _shape(family.name)
        features = attention_features(batch=1, heads=4, kv_heads=2, q_len=s["Lq"], kv_len=s["Lk"],
                                      head_dim=32, dtype="f32")
        space = list(family.search_space(CHIP, features))
        assert space, family.name
        for params in random.Random(11).sample(space, min(3, len(space))):
            configs.append(KernelConfig.make("attention", "cpu", family.name, params))
    return configs


CPU_ATTENTION_CONFIGS = _cpu_attention_configs()


@pytest.mark.parametrize("case", ATTN_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", CPU_ATTENTION_CONFIGS, ids=lambda c: c.to_dsl().replace(" ", "_"))
def test_cpu_attention_propagates_like_mlx(config, dtype, case):
    q, k, v, mask = attention_inputs(case, dtype, **_shape(config.family))
    scale = 0.3
    want = mlx_attention(q, k, v, scale, mask)
    got = ke.attention(q, k, v, scale=scale, mask=mask, config=config)
    assert_same_specials(got, want, dtype, f"{config.to_dsl()} {case}")


@pytest.mark.parametrize("case", ["q_nan", "k_nan", "k_inf", "mask_neginf_row", "bool_masked_row"])
@pytest.mark.parametrize("shape", [PREFILL, DECODE], ids=["prefill", "decode"])
def test_cpu_attention_default_selection_propagates_like_mlx(shape, case):
    q, k, v, mask = attention_inputs(case, "bf16", **shape)
    want = mlx_attention(q, k, v, 0.3, mask)
    assert_same_specials(ke.attention(q, k, v, scale=0.3, mask=mask), want, "bf16", case)


def test_causal_rows_that_see_no_key_still_average_v():
    """q_len > kv_len under a causal mask: the first rows see no key; MLX gives them the
    mean of v (and a NaN in v reaches them through it)."""
    for family in ("flash", "decode"):
        Lq, Lk = (12, 8) if family == "flash" else (6, 3)
        q, k, v, _ = attention_inputs("v_nan", "f32", Lq=Lq, Lk=Lk)
        config = next(c for c in CPU_ATTENTION_CONFIGS if c.family == family)
        want = mlx_attention(q, k, v, 0.3, "causal")
        got = ke.attention(q, k, v, scale=0.3, mask="causal", config=config)
        assert_same_specials(got, want, "f32", family)


# ---- the default scale ---------------------------------------------------------------


@pytest.mark.parametrize("shape", [PREFILL, DECODE], ids=["prefill", "decode"])
def test_scale_defaults_to_one_over_sqrt_head_dim(shape):
    q, k, v, _ = attention_inputs("bool_masked_row", "f32", D=48, **shape)
    want = mlx_attention(q, k, v, 1 / math.sqrt(48), "causal")
    got = ke.attention(q, k, v, mask="causal")
    assert_same_specials(got, want, "f32", "default scale")
    explicit = ke.attention(q, k, v, scale=1 / math.sqrt(48), mask="causal")
    assert np.array_equal(np.array(got), np.array(explicit))
    assert not np.allclose(np.array(got), np.array(ke.attention(q, k, v, scale=1.0, mask="causal")))


# ---- matmul --------------------------------------------------------------------------

MM_CASES = ["a_nan", "a_inf", "b_nan", "b_neginf", "zero_row_times_inf", "inf_minus_inf"]


def matmul_inputs(case: str, dtype: str, M: int, N: int, K: int, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((M, K))
    b = rng.standard_normal((K, N))
    i, j, kk = M // 2, N // 3, K // 2
    if case == "a_nan":
        a[i, kk] = NAN
    elif case == "a_inf":
        a[i, kk] = INF
    elif case == "b_nan":
        b[kk, j] = NAN
    elif case == "b_neginf":
        b[kk, j] = -INF
    elif case == "zero_row_times_inf":  # 0 * inf is NaN: a kernel that skips zeros loses it
        a[i, :] = 0.0
        b[kk, j] = INF
    elif case == "inf_minus_inf":
        a[i, 0], a[i, K - 1] = INF, -INF
    else:
        raise ValueError(case)
    return _array(a, dtype), _array(b, dtype)


def _cpu_matmul_configs() -> list[tuple[KernelConfig, str]]:
    out = []
    for dtype in DTYPES:
        for family in (CPU_GEMM, CPU_GEMV):
            space = list(family.search_space(CHIP, {"M": 9, "dtype": dtype}))
            for params in random.Random(5).sample(space, min(3, len(space))):
                out.append((KernelConfig.make("matmul", "cpu", family.name, params), dtype))
    return out


@pytest.mark.parametrize("case", MM_CASES)
@pytest.mark.parametrize("config,dtype", _cpu_matmul_configs(),
                         ids=lambda x: x.to_dsl().replace(" ", "_") if isinstance(x, KernelConfig) else x)
def test_cpu_matmul_propagates_like_mlx(config, dtype, case):
    M, N, K = (7, 45, 67) if config.family == "gemv" else (37, 45, 67)
    a, b = matmul_inputs(case, dtype, M, N, K)
    want = mx.matmul(a, b)
    assert_same_specials(ke.matmul(a, b, config=config), want, dtype, f"{config.to_dsl()} {case}")
    # b transposed in memory reaches the other operand layout of the kernels
    bt = mx.array(np.ascontiguousarray(np.array(b.astype(mx.float32)).T)).astype(b.dtype)
    assert_same_specials(ke.matmul(a, bt, transpose_b=True, config=config), want, dtype,
                         f"{config.to_dsl()} {case} transpose_b")


# ---- the Metal and CUDA kernels, in their emulators ----------------------------------
#
# Small calls (the emulators compile each kernel and run every GPU thread on the CPU):
# one hand-picked configuration per family, run through the GPU op layer as a Mac or an
# NVIDIA GPU would run it, only the launch emulated.

needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="the emulators need g++")

GPU_SHAPES = {"flash": dict(Lq=20, Lk=37, D=64), "decode": dict(Lq=2, Lk=37, D=64),
              "decode_split": dict(Lq=1, Lk=70, D=64)}
GPU_CASES = ["q_nan", "k_nan", "k_inf", "v_nan", "mask_nan", "mask_neginf_row", "causal_k_nan",
             "bool_masked_row"]
# every case in f16; the other dtypes on the cases that exercise the softmax state
GPU_MATRIX = [(d, c) for d in DTYPES for c in GPU_CASES
              if d == "f16" or c in ("k_nan", "k_inf", "mask_neginf_row")]

METAL_ATTENTION = ["flash bq=16 bk=16 wm=2 wn=1 skip_masked_blocks=yes scale_at=q",
                   "decode simdgroups=2 pack_gqa=yes scale_at=scores",
                   "decode_split blocks=32 pack_gqa=yes scale_at=q"]
CUDA_ATTENTION = ["flash bq=16 bk=16 warps=1 stages=2 skip_masked_blocks=yes scale_at=q pack_gqa=no kv_splits=1",
                  "flash bq=16 bk=32 warps=1 stages=2 skip_masked_blocks=yes scale_at=scores pack_gqa=yes kv_splits=2",
                  "decode warps=2 key_lanes=8 pack_gqa=yes scale_at=q",
                  "decode_split blocks=4 warps=2 key_lanes=8 pack_gqa=yes scale_at=scores"]


def _gpu_shape(config: str) -> dict:
    family = config.split()[0]
    if "kv_splits=2" in config:  # the tensor-core decode path
        return GPU_SHAPES["decode"]
    return GPU_SHAPES[family]


def _run_gpu_attention(config: str, dtype: str, case: str):
    from kernelevo.ops import gpu

    shape = _gpu_shape(config)
    q, k, v, mask = attention_inputs(case, dtype, **shape)
    want = mlx_attention(q, k, v, 0.3, mask)
    got = gpu.attention(q, k, v, scale=0.3, mask=mask, config=config)
    assert_same_specials(got, want, dtype, f"{config} {case}")


@pytest.fixture
def metal(monkeypatch):
    from metal_emulated import pretend_metal

    return pretend_metal(monkeypatch, "m1")


@pytest.fixture
def cuda(monkeypatch):
    from test_cuda_emulated import EmulatedLaunch
    from kernelevo.ops import gpu

    launch = EmulatedLaunch()
    monkeypatch.setattr(gpu.launch, "launch_kernel", launch)
    monkeypatch.setattr(gpu.launch, "require_gpu", lambda op: "cuda")
    real_detect = chips.detect
    h100 = chips.from_id("nvidia-h100")
    monkeypatch.setattr(chips, "detect", lambda backend="cpu": h100 if backend == "cuda" else real_detect(backend))
    return launch


@needs_gxx
@pytest.mark.parametrize("dtype,case", GPU_MATRIX)
@pytest.mark.parametrize("config", METAL_ATTENTION, ids=lambda c: c.split()[0])
def test_metal_attention_propagates_like_mlx(metal, config, dtype, case):
    _run_gpu_attention(config, dtype, case)
    assert metal.launched


def _cuda_dtypes_fit(config: str, dtype: str) -> bool:
    """CUDA's flash, gemm and splitk kernels run on tensor cores: f16 and bf16 only."""
    return dtype != "f32" or config.split()[0] not in ("flash", "gemm", "splitk")


@needs_gxx
@pytest.mark.parametrize("config,dtype,case",
                         [(c, d, x) for c in CUDA_ATTENTION for d, x in GPU_MATRIX if _cuda_dtypes_fit(c, d)]
                         + [(c, "bf16", x) for c in CUDA_ATTENTION for x in GPU_CASES
                            if not _cuda_dtypes_fit(c, "f32") and x not in ("k_nan", "k_inf", "mask_neginf_row")],
                         ids=lambda x: x.split()[0] + ("-tc" if "kv_splits=2" in x else "") if " " in x else x)
def test_cuda_attention_propagates_like_mlx(cuda, config, dtype, case):
    _run_gpu_attention(config, dtype, case)
    assert cuda.launched


METAL_MATMUL = ["gemm bm=32 bn=32 bk=16 wm=2 wn=2 swizzle=0 epilogue=fused",
                "splitk bm=16 bn=32 bk=16 wm=2 wn=2 parts=4",
                "gemv bm=1 bn=16 sm=8 sn=4 tm=4 tn=4",
                "gemv_wide vecs=4 lanes=32 split_passes=yes"]
CUDA_MATMUL = ["gemm bm=32 bn=32 bk=16 wm=1 wn=2 stages=2 swizzle=0 epilogue=fused",
               "splitk bm=32 bn=32 bk=16 wm=1 wn=2 stages=2 parts=4 epilogue=fused",
               "gemv warps=2 rows=2 vec=4 epilogue=fused"]
GPU_MM_CASES = ["a_nan", "b_neginf", "zero_row_times_inf", "inf_minus_inf"]


def _run_gpu_matmul(config: str, dtype: str, case: str):
    from kernelevo.ops import gpu

    M, N, K = {"gemv": (1, 40, 64), "gemv_wide": (4, 40, 64)}.get(config.split()[0], (20, 24, 64))
    a, b = matmul_inputs(case, dtype, M, N, K)
    want = mx.matmul(a, b)
    if config.startswith("gemv_wide"):  # a weight stored [N, K]
        bt = mx.array(np.ascontiguousarray(np.array(b.astype(mx.float32)).T)).astype(b.dtype)
        got = gpu.matmul(a, bt, transpose_b=True, config=config)
    else:
        got = gpu.matmul(a, b, config=config)
    assert_same_specials(got, want, dtype, f"{config} {case}")


@needs_gxx
@pytest.mark.parametrize("case", GPU_MM_CASES)
@pytest.mark.parametrize("config,dtype", [(c, d) for c in METAL_MATMUL for d in ("f16", "f32", "bf16")
                                          if (d == "f32") != c.startswith("gemv_wide") or d == "f16"],
                         ids=lambda x: x.split()[0] if " " in x else x)
def test_metal_matmul_propagates_like_mlx(metal, config, dtype, case):
    _run_gpu_matmul(config, dtype, case)
    assert metal.launched


@needs_gxx
@pytest.mark.parametrize("case", GPU_MM_CASES)
@pytest.mark.parametrize("config,dtype", [(c, d) for c in CUDA_MATMUL for d in ("bf16", "f16", "f32")
                                          if _cuda_dtypes_fit(c, d)],
                         ids=lambda x: x.split()[0] if " " in x else x)
def test_cuda_matmul_propagates_like_mlx(cuda, config, dtype, case):
    _run_gpu_matmul(config, dtype, case)
    assert cuda.launched
