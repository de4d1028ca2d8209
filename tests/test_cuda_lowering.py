"""Lowering to CUDA, checked on the CPU: what each configuration launches (names, grids,
template arguments, shared memory, sizes) agrees with the schema, and every parameter of
every CUDA family changes what runs."""

from __future__ import annotations

import random

import mlx.core as mx
import pytest

import kernelevo as ke
from kernelevo import KernelConfig, chips
from kernelevo.families import families_for
from kernelevo.families.cuda_attention import decode_smem, flash_smem
from kernelevo.families.cuda_matmul import gemm_smem
from kernelevo.features import attention_features, matmul_features
from kernelevo.features import Epilogue
from kernelevo.lowering import LoweredKernel, cdiv
from kernelevo.lowering.cuda import lower_attention, lower_matmul, mlx_source
from kernelevo.ops import gpu

H100 = chips.from_id("nvidia-h100")
EPILOGUE = Epilogue(bias=True, activation="gelu")

MATMUL_CALLS = {
    "gemm": matmul_features(1000, 1500, 700, dtype="bf16", transpose_b=True, epilogue="mixed"),
    "splitk": matmul_features(64, 512, 8192, dtype="f16", epilogue="mixed"),
    "gemv": matmul_features(5, 3000, 4096, dtype="bf16", transpose_b=True, epilogue="mixed"),
}
ATTENTION_CALLS = {
    "flash": attention_features(batch=2, heads=8, kv_heads=2, q_len=1000, kv_len=1000,
                                head_dim=128, dtype="bf16", mask="causal", window=300),
    "decode": attention_features(batch=2, heads=16, kv_heads=8, q_len=1, kv_len=30000,
                                 head_dim=128, dtype="bf16"),
    "decode_split": attention_features(batch=2, heads=16, kv_heads=8, q_len=1, kv_len=30000,
                                       head_dim=128, dtype="bf16"),
}


def lower(config: KernelConfig, call: dict):
    if config.op == "matmul":
        return lower_matmul(config, call, epilogue=EPILOGUE)
    return lower_attention(config, call, scale=0.125)


def what_runs(plan) -> tuple:
    """Everything a launch hands MLX except the names (the cache keys)."""
    return tuple((k.source, k.header, k.template_args, k.grid, k.threadgroup, k.shared_memory,
                  k.sizes, k.output_shapes, k.output_dtypes) for k in plan.kernels) + (plan.pending,)


def cuda_families():
    return [pytest.param(fam, calls[fam.name], id=fam.name)
            for op, calls in (("matmul", MATMUL_CALLS), ("attention", ATTENTION_CALLS))
            for fam in families_for(op, "cuda") if fam.name != "mlx"]


def sample_space(fam, call, n=12):
    space = list(fam.search_space(H100, call))
    assert space, f"{fam.name} has no valid configuration for {call}"
    return random.Random(0).sample(space, min(n, len(space)))


@pytest.mark.parametrize("fam,call", cuda_families())
def test_every_parameter_changes_what_runs(fam, call):
    if fam.name == "flash":  # at head_dim 64 a warp may own two row tiles: bq and warps vary apart
        call = dict(call, head_dim=64)
    tested = set()
    for params in sample_space(fam, call, 16):
        base = what_runs(lower(KernelConfig.make(fam.op, "cuda", fam.name, params), call))
        for p in fam.params:
            for value in p.search_values(H100):
                changed = dict(params, **{p.name: value})
                if value == params[p.name] or not p.contains(value) or fam.violations(changed, H100, call):
                    continue
                other = lower(KernelConfig.make(fam.op, "cuda", fam.name, changed), call)
                assert what_runs(other) != base, f"{fam.name}: {p.name}={value} launches the same kernel"
                tested.add(p.name)
                break
    assert tested == set(fam.param_names), f"untested: {set(fam.param_names) - tested}"


@pytest.mark.parametrize("fam,call", cuda_families())
def test_names_carry_every_template_argument(fam, call):
    seen = {}
    for params in sample_space(fam, call):
        config = KernelConfig.make(fam.op, "cuda", fam.name, params)
        first, *rest = lower(config, call).kernels
        assert first.name.startswith(config.name + "_"), "the configuration's name, then derived values"
        for kernel in (first, *rest):
            key = (kernel.source, kernel.template_args, kernel.shared_memory)
            assert seen.setdefault(kernel.name, key) == key, f"{kernel.name} names two kernels"
            for name, _ in kernel.template_args:
                assert name in kernel.source or name in kernel.header, f"{name} is read by nothing"


