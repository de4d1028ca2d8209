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


ENGINES = ke.ops._ext.cpu_engines()
WIDE = CHIP.vector_registers >= 32
TAIL = "pack_a=yes epilogue=fused"

# A spread of configurations: edge tiles, small blocks that force many k/n/m blocks, both
# thread splits, A packed and read in place, every engine this CPU has, and the gemv family.
CONFIGS = [
    cfg(f"gemm mc=6 nc=48 kc=7 mr=6 nr={48 if WIDE else 16} threads={CHIP.cores} split=m engine=fma {TAIL}"),
    cfg(f"gemm mc=16 nc=32 kc=16 mr={16 if WIDE else 4} nr=16 threads=1 split=n engine=fma "
        "pack_a=no epilogue=fused"),
    cfg(f"gemm mc=3 nc=64 kc=33 mr=1 nr={64 if WIDE else 16} threads={CHIP.cores} split=n "
        f"engine=fma {TAIL}"),
    cfg(f"gemm mc=10 nc=32 kc=100 mr=5 nr={32 if WIDE else 16} threads={CHIP.cores} split=m "
        "engine=fma pack_a=no epilogue=separate"),
    cfg(f"gemv nb=16 kb=32 threads={CHIP.cores} epilogue=fused"),
    cfg("gemv nb=48 kb=4096 threads=1 epilogue=separate"),
]
# bf16 only: the engines that multiply pairs of bf16
BF16_CONFIGS = []
if "bf16dot" in ENGINES:
    BF16_CONFIGS += [
        cfg(f"gemm mc=12 nc=64 kc=20 mr=6 nr=32 threads={CHIP.cores} split=m engine=bf16dot {TAIL}"),
        cfg(f"gemm mc=8 nc=48 kc=64 mr=4 nr=48 threads={CHIP.cores} split=n engine=bf16dot "
            "pack_a=no epilogue=fused"),
    ]
if "amx" in ENGINES:
    BF16_CONFIGS += [
        cfg(f"gemm mc=64 nc=64 kc=32 mr=32 nr=32 threads={CHIP.cores} split=m engine=amx {TAIL}"),
        cfg(f"gemm mc=48 nc=96 kc=64 mr=16 nr=48 threads={CHIP.cores} split=n engine=amx "
            "pack_a=no epilogue=fused"),
        cfg(f"gemm mc=48 nc=64 kc=4096 mr=48 nr=16 threads=1 split=m engine=amx {TAIL}"),
    ]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (17, 33, 65), (1, 4096, 4096), (64, 48, 32),
                                   (3, 5, 300), (130, 70, 1)])
def test_default_heuristics_match_numpy(rng, dtype, M, N, K):
    a, b = operand(rng, (M, K), dtype), operand(rng, (K, N), dtype)
    out = ke.matmul(a, b)
    assert out.dtype == a.dtype and out.shape == (M, N)
    assert relative_error(out, f64(a) @ f64(b)) < TOL[dtype]


@pytest.mark.parametrize("config,dtype", [(c, d) for c in CONFIGS for d in DTYPES]
                         + [(c, "bf16") for c in BF16_CONFIGS], ids=lambda x: getattr(x, "name", x))
@pytest.mark.parametrize("transpose_b", [False, True])
def test_every_configuration_is_correct(rng, config, dtype, transpose_b):
    M, N, K = (7, 101, 67) if config.family == "gemv" else (37, 101, 67)
    a = operand(rng, (M, K), dtype)
    b = operand(rng, (N, K) if transpose_b else (K, N), dtype)
    out = ke.matmul(a, b, transpose_b=transpose_b, config=config)
    ref = f64(a) @ (f64(b).T if transpose_b else f64(b))
    assert out.dtype == a.dtype
    assert relative_error(out, ref) < TOL[dtype]


