"""ke.matmul's fused epilogue, out = act(a @ b * scale + bias) + residual: against a float64
reference in every dtype and family, fused and separate, with broadcasting, gradients,
mx.compile, vmap, the `epilogue` call feature, and bad input."""

import math

import mlx.core as mx
import numpy as np
import pytest

import kernelevo as ke
from kernelevo import KernelConfig, chips
from kernelevo.ops.matmul_op import epilogue_kind

from helpers import TOL, f64, operand, relative_error

CHIP = chips.detect("cpu")
WIDE = CHIP.vector_registers >= 32  # AVX-512 holds 32-wide register tiles; AVX2 has 16 registers
ENGINES = ke.ops._ext.cpu_engines()
ACTIVATIONS = ["relu", "gelu", "gelu_tanh", "silu"]
_erf = np.vectorize(math.erf)


def act64(name, y):
    if name == "relu":
        return np.maximum(y, 0.0)
    if name == "gelu":
        return 0.5 * y * (1.0 + _erf(y / math.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * y * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (y + 0.044715 * y ** 3)))
    if name == "silu":
        return y / (1.0 + np.exp(-y))
    return y


def reference(a, b, bias=None, activation=None, residual=None, scale=None, transpose_b=False):
    y = f64(a) @ (np.swapaxes(f64(b), -1, -2) if transpose_b else f64(b))
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + f64(bias)
    y = act64(activation, y)
    return y + f64(residual) if residual is not None else y


def cfg(text):
    return KernelConfig.parse(text, "matmul", "cpu")


def configs(epilogue):
    found = [
        cfg(f"gemm mc=12 nc=64 kc=40 mr=6 nr={32 if WIDE else 16} threads={CHIP.cores} split=m engine=fma "
            f"pack_a=yes epilogue={epilogue}"),
        cfg(f"gemm mc=16 nc=48 kc=512 mr=4 nr=16 threads={CHIP.cores} split=n engine=fma "
            f"pack_a=no epilogue={epilogue}"),
        cfg(f"gemv nb=32 kb=32 threads={CHIP.cores} epilogue={epilogue}"),
    ]
    if "amx" in ENGINES:
        found.append(cfg(f"gemm mc=32 nc=64 kc=32 mr=32 nr=32 threads={CHIP.cores} split=m "
                         f"engine=amx pack_a=yes epilogue={epilogue}"))
    return found


@pytest.mark.parametrize("epilogue", ["fused", "separate"])
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation_in_every_dtype_and_family(rng, epilogue, dtype, activation):
    M, N, K = 13, 75, 66
    a, w = operand(rng, (M, K), dtype), operand(rng, (N, K), dtype)  # a linear layer
    bias, residual = operand(rng, (N,), dtype), operand(rng, (M, N), dtype)
    ref = reference(a, w, bias, activation, residual, 0.5, transpose_b=True)
    for config in configs(epilogue):
        if config.as_dict().get("engine") == "amx" and dtype != "bf16":
            continue
        out = ke.matmul(a, w, transpose_b=True, bias=bias, activation=activation,
                        residual=residual, scale=0.5, config=config)
        assert out.dtype == a.dtype and out.shape == (M, N)
        assert relative_error(out, ref) < 2 * TOL[dtype], config.to_dsl()


def test_activation_values_far_out(rng):
    """Large and tiny pre-activations: the vector exp/erf/tanh saturate correctly."""
    a = mx.array(np.linspace(-60, 60, 64, dtype=np.float32).reshape(64, 1))
    b = mx.ones((1, 16))
    for activation in ACTIVATIONS:
        out = f64(ke.matmul(a, b, activation=activation))
        ref = act64(activation, np.repeat(f64(a), 16, axis=1))
        assert np.all(np.isfinite(out))
        assert np.max(np.abs(out - ref) / np.maximum(1.0, np.abs(ref))) < 1e-5, activation
    tiny = mx.array(np.linspace(-1e-3, 1e-3, 32, dtype=np.float32).reshape(32, 1))
    out = f64(ke.matmul(tiny, mx.ones((1, 16)), activation="gelu_tanh"))
    ref = act64("gelu_tanh", np.repeat(f64(tiny), 16, axis=1))
    assert np.max(np.abs(out - ref)) < 1e-9


