"""ke.attention against an independent float64 reference (numpy): every family over a
matrix of configurations and shapes (odd sizes, GQA ratios, every mask kind, softcap,
window, dtypes, fully masked rows, head dims), agreement with mx.fast's SDPA, gradients,
mx.compile, non-contiguous inputs and bad input."""

import mlx.core as mx
import numpy as np
import pytest

import kernelevo as ke
from kernelevo import KernelConfig, chips
from kernelevo.ops.attention_op import call_features

from helpers import MX, TOL, f64, operand, relative_error

DTYPES = ["f32", "f16", "bf16"]
CHIP = chips.detect("cpu")
CORES = CHIP.cores


def cfg(text):
    return KernelConfig.parse(text, "attention", "cpu")


# Every family, with parameters that force many blocks, ragged last blocks, both query
# layouts (packed heads or one head per task), both scale placements, masked blocks
# visited or skipped, and one or all cores.
CONFIGS = [
    cfg(f"flash bq=16 bk=7 threads={CORES} pack_gqa=yes skip_masked_blocks=yes scale_at=q dot=fma"),
    cfg("flash bq=32 bk=24 threads=1 pack_gqa=no skip_masked_blocks=no scale_at=scores dot=fma"),
    cfg(f"flash bq=64 bk=96 threads={CORES} pack_gqa=yes skip_masked_blocks=no scale_at=scores dot=fma"),
    cfg(f"flash bq=48 bk=1 threads={CORES} pack_gqa=no skip_masked_blocks=yes scale_at=q dot=fma"),
    cfg(f"decode bk=16 threads={CORES} pack_gqa=yes"),
    cfg("decode bk=5 threads=1 pack_gqa=no"),
    cfg(f"decode_split bk=8 blocks=3 threads={CORES} pack_gqa=yes"),
    cfg(f"decode_split bk=32 blocks=16 threads={CORES} pack_gqa=no"),
]


# bf16 tile products on AMX (where the CPU has them): bf16 inputs only.
AMX_CONFIGS = [
    cfg(f"flash bq=32 bk=32 threads={CORES} pack_gqa=yes skip_masked_blocks=yes scale_at=q dot=amx"),
    cfg("flash bq=64 bk=96 threads=1 pack_gqa=no skip_masked_blocks=no scale_at=scores dot=amx"),
    cfg(f"flash bq=128 bk=256 threads={CORES} pack_gqa=yes skip_masked_blocks=yes scale_at=scores "
        "dot=amx"),
] if CHIP.has_amx else []