@pytest.mark.parametrize("config", BF16_CONFIGS, ids=lambda c: c.name)
def test_bf16_engines_on_blocks_and_layouts(rng, config):
    """Several depth blocks, row blocks and panels; A transposed (packed or copied)."""
    M, N, K = 131, 170, 203
    a = operand(rng, (K, M), "bf16")  # used transposed
    b = operand(rng, (N, K), "bf16")
    out = ke.matmul(a, b, transpose_a=True, transpose_b=True, config=config)
    assert relative_error(out, f64(a).T @ f64(b).T) < TOL["bf16"]
    a2 = operand(rng, (2, M, 256), "bf16")  # depth a whole number of tiles: A read in place
    b2 = operand(rng, (256, N), "bf16")
    assert relative_error(ke.matmul(a2, b2, config=config), f64(a2) @ f64(b2)) < TOL["bf16"]


def test_engines_match_the_chip():
    """The extension runs exactly the engines the schema allows on this chip."""
    from kernelevo.families.cpu_matmul import CPU_ENGINES, engine_available

    assert {e for e in CPU_ENGINES if engine_available(e, CHIP)} == set(ENGINES)


def test_bf16_engines_refuse_other_dtypes(rng):
    if len(ENGINES) == 1:
        pytest.skip("this CPU has only the fma engine")
    engine = ENGINES[-1]
    tile = "mr=32 nr=32 kc=64" if engine == "amx" else "mr=4 nr=16 kc=64"
    a, b = operand(rng, (8, 64), "f32"), operand(rng, (64, 32), "f32")
    with pytest.raises(ke.ConfigError, match="engine fma for f16/f32"):
        ke.matmul(a, b, config=f"gemm mc=32 nc=32 {tile} threads=1 split=m engine={engine} {TAIL}")


def test_sampled_search_space_is_correct(rng):
    """Random configurations the tuner may try, on odd sizes, for f32 and bf16."""
    import random

    for dtype, count in (("f32", 20), ("bf16", 12)):
        space = [KernelConfig.make("matmul", "cpu", f.name, p) for f in (CPU_GEMM, CPU_GEMV)
                 for p in f.search_space(CHIP, {"M": 9, "dtype": dtype})]
        for config in random.Random(7).sample(space, count):
            a, b = operand(rng, (9, 131), dtype), operand(rng, (131, 77), dtype)
            out = ke.matmul(a, b, config=config)
            assert relative_error(out, f64(a) @ f64(b)) < TOL[dtype], config.to_dsl()


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
    config = cfg(f"gemm mc=8 nc=32 kc=8 mr=4 nr=16 threads=1 split=n engine=fma {TAIL}")
    out = ke.matmul(a, b, config=config.to_dsl())
    family, params = ke.ops._ext.config_of(out)
    assert (family, params) == (config.family, config.ext_params())


def test_bad_shapes_and_dtypes_raise_value_error(rng):
    a, b = operand(rng, (3, 4), "f32"), operand(rng, (5, 6), "f32")
    with pytest.raises(ValueError, match=r"inner dimensions differ: a \(\d+, \d+\) has"):
        ke.matmul(a, b)
    with pytest.raises(ValueError, match="cannot be broadcast"):
        ke.matmul(operand(rng, (2, 3, 4), "f32"), operand(rng, (3, 4, 5), "f32"))
    with pytest.raises(ValueError, match="float32, float16 and bfloat16; got int32 and uint8"):
        ke.matmul(mx.ones((2, 2), dtype=mx.int32), mx.ones((2, 2), dtype=mx.uint8))
    with pytest.raises(ValueError, match="at least one dimension"):
        ke.matmul(mx.array(1.0), b)


def test_bad_configurations_are_refused(rng):
    a, b = operand(rng, (8, 16), "f32"), operand(rng, (16, 32), "f32")
    base = f"nc=32 kc=8 mr=4 nr=16 threads=1 split=m engine=fma {TAIL}"
    with pytest.raises(ke.ConfigError, match="mc % mr == 0"):
        ke.matmul(a, b, config=f"gemm mc=7 {base}")
    with pytest.raises(ke.ConfigError, match="no parameter"):
        ke.matmul(a, b, config=f"gemm mc=8 {base} bk=3")
    with pytest.raises(ke.ConfigError, match="needs"):
        ke.matmul(a, b, config="gemm mc=8")
    with pytest.raises(ke.ConfigError, match="register tile the engine has"):
        ke.matmul(a, b, config=f"gemm mc=32 nc=32 kc=32 mr=32 nr=16 threads=1 split=m engine=fma {TAIL}")
    with pytest.raises(ke.ConfigError, match="M <= 64"):
        ke.matmul(operand(rng, (65, 16), "f32"), b, config="gemv nb=32 kb=64 threads=1 epilogue=fused")
    with pytest.raises(ke.DSLError, match="1:1"):
        ke.matmul(a, b, config="= 3")


