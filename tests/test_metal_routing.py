"""ke.matmul, ke.linear and ke.attention on a Metal device: the real routing, selection
and lowering, with only the launch — MLX's fast::metal_kernel — replaced at the boundary by
the MSL emulator. Results are checked against float64; the configuration that ran must be
the one the heuristics chose.

The shipped apple-*.kevo send every call to MLX's own op (kernelevo's Metal kernels are
untimed on an Apple GPU): with them nothing is launched. The kernels run where the seed
programs (heuristics/seeds/, what tune and evolve start from) choose them: those tests put
the chip's seed in force as its tuned file, as a tuned program would be."""

from __future__ import annotations

import math
import shutil

import mlx.core as mx
import numpy as np
import pytest

import kernelevo as ke
from cuda_cases import assert_close, attention_reference, epilogue_reference
from kernelevo import heuristics
from kernelevo.features import attention_features, matmul_features
from kernelevo.features import Epilogue
from kernelevo.chips import apple_from_device_info
from kernelevo.ops import gpu
from kernelevo.paths import tuned_heuristics_path
from kernelevo.tune.correctness import random_operand, to_f64
from metal_emulated import CHIPS, pretend_metal

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the MSL emulator needs g++")


def chosen(chip, op, features):
    return heuristics.active("metal", CHIPS[chip]).program.select(op, features).config