@pytest.mark.parametrize("fam,call", cuda_families())
def test_shared_memory_and_threads_within_the_chip(fam, call):
    for params in sample_space(fam, call):
        for kernel in lower(KernelConfig.make(fam.op, "cuda", fam.name, params), call).kernels:
            assert 0 <= kernel.shared_memory <= H100.threadgroup_memory
            threads = kernel.threadgroup[0] * kernel.threadgroup[1] * kernel.threadgroup[2]
            assert threads % 32 == 0 and threads <= H100.max_threads
            assert kernel.grid[0] % kernel.threadgroup[0] == 0, "whole blocks"


def test_gemm_grid_and_shared_memory_follow_the_tiles():
    call = MATMUL_CALLS["gemm"]
    config = KernelConfig.parse("gemm bm=128 bn=64 bk=32 wm=2 wn=2 stages=3 swizzle=2 epilogue=fused",
                                "matmul", "cuda")
    (kernel,) = lower_matmul(config, call, epilogue=EPILOGUE).kernels
    assert kernel.grid == (cdiv(1000, 128) * cdiv(1500, 64) * 128, 1, 1)
    assert kernel.threadgroup == (128, 1, 1)
    # transpose_b: A tile [bm][bk + 8], B tile [bn][bk + 8], three stages, two bytes each
    assert kernel.shared_memory == 3 * (128 * 40 + 64 * 40) * 2 == gemm_smem(config.as_dict(), call)
    assert kernel.input_names == ("a", "b", "bias", "sizes")
    assert dict(kernel.template_args)["ACT"] == 3 and dict(kernel.template_args)["SWIZZLE"] == 2
    assert kernel.sizes[:3] == (1000, 1500, 700)


def test_splitk_reduces_in_a_second_kernel():
    call = MATMUL_CALLS["splitk"]
    config = KernelConfig.parse("splitk bm=64 bn=64 bk=32 wm=2 wn=2 stages=3 parts=8 epilogue=fused",
                                "matmul", "cuda")
    partial, reduce = lower_matmul(config, call, epilogue=EPILOGUE).kernels
    assert partial.output_names == ("partials",) and partial.output_dtypes == ("float32",)
    assert partial.output_shapes == ((8, 1, 64, 512),) and partial.grid[2] == 8
    assert partial.sizes[6] == 1024  # K per part, a multiple of bk
    assert reduce.input_names[0] == "partials" and reduce.output_shapes == ((1, 64, 512),)


def test_separate_epilogue_is_left_to_the_op():
    call = MATMUL_CALLS["gemm"]
    fused = KernelConfig.parse("gemm bm=64 bn=64 bk=32 wm=2 wn=2 stages=3 swizzle=0 epilogue=fused", "matmul", "cuda")
    separate = KernelConfig.parse("gemm bm=64 bn=64 bk=32 wm=2 wn=2 stages=3 swizzle=0 epilogue=separate", "matmul", "cuda")
    assert lower_matmul(fused, call, epilogue=EPILOGUE).pending is None
    plan = lower_matmul(separate, call, epilogue=EPILOGUE)
    assert plan.pending == EPILOGUE and "bias" not in plan.kernels[0].input_names


def test_decode_split_slices_and_merge():
    call = ATTENTION_CALLS["decode_split"]
    config = KernelConfig.parse("decode_split blocks=64 warps=4 key_lanes=16 pack_gqa=yes scale_at=q",
                                "attention", "cuda")
    first, merge = lower_attention(config, call, scale=0.1).kernels
    groups = 4 * 32 // 16
    chunk = cdiv(cdiv(30000, 64), groups) * groups
    assert first.sizes[-2:] == (cdiv(30000, chunk), chunk) and cdiv(30000, chunk) <= 64
    assert first.grid == (cdiv(30000, chunk) * 128, 2 * 8, 1)  # packed: one block row per KV head
    assert dict(first.template_args)["R"] == 2  # gqa 2, one query
    assert first.shared_memory == decode_smem(config.as_dict(), call)
    assert merge.input_names == ("o_part", "ml_part", "sizes") and merge.output_shapes == ((2, 16, 1, 128),)


