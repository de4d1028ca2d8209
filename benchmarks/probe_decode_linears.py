"""Where a decode token's linear-layer time goes: the patched model's decode-step matmuls
(every weight once, streamed from memory as in the model) replayed in one evaluation, as
the heuristics choose them and with the thread count forced, whole and per shape.

    OPENBLAS_THREAD_TIMEOUT=4 OMP_WAIT_POLICY=PASSIVE flock /tmp/kernelevo-bench.lock \\
        python3 benchmarks/probe_decode_linears.py qwen3-0.6b

Prints ms and GB/s of weights read per group, next to the read bandwidth measured just
before (benchmarks/machine_limits.py) and to the same weights re-read from cache (one
weight of each shape, called as often as the token calls that shape).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import mlx.core as mx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from machine_limits import measure  # noqa: E402


def median_time(fn, reps: int = 9) -> float:
    fn()
    samples = []
    for _ in range(reps):
        tic = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - tic)
    return statistics.median(samples)


def main() -> None:
    import kernelevo as ke
    from kernelevo.mlx_lm import build_model, patch, recording
    from kernelevo.mlx_lm.bench import wait_for_quiet
    from mlx_lm.models.cache import make_prompt_cache

    name = sys.argv[1] if len(sys.argv) > 1 else "qwen3-0.6b"
    model = build_model(name, "bf16")
    cache = make_prompt_cache(model)
    prompt = mx.arange(1, 65)[None]
    mx.eval(model(prompt, cache=cache))
    with patch(model), recording(keep_arguments=True) as recorder:
        logits = model(prompt[:, -1:], cache=cache)
    calls = [c for c in recorder.calls if c.op == "matmul"]
    mx.eval(logits, [c.args for c in calls])
    wait_for_quiet()
    limits = measure()
    print(f"{name}: {len(calls)} decode matmuls; read bandwidth now {limits['read_gbs']:.1f} GB/s "
          f"({limits['read_gbs_one_core']:.1f} on one core)")

    def forced(call, threads):
        family, params = call.config
        return ke.KernelConfig.make("matmul", "cpu", family, {**params, "threads": threads})

    def run(group, threads=None):
        def go():
            outs = []
            for c in group:
                x, w = c.args
                config = None if threads is None else forced(c, threads)
                outs.append(ke.matmul(x, w, transpose_b=True, config=config))
            mx.eval(outs)
        return go

    groups = defaultdict(list)
    for c in calls:
        f = c.features
        groups[f"1x{f['N']}x{f['K']}"].append(c)
    print(f"{'group':18s} {'calls':>5s} {'MB':>7s} {'as chosen':>16s} {'threads=1':>16s} {'threads=2':>16s}"
          f" {'cached, chosen':>16s}")
    for label, group in [("all", calls)] + sorted(groups.items(), key=lambda kv: -len(kv[1])):
        nbytes = sum(c.args[1].nbytes for c in group)
        cells = []
        for threads in (None, 1, 2):
            t = median_time(run(group, threads))
            cells.append(f"{t * 1e3:7.2f} {nbytes / t / 1e9:5.1f} GB/s")
        if label != "all":
            hot = [group[0]] * len(group)  # one weight, re-read from cache
            t = median_time(run(hot))
            cells.append(f"{t * 1e3:7.2f} {nbytes / t / 1e9:5.1f} GB/s")
        print(f"{label:18s} {len(group):5d} {nbytes / 1e6:7.1f} " + " ".join(f"{c:>16s}" for c in cells))


if __name__ == "__main__":
    main()