def pretend_seeded(monkeypatch, chip):
    """pretend_metal, with the chip's seed program in force (installed as its tuned file)."""
    seed = heuristics.seed_source("metal", CHIPS[chip])
    assert seed.origin == "seed"
    path = tuned_heuristics_path(CHIPS[chip].id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(seed.path.read_text())
    heuristics.invalidate()
    ke.forget_selections()
    launch = pretend_metal(monkeypatch, chip)
    assert heuristics.active("metal", CHIPS[chip]).source.origin == "tuned"
    return launch


@pytest.mark.parametrize("chip,M,N,K,dtype,tb,batch,family", [
    ("m1", 1, 300, 40, "f16", True, 1, "gemv"),
    ("m1", 1, 90, 70, "f32", False, 1, "gemv"),
    ("m3", 4, 96, 128, "f16", True, 1, "gemv_wide"),
    ("m1", 16, 16, 512, "f32", False, 1, "splitk"),
    ("m1", 70, 45, 40, "bf16", True, 1, "gemm"),
    ("m2-ultra", 70, 45, 40, "f32", False, 1, "gemm"),
    ("m3-max", 33, 20, 24, "f16", False, 2, "gemm"),
])
def test_matmul_runs_what_the_seed_heuristics_choose(monkeypatch, chip, M, N, K, dtype, tb, batch, family):
    launch = pretend_seeded(monkeypatch, chip)
    lead = (batch,) if batch > 1 else ()
    a = random_operand(lead + (M, K), dtype, 1)
    b = random_operand(lead + ((N, K) if tb else (K, N)), dtype, 2)
    out = ke.matmul(a, b, transpose_b=tb)
    config = chosen(chip, "matmul", matmul_features(M, N, K, batch=batch, dtype=dtype, transpose_b=tb))
    assert config.family == family
    assert launch.launched[0].startswith(config.name + "_")
    b64 = to_f64(b)
    assert_close(out, to_f64(a) @ (np.swapaxes(b64, -1, -2) if tb else b64), dtype)


@pytest.mark.parametrize("chip,M,family", [("m3", 5, "gemv_wide"), ("m1", 5, "gemm"), ("m1", 1, "gemv")])
def test_linear_fuses_its_epilogue_into_the_chosen_kernel(monkeypatch, chip, M, family):
    launch = pretend_seeded(monkeypatch, chip)
    x, w = random_operand((M, 64), "f16", 3), random_operand((48, 64), "f16", 4)
    bias, residual = random_operand((48,), "f16", 5), random_operand((M, 48), "f16", 6)
    y = ke.linear(x, w, bias, activation="gelu", residual=residual, scale=0.5)
    assert len(launch.launched) == 1 and launch.launched[0].startswith(family + "_")
    ep = Epilogue(bias=True, activation="gelu", residual=True, alpha=0.5)
    assert_close(y, epilogue_reference(to_f64(x) @ to_f64(w).T, ep, bias, residual), "f16")


def _attention_call(chip, monkeypatch, B, Hq, Hkv, Lq, Lk, D, dtype="f16", mask=None, seeded=True):
    launch = pretend_seeded(monkeypatch, chip) if seeded else pretend_metal(monkeypatch, chip)
    q = random_operand((B, Hq, Lq, D), dtype, 7)
    k, v = random_operand((B, Hkv, Lk, D), dtype, 8), random_operand((B, Hkv, Lk, D), dtype, 9)
    out = ke.attention(q, k, v, scale=1 / math.sqrt(D), mask=mask)
    kind = "causal" if mask == "causal" else "none"
    config = chosen(chip, "attention", attention_features(batch=B, heads=Hq, kv_heads=Hkv, q_len=Lq, kv_len=Lk,
                                                          head_dim=D, dtype=dtype, mask=kind))
    ref = attention_reference(q, k, v, 1 / math.sqrt(D), kind, None, 0.0, 0)
    return launch, config, out, ref


@pytest.mark.parametrize("chip,B,Hq,Hkv,Lq,Lk,D,mask,family", [
    ("m1", 1, 4, 4, 1, 300, 128, None, "decode"),
    ("m2-pro", 1, 8, 2, 1, 1100, 64, None, "decode_split"),
    ("m1", 2, 4, 2, 40, 40, 64, "causal", "flash"),
])
def test_attention_runs_what_the_seed_heuristics_choose(monkeypatch, chip, B, Hq, Hkv, Lq, Lk, D, mask, family):
    launch, config, out, ref = _attention_call(chip, monkeypatch, B, Hq, Hkv, Lq, Lk, D, mask=mask)
    assert config.family == family
    assert launch.launched[0].startswith(config.name + "_")
    assert_close(out, ref, "f16")


def test_attention_the_heuristics_give_to_mlx_runs_mlx(monkeypatch):
    launch, config, out, ref = _attention_call("m1", monkeypatch, 1, 2, 1, 16, 16, 256)
    assert config.family == "mlx" and not launch.launched
    assert_close(out, ref, "f16")


def test_without_metal_the_launch_is_a_clear_error():
    """This machine's MLX has no Metal back-end: the real launcher says so, as kernelevo's
    BackendNotSupportedError, instead of MLX's bare RuntimeError."""
    from kernelevo.config import KernelConfig
    from kernelevo.lowering import metal as lowering

    cfg = KernelConfig.parse("gemm bm=32 bn=32 bk=16 wm=2 wn=2 swizzle=0 epilogue=fused", "matmul", "metal")
    (kernel,) = lowering.lower_matmul(cfg, matmul_features(8, 8, 8, dtype="f32")).kernels
    inputs = [mx.zeros((8, 8)), mx.zeros((8, 8)), mx.array(kernel.sizes, dtype=mx.int32)]
    with pytest.raises(ke.BackendNotSupportedError, match="no Metal back-end"):
        gpu.launch.native_launch(kernel, inputs, stream=None)


def test_a_window_with_more_queries_than_keys_goes_to_mlx_on_every_chip():
    """flash needs every query to see a key (q_len <= kv_len when causal or windowed); the
    seeds (and the shipped files) send such calls to MLX rather than to a rule that would fail
    its check."""
    features = attention_features(batch=1, heads=4, kv_heads=2, q_len=64, kv_len=32, head_dim=64, window=16)
    for chip in CHIPS:
        assert chosen(chip, "attention", features).family == "mlx"
        assert heuristics.seed_program("metal", CHIPS[chip]).select("attention", features).config.family == "mlx"


@pytest.mark.parametrize("ta,tb", [(False, False), (False, True), (True, False), (True, True)])
def test_gradients_of_matmul_run_on_metal_kernels_too(monkeypatch, ta, tb):
    """The VJP is built from kernelevo matmuls, which route to Metal kernels again."""
    launch = pretend_seeded(monkeypatch, "m1")
    M, N, K = 37, 45, 24
    a = random_operand((K, M) if ta else (M, K), "f32", 10)
    b = random_operand((N, K) if tb else (K, N), "f32", 11)
    da, db = mx.grad(lambda x, w: (ke.matmul(x, w, transpose_a=ta, transpose_b=tb) ** 2).sum(),
                     argnums=(0, 1))(a, b)
    mx.eval(da, db)
    a64 = to_f64(a).T if ta else to_f64(a)
    b64 = to_f64(b).T if tb else to_f64(b)
    dy = 2 * a64 @ b64
    da_ref, db_ref = dy @ b64.T, a64.T @ dy
    assert_close(da, da_ref.T if ta else da_ref, "f32")
    assert_close(db, db_ref.T if tb else db_ref, "f32")
    assert len(launch.launched) == 3  # the product, then one kernel per gradient


# ---- the shipped files: an untuned Mac runs MLX's own op ---------------------------------

M5 = apple_from_device_info("applegpu_g17s", "Apple M5 Pro")


@pytest.mark.parametrize("chip", ["m1", "m3", "m2-pro", "m3-max", "m2-ultra", "m4", "m5-pro"])
def test_untuned_mac_runs_mlx_for_matmul_linear_and_attention(monkeypatch, chip):
    """What the seeds send to kernelevo kernels (gemv, gemv_wide, splitk, gemm, decode,
    decode_split, flash) goes to MLX's own op with the shipped files: nothing is launched,
    and the results are MLX's (correct)."""
    monkeypatch.setitem(CHIPS, "m5-pro", M5)
    launch = pretend_metal(monkeypatch, chip)
    assert heuristics.active("metal", CHIPS[chip]).source.origin == "shipped"
    for M, N, K, dtype, tb in [(1, 300, 40, "f16", True), (4, 96, 128, "f16", True), (16, 16, 512, "f32", False),
                               (70, 45, 40, "bf16", True)]:
        a, b = random_operand((M, K), dtype, 1), random_operand((N, K) if tb else (K, N), dtype, 2)
        out = ke.matmul(a, b, transpose_b=tb)
        assert chosen(chip, "matmul", matmul_features(M, N, K, dtype=dtype, transpose_b=tb)).family == "mlx"
        b64 = to_f64(b)
        assert_close(out, to_f64(a) @ (b64.T if tb else b64), dtype)
    x, w, bias = random_operand((5, 64), "f16", 3), random_operand((48, 64), "f16", 4), random_operand((48,), "f16", 5)
    y = ke.linear(x, w, bias, activation="gelu")
    assert_close(y, epilogue_reference(to_f64(x) @ to_f64(w).T, Epilogue(bias=True, activation="gelu"), bias, None),
                 "f16")
    for B, Hq, Hkv, Lq, Lk, D, mask in [(1, 4, 4, 1, 300, 128, None), (1, 8, 2, 1, 1100, 64, None),
                                        (2, 4, 2, 40, 40, 64, "causal")]:
        again, config, out, ref = _attention_call(chip, monkeypatch, B, Hq, Hkv, Lq, Lk, D, mask=mask, seeded=False)
        assert config.family == "mlx" and again.launched == []
        assert_close(out, ref, "f16")
    assert launch.launched == []