def test_flash_lowering():
    call = ATTENTION_CALLS["flash"]
    config = KernelConfig.parse("flash bq=64 bk=64 warps=4 stages=2 skip_masked_blocks=yes scale_at=q "
                                "pack_gqa=no kv_splits=1", "attention", "cuda")
    (kernel,) = lower_attention(config, call, scale=0.1).kernels
    assert kernel.grid == (cdiv(1000, 64) * 128, 2 * 8, 1)
    assert kernel.shared_memory == flash_smem(config.as_dict(), call) == (64 + 2 * 2 * 64) * 136 * 2
    args = dict(kernel.template_args)
    assert args["CAUSAL"] and args["SKIP"] and args["SCALE_Q"] and args["D"] == 128
    assert kernel.sizes[7] == 300  # the window
    # packed and split: rows are the 4 query heads of a KV head, keys in 64-key slices
    config = KernelConfig.parse("flash bq=16 bk=64 warps=1 stages=2 skip_masked_blocks=yes scale_at=q "
                                "pack_gqa=yes kv_splits=16", "attention", "cuda")
    first, merge = lower_attention(config, call, scale=0.1).kernels
    assert first.grid == (cdiv(1000 * 4, 16) * 32, 2 * 2, 16) and first.sizes[-2:] == (16, 64)
    assert first.output_names == ("o_part", "ml_part") and merge.output_shapes == ((2, 8, 1000, 128),)


def test_constraints_keep_kernels_to_what_they_do():
    gemm = families_for("matmul", "cuda")[0]
    assert gemm.name == "gemm"
    ok = {"bm": 64, "bn": 64, "bk": 32, "wm": 2, "wn": 2, "stages": 3, "swizzle": 0, "epilogue": "fused"}
    assert not gemm.violations(ok, H100, matmul_features(64, 64, 64, dtype="bf16"))
    assert gemm.violations(ok, H100, matmul_features(64, 64, 64, dtype="f32"))  # MMA: 16-bit only
    assert gemm.violations(dict(ok, bm=256, bn=256, wm=1, wn=1), H100, {})  # registers
    assert gemm.violations(dict(ok, bn=32, wn=4), H100, {})  # 8-column fragments in pairs
    decode = [f for f in families_for("attention", "cuda") if f.name == "decode"][0]
    call = attention_features(batch=1, heads=8, kv_heads=8, q_len=1, kv_len=10, head_dim=72, dtype="bf16")
    assert decode.violations({"warps": 4, "key_lanes": 16, "pack_gqa": True, "scale_at": "q"}, H100, call)


def test_unsupported_grids_and_configs_are_clear_errors():
    config = KernelConfig.parse("gemm bm=16 bn=16 bk=16 wm=1 wn=1 stages=2 swizzle=0 epilogue=fused", "matmul", "cuda")
    with pytest.raises(ValueError, match="grid"):
        lower_matmul(config, matmul_features(64, 64, 64, batch=70000, dtype="bf16"))
    cpu = KernelConfig.parse("gemm mc=96 nc=1024 kc=256 mr=6 nr=64 threads=2 split=m engine=fma pack_a=yes epilogue=fused", "matmul", "cpu")
    with pytest.raises(ValueError, match="not a CUDA"):
        lower_matmul(cpu, matmul_features(64, 64, 64))


def test_mlx_source_is_what_cuda_kernel_builds():
    config = KernelConfig.parse("gemv warps=4 rows=2 vec=8 epilogue=fused", "matmul", "cuda")
    (kernel,) = lower_matmul(config, matmul_features(4, 256, 512, dtype="bf16", transpose_b=True)).kernels
    func, text = mlx_source(kernel, ("bfloat16", "bfloat16", "int32"))
    assert f"__global__ void {func}(\n    const __nv_bfloat16* a,\n    const __nv_bfloat16* b,\n" \
           "    const int32_t* sizes,\n    __nv_bfloat16* out) {\n" in text
    assert "  using T = __nv_bfloat16;\n" in text and "  constexpr int MB = 4;\n" in text
    assert "  constexpr bool TRANS_B = true;\n" in text
    assert text.index('#include "mlx/backend/cuda/device/utils.cuh"') < text.index("namespace ke {")


def test_gpu_ops_need_a_cuda_mlx():
    if mx.cuda.is_available() or mx.metal.is_available():
        pytest.skip("about an MLX without a GPU back-end (here the GPU path runs)")
    a = mx.ones((4, 4))
    with pytest.raises(ke.BackendNotSupportedError, match="CUDA back-end"):
        gpu.matmul(a, a)
    with pytest.raises(ke.BackendNotSupportedError, match="CUDA back-end"):
        gpu.attention(a[None, None], a[None, None], a[None, None], scale=1.0)
    kernel = LoweredKernel(name="k", backend="cuda", source="", header="", input_names=("x",),
                           output_names=("y",), template_args=(), grid=(32, 1, 1),
                           threadgroup=(32, 1, 1), shared_memory=0, output_shapes=((4,),),
                           output_dtypes=("float32",))
    with pytest.raises(ke.BackendNotSupportedError, match="no CUDA back-end"):
        gpu.launch.native_launch(kernel, [mx.ones(4)])
