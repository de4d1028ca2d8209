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
    monkeypatch.setattr(gpu.launch, "launch_kernel", launch)
    monkeypatch.setattr(gpu.launch, "require_gpu", lambda op: "cuda")
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


def _counting(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def test_a_call_signature_is_prepared_once(emulated, rng, monkeypatch):
    """Selection, layout and lowering run once per call signature; the next call of that
    signature only launches, a new shape prepares again, and forgetting the selections
    (new heuristics) drops what was prepared."""
    import kernelevo as ke
    from kernelevo.ops.gpu import matmul_op

    lowered = _counting(monkeypatch, matmul_op.LOWERING["cuda"], "lower_matmul")
    config = "gemv warps=4 rows=2 vec=4 epilogue=fused"
    w = mx.array(rng.standard_normal((40, 64)).astype(np.float32))
    xs = [mx.array(rng.standard_normal((1, 64)).astype(np.float32)) for _ in range(3)]
    for x in xs:
        assert_close(gpu.matmul(x, w, transpose_b=True, config=config), np.array(x) @ np.array(w).T, "f32")
    assert len(lowered) == 1 and len(emulated.launched) == 3
    x3 = mx.array(rng.standard_normal((3, 64)).astype(np.float32))
    assert_close(gpu.matmul(x3, w, transpose_b=True, config=config), np.array(x3) @ np.array(w).T, "f32")
    assert len(lowered) == 2
    ke.forget_selections()
    gpu.matmul(xs[0], w, transpose_b=True, config=config)
    assert len(lowered) == 3


def test_the_custom_vjp_is_used_only_where_a_transformation_traces(emulated, rng, monkeypatch):
    """Outside grad/vjp/compile a GPU matmul is its launches alone (mx.custom_function
    costs ~3 us a call); under mx.grad the same prepared call takes the custom VJP, and
    its gradients are right."""
    made = _counting(monkeypatch, mx, "custom_function")
    config = "gemv warps=4 rows=2 vec=4 epilogue=fused"
    x = mx.array(rng.standard_normal((1, 64)).astype(np.float32))
    w = mx.array(rng.standard_normal((40, 64)).astype(np.float32))
    gpu.matmul(x, w, transpose_b=True, config=config)
    assert len(made) == 1  # made once, with the prepared call
    from kernelevo.ops import _ext

    assert not _ext.any_tracer([x, w])
    seen = []

    def loss(x):
        seen.append(_ext.any_tracer([x]))
        return gpu.matmul(x, w, transpose_b=True, config=config).sum()

    grad = mx.grad(loss)(x)
    assert seen == [True]
    assert_close(grad, np.broadcast_to(np.array(w).sum(axis=0), (1, 64)), "f32")
    assert len(made) == 1
