"""CPU attention: `ke.attention` side by side with PyTorch's CPU SDPA and MLX's
`mx.fast.scaled_dot_product_attention`, f32 and bf16.

    python3 benchmarks/bench_attention_cpu.py                # full grid (about 10 minutes)
    python3 benchmarks/bench_attention_cpu.py --quick        # a few shapes (about 2 minutes)
    python3 benchmarks/bench_attention_cpu.py --record       # also rewrite RESULTS.md's section

- prefill: L in 512..4096, heads 32/8 and 16/8, head_dim 64 and 128, causal and not;
  GFLOP/s count the visible (query, key) pairs only.
- decode: one query, kv 1k..32k, heads 32/8, head_dim 128; the key/value caches rotate over
  copies totalling > 1 GiB (twice this machine's L3), as a model's layers would, so that
  the figure is memory bandwidth rather than cache bandwidth.
- memory: peak resident memory of one causal prefill at L = 16384, in a fresh process.

Each kernelevo/PyTorch pair is timed interleaved (tune/timing.py: warm-up, batches of
launches, medians, per-pair ratios); MLX is timed on its own (its CPU SDPA multiplies with
the reference BLAS, so it is run only where it finishes in seconds). Outputs are checked
against PyTorch's before anything is timed. Figures are also given as fractions of the
machine's limits (benchmarks/machine_limits.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from machine_limits import load_or_measure  # noqa: E402

import kernelevo as ke  # noqa: E402
from kernelevo import chips  # noqa: E402
from kernelevo.tune.adapters import chained  # noqa: E402
from kernelevo.tune.timing import eager, time_one, time_paired  # noqa: E402
from kernelevo.tune.correctness import TOLERANCE  # noqa: E402

RESULTS_MD = HERE / "RESULTS.md"
BEGIN, END = "<!-- bench_attention_cpu: begin -->", "<!-- bench_attention_cpu: end -->"
MX_DTYPE = {"f32": mx.float32, "bf16": mx.bfloat16}


def background_load(seconds: float = 0.3) -> float:
    """Fraction of the machine's CPU time others used over a short window (Linux)."""
    def busy():
        fields = list(map(int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]))
        return sum(fields) - fields[3] - fields[4], sum(fields)
    try:
        b0, t0 = busy()
        time.sleep(seconds)
        b1, t1 = busy()
    except (OSError, ValueError):
        return 0.0
    return (b1 - b0) / max(1, t1 - t0)


def wait_for_quiet(limit: float = 0.1, max_wait: float = 60.0) -> float:
    """The machine is shared: wait (up to max_wait seconds) until others use < limit of it
    before a case, and return what they used (recorded with the case)."""
    start = time.time()
    while True:
        load = background_load()
        if load < limit or time.time() - start > max_wait:
            return load


def torch_dtype(dtype):
    import torch

    return {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]


def make_inputs(shape_q, shape_kv, dtype, seed=0):
    """The same random q, k, v for MLX and PyTorch."""
    import torch

    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(shape, dtype=np.float32) for shape in (shape_q, shape_kv, shape_kv)]
    mine = [mx.array(a).astype(MX_DTYPE[dtype]) for a in arrays]
    theirs = [torch.from_numpy(a).to(torch_dtype(dtype)) for a in arrays]
    mx.eval(mine)
    return mine, theirs


def check(ours, theirs, dtype):
    got = np.array(ours.astype(mx.float32), dtype=np.float64)
    ref = theirs.float().numpy().astype(np.float64)
    error = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
    if not np.isfinite(error) or error > 2 * TOLERANCE[dtype]:
        raise SystemExit(f"ke.attention disagrees with PyTorch: relative error {error:.3g}")
    return error


def visible_pairs(L, causal):
    return L * (L + 1) // 2 if causal else L * L


