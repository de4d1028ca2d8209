"""The CUDA kernels, run on the CPU emulator (tests/cudaemu/) through kernelevo's GPU op
layer: the whole path a CUDA call takes — features, configuration checks, lowering, the
source MLX's cuda_kernel would compile, the launch, shapes and epilogues — with the
launch itself executed by the emulator. The GPU runs the same cases (test_cuda_gpu.py)."""

from __future__ import annotations

import shutil

import mlx.core as mx
import numpy as np
import pytest

from cuda_cases import (ATTENTION_CASES, GRAD_CASES, MATMUL_CASES, assert_close, run_attention_case,
                        run_matmul_case, run_matmul_grad_case)
from cudaemu.harness import run_kernel
from kernelevo import chips
from kernelevo.ops import gpu

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the emulator needs g++")

H100 = chips.from_id("nvidia-h100")
NP_OF = {mx.float32: np.float32, mx.float16: np.float16, mx.bool_: np.bool_, mx.int32: np.int32}


def _to_numpy(x: mx.array) -> np.ndarray:
    if x.dtype == mx.bfloat16:
        return np.array(x.view(mx.uint16))
    return np.array(x)


def _to_mlx(x: np.ndarray, dtype: str) -> mx.array:
    return mx.array(x).view(mx.bfloat16) if dtype == "bfloat16" else mx.array(x)


class EmulatedLaunch:
    """Stands in for _ext.launch: runs the kernel on the emulator, in a given order."""

    def __init__(self, order: int = 0):
        self.order = order
        self.launched: list[str] = []

    def __call__(self, kernel, inputs, stream=None):
        self.launched.append(kernel.name)
        outs = run_kernel(kernel, [_to_numpy(x) for x in inputs], order=self.order, seed=len(self.launched))
        return [_to_mlx(o, d) for o, d in zip(outs, kernel.output_dtypes)]


@pytest.fixture
def emulated(monkeypatch):
    launch = EmulatedLaunch()
    monkeypatch.setattr(gpu, "launch_kernel", launch)
    monkeypatch.setattr(gpu, "require_gpu", lambda op: "cuda")
    real_detect = chips.detect
    monkeypatch.setattr(chips, "detect", lambda backend="cpu": H100 if backend == "cuda" else real_detect(backend))
    return launch


@pytest.mark.parametrize("case", MATMUL_CASES, ids=str)
def test_matmul_kernels(case, emulated, rng):
    out, ref = run_matmul_case(case, rng)
    assert_close(out, ref, case.dtype)
    assert emulated.launched, "the kernel must have run"


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=str)
def test_attention_kernels(case, emulated, rng):
    out, ref = run_attention_case(case, rng)
    assert_close(out, ref, case.dtype)
    assert emulated.launched



@pytest.mark.parametrize("case", GRAD_CASES, ids=str)
def test_matmul_gradients(case, emulated, rng):
    for grad, ref in run_matmul_grad_case(case, rng):
        assert_close(grad, ref, case.dtype)
