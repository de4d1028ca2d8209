"""What a kernelevo GPU call costs the CPU, against the MLX op it replaces (issue: per-call
overhead at most 3 us above MLX's op). Needs a GPU with MLX's CUDA (or Metal) back-end.

For a decode-sized linear (1x2048x2048 bf16, weight [out, in] as nn.Linear keeps it) and a
decode attention (1 query, 16/8 heads, 1024 keys, head dim 128, bf16):

- graph building: the Python and C++ that build one call, 256 calls per sample, 15 samples
  (median and quartiles), nothing evaluated;
- evaluation: per launch, a chain of 256 calls each reading the previous output, built
  before the clock starts, 15 samples (MLX's dispatch of the launches and the kernels);
- the same for kernelevo's `mlx` family (MLX's op behind kernelevo's front end), a
  kernelevo kernel (gemv / split-key decode), and the heuristics' own choice.

With --header-include (CUDA only, needs the extension's GpuLaunch) the gemv kernel is also
launched with its 10 KB header replaced by an `#include` of the same text from a file:
MLX builds the kernel's full source on every call and hashes it on every evaluation, so
this shows what the header's length costs.

    python3 benchmarks/bench_gpu_dispatch.py [--header-include] [--json FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx

import kernelevo as ke
from kernelevo.tune.correctness import random_operand

SAMPLES, CALLS = 15, 256


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


def building(call) -> tuple[float, float, float]:
    """Seconds per call to build (not evaluate) it."""
    for _ in range(CALLS):
        call()
    times = []
    for _ in range(SAMPLES):
        start = time.perf_counter()
        for _ in range(CALLS):
            call()
        times.append((time.perf_counter() - start) / CALLS)
    return quartiles(times)


def evaluation(step, x0) -> tuple[float, float, float]:
    """Seconds per launch of a chain of CALLS launches, each reading the last one's output."""
    def sample():
        y = x0
        for _ in range(CALLS):
            y = step(y)
        mx.synchronize()
        start = time.perf_counter()
        mx.eval(y)
        mx.synchronize()
        return (time.perf_counter() - start) / CALLS
    sample()
    return quartiles([sample() for _ in range(SAMPLES)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--header-include", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    mx.set_default_device(mx.gpu)
    x = random_operand((1, 2048), "bf16", 1)
    w = random_operand((2048, 2048), "bf16", 2) * (2048 ** -0.5)
    q = random_operand((1, 16, 1, 128), "bf16", 3)
    k = random_operand((1, 8, 1024, 128), "bf16", 4)
    v = random_operand((1, 8, 1024, 128), "bf16", 5)
    mx.eval(x, w, q, k, v)
    scale = 128 ** -0.5
    gemv = "gemv warps=4 rows=2 vec=8 epilogue=fused"
    linear = {
        "mx.matmul(x, w.T)": lambda x: mx.matmul(x, w.T),
        "ke.matmul family mlx": lambda x: ke.matmul(x, w, transpose_b=True, config="mlx"),
        f"ke.matmul {gemv.split()[0]}": lambda x: ke.matmul(x, w, transpose_b=True, config=gemv),
        "ke.matmul (heuristics)": lambda x: ke.matmul(x, w, transpose_b=True),
    }
    decode_kernel = "decode_split blocks=16 warps=4 key_lanes=16 pack_gqa=yes scale_at=q"
    attention = {
        "mx.fast.sdpa": lambda q: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale),
        "ke.attention family mlx": lambda q: ke.attention(q, k, v, scale=scale, config="mlx"),
        "ke.attention (heuristics)": lambda q: ke.attention(q, k, v, scale=scale),
    }
    try:
        ke.attention(q, k, v, scale=scale, config=decode_kernel)
        attention[f"ke.attention {decode_kernel.split()[0]}"] = \
            lambda q: ke.attention(q, k, v, scale=scale, config=decode_kernel)
    except Exception as err:  # a configuration this backend does not have: say so
        print(f"(no {decode_kernel!r} here: {str(err)[:120]})")
    if args.header_include:
        linear.update(_header_included(x, w, gemv))
    rows = []
    print(f"{mx.default_device()}, {platform.node()}; medians [quartiles] of {SAMPLES} samples of {CALLS} calls")
    print(f"{'call':32s} {'graph building us':>26s} {'evaluation us/launch':>26s}")
    for group, first, calls in (("linear 1x2048x2048 bf16", x, linear),
                                ("attention decode 16/8 heads 1024 keys", q, attention)):
        print(group)
        base = None
        for name, call in calls.items():
            b = building(lambda: call(first))
            e = evaluation(call, first)
            base = base or (b, e)
            rows.append({"group": group, "call": name, "building_s": b, "evaluation_s": e})
            print(f"  {name:30s} {b[1] * 1e6:7.2f} [{b[0] * 1e6:.2f}, {b[2] * 1e6:.2f}]"
                  f" {e[1] * 1e6:9.2f} [{e[0] * 1e6:.2f}, {e[2] * 1e6:.2f}]"
                  f"   +{(b[1] - base[0][1]) * 1e6:.2f} / +{(e[1] - base[1][1]) * 1e6:.2f} over MLX's op")
    if args.json:
        args.json.write_text(json.dumps({"device": str(mx.default_device()), "host": platform.node(),
                                         "rows": rows}, indent=1))


def _header_included(x, w, config):
    """The gemv kernel launched directly, once with its header as text, once by #include."""
    from kernelevo.config import KernelConfig
    from kernelevo.features import Epilogue, matmul_features
    from kernelevo.lowering import cuda as lowering

    ext = ke.ops._ext
    if not hasattr(ext, "GpuLaunch") or ke.chips.gpu_backend() != "cuda":
        print("(--header-include needs the CUDA back-end and the extension's GpuLaunch)")
        return {}
    cfg = KernelConfig.parse(config, "matmul", "cuda")
    (kernel,) = lowering.lower_matmul(cfg, matmul_features(1, 2048, 2048, dtype="bf16", transpose_b=True),
                                      epilogue=Epilogue()).kernels
    path = Path(tempfile.mkdtemp()) / f"{kernel.name}.cuh"
    path.write_text(kernel.header)
    included = dataclasses.replace(kernel, name=kernel.name + "_inc", header=f'#include "{path}"\n')
    sizes = mx.array(kernel.sizes, dtype=mx.int32)
    text, inc = ext.GpuLaunch(kernel), ext.GpuLaunch(included)
    return {"gemv launch, header as text": lambda x: text([x, w, sizes])[0],
            "gemv launch, header #included": lambda x: inc([x, w, sizes])[0]}


if __name__ == "__main__":
    main()
