"""The source MLX's cuda_kernel builds from each lowered kernel compiles with NVRTC for
Hopper (sm_90a), and its registers fit the block — the families' register constraints
are estimates, checked here against ptxas's report. Skipped where NVRTC is not installed
(pip install nvidia-cuda-nvrtc; CI has none): the GPU machine compiles every kernel the
GPU tests run anyway."""

from __future__ import annotations

import random

import pytest

import cuda_nvrtc
from kernelevo import KernelConfig, chips, heuristics
from kernelevo.families import families_for
from kernelevo.families.cuda_attention import decode_registers
from kernelevo.families.cuda_matmul import gemv_registers
from kernelevo.features import attention_features, matmul_features
from kernelevo.features import Epilogue
from kernelevo.lowering.cuda import MX_DTYPE, lower_attention, lower_matmul

pytestmark = pytest.mark.skipif(not cuda_nvrtc.available(), reason="needs NVRTC and ptxas")

H100 = chips.from_id("nvidia-h100")
CALLS = {
    "gemm": matmul_features(4096, 4096, 4096, dtype="bf16", transpose_a=True, epilogue="mixed"),
    "splitk": matmul_features(64, 4096, 8192, dtype="f16", transpose_b=True, epilogue="mixed"),
    "gemv": matmul_features(16, 4096, 4096, dtype="bf16", transpose_b=True, epilogue="mixed"),
    "flash": attention_features(batch=1, heads=32, kv_heads=8, q_len=2048, kv_len=2048, head_dim=128,
                                dtype="bf16", mask="bool", softcap=30.0),
    "decode": attention_features(batch=1, heads=32, kv_heads=8, q_len=1, kv_len=8192, head_dim=128,
                                 dtype="bf16", mask="additive"),
    "decode_split": attention_features(batch=1, heads=64, kv_heads=8, q_len=1, kv_len=8192, head_dim=128,
                                       dtype="f32"),
}


def input_dtypes(kernel, call):
    dtype = MX_DTYPE[call["dtype"]]
    mask = "bool" if call.get("mask") == "bool" else dtype
    return tuple({"sizes": "int32", "partials": "float32", "o_part": "float32", "ml_part": "float32",
                  "mask": mask}.get(n, dtype) for n in kernel.input_names)


def lowered(config: KernelConfig, call):
    if config.op == "matmul":
        return lower_matmul(config, call, epilogue=Epilogue(bias=True, activation="gelu", residual=True))
    return lower_attention(config, call, scale=0.1,
                           mask_dtype={"bool": "bool", "additive": MX_DTYPE[call["dtype"]]}.get(call["mask"]),
                           mask_strides=(0, 0, 8192, 1))


def cases():
    out = []
    for op in ("matmul", "attention"):
        for fam in families_for(op, "cuda"):
            if fam.name in CALLS:
                space = list(fam.search_space(H100, CALLS[fam.name]))
                for params in random.Random(1).sample(space, min(5, len(space))):
                    out.append(pytest.param(KernelConfig.make(op, "cuda", fam.name, params), CALLS[fam.name],
                                            id=f"{fam.name}-{len(out)}"))
    return out


@pytest.mark.parametrize("config,call", cases())
def test_kernels_compile_and_fit_their_block(config, call):
    for kernel in lowered(config, call).kernels:
        res = cuda_nvrtc.compile_kernel(kernel, input_dtypes(kernel, call))
        threads = kernel.threadgroup[0] * kernel.threadgroup[1] * kernel.threadgroup[2]
        assert res.registers * threads <= 65536, f"{kernel.name}: {res.registers} registers x {threads} threads"
        assert res.static_smem == 0, "shared memory is dynamic, sized by the lowering"
        if config.family == "decode_split" and kernel is lowered(config, call).kernels[0]:
            assert res.registers <= decode_registers(config.as_dict(), call)
        if config.family == "gemv":
            assert res.registers <= gemv_registers(config.as_dict(), call)


def test_shipped_choices_compile_without_spills():
    program = heuristics.active("cuda", H100).program
    for op, call in [("matmul", matmul_features(8, 4096, 4096, dtype="bf16", transpose_b=True)),
                     ("matmul", matmul_features(128, 14336, 4096, dtype="bf16", transpose_b=True, epilogue="mixed")),
                     ("attention", CALLS["decode"]), ("attention", CALLS["flash"])]:
        config = program.select(op, call).config
        if config.family == "mlx":
            continue
        for kernel in lowered(config, call).kernels:
            res = cuda_nvrtc.compile_kernel(kernel, input_dtypes(kernel, call))
            assert res.spill_bytes == 0 and res.stack_bytes == 0, f"{kernel.name} spills: {res}"