def test_extension_rejects_parameters_it_does_not_read():
    ext = ke.ops._ext
    good = {"mc": 8, "nc": 32, "kc": 8, "mr": 4, "nr": 16, "threads": 1, "split": "m",
            "engine": "fma", "pack_a": 1, "epilogue": "fused"}
    ext.validate_matmul_config("gemm", good)
    with pytest.raises(ValueError, match="does not take parameter 'swizzle'"):
        ext.validate_matmul_config("gemm", {**good, "swizzle": 1})
    with pytest.raises(ValueError, match="needs parameter 'kc'"):
        ext.validate_matmul_config("gemm", {k: v for k, v in good.items() if k != "kc"})
    with pytest.raises(ValueError, match="'engine' must be one of fma, bf16dot, amx"):
        ext.validate_matmul_config("gemm", {**good, "engine": "tensor"})


@pytest.mark.skipif(mx.cuda.is_available() or mx.metal.is_available(),
                    reason="about an MLX without a GPU back-end (here the GPU path runs)")
def test_gpu_stream_is_refused_clearly(rng):
    a, b = operand(rng, (2, 2), "f32"), operand(rng, (2, 2), "f32")
    with pytest.raises(ke.BackendNotSupportedError, match="not yet supported on this backend"):
        ke.matmul(a, b, stream=mx.gpu)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transpose_b", [False, True])
def test_gemv_rows_columns_and_depth_chunks(rng, dtype, transpose_b):
    """Every row-group size, columns and depth that are not multiples of the vectors, depth
    chunks shorter than the depth, and batches."""
    for M, N, K, kb in [(1, 37, 70, 16), (2, 64, 33, 32), (3, 20, 129, 64), (5, 99, 48, 4096),
                        (16, 133, 301, 96), (64, 17, 19, 16)]:
        a = operand(rng, (2, M, K), dtype)
        b = operand(rng, (2, N, K) if transpose_b else (2, K, N), dtype)
        out = ke.matmul(a, b, transpose_b=transpose_b,
                        config=f"gemv nb=32 kb={kb} threads={CHIP.cores} epilogue=fused")
        ref = f64(a) @ (np.swapaxes(f64(b), -1, -2) if transpose_b else f64(b))
        assert relative_error(out, ref) < TOL[dtype], (M, N, K, kb)


@pytest.mark.parametrize("config", [c for c in CONFIGS + BF16_CONFIGS if c.family == "gemm"],
                         ids=lambda c: c.name)
def test_batches_reuse_nothing_from_the_previous_entry(rng, config):
    """A is packed (or copied) once per batch entry and shared by the team: every entry
    must see its own A and B."""
    dtype = "f32" if config.get("engine") == "fma" else "bf16"
    a = operand(rng, (3, 45, 70), dtype)
    b = operand(rng, (3, 70, 53), dtype)
    out = ke.matmul(a, b, config=config)
    assert relative_error(out, f64(a) @ f64(b)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_weight_rows_read_ahead_in_memory_order(rng, dtype):
    """x @ W.T asks for the rows of W ahead of its tile (16 KB and more ahead): weights whose
    rows are further apart than their length (a slice of a wider weight), rows a multiple of
    4 KB long (A's rows padded against L1 aliasing), fewer rows than the distance ahead, and
    a last tile of fewer than 4 rows."""
    for M, N, K, wide in [(1, 301, 1024, 1024), (4, 257, 1024, 1040), (3, 6, 2048, 2048),
                          (2, 90, 333, 400)]:
        a = operand(rng, (M, K), dtype)
        w = operand(rng, (N, wide), dtype)[:, :K]
        out = ke.matmul(a, w, transpose_b=True,
                        config=f"gemv nb=64 kb=256 threads={CHIP.cores} epilogue=fused")
        ref = f64(a) @ f64(w).T
        assert relative_error(out, ref) < TOL[dtype], (M, N, K, wide)
