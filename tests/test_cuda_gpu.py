"""The CUDA kernels on an NVIDIA GPU through MLX's CUDA back-end (marked `gpu`; skipped
where MLX has no CUDA device, as in CI). The shared case matrix (cuda_cases.py), a sample
of every family's search space over odd and LLM-sized shapes, the ops as the shipped
heuristics choose, gradients, and the launcher's cache."""

from __future__ import annotations

import math
import random

import mlx.core as mx
import numpy as np
import pytest

import kernelevo as ke
from cuda_cases import (ATTENTION_CASES, GRAD_CASES, MATMUL_CASES, AttentionCase, MatmulCase,
                        assert_close, run_attention_case, run_matmul_case, run_matmul_grad_case)
from kernelevo import KernelConfig, chips
from kernelevo.families import families_for
from kernelevo.features import attention_features, matmul_features
from kernelevo.features import Epilogue
from kernelevo.ops import gpu

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not mx.cuda.is_available(), reason="needs MLX's CUDA back-end and a GPU"),
]


@pytest.fixture(autouse=True)
def on_gpu():
    with mx.stream(mx.gpu):
        yield


@pytest.mark.parametrize("case", MATMUL_CASES, ids=str)
def test_matmul_cases(case, rng):
    out, ref = run_matmul_case(case, rng)
    assert_close(out, ref, case.dtype)


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=str)
def test_attention_cases(case, rng):
    out, ref = run_attention_case(case, rng)
    assert_close(out, ref, case.dtype)


@pytest.mark.parametrize("case", GRAD_CASES, ids=str)
def test_matmul_gradients(case, rng):
    for grad, ref in run_matmul_grad_case(case, rng):
        assert_close(grad, ref, case.dtype)


# ---- a sample of every family's search space -----------------------------------------

def _sampled_matmul_cases():
    chip = chips.from_id("nvidia-h100")
    shapes = {
        "gemm": [(1024, 1024, 1024, "bf16", False, True), (333, 517, 250, "f16", True, False),
                 (96, 4096, 512, "bf16", False, False)],
        "splitk": [(64, 512, 4096, "bf16", False, True), (50, 300, 3000, "f16", True, True)],
        "gemv": [(1, 4096, 4096, "bf16", False, True), (9, 1000, 1536, "f16", False, False),
                 (4, 777, 999, "f32", False, True)],
    }
    cases = []
    for fam in families_for("matmul", "cuda"):
        for M, N, K, dtype, ta, tb in shapes.get(fam.name, []):
            call = matmul_features(M, N, K, dtype=dtype, transpose_a=ta, transpose_b=tb, epilogue="mixed")
            space = list(fam.search_space(chip, call))
            for params in random.Random(M * N + K).sample(space, min(8, len(space))):
                config = KernelConfig.make("matmul", "cuda", fam.name, params)
                cases.append(MatmulCase(config.to_dsl(), M, N, K, dtype, ta, tb,
                                        epilogue=Epilogue(bias=True, activation="silu")))
    return cases


def _sampled_attention_cases():
    chip = chips.from_id("nvidia-h100")
    shapes = {
        "flash": [(1, 8, 2, 300, 300, 128, "bf16", "causal"), (2, 4, 4, 129, 257, 64, "f16", "none"),
                  (2, 32, 8, 1, 5000, 128, "bf16", "none")],
        "decode": [(4, 32, 8, 1, 1000, 128, "bf16", "none"), (1, 16, 8, 4, 777, 128, "f16", "causal")],
        "decode_split": [(1, 32, 8, 1, 9000, 128, "bf16", "none"), (2, 12, 4, 1, 5000, 64, "f32", "none")],
    }
    cases = []
    for fam in families_for("attention", "cuda"):
        for B, Hq, Hkv, Lq, Lk, D, dtype, mask in shapes.get(fam.name, []):
            call = attention_features(batch=B, heads=Hq, kv_heads=Hkv, q_len=Lq, kv_len=Lk,
                                      head_dim=D, dtype=dtype, mask=mask)
            space = list(fam.search_space(chip, call))
            for params in random.Random(Lq * Lk + D).sample(space, min(6, len(space))):
                config = KernelConfig.make("attention", "cuda", fam.name, params)
                cases.append(AttentionCase(config.to_dsl(), B, Hq, Hkv, Lq, Lk, D, dtype, mask))
    return cases


@pytest.mark.parametrize("case", _sampled_matmul_cases(), ids=lambda c: f"{c}-{c.config}")
def test_sampled_matmul_configurations(case, rng):
    out, ref = run_matmul_case(case, rng)
    assert_close(out, ref, case.dtype)


@pytest.mark.parametrize("case", _sampled_attention_cases(), ids=lambda c: f"{c}-{c.config}")
def test_sampled_attention_configurations(case, rng):
    out, ref = run_attention_case(case, rng)
    assert_close(out, ref, case.dtype)


# ---- the ops as the shipped heuristics choose --------------------------------------

LLM_SHAPES = [(1, 4096, 4096), (8, 14336, 4096), (64, 4096, 14336), (256, 4096, 4096), (2048, 4096, 4096)]


