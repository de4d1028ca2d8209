"""ke.matmul against numpy's float64 product: dtypes, odd sizes, batches, transposes,
layouts, every family, gradients, mx.compile, vmap and bad input."""

import mlx.core as mx
import numpy as np
import pytest

import kernelevo as ke
from kernelevo import KernelConfig, chips
from kernelevo.families import CPU_GEMM, CPU_GEMV

from helpers import TOL, f64, operand, relative_error

DTYPES = ["f32", "f16", "bf16"]
CHIP = chips.detect("cpu")


def cfg(text):
    return KernelConfig.parse(text, "matmul", "cpu")


# A spread of configurations: edge tiles, small blocks that force many k/n/m blocks,
# both thread splits, and the gemv family.
CONFIGS = [
    cfg(f"gemm mc=6 nc=48 kc=7 mr=6 nr=48 threads={CHIP.cores} split=m"),
    cfg("gemm mc=16 nc=32 kc=16 mr=16 nr=16 threads=1 split=n") if CHIP.vector_registers >= 32
    else cfg("gemm mc=16 nc=32 kc=16 mr=4 nr=16 threads=1 split=n"),
    cfg(f"gemm mc=3 nc=64 kc=33 mr=1 nr=64 threads={CHIP.cores} split=n") if CHIP.vector_registers >= 32
    else cfg(f"gemm mc=3 nc=64 kc=33 mr=1 nr=16 threads={CHIP.cores} split=n"),
    cfg(f"gemm mc=10 nc=32 kc=100 mr=5 nr=32 threads={CHIP.cores} split=m") if CHIP.vector_registers >= 32
    else cfg(f"gemm mc=10 nc=16 kc=100 mr=5 nr=16 threads={CHIP.cores} split=m"),
    cfg(f"gemv nb=16 threads={CHIP.cores}"),
    cfg("gemv nb=48 threads=1"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (17, 33, 65), (1, 4096, 4096), (64, 48, 32),
                                   (3, 5, 300), (130, 70, 1)])
def test_default_heuristics_match_numpy(rng, dtype, M, N, K):
    a, b = operand(rng, (M, K), dtype), operand(rng, (K, N), dtype)
    out = ke.matmul(a, b)
    assert out.dtype == a.dtype and out.shape == (M, N)
    assert relative_error(out, f64(a) @ f64(b)) < TOL[dtype]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transpose_b", [False, True])
def test_every_configuration_is_correct(rng, config, dtype, transpose_b):
    M, N, K = (7, 101, 67) if config.family == "gemv" else (37, 101, 67)
    a = operand(rng, (M, K), dtype)
    b = operand(rng, (N, K) if transpose_b else (K, N), dtype)
    out = ke.matmul(a, b, transpose_b=transpose_b, config=config)
    ref = f64(a) @ (f64(b).T if transpose_b else f64(b))
    assert out.dtype == a.dtype
    assert relative_error(out, ref) < TOL[dtype]


def test_sampled_search_space_is_correct(rng):
    """Random configurations the tuner may try, on odd sizes."""
    import random

    space = [KernelConfig.make("matmul", "cpu", f.name, p) for f in (CPU_GEMM, CPU_GEMV)
             for p in f.search_space(CHIP, {"M": 9})]
    for config in random.Random(7).sample(space, 24):
        a, b = operand(rng, (9, 131), "f32"), operand(rng, (131, 77), "f32")
        out = ke.matmul(a, b, config=config)
        assert relative_error(out, f64(a) @ f64(b)) < TOL["f32"], config.to_dsl()