def prefill(cases, limits, reps):
    import torch.nn.functional as F

    rows = []
    for dtype, H, Hkv, D, L, causal in cases:
        (q, k, v), (tq, tk, tv) = make_inputs((1, H, L, D), (1, Hkv, L, D), dtype)
        scale, mask = D ** -0.5, ("causal" if causal else None)
        ours = ke.ops.attention_launcher(q, k, v, ke.select_attention(
            ke.ops.attention_op.call_features(q, k, v, mask=mask)).config, scale=scale, mask=mask)

        def theirs():
            return F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal, scale=scale,
                                                  enable_gqa=True)
        error = check(ours(), theirs(), dtype)
        background = wait_for_quiet()
        paired = time_paired(ours, eager(theirs), reps=reps)
        flops = 4.0 * H * visible_pairs(L, causal) * D
        peak = limits["f32_fma_gflops"] if dtype == "f32" else limits["amx_bf16_gflops"]
        row = {"dtype": dtype, "heads": f"{H}/{Hkv}", "D": D, "L": L, "causal": causal,
               "config": str(ke.select_attention(ke.ops.attention_op.call_features(
                   q, k, v, mask=mask)).config),
               "ke_ms": paired.candidate.median_s * 1e3, "torch_ms": paired.baseline.median_s * 1e3,
               "speedup_vs_torch": 1.0 / paired.ratio, "ke_spread": paired.candidate.spread,
               "ke_gflops": flops / paired.candidate.median_s / 1e9,
               "torch_gflops": flops / paired.baseline.median_s / 1e9,
               "peak_gflops": peak, "error_vs_torch": error, "mx_ms": None,
               "background": background}
        if flops <= 6e9:  # MLX's unfused CPU SDPA: only where it takes seconds, not minutes
            mlx = time_one(chained(q, lambda first: mx.fast.scaled_dot_product_attention(
                first, k, v, scale=scale, mask=mask)), reps=3)
            row["mx_ms"] = mlx.median_s * 1e3
        rows.append(row)
        print(_prefill_line(row), flush=True)
    return rows