def test_fused_and_separate_run_differently_in_bf16(rng):
    """separate rounds the product to bf16 before the epilogue; fused does not."""
    a, b = operand(rng, (40, 96), "bf16"), operand(rng, (96, 64), "bf16")
    bias = operand(rng, (64,), "bf16")
    outs = {}
    for epilogue in ("fused", "separate"):
        config = (f"gemm mc=8 nc=64 kc=96 {'mr=8 nr=32' if WIDE else 'mr=4 nr=16'} threads=1 split=m engine=fma pack_a=yes "
                  f"epilogue={epilogue}")
        outs[epilogue] = ke.matmul(a, b, bias=bias, activation="silu", scale=0.75, config=config)
        assert relative_error(outs[epilogue], reference(a, b, bias, "silu", None, 0.75)) < 2 * TOL["bf16"]
    assert not np.array_equal(np.array(outs["fused"].astype(mx.float32)),
                              np.array(outs["separate"].astype(mx.float32)))


def test_broadcast_operands_batches_and_one_dimensional_calls(rng):
    a, b = operand(rng, (2, 3, 9, 17), "f32"), operand(rng, (3, 17, 11), "f32")
    cases = [dict(bias=operand(rng, (11,), "f32")),
             dict(bias=operand(rng, (9, 1), "f32"), residual=operand(rng, (3, 1, 11), "f32")),
             dict(residual=operand(rng, (2, 3, 9, 11), "f32"), activation="relu", scale=2.0),
             dict(bias=operand(rng, (1,), "bf16"))]  # other dtypes are cast to the result's
    for kwargs in cases:
        out = ke.matmul(a, b, **kwargs)
        assert out.shape == (2, 3, 9, 11) and out.dtype == mx.float32
        assert relative_error(out, reference(a, b, **kwargs)) < TOL["f32"], list(kwargs)
    v, m = operand(rng, (17,), "f32"), operand(rng, (17, 5), "f32")
    bias = operand(rng, (5,), "f32")
    out = ke.matmul(v, m, bias=bias, activation="gelu")
    assert out.shape == (5,)
    assert relative_error(out, act64("gelu", f64(v) @ f64(m) + f64(bias))) < TOL["f32"]


def test_empty_contraction_still_applies_the_epilogue():
    out = ke.matmul(mx.ones((3, 0)), mx.ones((0, 4)), bias=mx.array([1.0, -2.0, 3.0, 0.0]),
                    activation="relu", residual=mx.full((3, 4), 0.5))
    assert np.allclose(np.array(out), np.tile([1.5, 0.5, 3.5, 0.5], (3, 1)))


@pytest.mark.parametrize("activation", [None] + ACTIVATIONS)
def test_gradients_through_the_epilogue_match_mlx_ops(rng, activation):
    x, w = operand(rng, (2, 5, 11), "f32"), operand(rng, (6, 11), "f32")
    bias, residual = operand(rng, (6,), "f32"), operand(rng, (5, 6), "f32")
    g = operand(rng, (2, 5, 6), "f32")
    mlx_act = {None: lambda y: y, "relu": lambda y: mx.maximum(y, 0),
               "gelu": lambda y: 0.5 * y * (1 + mx.erf(y / math.sqrt(2))),
               "gelu_tanh": lambda y: 0.5 * y * (1 + mx.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y ** 3))),
               "silu": lambda y: y * mx.sigmoid(y)}[activation]

    def ours(x, w, bias, residual):
        out = ke.matmul(x, w, transpose_b=True, bias=bias, activation=activation,
                        residual=residual, scale=1.5)
        return (out * g).sum()

    def theirs(x, w, bias, residual):
        return ((mlx_act(mx.matmul(x, w.T) * 1.5 + bias) + residual) * g).sum()

    got = mx.grad(ours, argnums=(0, 1, 2, 3))(x, w, bias, residual)
    want = mx.grad(theirs, argnums=(0, 1, 2, 3))(x, w, bias, residual)
    for p, q in zip(got, want):
        assert p.shape == q.shape
        assert relative_error(p, f64(q)) < 1e-5