def reference(q, k, v, scale, mask=None, softcap=None, window=None):
    """softmax(mask(softcap(scale q k^T))) v in float64; a row that sees no finite score
    outputs the mean of v (what MLX does for a row its boolean mask masks fully)."""
    q, k, v = f64(q), f64(k), f64(v)
    B, H, Lq, _ = q.shape
    Hkv, Lkv = k.shape[1], k.shape[2]
    k = np.repeat(k, H // Hkv, axis=1)
    v = np.repeat(v, H // Hkv, axis=1)
    s = scale * q @ np.swapaxes(k, -1, -2)
    if softcap:
        s = softcap * np.tanh(s / softcap)
    visible = np.ones((B, H, Lq, Lkv), dtype=bool)
    pos = np.arange(Lq)[:, None] + Lkv - Lq  # the key each query aligns with
    key = np.arange(Lkv)[None, :]
    if isinstance(mask, str):
        visible &= key <= pos
    elif mask is not None and mask.dtype == mx.bool_:
        visible &= np.broadcast_to(np.array(mask), visible.shape)
    elif mask is not None:
        s = s + np.broadcast_to(f64(mask), s.shape)
    if window:
        visible &= (key <= pos) & (key > pos - window)
    s = np.where(visible, s, -np.inf)
    top = s.max(axis=-1, keepdims=True)
    dead = ~np.isfinite(top)
    p = np.where(dead, 1.0, np.exp(s - np.where(dead, 0.0, top)))
    return (p / p.sum(axis=-1, keepdims=True)) @ v


def inputs(rng, dtype, B, H, Hkv, Lq, Lkv, D, Dv=None):
    return (operand(rng, (B, H, Lq, D), dtype), operand(rng, (B, Hkv, Lkv, D), dtype),
            operand(rng, (B, Hkv, Lkv, Dv or D), dtype))


def make_mask(rng, kind, dtype, B, H, Lq, Lkv):
    if kind in (None, "causal"):
        return kind
    if kind == "bool":  # broadcast over batch; about a third of the keys hidden
        return mx.array(rng.random((1, H, Lq, Lkv)) > 0.3)
    return mx.array(rng.standard_normal((Lq, Lkv)).astype(np.float32)).astype(MX[dtype])


def check(out, ref, dtype):
    assert out.dtype == MX[dtype]
    assert relative_error(out, ref) < TOL[dtype]


MASKS = [None, "causal", "bool", "additive"]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask", MASKS)
def test_every_configuration_is_correct(rng, config, dtype, mask):
    decode = config.family != "flash"
    # GQA ratios 1, 2, 4, 5, 8 spread over the matrix; odd lengths and head dims
    case = CONFIGS.index(config) + DTYPES.index(dtype) + MASKS.index(mask)
    H, Hkv = [(4, 4), (6, 3), (8, 2), (5, 1), (8, 1)][case % 5]
    B, Lq, Lkv, D, Dv = 2, (3 if decode else 37), 53, 40, 24
    q, k, v = inputs(rng, dtype, B, H, Hkv, Lq, Lkv, D, Dv)
    m = make_mask(rng, mask, dtype, B, H, Lq, Lkv)
    out = ke.attention(q, k, v, scale=D ** -0.5, mask=m, config=config)
    check(out, reference(q, k, v, D ** -0.5, m), dtype)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", DTYPES)
def test_softcap_and_window(rng, config, dtype):
    Lq = 4 if config.family != "flash" else 29
    q, k, v = inputs(rng, dtype, 1, 4, 2, Lq, 41, 32)
    for softcap, window, mask in [(5.0, None, None), (None, 9, None), (2.0, 3, "causal"),
                                  (30.0, 1, "bool"), (None, 100, "additive")]:
        m = make_mask(rng, mask, dtype, 1, 4, Lq, 41)
        out = ke.attention(q, k, v, scale=0.3, mask=m, softcap=softcap, window=window,
                           config=config)
        check(out, reference(q, k, v, 0.3, m, softcap, window), dtype)


@pytest.mark.parametrize("config", AMX_CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("mask", MASKS)
def test_amx_configurations_are_correct(rng, config, mask):
    for case, (H, Hkv, Lq, Lkv, D, Dv) in enumerate([(4, 4, 37, 53, 40, 24), (8, 2, 64, 64, 128, 128),
                                                     (5, 1, 100, 77, 64, 80), (2, 2, 33, 300, 256, 256),
                                                     (8, 1, 17, 9, 96, 96)]):
        q, k, v = inputs(rng, "bf16", 2 if case == 0 else 1, H, Hkv, Lq, Lkv, D, Dv)
        m = make_mask(rng, mask, "bf16", q.shape[0], H, Lq, Lkv)
        out = ke.attention(q, k, v, scale=D ** -0.5, mask=m, config=config)
        check(out, reference(q, k, v, D ** -0.5, m), "bf16")
    q, k, v = inputs(rng, "bf16", 1, 4, 2, 29, 41, 32)
    for softcap, window, mask in [(5.0, None, mask), (None, 9, mask), (2.0, 3, "causal")]:
        m = make_mask(rng, mask, "bf16", 1, 4, 29, 41)
        out = ke.attention(q, k, v, scale=0.3, mask=m, softcap=softcap, window=window, config=config)
        check(out, reference(q, k, v, 0.3, m, softcap, window), "bf16")


@pytest.mark.parametrize("D", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES)
def test_head_dims_with_default_heuristics(rng, D, dtype):
    for Lq, mask in [(1, None), (33, "causal")]:  # a decode and a prefill call
        q, k, v = inputs(rng, dtype, 1, 4, 2, Lq, 77, D)  # 77: no block size divides it
        check(ke.attention(q, k, v, scale=D ** -0.5, mask=mask),
              reference(q, k, v, D ** -0.5, mask), dtype)


@pytest.mark.parametrize("config", CONFIGS + AMX_CONFIGS, ids=lambda c: c.name)
def test_fully_masked_rows_output_the_mean_of_v(rng, config):
    """A boolean mask hiding every key of a row: the mean of v (MLX's output)."""
    Lq = 5 if config.family != "flash" else 21
    dtype = "bf16" if config.as_dict().get("dot") == "amx" else "f32"
    q, k, v = inputs(rng, dtype, 1, 2, 1, Lq, 19, 16)
    visible = rng.random((1, 2, Lq, 19)) > 0.5
    visible[:, :, 1] = False  # row 1 of every head sees nothing
    bool_mask = mx.array(visible)
    additive = mx.array(np.where(visible, 0.0, -np.inf).astype(np.float32)).astype(MX[dtype])
    mean_v = f64(v).mean(axis=2)[0, 0]
    out = ke.attention(q, k, v, scale=0.25, mask=bool_mask, config=config)
    got = f64(out)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got[0, :, 1], np.broadcast_to(mean_v, (2, 16)),
                               atol=TOL[dtype] * np.abs(mean_v).max())
    assert relative_error(out, reference(q, k, v, 0.25, bool_mask)) < TOL[dtype]
    # An additive mask that is -inf on every key of a row makes the row NaN, as in MLX
    # (exp(-inf - -inf)); the other rows are as with the boolean mask.
    got = f64(ke.attention(q, k, v, scale=0.25, mask=additive, config=config))
    assert np.all(np.isnan(got[0, :, 1]))
    rows = [r for r in range(Lq) if r != 1]
    ref = reference(q, k, v, 0.25, additive)
    assert relative_error(got[:, :, rows], ref[:, :, rows]) < TOL[dtype]
    mlx_additive = f64(mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=additive))
    assert np.all(np.isnan(mlx_additive[0, :, 1]))
    # MLX outputs the same for a fully masked boolean row
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=bool_mask)
    assert relative_error(ke.attention(q, k, v, scale=0.25, mask=bool_mask, config=config),
                          f64(expected)) < 2 * TOL[dtype]