@pytest.mark.parametrize("M,N,K", LLM_SHAPES)
@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_linear_as_chosen(M, N, K, dtype, rng):
    case = MatmulCase("", M, N, K, dtype)
    x = mx.array(rng.standard_normal((M, K)).astype(np.float32)).astype(getattr(mx, {"bf16": "bfloat16", "f16": "float16"}[dtype]))
    w = mx.array(rng.standard_normal((N, K)).astype(np.float32) / math.sqrt(K)).astype(x.dtype)
    bias = mx.array(rng.standard_normal(N).astype(np.float32)).astype(x.dtype)
    out = ke.linear(x, w, bias, activation="gelu")
    from cuda_cases import epilogue_reference
    from kernelevo.tune.correctness import to_f64
    ref = epilogue_reference(to_f64(x) @ to_f64(w).T, Epilogue(bias=True, activation="gelu"), bias, None)
    assert_close(out, ref, case.dtype)
    plain = ke.matmul(x, w, transpose_b=True)
    assert_close(plain, to_f64(x) @ to_f64(w).T, dtype)


@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk", [(1, 32, 8, 1, 4096), (8, 16, 8, 1, 1024), (1, 32, 8, 2048, 2048)])
@pytest.mark.parametrize("mask", [None, "causal"])
def test_attention_as_chosen(B, Hq, Hkv, Lq, Lk, mask, rng):
    case = AttentionCase("", B, Hq, Hkv, Lq, Lk, 128, "bf16", mask or "none")
    features = attention_features(batch=B, heads=Hq, kv_heads=Hkv, q_len=Lq, kv_len=Lk, head_dim=128,
                                  dtype="bf16", mask=mask or "none")
    config = gpu.select_attention_config(features)
    out, ref = run_attention_case(AttentionCase(config.to_dsl() if config.family != "mlx" else "mlx",
                                                B, Hq, Hkv, Lq, Lk, 128, "bf16", mask or "none"), rng)
    assert_close(out, ref, case.dtype)


@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,mask,window", [(8, 16, 8, 1, 1024, None, 0),
                                                        (1, 16, 4, 300, 300, "causal", 128)])
def test_public_attention_runs_the_gpu_kernels(B, Hq, Hkv, Lq, Lk, mask, window, rng, monkeypatch):
    """ke.attention on a GPU stream: the heuristics' kernel, not the CPU extension."""
    from cuda_cases import attention_reference

    q, k, v = (mx.array(rng.standard_normal(s).astype(np.float32)).astype(mx.bfloat16)
               for s in ((B, Hq, Lq, 128), (B, Hkv, Lk, 128), (B, Hkv, Lk, 128)))
    features = attention_features(batch=B, heads=Hq, kv_heads=Hkv, q_len=Lq, kv_len=Lk,
                                  head_dim=128, dtype="bf16", mask=mask or "none", window=window)
    config = gpu.select_attention_config(features)
    assert config.family != "mlx", "the shipped rules should pick a kernelevo kernel here"
    launched = []
    real_launch = gpu.launch.launch_kernel
    monkeypatch.setattr(gpu.launch, "launch_kernel", lambda kernel, *a, **kw: launched.append(kernel.name) or real_launch(kernel, *a, **kw))
    out = ke.attention(q, k, v, scale=128 ** -0.5, mask=mask, window=window or None)
    mx.eval(out)
    assert launched and launched[0].startswith(config.family), launched
    assert_close(out, attention_reference(q, k, v, 128 ** -0.5, mask or "none", mask, 0, window), "bf16")
    forced = ke.attention(q, k, v, scale=128 ** -0.5, mask=mask, window=window or None, config=config)
    assert mx.array_equal(out, forced).item()


def test_non_contiguous_inputs_are_read_correctly(rng):
    """A KV-cache slice and a transposed view: MLX copies them row-contiguous first."""
    cache = mx.array(rng.standard_normal((1, 8, 1024, 128)).astype(np.float32)).astype(mx.bfloat16)
    k, v = cache[:, :, :700], cache[:, :, 100:800]
    q = mx.array(rng.standard_normal((1, 32, 1, 128)).astype(np.float32)).astype(mx.bfloat16)
    config = "decode_split blocks=16 warps=4 key_lanes=16 pack_gqa=yes scale_at=q"
    out = gpu.attention(q, k, v, scale=0.1, config=config)
    from cuda_cases import attention_reference
    assert_close(out, attention_reference(q, k, v, 0.1, "none", None, 0, 0), "bf16")
    a = mx.array(rng.standard_normal((64, 96)).astype(np.float32)).astype(mx.float16)
    w = mx.array(rng.standard_normal((128, 64)).astype(np.float32)).astype(mx.float16)
    out = ke.matmul(a.T, w.T, config="gemm bm=32 bn=32 bk=32 wm=1 wn=2 stages=2 swizzle=0 epilogue=fused")
    from kernelevo.tune.correctness import to_f64
    assert_close(out, to_f64(a).T @ to_f64(w).T, "f16")


def test_each_configuration_compiles_once(rng):
    a = mx.array(rng.standard_normal((40, 64)).astype(np.float32)).astype(mx.bfloat16)
    config = "gemm bm=64 bn=32 bk=32 wm=2 wn=1 stages=3 swizzle=1 epilogue=fused"
    mx.eval(ke.matmul(a, a.T, config=config))
    before = ke.ops._ext.gpu_kernels_cached()
    for n in (50, 60, 70):  # other shapes: the same kernel
        b = mx.array(rng.standard_normal((n, 64)).astype(np.float32)).astype(mx.bfloat16)
        mx.eval(ke.matmul(b, a.T, config=config))
    assert ke.ops._ext.gpu_kernels_cached() == before
