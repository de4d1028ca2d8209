"""kernelevo.matmul on the CPU against numpy (OpenBLAS) and torch.matmul, side by side.

    python3 benchmarks/bench_gemm_cpu.py            # everything; records benchmarks/RESULTS.md
    python3 benchmarks/bench_gemm_cpu.py --quick    # a few shapes, printed only

Run it alone on the machine (under `flock /tmp/kernelevo-heavy.lock` where several people
share one). Every figure is a median of interleaved runs (tune/timing.py: kernelevo and
each baseline alternate, so drift cancels in the per-pair ratio), and is also given as a
fraction of this machine's own limits (benchmarks/machine_limits.py): f32 products against
the f32 FMA peak, bf16 products against the fastest bf16 unit the CPU has (AMX, else
AVX512-BF16, else the f32 FMA peak), skinny products (M <= 16) against memory bandwidth.

Groups:
  square   M = N = K in 256 .. 4096, f32 and bf16, B row-major
  llm      a linear layer x @ W.T (W stored [N, K]) for M in {1, 8, 64, 512} and
           K x N in {4096 x 4096, 4096 x 11008, 11008 x 4096}, f32 and bf16; for M <= 16
           also with W stored [K, N] (x @ W). Weights of skinny products rotate through
           copies larger than the caches, as a model's layers do in decode.
  fused    matmul + bias + silu in one call, against the same computed unfused with numpy
           (product, then bias, then silu, each a pass over the result).
"""

from __future__ import annotations

import os

# The baselines' thread pools spin for a while after each call (OpenMP in torch, OpenBLAS's
# own threads); interleaved with kernelevo, that spinning would take its cores. Let them
# sleep instead (set before numpy and torch load their libraries).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import argparse
import datetime
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import machine_limits  # noqa: E402

import kernelevo as ke  # noqa: E402
from kernelevo import chips  # noqa: E402
from kernelevo.ops.matmul_op import call_features, epilogue_kind, select_matmul  # noqa: E402
from kernelevo.tune.adapters import chained  # noqa: E402
from kernelevo.tune.timing import eager, time_paired  # noqa: E402

RESULTS = HERE / "RESULTS.md"
SECTION = "GEMM on the CPU (bench_gemm_cpu.py)"
COLD_BYTES = 768 << 20  # weights of skinny products rotate through at least this much
MX = {"f32": mx.float32, "bf16": mx.bfloat16}


@dataclass
class Case:
    group: str
    M: int
    N: int
    K: int
    dtype: str
    transpose_b: bool = False
    fused: bool = False

    @property
    def skinny(self) -> bool:
        return self.M <= 16

    @property
    def label(self) -> str:
        layout = "x@W.T" if self.transpose_b else "x@W"
        return f"{self.M}x{self.N}x{self.K} {self.dtype} {layout}"

    @property
    def flops(self) -> float:
        return 2.0 * self.M * self.N * self.K

    @property
    def weight_bytes(self) -> float:
        return self.N * self.K * (4 if self.dtype == "f32" else 2)


@dataclass
class Row:
    case: Case
    ke_s: float
    config: str
    baselines: dict[str, float] = field(default_factory=dict)  # name -> median seconds
    ratios: dict[str, float] = field(default_factory=dict)  # name -> baseline / ke (> 1: ke faster)


def cases(quick: bool) -> list[Case]:
    squares = (256, 1024, 2048) if quick else (256, 512, 1024, 2048, 4096)
    out = [Case("square", n, n, n, dt) for dt in ("f32", "bf16") for n in squares]
    layers = ((4096, 4096),) if quick else ((4096, 4096), (4096, 11008), (11008, 4096))
    tokens = (1, 8, 512) if quick else (1, 8, 64, 512)
    for dt in ("f32", "bf16"):
        for K, N in layers:
            for M in tokens:
                out.append(Case("llm", M, N, K, dt, transpose_b=True))
                if M <= 16:
                    out.append(Case("llm", M, N, K, dt, transpose_b=False))
    fused_tokens = (512,) if quick else (64, 512)
    for M in fused_tokens:
        out.append(Case("fused", M, 11008, 4096, "f32", transpose_b=True, fused=True))
    return out


def reps_for(case: Case) -> int:
    return 3 if case.flops > 1e11 else 5 if case.flops > 1e10 else 9