@pytest.mark.parametrize("config", CONFIGS + AMX_CONFIGS, ids=lambda c: c.name)
def test_more_queries_than_keys_with_causal_mask(rng, config):
    Lq = 12 if config.family != "flash" else 50
    dtype = "bf16" if config.as_dict().get("dot") == "amx" else "f32"
    q, k, v = inputs(rng, dtype, 1, 4, 2, Lq, 7, 32)  # the first Lq - 7 rows see no key
    out = ke.attention(q, k, v, scale=0.2, mask="causal", config=config)
    check(out, reference(q, k, v, 0.2, "causal"), dtype)
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.2, mask="causal")
    assert relative_error(out, f64(expected)) < 2 * TOL[dtype]
    windowed = ke.attention(q, k, v, scale=0.2, window=3, config=config)
    check(windowed, reference(q, k, v, 0.2, None, None, 3), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask", MASKS)
def test_matches_mlx_fast_sdpa(rng, dtype, mask):
    for Lq in (1, 3, 40):
        q, k, v = inputs(rng, dtype, 2, 8, 2, Lq, 45, 64)
        m = make_mask(rng, mask, dtype, 2, 8, Lq, 45)
        expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=m)
        out = ke.attention(q, k, v, scale=0.125, mask=m)
        assert out.shape == expected.shape and out.dtype == expected.dtype
        # MLX rounds the scores to the input dtype; both are within the dtype's tolerance
        assert relative_error(out, f64(expected)) < 2 * TOL[dtype]


def test_non_contiguous_inputs(rng):
    # mlx-lm's layout: [B, L, H, D] transposed to [B, H, L, D]; keys with their last two
    # axes swapped (the head dimension not contiguous); a broadcast mask
    q = operand(rng, (2, 17, 6, 32), "f32").transpose(0, 2, 1, 3)
    kt = operand(rng, (2, 3, 32, 23), "f32")
    k = mx.swapaxes(kt, -1, -2)
    v = operand(rng, (2, 23, 3, 32), "f32").transpose(0, 2, 1, 3)
    mask = mx.broadcast_to(mx.array(rng.random((1, 1, 1, 23)) > 0.2), (2, 6, 17, 23))
    for config in CONFIGS:
        if config.family != "flash":
            continue
        out = ke.attention(q, k, v, scale=0.2, mask=mask, config=config)
        check(out, reference(q, k, v, 0.2, mask), "f32")
    qd = q[:, :, 16:]
    out = ke.attention(qd, k[:, :, ::2], v[:, :, ::2], scale=0.2)  # strided keys
    check(out, reference(qd, k[:, :, ::2], v[:, :, ::2], 0.2), "f32")