class Caches:
    """Key/value caches totalling > 1 GiB per dtype, cut into `copies` caches of the shape a
    call needs (the copies rotate, as a model's layers would). MLX gets its own buffer per
    copy: slicing one large array would copy on every use."""

    BYTES = 1 << 30

    def __init__(self, dtype):
        import torch

        self.dtype = dtype
        itemsize = 4 if dtype == "f32" else 2
        self.n = self.BYTES // itemsize // 2  # elements of all k (and of all v)
        rng = np.random.default_rng(1)
        self.flat = [rng.standard_normal(self.n, dtype=np.float32) for _ in range(2)]
        self.theirs = [torch.from_numpy(a).to(torch_dtype(dtype)) for a in self.flat]

    def views(self, Hkv, kv, D):
        per = Hkv * kv * D
        copies = max(2, self.n // per)
        shape = (1, Hkv, kv, D)
        mine = [[mx.array(a[i * per:(i + 1) * per].reshape(shape)).astype(MX_DTYPE[self.dtype])
                 for i in range(copies)] for a in self.flat]
        mx.eval(mine)
        theirs = [[t[i * per:(i + 1) * per].view(shape) for i in range(copies)]
                  for t in self.theirs]
        return copies, mine, theirs


def decode(cases, limits, reps):
    import torch
    import torch.nn.functional as F

    rows, caches = [], {}
    for dtype, H, Hkv, D, kv in cases:
        if dtype not in caches:
            caches.clear()  # one dtype's caches at a time
            caches[dtype] = Caches(dtype)
        copies, (ks, vs), (tks, tvs) = caches[dtype].views(Hkv, kv, D)
        q32 = np.random.default_rng(2).standard_normal((1, H, 1, D), dtype=np.float32)
        q, tq = mx.array(q32).astype(MX_DTYPE[dtype]), torch.from_numpy(q32).to(torch_dtype(dtype))
        per_call = 2 * Hkv * kv * D * (4 if dtype == "f32" else 2)
        scale = D ** -0.5
        config = ke.select_attention(ke.ops.attention_op.call_features(q, ks[0], vs[0])).config
        launchers = [ke.ops.attention_launcher(q, ks[i], vs[i], config, scale=scale)
                     for i in range(copies)]
        turn = {"ke": 0, "torch": 0, "mx": 0}

        # Each launch reads the previous output as its query (the same shape): a chain.
        def ours(after=None):
            turn["ke"] = (turn["ke"] + 1) % copies
            return launchers[turn["ke"]](q if after is None else after)

        def theirs():
            turn["torch"] = (turn["torch"] + 1) % copies
            i = turn["torch"]
            return F.scaled_dot_product_attention(tq, tks[i], tvs[i], scale=scale, enable_gqa=True)

        def mlx(after=None):
            turn["mx"] = (turn["mx"] + 1) % copies
            i = turn["mx"]
            return mx.fast.scaled_dot_product_attention(q if after is None else after, ks[i], vs[i],
                                                        scale=scale)

        error = check(launchers[0](), F.scaled_dot_product_attention(
            tq, tks[0], tvs[0], scale=scale, enable_gqa=True), dtype)
        background = wait_for_quiet()
        paired = time_paired(ours, eager(theirs), reps=reps)
        mlx_t = time_one(mlx, reps=max(3, reps // 2))
        row = {"dtype": dtype, "heads": f"{H}/{Hkv}", "D": D, "kv": kv, "config": str(config),
               "copies": copies, "ke_ms": paired.candidate.median_s * 1e3,
               "torch_ms": paired.baseline.median_s * 1e3, "mx_ms": mlx_t.median_s * 1e3,
               "speedup_vs_torch": 1.0 / paired.ratio, "ke_spread": paired.candidate.spread,
               "ke_gbs": per_call / paired.candidate.median_s / 1e9,
               "torch_gbs": per_call / paired.baseline.median_s / 1e9,
               "read_gbs": limits["read_gbs"], "error_vs_torch": error,
               "background": background}
        rows.append(row)
        print(_decode_line(row), flush=True)
    return rows


def memory_probe(who: str, dtype: str, H: int, Hkv: int, L: int, D: int) -> dict:
    """Runs in a fresh process: resident memory before one causal prefill and at its peak."""
    def rss(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(field)

    (q, k, v), (tq, tk, tv) = make_inputs((1, H, L, D), (1, Hkv, L, D), dtype)
    if who == "ke":
        del tq, tk, tv
        run = lambda: mx.eval(ke.attention(q, k, v, scale=D ** -0.5, mask="causal"))  # noqa: E731
        inputs = q.nbytes + k.nbytes + v.nbytes
    else:
        import torch.nn.functional as F

        del q, k, v
        run = lambda: F.scaled_dot_product_attention(tq, tk, tv, is_causal=True,  # noqa: E731
                                                     enable_gqa=True)
        inputs = sum(t.numel() * t.element_size() for t in (tq, tk, tv))
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current size
    before = rss("VmRSS")
    run()
    peak = rss("VmHWM")
    return {"who": who, "dtype": dtype, "inputs": inputs, "output": inputs * H // (H + 2 * Hkv),
            "before": before, "peak": peak}


def memory(dtypes, H, Hkv, L, D):
    rows = []
    for dtype in dtypes:
        for who in ("ke", "torch"):
            wait_for_quiet()
            out = subprocess.run([sys.executable, __file__, "--memory-probe", who, dtype, str(H),
                                  str(Hkv), str(L), str(D)], check=True, capture_output=True,
                                 text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            row["extra"] = row["peak"] - row["before"]
            row["peak_over_inputs"] = (row["inputs"] + row["extra"]) / row["inputs"]
            rows.append(row)
            print(f"memory {who:5s} {dtype:4s} L={L} heads {H}/{Hkv} D={D}: inputs "
                  f"{row['inputs'] / 2**20:.0f} MiB, output {row['output'] / 2**20:.0f} MiB, "
                  f"peak during the call +{row['extra'] / 2**20:.0f} MiB "
                  f"-> {row['peak_over_inputs']:.2f}x the inputs", flush=True)
    return rows


def _prefill_line(r):
    mx_text = f"{r['mx_ms']:9.1f}" if r["mx_ms"] else "        -"
    return (f"prefill {r['dtype']:4s} {r['heads']:5s} D={r['D']:3d} L={r['L']:4d} "
            f"{'causal' if r['causal'] else 'full  '}  ke {r['ke_ms']:8.1f} ms  torch "
            f"{r['torch_ms']:8.1f} ms  mx {mx_text} ms  x{r['speedup_vs_torch']:.2f} vs torch  "
            f"{r['ke_gflops']:6.0f} GFLOP/s ({100 * r['ke_gflops'] / r['peak_gflops']:.0f}% of peak)")


def _decode_line(r):
    return (f"decode  {r['dtype']:4s} {r['heads']:5s} D={r['D']:3d} kv={r['kv']:5d}  ke "
            f"{r['ke_ms']:7.2f} ms  torch {r['torch_ms']:7.2f} ms  mx {r['mx_ms']:7.2f} ms  "
            f"x{r['speedup_vs_torch']:.2f} vs torch  {r['ke_gbs']:5.1f} GB/s "
            f"({100 * r['ke_gbs'] / r['read_gbs']:.0f}% of read bandwidth)")


def markdown(meta, pre, dec, mem) -> str:
    lim = meta["limits"]
    out = [BEGIN, "## Attention on the CPU (`python3 benchmarks/bench_attention_cpu.py`)", "",
           f"Machine: `{meta['chip']}` ({meta['cpu']}, {meta['cores']} cores), {meta['date']}; "
           f"MLX {meta['mlx']}, PyTorch {meta['torch']} ({meta['cores']} threads). Limits "
           f"(`benchmarks/machine_limits.py`): f32 FMA {lim['f32_fma_gflops']:.0f} GFLOP/s, "
           f"AMX bf16 {lim['amx_bf16_gflops']:.0f} GFLOP/s, read {lim['read_gbs']:.1f} GB/s.",
           f"Command: `{meta['command']}`. The machine is shared: each case waits until other "
           f"processes use < 10% of it (up to a minute); the most they used at the start of a "
           f"case was {100 * meta['max_background']:.0f}%. Medians of interleaved "
           "kernelevo/PyTorch samples; "
           "`vs torch` is the median of the per-pair time ratios (> 1: kernelevo faster). "
           "GFLOP/s count visible (query, key) pairs; `% peak` is of the f32 FMA peak for f32 "
           "and of the AMX bf16 peak for bf16. `mx` is MLX's CPU SDPA (unfused, reference "
           "BLAS), run only where it finishes in seconds.", "",
           *summary(pre, dec, mem),
           "### Prefill (target: >= 1.5x PyTorch)", "",
           "| dtype | heads | D | L | mask | kernelevo ms | PyTorch ms | mx ms | vs torch | "
           "GFLOP/s | % peak | configuration |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in pre:
        out.append(f"| {r['dtype']} | {r['heads']} | {r['D']} | {r['L']} | "
                   f"{'causal' if r['causal'] else 'none'} | {r['ke_ms']:.1f} | "
                   f"{r['torch_ms']:.1f} | {'%.0f' % r['mx_ms'] if r['mx_ms'] else '-'} | "
                   f"{r['speedup_vs_torch']:.2f} | {r['ke_gflops']:.0f} | "
                   f"{100 * r['ke_gflops'] / r['peak_gflops']:.0f}% | `{r['config']}` |")
    out += ["", "### Decode, one query (target: >= 60% of the read bandwidth)", "",
            "| dtype | heads | D | kv | kernelevo ms | PyTorch ms | mx ms | vs torch | GB/s | "
            "% read bw | PyTorch GB/s | configuration |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in dec:
        out.append(f"| {r['dtype']} | {r['heads']} | {r['D']} | {r['kv']} | {r['ke_ms']:.2f} | "
                   f"{r['torch_ms']:.2f} | {r['mx_ms']:.2f} | {r['speedup_vs_torch']:.2f} | "
                   f"{r['ke_gbs']:.1f} | {100 * r['ke_gbs'] / r['read_gbs']:.0f}% | "
                   f"{r['torch_gbs']:.1f} | `{r['config']}` |")
    if mem:
        m = mem[0]
        out += ["", f"### Peak memory, causal prefill L = {meta['memory_shape']} "
                "(target: within 1.5x of the inputs)", "",
                "Resident memory in a fresh process: the peak during the call over the "
                "resident size before it, added to the inputs. The output alone is "
                f"{m['output'] / m['inputs']:.2f}x the inputs at these heads.", "",
                "| who | dtype | inputs MiB | output MiB | added at peak MiB | peak / inputs |",
                "|---|---|---|---|---|---|"]
        for r in mem:
            out.append(f"| {'kernelevo' if r['who'] == 'ke' else 'PyTorch'} | {r['dtype']} | "
                       f"{r['inputs'] / 2**20:.0f} | {r['output'] / 2**20:.0f} | "
                       f"{r['extra'] / 2**20:.0f} | {r['peak_over_inputs']:.2f} |")
    out.append(END)
    return "\n".join(out) + "\n"


def summary(pre, dec, mem) -> list[str]:
    """The targets, met or missed, counted from the rows."""
    import statistics

    out = ["Against the issue's targets (counted from the tables below):", ""]
    for dtype in ("f32", "bf16"):
        rows = [r for r in pre if r["dtype"] == dtype]
        if rows:
            hits = [r for r in rows if r["speedup_vs_torch"] >= 1.5]
            out.append(f"- prefill {dtype}: >= 1.5x PyTorch in {len(hits)} of {len(rows)} cases; "
                       f"median {statistics.median(r['speedup_vs_torch'] for r in rows):.2f}x, "
                       f"range {min(r['speedup_vs_torch'] for r in rows):.2f}-"
                       f"{max(r['speedup_vs_torch'] for r in rows):.2f}x")
    for dtype in ("f32", "bf16"):
        rows = [r for r in dec if r["dtype"] == dtype]
        if rows:
            hits = [r for r in rows if r["ke_gbs"] >= 0.6 * r["read_gbs"]]
            out.append(f"- decode {dtype}: >= 60% of the read bandwidth in {len(hits)} of {len(rows)} "
                       f"cases; best {max(100 * r['ke_gbs'] / r['read_gbs'] for r in rows):.0f}%; "
                       f"{min(r['speedup_vs_torch'] for r in rows):.2f}-"
                       f"{max(r['speedup_vs_torch'] for r in rows):.2f}x PyTorch")
    for r in mem:
        if r["who"] == "ke":
            out.append(f"- peak memory {r['dtype']}: {r['peak_over_inputs']:.2f}x the inputs "
                       f"(the output alone is {r['output'] / r['inputs']:.2f}x)")
    return out + [""]


def record(section: str) -> None:
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# Benchmark results\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section.rstrip("\n") + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS_MD.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few shapes only")
    parser.add_argument("--record", action="store_true", help="rewrite the section in RESULTS.md")
    parser.add_argument("--only", choices=("prefill", "decode", "memory"),
                        help="run one part (not recorded)")
    parser.add_argument("--memory-probe", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        who, dtype, *dims = args.memory_probe
        print(json.dumps(memory_probe(who, dtype, *map(int, dims))))
        return

    import torch

    chip = chips.detect("cpu")
    torch.set_num_threads(chip.cores)
    limits = load_or_measure()
    dtypes = ("f32", "bf16")
    if args.quick:
        shapes = [(32, 8, 128), (16, 8, 64)]
        lengths, kvs, reps = (512, 1024), (1024, 8192), 3
    else:
        shapes = [(32, 8, 128), (32, 8, 64), (16, 8, 128), (16, 8, 64)]
        lengths, kvs, reps = (512, 1024, 2048, 4096), (1024, 4096, 8192, 16384, 32768), 5
    part = args.only
    pre = [] if part not in (None, "prefill") else prefill(
        [(dt, H, Hkv, D, L, causal) for dt in dtypes for H, Hkv, D in shapes for L in lengths
         for causal in (True, False)], limits, reps=max(3, reps - 2))
    dec = [] if part not in (None, "decode") else decode(
        [(dt, 32, 8, 128, kv) for dt in dtypes for kv in kvs], limits, reps=reps + 2)
    mem_shape = (16, 8, 16384, 128)
    mem = [] if args.quick or part not in (None, "memory") else memory(dtypes, *mem_shape)
    if part:
        return
    meta = {"chip": chip.id, "cpu": chip.name, "cores": chip.cores, "limits": limits,
            "date": datetime.date.today().isoformat(), "mlx": mx.__version__,
            "torch": torch.__version__, "python": platform.python_version(),
            "command": "python3 benchmarks/bench_attention_cpu.py" + (" --quick" if args.quick else ""),
            "memory_shape": f"{mem_shape[2]}, heads {mem_shape[0]}/{mem_shape[1]}, D {mem_shape[3]}"}
    meta["max_background"] = max(r["background"] for r in pre + dec)
    section = markdown(meta, pre, dec, mem)
    print()
    print(section)
    (HERE / "results").mkdir(exist_ok=True)
    raw = HERE / "results" / f"attention-cpu-{chip.id}{'-quick' if args.quick else ''}.json"
    raw.write_text(json.dumps({"meta": meta, "prefill": pre, "decode": dec, "memory": mem},
                              indent=1) + "\n")
    if args.record:
        record(section)
        print(f"recorded in {RESULTS_MD}")


if __name__ == "__main__":
    os.environ.setdefault("KMP_WARNINGS", "0")
    main()