def rotating(make, case: Case):
    """A list of weights to cycle through: one, or enough copies to leave the caches."""
    copies = max(1, -(-COLD_BYTES // int(case.weight_bytes))) if case.skinny else 1
    return [make(seed) for seed in range(copies)]


def cycler(items, fn):
    """An eager baseline over rotating weights: fn(next item) per call."""
    state = {"i": 0}

    def call():
        item = items[state["i"] % len(items)]
        state["i"] += 1
        return fn(item)
    return eager(call)


def ke_cycler(x, ws, fn):
    """kernelevo's launch over rotating weights, each call chained on the one before (its
    x made to depend on the previous output), as the tuner times it."""
    state = {"i": 0}

    def call(xx):
        w = ws[state["i"] % len(ws)]
        state["i"] += 1
        return fn(xx, w)
    return chained(x, call)


def launches(case: Case, torch):
    """kernelevo's launch and each baseline's, over the same inputs (and weight copies)."""
    rng = np.random.default_rng(0)
    x32 = rng.standard_normal((case.M, case.K), dtype=np.float32)
    w_shape = (case.N, case.K) if case.transpose_b else (case.K, case.N)
    weights32 = rotating(lambda s: np.random.default_rng(s + 1).standard_normal(w_shape, dtype=np.float32), case)
    bias32 = rng.standard_normal((case.N,), dtype=np.float32)
    dt = MX[case.dtype]
    x = mx.array(x32).astype(dt)
    ws = [mx.array(w).astype(dt) for w in weights32]
    bias = mx.array(bias32).astype(dt)
    mx.eval(x, *ws, bias)
    kwargs = {"bias": bias, "activation": "silu"} if case.fused else {}
    ke_launch = ke_cycler(x, ws, lambda xx, w: ke.matmul(xx, w, transpose_b=case.transpose_b, **kwargs))
    features = call_features(x, ws[0], False, case.transpose_b, epilogue=epilogue_kind(**kwargs))
    config = select_matmul(features).config.to_dsl()

    baselines = {}
    if case.dtype == "f32":
        def np_product(w):
            return x32 @ (w.T if case.transpose_b else w)
        if case.fused:
            def np_unfused(w):
                y = np_product(w)
                y += bias32
                return y / (1.0 + np.exp(-y))
            baselines["numpy"] = cycler(weights32, np_unfused)
        else:
            baselines["numpy"] = cycler(weights32, np_product)
    if torch is not None and not case.fused:
        tdt = torch.float32 if case.dtype == "f32" else torch.bfloat16
        tx = torch.from_numpy(x32).to(tdt)
        tws = [torch.from_numpy(w).to(tdt) for w in weights32]
        baselines["torch"] = cycler(tws, lambda w: tx @ (w.T if case.transpose_b else w))
    del weights32
    return ke_launch, config, baselines


def wait_until_idle(limit_s: float = 120.0) -> None:
    """On a shared machine: wait (up to limit_s) until the CPUs were idle for half a second,
    so that other people's work does not land in the middle of a measurement."""
    def busy_idle():
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:8]]
        return sum(fields) - fields[3] - fields[4], fields[3] + fields[4]
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        b0, i0 = busy_idle()
        time.sleep(0.5)
        b1, i1 = busy_idle()
        if (b1 - b0) <= 0.08 * max(1, (b1 - b0) + (i1 - i0)):
            return


def run(case: Case, torch) -> Row:
    ke_launch, config, baselines = launches(case, torch)
    reps = reps_for(case)
    row = Row(case, float("inf"), config)
    for name, launch in baselines.items():
        paired = time_paired(ke_launch, launch, reps=reps, warmup=1)
        row.ke_s = min(row.ke_s, paired.candidate.median_s)
        row.baselines[name] = paired.baseline.median_s
        row.ratios[name] = 1.0 / paired.ratio
    if not baselines:  # nothing to compare with: time kernelevo alone
        from kernelevo.tune.timing import time_one
        row.ke_s = time_one(ke_launch, reps=reps).median_s
    return row


def limit_text(row: Row, limits: dict) -> str:
    c = row.case
    if c.skinny:
        return f"{c.weight_bytes / row.ke_s / 1e9 / limits['read_gbs']:.0%} of {limits['read_gbs']:.0f} GB/s"
    peak, unit = bf16_peak(limits) if c.dtype == "bf16" else (limits["f32_fma_gflops"], "FMA")
    return f"{c.flops / row.ke_s / 1e9 / peak:.0%} of {unit} {peak:.0f}"


def bf16_peak(limits: dict) -> tuple[float, str]:
    if limits.get("amx_bf16_gflops"):
        return limits["amx_bf16_gflops"], "AMX"
    if limits.get("bf16_dot_gflops"):
        return limits["bf16_dot_gflops"], "BF16dot"
    return limits["f32_fma_gflops"], "FMA"


def verdict(row: Row, limits: dict) -> str:
    c = row.case
    best = min(row.ratios.values()) if row.ratios else None
    if c.fused:
        return "hit" if best is not None and best >= 1.2 else "miss"
    if c.skinny:
        bw = c.weight_bytes / row.ke_s / 1e9 / limits["read_gbs"]
        return "hit" if best is not None and best >= 1.0 and bw >= 0.7 else "miss"
    if c.dtype == "bf16":
        return "hit" if row.ratios.get("torch", 0) >= 1.0 else "miss"
    if c.group == "square" and c.M >= 2048:
        peak = limits["f32_fma_gflops"]
        return "hit" if c.flops / row.ke_s / 1e9 >= 0.7 * peak else "miss"
    return ""