def test_dtype_promotion_and_empty_inputs(rng):
    q = operand(rng, (1, 2, 3, 8), "f16")
    k, v = operand(rng, (1, 2, 5, 8), "f32"), operand(rng, (1, 2, 5, 8), "bf16")
    out = ke.attention(q, k, v, scale=0.5)
    assert out.dtype == mx.float32
    check(out, reference(q, k, v, 0.5), "f32")
    int_mask = mx.array(rng.integers(-2, 2, (3, 5)).astype(np.int32))  # additive, cast
    check(ke.attention(q, k, v, scale=0.5, mask=int_mask), reference(q, k, v, 0.5, int_mask), "f32")
    empty_keys = ke.attention(q, k[:, :, :0], v[:, :, :0], scale=0.5)  # softmax of nothing
    np.testing.assert_array_equal(np.array(empty_keys), np.zeros((1, 2, 3, 8)))
    assert ke.attention(q[:, :, :0], k, v, scale=0.5).shape == (1, 2, 0, 8)


def _loss(fn, mask=None, **kw):
    def loss(q, k, v):
        out = fn(q, k, v, scale=0.3, mask=mask, **kw)
        return (out * mx.cos(out)).sum()  # a cotangent that varies per element
    return mx.grad(loss, argnums=(0, 1, 2))


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("Lq", [1, 13])
def test_gradients_match_mlx(rng, mask, Lq):
    q, k, v = inputs(rng, "f32", 2, 6, 2, Lq, 11, 16)
    m = make_mask(rng, mask, "f32", 2, 6, Lq, 11)
    ours = _loss(ke.attention, m)(q, k, v)
    theirs = _loss(mx.fast.scaled_dot_product_attention, m)(q, k, v)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert relative_error(a, f64(b)) < 1e-4


def _softcap_window_attention(q, k, v, *, scale, mask=None, softcap, window):
    """The same computation from plain MLX ops (a second, unfused implementation)."""
    G = q.shape[1] // k.shape[1]
    k, v = mx.repeat(k, G, axis=1), mx.repeat(v, G, axis=1)
    s = scale * q @ mx.swapaxes(k, -1, -2)
    s = softcap * mx.tanh(s / softcap)
    Lq, Lkv = q.shape[2], k.shape[2]
    pos = mx.arange(Lq)[:, None] + Lkv - Lq
    key = mx.arange(Lkv)[None]
    s = mx.where((key <= pos) & (key > pos - window), s, -mx.inf)
    return mx.softmax(s, axis=-1, precise=True) @ v


def test_gradients_with_softcap_and_window(rng):
    q, k, v = inputs(rng, "f32", 1, 4, 2, 9, 9, 16)
    ours = _loss(ke.attention, softcap=3.0, window=4)(q, k, v)
    theirs = _loss(_softcap_window_attention, softcap=3.0, window=4)(q, k, v)
    for a, b in zip(ours, theirs):
        assert relative_error(a, f64(b)) < 1e-4


def test_gradients_in_low_precision_and_of_an_additive_mask(rng):
    q, k, v = inputs(rng, "bf16", 1, 2, 1, 5, 8, 16)
    grads = _loss(ke.attention)(q, k, v)
    expected = _loss(mx.fast.scaled_dot_product_attention)(
        *(x.astype(mx.float32) for x in (q, k, v)))
    for g, e in zip(grads, expected):
        assert g.dtype == mx.bfloat16
        assert relative_error(g, f64(e)) < 3e-2
    mask = mx.array(rng.standard_normal((5, 8)).astype(np.float32))
    q, k, v = (x.astype(mx.float32) for x in (q, k, v))

    def by_mask(fn):
        return mx.grad(lambda m: (fn(q, k, v, scale=0.3, mask=m) ** 2).sum())(mask)

    got, want = by_mask(ke.attention), by_mask(mx.fast.scaled_dot_product_attention)
    assert got.shape == mask.shape and relative_error(got, f64(want)) < 1e-4


def test_compile_matches_eager(rng):
    q, k, v = inputs(rng, "f32", 1, 4, 2, 19, 19, 32)

    def fn(q, k, v):
        return ke.attention(q, k, v, scale=0.2, mask="causal", softcap=10.0) * 2.0

    compiled = mx.compile(fn)
    np.testing.assert_allclose(np.array(compiled(q, k, v)), np.array(fn(q, k, v)), rtol=0, atol=0)
    q2, k2, v2 = inputs(rng, "f32", 1, 4, 2, 19, 19, 32)  # traced again for new values
    check(compiled(q2, k2, v2) / 2.0, reference(q2, k2, v2, 0.2, "causal", 10.0), "f32")


