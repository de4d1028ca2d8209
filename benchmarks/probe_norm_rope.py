"""MLX's CPU `mx.fast.rms_norm` and `mx.fast.rope` per call, as a Qwen3-0.6B decode token makes
them, next to the same functions written as one `mx.compile`d MLX function each and to
kernelevo's one-pass primitives (`ke.rms_norm`, `ke.rope`).

    OPENBLAS_THREAD_TIMEOUT=4 OMP_WAIT_POLICY=PASSIVE flock /tmp/kernelevo-bench.lock \\
        python3 benchmarks/probe_norm_rope.py

Each figure: a chain of 300 calls (each consuming the previous output) in one evaluation,
median of 7, in microseconds per call; outputs checked against MLX's own first.
"""

from __future__ import annotations

import statistics
import time

import mlx.core as mx
import numpy as np

import kernelevo as ke

CALLS, REPS, EPS, BASE, DIMS = 300, 7, 1e-6, 1e6, 128


def per_call(step, x0) -> float:
    def chain():
        y = x0
        for _ in range(CALLS):
            y = step(y)
        mx.eval(y)

    chain()
    samples = []
    for _ in range(REPS):
        tic = time.perf_counter()
        chain()
        samples.append((time.perf_counter() - tic) / CALLS)
    return statistics.median(samples) * 1e6


@mx.compile
def compiled_rms_norm(x, w):
    xf = x.astype(mx.float32)
    return (xf * mx.rsqrt(mx.mean(xf * xf, axis=-1, keepdims=True) + EPS)).astype(x.dtype) * w


INV_FREQ = 1.0 / (BASE ** (mx.arange(0, DIMS, 2, dtype=mx.float32) / DIMS))


@mx.compile
def compiled_rope(x, offset):
    theta = (offset + mx.arange(x.shape[-2], dtype=mx.float32))[:, None] * INV_FREQ[None, :]
    cos, sin = mx.cos(theta), mx.sin(theta)
    half = DIMS // 2
    x1, x2 = x[..., :half].astype(mx.float32), x[..., half:].astype(mx.float32)
    return mx.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


def main() -> None:
    rng = np.random.default_rng(0)
    offset = 512
    hidden = mx.array(rng.standard_normal((1, 1, 1024)).astype(np.float32)).astype(mx.bfloat16)
    heads = mx.array(rng.standard_normal((1, 16, 1, DIMS)).astype(np.float32)).astype(mx.bfloat16)
    w = mx.ones((1024,), dtype=mx.bfloat16)
    mlx_rope = lambda y: mx.fast.rope(y, DIMS, traditional=False, base=BASE, scale=1.0, offset=offset)  # noqa: E731
    off = mx.array(float(offset))
    ke_rope = lambda y: ke.rope(y, DIMS, traditional=False, base=BASE, scale=1.0, offset=offset)  # noqa: E731
    for name, ref, ours in (("rms_norm", mx.fast.rms_norm(hidden, w, EPS), compiled_rms_norm(hidden, w)),
                            ("rms_norm", mx.fast.rms_norm(hidden, w, EPS), ke.rms_norm(hidden, w, EPS)),
                            ("rope", mlx_rope(heads), compiled_rope(heads, off)),
                            ("rope", mlx_rope(heads), ke_rope(heads))):
        err = float(mx.max(mx.abs(ref.astype(mx.float32) - ours.astype(mx.float32))))
        assert err < 5e-2, (name, err)
    print(f"per call, us (chain of {CALLS} in one evaluation, median of {REPS}); mlx {mx.__version__}")
    print(f"  mx.fast.rms_norm [1,1,1024] bf16        {per_call(lambda y: mx.fast.rms_norm(y, w, EPS), hidden):7.1f}")
    print(f"  compiled MLX rms_norm, same             {per_call(lambda y: compiled_rms_norm(y, w), hidden):7.1f}")
    print(f"  ke.rms_norm, same                       {per_call(lambda y: ke.rms_norm(y, w, EPS), hidden):7.1f}")
    print(f"  mx.fast.rope [1,16,1,128] bf16          {per_call(mlx_rope, heads):7.1f}")
    print(f"  compiled MLX rope, same                 {per_call(lambda y: compiled_rope(y, off), heads):7.1f}")
    print(f"  ke.rope, same                           {per_call(ke_rope, heads):7.1f}")


if __name__ == "__main__":
    main()