def test_jvp_through_the_epilogue(rng):
    a, b, bias = operand(rng, (4, 6), "f32"), operand(rng, (6, 3), "f32"), operand(rng, (3,), "f32")
    ta, tb, tbias = operand(rng, (4, 6), "f32"), operand(rng, (6, 3), "f32"), operand(rng, (3,), "f32")
    _, got = mx.jvp(lambda a, b, c: ke.matmul(a, b, bias=c, activation="silu", scale=0.5),
                    [a, b, bias], [ta, tb, tbias])
    _, want = mx.jvp(lambda a, b, c: mx.sigmoid(0.5 * (a @ b) + c) * (0.5 * (a @ b) + c),
                     [a, b, bias], [ta, tb, tbias])
    assert relative_error(got[0], f64(want[0])) < 1e-5


def test_compile_and_vmap_with_an_epilogue(rng):
    a, b = operand(rng, (8, 16), "f32"), operand(rng, (16, 4), "f32")
    bias = operand(rng, (4,), "f32")
    fn = mx.compile(lambda x, y, c: ke.matmul(x, y, bias=c, activation="gelu_tanh") * 2.0)
    assert relative_error(fn(a, b, bias), 2.0 * reference(a, b, bias, "gelu_tanh")) < 1e-5
    xs, biases = operand(rng, (3, 8, 16), "f32"), operand(rng, (3, 4), "f32")
    out = mx.vmap(lambda x, c: ke.matmul(x, b, bias=c, activation="relu"))(xs, biases)
    ref = np.stack([reference(xs[i], b, biases[i], "relu") for i in range(3)])
    assert relative_error(out, ref) < 1e-5
    out = mx.vmap(lambda c: ke.matmul(a, b, bias=c, residual=a[:, :4]))(biases)  # only bias mapped
    ref = np.stack([reference(a, b, biases[i], None, a[:, :4]) for i in range(3)])
    assert relative_error(out, ref) < 1e-5


@pytest.mark.parametrize("kwargs,kind", [
    ({}, "none"), ({"bias": 1}, "bias"), ({"activation": "silu"}, "activation"),
    ({"residual": 1}, "residual"), ({"scale": 0.5}, "scale"), ({"scale": 1.0}, "none"),
    ({"bias": 1, "activation": "relu"}, "mixed"),
])
def test_the_epilogue_call_feature_steers_the_heuristics(rng, kwargs, kind):
    from kernelevo.paths import tuned_heuristics_path

    path = tuned_heuristics_path(CHIP.id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"kevo 1\ntarget cpu\nchips {CHIP.id}\n\nmatmul {{\n"
                    f"  when epilogue == {kind} {{ gemv nb=32 kb=64 threads=1 epilogue=separate }}\n"
                    "  else { gemv nb=16 kb=64 threads=1 epilogue=fused }\n}\n")
    ke.forget_selections()
    a, b = operand(rng, (4, 8), "f32"), operand(rng, (8, 16), "f32")
    args = {k: (operand(rng, (16,), "f32") if k in ("bias", "residual") else v) for k, v in kwargs.items()}
    out = ke.matmul(a, b, **args)
    assert ke.ops._ext.config_of(out)[1]["nb"] == 32
    assert epilogue_kind(**args) == kind


def test_bad_epilogues_raise_value_error(rng):
    a, b = operand(rng, (3, 4), "f32"), operand(rng, (4, 5), "f32")
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        ke.matmul(a, b, activation="tanh")
    with pytest.raises(ValueError, match=r"bias of shape \(4,\) does not broadcast to the result \(3, 5\)"):
        ke.matmul(a, b, bias=mx.ones((4,)))
    with pytest.raises(ValueError, match="residual of shape"):
        ke.matmul(a, b, residual=mx.ones((2, 3, 5)))  # would enlarge the result
    with pytest.raises(TypeError, match="scale must be a number"):
        ke.matmul(a, b, scale="2")