def test_heuristics_choose_by_call(rng):
    q, k, v = inputs(rng, "bf16", 1, 8, 2, 1, 64, 64)
    family, params = ke.ops._ext.config_of(ke.attention(q, k, v, scale=0.1))
    assert family in ("decode", "decode_split")
    q = operand(rng, (1, 8, 64, 64), "bf16")
    family, params = ke.ops._ext.config_of(ke.attention(q, k, v, scale=0.1, mask="causal"))
    assert family == "flash" and params["threads"] <= CORES
    features = call_features(q, k, v, mask="causal", window=16)
    assert features["gqa"] == 4 and features["causal"] and features["window"] == 16
    explanation = ke.explain_attention(features)
    assert explanation.selection.config.family == "flash"
    assert ke.select_attention(features).config == explanation.selection.config


def _bad(**changes):
    base = dict(q=mx.zeros((1, 4, 3, 8)), k=mx.zeros((1, 2, 5, 8)), v=mx.zeros((1, 2, 5, 8)),
                scale=1.0)
    base.update(changes)
    return base


@pytest.mark.parametrize("kwargs,message", [
    (_bad(q=mx.zeros((4, 3, 8))), "rank 4"),
    (_bad(k=mx.zeros((2, 2, 5, 8)), v=mx.zeros((2, 2, 5, 8))), "batch size"),
    (_bad(k=mx.zeros((1, 2, 5, 7))), "head dimension"),
    (_bad(v=mx.zeros((1, 2, 6, 8))), "same heads and length"),
    (_bad(k=mx.zeros((1, 3, 5, 8)), v=mx.zeros((1, 3, 5, 8))), "multiple of the key/value heads"),
    (_bad(mask="upper"), "causal"),
    (_bad(mask=mx.zeros((2, 5), dtype=mx.bool_)), "does not broadcast"),
    (_bad(mask=mx.zeros((1, 1, 1, 3, 5), dtype=mx.bool_)), "rank at most 4"),
    (_bad(q=mx.zeros((1, 4, 3, 8)).astype(mx.bfloat16), k=mx.zeros((1, 2, 5, 8)).astype(mx.bfloat16),
          v=mx.zeros((1, 2, 5, 8)).astype(mx.bfloat16), mask=mx.zeros((3, 5))), "promote"),
    (_bad(q=mx.zeros((1, 4, 3, 8), dtype=mx.int32), k=mx.zeros((1, 2, 5, 8), dtype=mx.int32),
          v=mx.zeros((1, 2, 5, 8), dtype=mx.int32)), "float32, float16 and bfloat16"),
    (_bad(softcap=0.0), "softcap"),
    (_bad(softcap=-1.0), "softcap"),
    (_bad(window=0), "window"),
    (_bad(mask=[[True]]), "mask must be"),
])
def test_bad_input_is_a_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ke.attention(**kwargs)


def test_bad_configurations_are_value_errors():
    q, k = mx.zeros((1, 2, 20, 8)), mx.zeros((1, 2, 20, 8))
    amx = "flash bq=32 bk=32 threads=1 pack_gqa=yes skip_masked_blocks=yes scale_at=q dot=amx"
    with pytest.raises(ValueError, match="bf16 when dot=amx" if CHIP.has_amx else "chip.amx == 1"):
        ke.attention(q, k, k, scale=1.0, config=amx)  # f32 inputs
    with pytest.raises(ValueError, match="bfloat16"):  # the extension checks too
        ke.ops._ext.attention(q, k, k, scale=1.0, family="flash",
                              params=KernelConfig.parse(amx, "attention", "cpu").ext_params())
    with pytest.raises(ValueError, match="q_len <= 16"):  # the schema's call constraint
        ke.attention(q, k, k, scale=1.0, config="decode bk=16 threads=1 pack_gqa=yes")
    with pytest.raises(ValueError, match="no parameter"):
        ke.attention(q, k, k, scale=1.0, config="flash bq=16 bk=8 threads=1 pack_gqa=yes "
                                                 "skip_masked_blocks=yes scale_at=q dot=fma extra=1")
    with pytest.raises(ValueError, match="at most 16 queries"):  # the extension checks too
        ke.ops._ext.attention(q, k, k, scale=1.0, family="decode",
                              params={"bk": 16, "threads": 1, "pack_gqa": 1})


@pytest.mark.skipif(mx.cuda.is_available() or mx.metal.is_available(),
                    reason="about an MLX without a GPU back-end (here the GPU path runs)")
def test_gpu_stream_is_not_supported():
    q = mx.zeros((1, 2, 3, 8))
    with pytest.raises(ke.BackendNotSupportedError, match="not yet supported"):
        ke.attention(q, q, q, scale=1.0, stream=mx.gpu)