@pytest.mark.parametrize("dtype", DTYPES)
def test_batched_and_broadcast(rng, dtype):
    a = operand(rng, (2, 3, 9, 17), dtype)
    b = operand(rng, (3, 17, 11), dtype)  # broadcast over the leading axis
    out = ke.matmul(a, b)
    assert out.shape == (2, 3, 9, 11)
    assert relative_error(out, f64(a) @ f64(b)) < TOL[dtype]
    c = operand(rng, (1, 17, 5), dtype)  # size-1 batch axis broadcast
    assert relative_error(ke.matmul(a, c), f64(a) @ f64(c)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_transposes_flags_and_views(rng, dtype):
    a = operand(rng, (4, 23, 19), dtype)  # used as a^T: 19 x 23
    b = operand(rng, (4, 29, 23), dtype)  # used as b^T: 23 x 29
    ref = np.swapaxes(f64(a), -1, -2) @ np.swapaxes(f64(b), -1, -2)
    out = ke.matmul(a, b, transpose_a=True, transpose_b=True)
    assert relative_error(out, ref) < TOL[dtype]
    # the same product from transposed views (strided inputs, flags off)
    out = ke.matmul(mx.swapaxes(a, -1, -2), mx.swapaxes(b, -1, -2))
    assert relative_error(out, ref) < TOL[dtype]


def test_non_contiguous_inputs(rng):
    big_a = operand(rng, (40, 70), "f32")
    big_b = operand(rng, (90, 50), "f32")
    a = big_a[1::3, 2::2]  # 13 x 34, both strides non-unit
    b = big_b[::2, 5:18][:34]  # 34 x 13
    out = ke.matmul(a, b)
    assert relative_error(out, f64(a) @ f64(b)) < TOL["f32"]


def test_one_dimensional_operands_follow_mx_matmul(rng):
    v, m = operand(rng, (6,), "f32"), operand(rng, (6, 4), "f32")
    w, u = operand(rng, (4,), "f32"), operand(rng, (6,), "f32")
    for x, y in [(v, m), (m.T, v), (v, u), (operand(rng, (2, 6, 4), "f32"), w)]:
        out, ref = ke.matmul(x, y), mx.matmul(x, y)
        assert out.shape == ref.shape
        assert relative_error(out, f64(ref)) < 1e-5


def test_mixed_dtypes_promote_like_mlx(rng):
    a, b = operand(rng, (5, 7), "bf16"), operand(rng, (7, 3), "f32")
    out = ke.matmul(a, b)
    assert out.dtype == mx.matmul(a, b).dtype == mx.float32
    assert relative_error(out, f64(a) @ f64(b)) < TOL["f32"]


def test_zero_sized_and_empty_contraction():
    assert ke.matmul(mx.zeros((0, 4)), mx.zeros((4, 3))).shape == (0, 3)
    out = ke.matmul(mx.ones((2, 0)), mx.ones((0, 3)))
    assert out.shape == (2, 3) and np.all(np.array(out) == 0)


def test_gradients_match_mlx(rng):
    a, b = operand(rng, (2, 9, 13), "f32"), operand(rng, (13, 7), "f32")
    g = operand(rng, (2, 9, 7), "f32")

    def loss(fn):
        return lambda x, y: (fn(x, y) * g).sum()

    got = mx.grad(loss(ke.matmul), argnums=(0, 1))(a, b)
    want = mx.grad(loss(mx.matmul), argnums=(0, 1))(a, b)
    for x, y in zip(got, want):
        assert x.shape == y.shape
        assert relative_error(x, f64(y)) < 1e-5


def test_gradients_with_transpose_flags(rng):
    x, w = operand(rng, (5, 11), "f32"), operand(rng, (6, 11), "f32")  # linear layer x @ w.T
    g = operand(rng, (5, 6), "f32")
    got = mx.grad(lambda x, w: (ke.matmul(x, w, transpose_b=True) * g).sum(), argnums=(0, 1))(x, w)
    want = mx.grad(lambda x, w: (mx.matmul(x, w.T) * g).sum(), argnums=(0, 1))(x, w)
    for p, q in zip(got, want):
        assert relative_error(p, f64(q)) < 1e-5
    a = operand(rng, (11, 5), "f32")  # a used transposed
    got = mx.grad(lambda a, w: (ke.matmul(a, w, transpose_a=True, transpose_b=True) * g).sum(), argnums=(0, 1))(a, w)
    want = mx.grad(lambda a, w: (mx.matmul(a.T, w.T) * g).sum(), argnums=(0, 1))(a, w)
    for p, q in zip(got, want):
        assert relative_error(p, f64(q)) < 1e-5


def test_jvp_matches_mlx(rng):
    a, b = operand(rng, (4, 6), "f32"), operand(rng, (6, 3), "f32")
    ta, tb = operand(rng, (4, 6), "f32"), operand(rng, (6, 3), "f32")
    _, got = mx.jvp(ke.matmul, [a, b], [ta, tb])
    _, want = mx.jvp(mx.matmul, [a, b], [ta, tb])
    assert relative_error(got[0], f64(want[0])) < 1e-5


def test_vmap_matches_a_loop(rng):
    a, b = operand(rng, (3, 4, 5), "f32"), operand(rng, (5, 2), "f32")
    out = mx.vmap(ke.matmul, in_axes=(0, None))(a, b)
    assert relative_error(out, f64(a) @ f64(b)) < 1e-5
    c = operand(rng, (5, 2, 3), "f32")  # mapped over its last axis
    out = mx.vmap(ke.matmul, in_axes=(None, 2))(a[0], c)
    ref = np.stack([f64(a[0]) @ f64(c)[:, :, i] for i in range(3)])
    assert relative_error(out, ref) < 1e-5


def test_inside_mx_compile(rng):
    a, b = operand(rng, (8, 16), "f32"), operand(rng, (16, 4), "f32")
    fn = mx.compile(lambda x, y: ke.matmul(x, y) + 1.0)
    assert relative_error(fn(a, b), f64(a) @ f64(b) + 1.0) < 1e-5
    a2 = operand(rng, (8, 16), "f32")
    assert relative_error(fn(a2, b), f64(a2) @ f64(b) + 1.0) < 1e-5


def test_forced_configuration_is_the_one_in_the_graph(rng):
    a, b = operand(rng, (8, 16), "f32"), operand(rng, (16, 32), "f32")
    config = cfg("gemm mc=8 nc=32 kc=8 mr=4 nr=16 threads=1 split=n")
    out = ke.matmul(a, b, config=config.to_dsl())
    family, params = ke.ops._ext.config_of(out)
    assert KernelConfig.make("matmul", "cpu", family, params) == config


def test_bad_shapes_and_dtypes_raise_value_error(rng):
    a, b = operand(rng, (3, 4), "f32"), operand(rng, (5, 6), "f32")
    with pytest.raises(ValueError, match="inner dimensions differ"):
        ke.matmul(a, b)
    with pytest.raises(ValueError, match="cannot be broadcast"):
        ke.matmul(operand(rng, (2, 3, 4), "f32"), operand(rng, (3, 4, 5), "f32"))
    with pytest.raises(ValueError, match="float32, float16 and bfloat16"):
        ke.matmul(mx.ones((2, 2), dtype=mx.int32), mx.ones((2, 2), dtype=mx.int32))
    with pytest.raises(ValueError, match="at least one dimension"):
        ke.matmul(mx.array(1.0), b)


def test_bad_configurations_are_refused(rng):
    a, b = operand(rng, (8, 16), "f32"), operand(rng, (16, 32), "f32")
    with pytest.raises(ke.ConfigError, match="mc % mr == 0"):
        ke.matmul(a, b, config="gemm mc=7 nc=32 kc=8 mr=4 nr=16 threads=1 split=m")
    with pytest.raises(ke.ConfigError, match="no parameter"):
        ke.matmul(a, b, config="gemm mc=8 nc=32 kc=8 mr=4 nr=16 threads=1 split=m bk=3")
    with pytest.raises(ke.ConfigError, match="needs"):
        ke.matmul(a, b, config="gemm mc=8")
    with pytest.raises(ke.ConfigError, match="M <= 64"):
        ke.matmul(operand(rng, (65, 16), "f32"), b, config="gemv nb=32 threads=1")
    with pytest.raises(ke.DSLError, match="1:1"):
        ke.matmul(a, b, config="= 3")


def test_extension_rejects_parameters_it_does_not_read():
    ext = ke.ops._ext
    ext.validate_matmul_config("gemm", {"mc": 8, "nc": 32, "kc": 8, "mr": 4, "nr": 16, "threads": 1, "split": "m"})
    with pytest.raises(ValueError, match="does not take parameter 'swizzle'"):
        ext.validate_matmul_config("gemm", {"mc": 8, "nc": 32, "kc": 8, "mr": 4, "nr": 16,
                                            "threads": 1, "split": "m", "swizzle": 1})
    with pytest.raises(ValueError, match="needs parameter 'kc'"):
        ext.validate_matmul_config("gemm", {"mc": 8, "nc": 32, "mr": 4, "nr": 16, "threads": 1, "split": "m"})


def test_gpu_stream_is_refused_clearly(rng):
    a, b = operand(rng, (2, 2), "f32"), operand(rng, (2, 2), "f32")
    with pytest.raises(ke.BackendNotSupportedError, match="not yet supported on this backend"):
        ke.matmul(a, b, stream=mx.gpu)