def table(rows: list[Row], limits: dict) -> str:
    head = ("| group | shape | kernelevo ms | GFLOP/s | of machine limit | numpy ms | torch ms "
            "| vs numpy | vs torch | target | config chosen |")
    lines = [head, "|" + "|".join(["---"] * 11) + "|"]
    for r in rows:
        c = r.case
        lines.append("| " + " | ".join([
            c.group, c.label, f"{r.ke_s * 1e3:.3f}", f"{c.flops / r.ke_s / 1e9:.0f}",
            limit_text(r, limits),
            f"{r.baselines['numpy'] * 1e3:.3f}" if "numpy" in r.baselines else "n/a",
            f"{r.baselines['torch'] * 1e3:.3f}" if "torch" in r.baselines else "n/a",
            f"{r.ratios['numpy']:.2f}x" if "numpy" in r.ratios else "n/a",
            f"{r.ratios['torch']:.2f}x" if "torch" in r.ratios else "n/a",
            verdict(r, limits) or "-", f"`{r.config}`"]) + " |")
    return "\n".join(lines)


def machine_text(limits: dict, torch) -> str:
    chip = chips.detect("cpu")
    return (f"{chip.name} ({chip.id}; {', '.join(chip.isa)}), {chip.cores} cores; "
            f"limits (machine_limits.py): f32 FMA {limits['f32_fma_gflops']:.0f} GFLOP/s, "
            f"AVX512-BF16 {limits['bf16_dot_gflops']:.0f}, AMX-BF16 {limits['amx_bf16_gflops']:.0f}, "
            f"read {limits['read_gbs']:.1f} GB/s; numpy {np.__version__} ({_blas_name()}), torch "
            f"{torch.__version__ if torch else 'absent'} ({chip.cores} threads), mlx {mx.__version__}, "
            f"Python {platform.python_version()}")


def _blas_name() -> str:
    try:
        info = np.show_config(mode="dicts")
        return info["Build Dependencies"]["blas"]["name"]
    except Exception:  # older numpy: no dict mode
        return "BLAS unknown"


def record(text: str) -> None:
    """Replaces this benchmark's section of RESULTS.md (other sections are kept)."""
    current = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"\n## {re.escape(SECTION)}\n.*?(?=\n## |\Z)", re.S)
    block = f"\n## {SECTION}\n\n{text.strip()}\n"
    current = pattern.sub(lambda m: block, current) if pattern.search(current) else current.rstrip() + "\n" + block
    RESULTS.write_text(current)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few shapes; printed, not recorded")
    parser.add_argument("--record", action="store_true", help="record a --quick run as well")
    parser.add_argument("--only", default="", help="run only these groups (comma-separated)")
    parser.add_argument("--wait-idle", action="store_true",
                        help="before each shape, wait until the CPUs are idle (Linux; shared machines)")
    args = parser.parse_args()
    try:
        import torch

        torch.set_num_threads(chips.detect("cpu").cores)
    except ImportError:
        torch = None
    limits = machine_limits.load_or_measure()
    groups = set(args.only.split(",")) if args.only else None
    todo = [c for c in cases(args.quick) if groups is None or c.group in groups]
    rows = []
    for case in todo:
        if args.wait_idle:
            wait_until_idle()
        row = run(case, torch)
        rows.append(row)
        print(f"{case.group:7s} {case.label:32s} {row.ke_s * 1e3:9.3f} ms  "
              + "  ".join(f"{n} {s * 1e3:.3f} ms ({row.ratios[n]:.2f}x)" for n, s in row.baselines.items())
              + f"  {limit_text(row, limits)}  {verdict(row, limits)}", flush=True)
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    command = "python3 benchmarks/bench_gemm_cpu.py" + (" --quick" if args.quick else "") + \
        (f" --only {args.only}" if args.only else "") + (" --wait-idle" if args.wait_idle else "")
    text = (f"Machine: {machine_text(limits, torch)}\n\nDate: {now}. Command: `{command}` "
            f"(under `flock /tmp/kernelevo-heavy.lock`).\n\n"
            "Ratios are baseline time / kernelevo time (> 1: kernelevo faster), medians of "
            "paired, interleaved runs; the baselines' threads sleep between calls "
            "(OMP_WAIT_POLICY=PASSIVE, OPENBLAS_THREAD_TIMEOUT=4) so that their spinning "
            "does not take kernelevo's cores. Targets (issue 4): f32 >= 70% of the FMA peak on large "
            "squares; bf16 >= 1.0x torch; skinny (M <= 16) >= 1.0x the best of numpy and torch "
            "and >= 70% of read bandwidth; fused >= 1.2x unfused numpy. numpy has no bf16.\n\n"
            + table(rows, limits))
    print()
    print(text)
    if not args.quick or args.record:
        record(text)
        print(f"\nrecorded in {RESULTS}")


if __name__ == "__main__":
    main()
