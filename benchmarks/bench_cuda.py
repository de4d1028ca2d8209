"""kernelevo's CUDA kernels against MLX-CUDA and PyTorch, side by side in one process.

    python3 benchmarks/bench_cuda.py [--sections decode,prefill,gemm,linear] [--dtypes bf16,f16]
                                     [--sweep] [--json out.jsonl] [--markdown out.md]

Sections (the targets of issue 6):
  decode   attention with q_len 1 (heads 32/8 and 16/8, D 128, kv 1k-32k, batch 1-8) vs
           mx.fast.scaled_dot_product_attention and torch SDPA; bytes of K and V moved per
           second, against the copy bandwidth measured in the same run
  prefill  attention with L = Lq = Lkv 1k-8k, causal and not (heads 32/8, D 128)
  gemm     large squares vs mx.matmul (cuBLAS) and torch.matmul
  linear   LLM layer shapes (M <= 256) with bias + GELU: ke.linear fused vs MLX computing the
           same unfused (x @ w.T + b, then nn.gelu) and MLX's best (addmm, then nn.gelu)

Timing: for MLX, N calls are built as one lazy graph, then only its evaluation is timed
(graph construction in Python excluded); for PyTorch, CUDA events around N calls. In
decode, prefill and gemm each call's input is the previous call's output, so calls run one
after another as layers do (MLX runs independent graph nodes concurrently, which would
measure throughput, not the call); a per-call figure is then the larger of the GPU time and
the framework's dispatch cost (MLX's is ~10-15 us per op here). linear times independent
calls (their outputs cannot feed the next). N is chosen so one sample takes >= 20 ms;
K/V and weights rotate among copies totalling >= 4x the L2 cache, so no figure is a
cache's. Implementations are interleaved sample by sample (A B C, B C A, ...), medians of
7 samples (5 with --sweep); ratios are medians of per-sample ratios. Every kernelevo output
is checked against MLX's before it is timed.

--sweep also times candidate configurations of each kernelevo family (the data the shipped
nvidia.kevo rules were chosen from) and reports the best next to the heuristics' choice.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

import kernelevo as ke
from kernelevo import chips
from kernelevo.features import attention_features, matmul_features
from kernelevo.ops import gpu

L2_BYTES = 50 << 20
# The measured points (issue 6's ranges); LLM layers as in Llama-3-8B: q/o, gate/up, down.
GRID = {
    "decode_heads": ((32, 8), (16, 8)), "decode_kv": (1024, 4096, 16384, 32768),
    "decode_batch": (1, 4, 8), "head_dim": 128, "prefill_len": (1024, 2048, 4096, 8192),
    "prefill_heads": (32, 8),
    "gemm_n": (2048, 4096, 8192), "layers": ((4096, 4096), (14336, 4096), (4096, 14336)),
    "layer_m": (1, 4, 16, 32, 64, 128, 256),
}
SAMPLE_SECONDS = 0.02
REPS = 7
MX = {"bf16": mx.bfloat16, "f16": mx.float16}


# ---- timing ------------------------------------------------------------------------


def mlx_timer(call):
    """Seconds per call of an MLX function of the rotation index, evaluated in batches."""

    def sample(n):
        outs = [call(i) for i in range(n)]
        mx.synchronize()
        start = time.perf_counter()
        mx.eval(outs)
        mx.synchronize()
        return (time.perf_counter() - start) / n

    return sample


def torch_timer(call):
    import torch

    def sample(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for i in range(n):
            call(i)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / n

    return sample


def chained(step, first):
    """A call of the rotation index whose input is the previous call's output (as layers
    follow each other): calls in one evaluation then run one after another, as in a model,
    instead of overlapping on the GPU as independent graph nodes would."""
    state = {"x": first}

    def call(i):
        state["x"] = step(state["x"], i)
        return state["x"]

    return call


@dataclass
class Impl:
    name: str
    sample: object  # n -> seconds per call
    config: str = ""
    n: int = 1
    times: list = field(default_factory=list)


def calibrate(impl: Impl) -> None:
    impl.sample(2)  # compile, allocate
    once = impl.sample(4)
    impl.n = int(min(2000, max(4, SAMPLE_SECONDS / max(once, 1e-7))))
    impl.sample(impl.n)  # warm at that batch size


def time_all(impls: list[Impl], reps: int | None = None) -> None:
    for impl in impls:
        calibrate(impl)
    for r in range(reps or REPS):
        order = impls[r % len(impls):] + impls[:r % len(impls)]
        for impl in order:
            impl.times.append(impl.sample(impl.n))


def median(impl: Impl) -> float:
    return statistics.median(impl.times)


def ratio(candidate: Impl, baseline: Impl) -> float:
    """Baseline time over candidate time, median over samples (> 1: candidate faster)."""
    return statistics.median(b / c for b, c in zip(baseline.times, candidate.times))


# ---- inputs ------------------------------------------------------------------------


def copies_for(bytes_per_set: int) -> int:
    return max(1, min(8, math.ceil(4 * L2_BYTES / max(bytes_per_set, 1))))


def randn(shape, dtype, seed):
    return mx.random.normal(shape, dtype=mx.float32, key=mx.random.key(seed)).astype(MX[dtype])


def to_torch(x: mx.array):
    import torch

    return torch.from_numpy(np.array(x.astype(mx.float32))).to("cuda").to(
        {mx.bfloat16: torch.bfloat16, mx.float16: torch.float16}[x.dtype])


def close(out: mx.array, ref: mx.array, tol: float) -> float:
    """Normwise relative difference; raises when above tol (a wrong kernel is not timed)."""
    o, r = np.array(out.astype(mx.float32)), np.array(ref.astype(mx.float32))
    err = float(np.max(np.abs(o - r)) / max(np.max(np.abs(r)), 1e-30))
    if not np.isfinite(err) or err > tol:
        raise AssertionError(f"output differs from MLX's by {err:.3g} (tolerance {tol})")
    return err


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read plus written per second (torch, 1 GiB)."""
    import torch

    x = torch.empty(1 << 29, dtype=torch.float16, device="cuda")
    y = torch.empty_like(x)
    t = torch_timer(lambda i: y.copy_(x))
    t(3)
    return 2 * x.numel() * 2 / statistics.median(t(10) for _ in range(5))


# ---- sections ----------------------------------------------------------------------

RECORDS: list[dict] = []


def record(section: str, point: dict, impls: list[Impl], baseline: Impl, extra=None) -> dict:
    row = {"section": section, **point, "impls": {}}
    for impl in impls:
        row["impls"][impl.name] = {"median_s": median(impl), "samples": impl.times, "n": impl.n,
                                   "config": impl.config, "speedup_vs_mlx": ratio(impl, baseline)}
    row.update(extra or {})
    RECORDS.append(row)
    return row


def ke_impls(make, candidates, chosen_config, check, sweep):
    """The heuristics' choice, and with --sweep every candidate configuration; each checked."""
    configs = [("ke", chosen_config)]
    if sweep:
        configs += [(f"ke:{c}", c) for c in candidates if c != chosen_config]
    impls = []
    for name, config in configs:
        try:
            check(config)
        except Exception as err:  # recorded as failed, never timed
            RECORDS.append({"failed": config, "error": str(err)[:500]})
            print(f"    FAILED {config}: {str(err)[:200]}", flush=True)
            continue
        impls.append(Impl(name, mlx_timer(make(config)), config))
    return impls


def decode_section(dtypes, sweep, bandwidth):
    import torch
    import torch.nn.functional as F

    rows = []
    for dtype in dtypes:
        for Hq, Hkv in GRID["decode_heads"]:
            for kv in GRID["decode_kv"]:
                for B in GRID["decode_batch"]:
                    D = GRID["head_dim"]
                    kv_bytes = 2 * B * Hkv * kv * D * 2
                    sets = copies_for(kv_bytes)
                    qs = [randn((B, Hq, 1, D), dtype, 10 * s) for s in range(sets)]
                    ks = [randn((B, Hkv, kv, D), dtype, 10 * s + 1) for s in range(sets)]
                    vs = [randn((B, Hkv, kv, D), dtype, 10 * s + 2) for s in range(sets)]
                    mx.eval(qs, ks, vs)
                    scale = 1 / math.sqrt(D)
                    tq, tk, tv = ([to_torch(x) for x in xs] for xs in (qs, ks, vs))
                    ref = mx.fast.scaled_dot_product_attention(qs[0], ks[0], vs[0], scale=scale)
                    features = attention_features(batch=B, heads=Hq, kv_heads=Hkv, q_len=1, kv_len=kv,
                                                  head_dim=D, dtype=dtype)
                    chosen = gpu.select_attention_config(features).to_dsl()

                    def make(config):
                        return chained(lambda x, i: gpu.attention(x, ks[i % sets], vs[i % sets], scale=scale,
                                                                  config=config), qs[0])

                    def check(config):
                        close(gpu.attention(qs[0], ks[0], vs[0], scale=scale, config=config), ref, 2e-2)

                    candidates = [f"decode_split blocks={b} warps=4 key_lanes=16 pack_gqa=yes scale_at=q"
                                  for b in (8, 16, 32, 64)]
                    candidates += ["decode warps=8 key_lanes=16 pack_gqa=yes scale_at=q",
                                   "decode warps=16 key_lanes=16 pack_gqa=yes scale_at=q"]
                    candidates += [f"flash bq=16 bk=64 warps=1 stages=2 skip_masked_blocks=yes scale_at=q "
                                   f"pack_gqa=yes kv_splits={sp}" for sp in (8, 16, 32, 64)]
                    mlx_impl = Impl("mlx", mlx_timer(chained(lambda x, i: mx.fast.scaled_dot_product_attention(
                        x, ks[i % sets], vs[i % sets], scale=scale), qs[0])))
                    torch_impl = Impl("torch", torch_timer(chained(lambda x, i: F.scaled_dot_product_attention(
                        x, tk[i % sets], tv[i % sets], scale=scale, enable_gqa=True), tq[0])))
                    impls = [mlx_impl, torch_impl] + ke_impls(make, candidates, chosen, check, sweep)
                    time_all(impls)
                    point = {"dtype": dtype, "heads": f"{Hq}/{Hkv}", "kv": kv, "batch": B}
                    row = record("decode", point, impls, mlx_impl, {"kv_bytes": kv_bytes})
                    rows.append(row)
                    print_decode(row, bandwidth)
                    mx.clear_cache()
                    torch.cuda.empty_cache()
    return rows


def best_ke(row):
    kes = {k: v for k, v in row["impls"].items() if k == "ke" or k.startswith("ke:")}
    name = min(kes, key=lambda k: kes[k]["median_s"])
    return name, kes[name]


def print_decode(row, bandwidth):
    ke_row = row["impls"].get("ke")
    best_name, best = best_ke(row)
    gbs = row["kv_bytes"] / best["median_s"] / 1e9
    mlx_t, torch_t = row["impls"]["mlx"]["median_s"], row["impls"]["torch"]["median_s"]
    print(f"  decode {row['dtype']:4s} {row['heads']:5s} kv={row['kv']:6d} B={row['batch']}: "
          f"ke {ke_row['median_s'] * 1e6 if ke_row else float('nan'):8.1f} us  best {best['median_s'] * 1e6:8.1f} us "
          f"mlx {mlx_t * 1e6:8.1f} us  torch {torch_t * 1e6:8.1f} us  "
          f"x{row['impls'][best_name]['speedup_vs_mlx']:.2f} vs mlx  x{torch_t / best['median_s']:.2f} vs torch  "
          f"{gbs:7.0f} GB/s ({gbs * 1e9 / bandwidth:.0%} of copy)  [{best['config']}]", flush=True)


def prefill_section(dtypes, sweep):
    import torch.nn.functional as F

    rows = []
    for dtype in dtypes:
        for L in GRID["prefill_len"]:
            # a sliding window (Mistral-style) too, where MLX has no fused kernel
            for causal, window in ((False, 0), (True, 0)) + (((True, L // 4),) if L >= 4096 else ()):
                (Hq, Hkv), B, D = GRID["prefill_heads"], 1, GRID["head_dim"]
                q, k, v = randn((B, Hq, L, D), dtype, 1), randn((B, Hkv, L, D), dtype, 2), randn((B, Hkv, L, D), dtype, 3)
                mx.eval(q, k, v)
                tq, tk, tv = to_torch(q), to_torch(k), to_torch(v)
                scale = 1 / math.sqrt(D)
                mask = "causal" if causal else None
                win = window or None
                ref = gpu.mlx_attention(q, k, v, scale=scale, mask=mask, softcap=None, window=win)
                features = attention_features(batch=B, heads=Hq, kv_heads=Hkv, q_len=L, kv_len=L,
                                              head_dim=D, dtype=dtype, mask=mask or "none", window=window)
                chosen = gpu.select_attention_config(features).to_dsl()

                def make(config):
                    return chained(lambda x, i: gpu.attention(x, k, v, scale=scale, mask=mask, window=win,
                                                              config=config), q)

                def check(config):
                    close(gpu.attention(q, k, v, scale=scale, mask=mask, window=win, config=config), ref, 2e-2)

                candidates = [f"flash bq={bq} bk={bk} warps={bq // 16} stages={st} skip_masked_blocks=yes "
                              f"scale_at=q pack_gqa={pack} kv_splits=1"
                              for bq in (64, 128) for bk in (32, 64) for st in (2, 3) for pack in ("no", "yes")]
                mlx_impl = Impl("mlx", mlx_timer(chained(lambda x, i: gpu.mlx_attention(
                    x, k, v, scale=scale, mask=mask, softcap=None, window=win), q)))
                if window:  # torch has no window option: the same mask as a boolean array
                    import torch

                    pos = torch.arange(L, device="cuda")
                    band = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)
                    torch_call = chained(lambda x, i: F.scaled_dot_product_attention(
                        x, tk, tv, attn_mask=band, scale=scale, enable_gqa=True), tq)
                else:
                    torch_call = chained(lambda x, i: F.scaled_dot_product_attention(
                        x, tk, tv, scale=scale, is_causal=causal, enable_gqa=True), tq)
                torch_impl = Impl("torch", torch_timer(torch_call))
                impls = [mlx_impl, torch_impl] + ke_impls(make, candidates, chosen, check, sweep)
                time_all(impls)
                keys = window if window else (L / 2 if causal else L)  # keys a query sees, on average
                flops = 4 * B * Hq * L * keys * D
                row = record("prefill", {"dtype": dtype, "L": L, "causal": causal, "window": window},
                             impls, mlx_impl, {"flops": flops})
                rows.append(row)
                best_name, best = best_ke(row)
                ke_row = row["impls"].get("ke", best)
                print(f"  prefill {dtype:4s} L={L:5d} causal={causal!s:5s} window={window:4d}: ke {ke_row['median_s'] * 1e3:7.3f} ms "
                      f"best {best['median_s'] * 1e3:7.3f} ms  mlx {median(mlx_impl) * 1e3:7.3f} ms  "
                      f"torch {median(torch_impl) * 1e3:7.3f} ms  x{row['impls'][best_name]['speedup_vs_mlx']:.2f} vs mlx "
                      f"{flops / best['median_s'] / 1e12:6.1f} TFLOP/s [{best['config']}]", flush=True)
    return rows


def gemm_section(dtypes, sweep):
    import torch

    rows = []
    for dtype in dtypes:
        for n in GRID["gemm_n"]:
            for tb in (False, True):
                sets = copies_for(3 * n * n * 2)
                As = [randn((n, n), dtype, 5 * s) for s in range(sets)]
                Bs = [randn((n, n), dtype, 5 * s + 1) * (1 / math.sqrt(n)) for s in range(sets)]
                mx.eval(As, Bs)
                tA, tB = [to_torch(x) for x in As], [to_torch(x) for x in Bs]
                ref = mx.matmul(As[0], Bs[0].T if tb else Bs[0])
                features = matmul_features(n, n, n, dtype=dtype, transpose_b=tb)
                chosen = gpu.select_matmul_config(features).to_dsl()

                def make(config):
                    return chained(lambda x, i: ke.matmul(x, Bs[i % sets], transpose_b=tb, config=config), As[0])

                def check(config):
                    close(ke.matmul(As[0], Bs[0], transpose_b=tb, config=config), ref, 2e-2)

                candidates = [
                    "gemm bm=128 bn=128 bk=32 wm=2 wn=4 stages=3 swizzle=2 epilogue=fused",
                    "gemm bm=128 bn=128 bk=32 wm=2 wn=4 stages=4 swizzle=2 epilogue=fused",
                    "gemm bm=128 bn=256 bk=32 wm=2 wn=4 stages=3 swizzle=2 epilogue=fused",
                    "gemm bm=256 bn=128 bk=32 wm=4 wn=2 stages=3 swizzle=2 epilogue=fused",
                    "gemm bm=128 bn=128 bk=64 wm=2 wn=4 stages=3 swizzle=2 epilogue=fused",
                    "gemm bm=128 bn=128 bk=32 wm=2 wn=2 stages=4 swizzle=2 epilogue=fused",
                    "gemm bm=128 bn=256 bk=64 wm=2 wn=4 stages=2 swizzle=3 epilogue=fused",
                ]
                mlx_impl = Impl("mlx", mlx_timer(chained(
                    lambda x, i: mx.matmul(x, Bs[i % sets].T if tb else Bs[i % sets]), As[0])))
                torch_impl = Impl("torch", torch_timer(chained(
                    lambda x, i: x @ (tB[i % sets].T if tb else tB[i % sets]), tA[0])))
                impls = [mlx_impl, torch_impl] + ke_impls(make, candidates, chosen, check, sweep)
                time_all(impls)
                row = record("gemm", {"dtype": dtype, "n": n, "transpose_b": tb}, impls, mlx_impl)
                rows.append(row)
                best_name, best = best_ke(row)
                ke_row = row["impls"].get("ke", best)
                tf = lambda t: 2 * n ** 3 / t / 1e12
                print(f"  gemm {dtype:4s} {n}^3 tb={tb!s:5s}: ke {tf(ke_row['median_s']):6.1f} best {tf(best['median_s']):6.1f} "
                      f"mlx {tf(median(mlx_impl)):6.1f} torch {tf(median(torch_impl)):6.1f} TFLOP/s  "
                      f"x{row['impls'][best_name]['speedup_vs_mlx']:.2f} vs mlx [{best['config']}]", flush=True)
                mx.clear_cache()
                torch.cuda.empty_cache()
    return rows




def linear_candidates(M, N, K):
    if M <= 16:
        c = [f"gemv warps={w} rows={r} vec=8 epilogue=fused" for w in (4, 8) for r in (1, 2, 4)]
    else:
        c = []
    c += ["gemm bm=64 bn=64 bk=64 wm=2 wn=2 stages=3 swizzle=1 epilogue=fused",
          "gemm bm=64 bn=128 bk=32 wm=2 wn=2 stages=4 swizzle=1 epilogue=fused",
          "gemm bm=128 bn=128 bk=32 wm=2 wn=4 stages=3 swizzle=2 epilogue=fused",
          "gemm bm=32 bn=64 bk=64 wm=1 wn=2 stages=4 swizzle=0 epilogue=fused",
          "gemm bm=16 bn=128 bk=64 wm=1 wn=4 stages=4 swizzle=0 epilogue=fused"]
    if K >= 8192 or M <= 64:
        c += [f"splitk bm={bm} bn=128 bk=64 wm=1 wn=4 stages=3 parts={p} epilogue=fused"
              for bm in (16, 32) for p in (2, 4, 8)]
    return c


def linear_section(dtypes, sweep):
    rows = []
    for dtype in dtypes:
        for N, K in GRID["layers"]:
            for M in GRID["layer_m"]:
                sets = copies_for(N * K * 2)
                xs = [randn((M, K), dtype, 7 * s) for s in range(sets)]
                ws = [randn((N, K), dtype, 7 * s + 1) * (1 / math.sqrt(K)) for s in range(sets)]
                bs = [randn((N,), dtype, 7 * s + 2) for s in range(sets)]
                mx.eval(xs, ws, bs)
                ref = nn.gelu(xs[0] @ ws[0].T + bs[0])
                features = matmul_features(M, N, K, dtype=dtype, transpose_b=True, epilogue="mixed")
                chosen = gpu.select_matmul_config(features).to_dsl()

                def make(config):
                    return lambda i: ke.linear(xs[i % sets], ws[i % sets], bs[i % sets], activation="gelu", config=config)

                def check(config):
                    close(ke.linear(xs[0], ws[0], bs[0], activation="gelu", config=config), ref, 2e-2)

                unfused = Impl("mlx", mlx_timer(lambda i: nn.gelu(xs[i % sets] @ ws[i % sets].T + bs[i % sets])))
                addmm = Impl("mlx_addmm", mlx_timer(lambda i: nn.gelu(mx.addmm(bs[i % sets], xs[i % sets], ws[i % sets].T))))
                plain_mlx = Impl("mlx_plain", mlx_timer(lambda i: xs[i % sets] @ ws[i % sets].T))
                plain_features = matmul_features(M, N, K, dtype=dtype, transpose_b=True)
                plain_cfg = gpu.select_matmul_config(plain_features).to_dsl()
                plain_ke = Impl("ke_plain", mlx_timer(lambda i: ke.matmul(xs[i % sets], ws[i % sets], transpose_b=True)), plain_cfg)
                impls = [unfused, addmm, plain_mlx, plain_ke] + ke_impls(make, linear_candidates(M, N, K), chosen, check, sweep)
                time_all(impls)
                row = record("linear", {"dtype": dtype, "M": M, "N": N, "K": K}, impls, unfused)
                rows.append(row)
                best_name, best = best_ke(row)
                ke_row = row["impls"].get("ke", best)
                print(f"  linear {dtype:4s} M={M:4d} N={N:5d} K={K:5d}: ke {ke_row['median_s'] * 1e6:8.1f} us "
                      f"best {best['median_s'] * 1e6:8.1f} us  mlx unfused {median(unfused) * 1e6:8.1f} us  "
                      f"addmm {median(addmm) * 1e6:8.1f} us  x{row['impls'][best_name]['speedup_vs_mlx']:.2f} vs unfused  "
                      f"x{ratio(Impl('', None, times=best['samples']), addmm):.2f} vs addmm  "
                      f"plain ke {median(plain_ke) * 1e6:7.1f} us mlx {median(plain_mlx) * 1e6:7.1f} us [{best['config']}]",
                      flush=True)
    return rows


# ---- markdown from recorded runs (no GPU needed) -------------------------------------


def _load(paths):
    header, rows = None, []
    for path in paths:
        for line in open(path, encoding="utf-8"):
            r = json.loads(line)
            header = r.get("header", header)
            if "section" in r:
                rows.append(r)
    return header, rows


def _short(config: str) -> str:
    return config.split()[0] if config else ""


def _first(started: set, section: str) -> bool:
    """True the first time a section's table is written (its header goes first)."""
    if section in started:
        return False
    started.add(section)
    return True


def report(paths) -> str:
    """Markdown tables of recorded runs (--json files): the heuristics' choice ("ke") against
    the baselines, and with --sweep records the best candidate too."""
    header, rows = _load(paths)
    bw = header["copy_bandwidth_gbs"] * 1e9 if header else float("nan")
    out, started = [], set()
    by = {}
    for r in rows:
        by.setdefault(r["section"], []).append(r)
    for r in by.get("decode", []):
        if _first(started, "decode"):
            out += ["", "| decode | heads | kv | batch | kernelevo (chosen) | µs | MLX µs | torch µs | x MLX | x torch "
                    "| K/V GB/s | % of copy |", "|" + "---|" * 12]
        i = r["impls"]
        ke, m, t = i["ke"], i["mlx"]["median_s"], i["torch"]["median_s"]
        gbs = r["kv_bytes"] / ke["median_s"]
        out.append(f"| {r['dtype']} | {r['heads']} | {r['kv']} | {r['batch']} | {_short(ke['config'])} | "
                   f"{ke['median_s'] * 1e6:.1f} | {m * 1e6:.1f} | {t * 1e6:.1f} | {ke['speedup_vs_mlx']:.2f} | "
                   f"{t / ke['median_s']:.2f} | {gbs / 1e9:.0f} | {gbs / bw:.0%} |")
    for r in by.get("prefill", []):
        if _first(started, "prefill"):
            out += ["", "| prefill | L | causal | window | kernelevo (chosen) | ms | MLX ms | torch ms | x MLX "
                    "| x torch | TFLOP/s |", "|" + "---|" * 11]
        i = r["impls"]
        ke, m, t = i["ke"], i["mlx"]["median_s"], i["torch"]["median_s"]
        out.append(f"| {r['dtype']} | {r['L']} | {r['causal']} | {r.get('window', 0)} | {_short(ke['config'])} | "
                   f"{ke['median_s'] * 1e3:.3f} | {m * 1e3:.3f} | {t * 1e3:.3f} | {ke['speedup_vs_mlx']:.2f} | "
                   f"{t / ke['median_s']:.2f} | {r['flops'] / ke['median_s'] / 1e12:.0f} |")
    for r in by.get("gemm", []):
        if _first(started, "gemm"):
            out += ["", "| gemm | n | transpose_b | kernelevo (chosen) | TFLOP/s | MLX TFLOP/s | torch TFLOP/s "
                    "| best kernelevo kernel | TFLOP/s | x MLX |", "|" + "---|" * 10]
        i = r["impls"]
        tf = lambda t: 2 * r["n"] ** 3 / t / 1e12
        cands = {k: v for k, v in i.items() if k.startswith("ke:")}
        best = min(cands.values(), key=lambda v: v["median_s"]) if cands else None
        out.append(f"| {r['dtype']} | {r['n']} | {r['transpose_b']} | {_short(i['ke']['config'])} | "
                   f"{tf(i['ke']['median_s']):.0f} | {tf(i['mlx']['median_s']):.0f} | {tf(i['torch']['median_s']):.0f} | "
                   + (f"{best['config']} | {tf(best['median_s']):.0f} | {best['speedup_vs_mlx']:.2f} |" if best else "| | |"))
    for r in by.get("linear", []):
        if _first(started, "linear"):
            out += ["", "| linear | M | N | K | kernelevo (chosen) | µs | MLX unfused µs | MLX addmm µs "
                    "| x unfused | x addmm |", "|" + "---|" * 10]
        i = r["impls"]
        ke = i["ke"]
        addmm = statistics.median(a / k for a, k in zip(i["mlx_addmm"]["samples"], ke["samples"]))
        out.append(f"| {r['dtype']} | {r['M']} | {r['N']} | {r['K']} | {_short(ke['config'])} | "
                   f"{ke['median_s'] * 1e6:.1f} | {i['mlx']['median_s'] * 1e6:.1f} | "
                   f"{i['mlx_addmm']['median_s'] * 1e6:.1f} | {ke['speedup_vs_mlx']:.2f} | {addmm:.2f} |")
    return "\n".join(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default="decode,prefill,gemm,linear")
    parser.add_argument("--dtypes", default="bf16,f16")
    parser.add_argument("--sweep", action="store_true", help="also time candidate configurations")
    parser.add_argument("--json", default=None, help="write every record here (JSON lines)")
    parser.add_argument("--report", nargs="+", metavar="JSONL",
                        help="print markdown tables of recorded runs instead of measuring")
    args = parser.parse_args(argv)
    if args.report:
        print(report(args.report))
        return
    if not mx.cuda.is_available():
        sys.exit("bench_cuda needs MLX's CUDA back-end and an NVIDIA GPU")
    import torch

    mx.set_default_device(mx.gpu)
    chip = chips.detect("cuda")
    bandwidth = copy_bandwidth()
    header = {"chip": chip.id, "name": chip.name, "sms": chip.cores, "mlx": mx.__version__,
              "torch": torch.__version__, "copy_bandwidth_gbs": bandwidth / 1e9,
              "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
              "command": " ".join(["python3", "benchmarks/bench_cuda.py"] + (argv or sys.argv[1:]))}
    print(json.dumps(header), flush=True)
    RECORDS.append({"header": header})
    dtypes = args.dtypes.split(",")
    if args.sweep:  # many candidates: fewer samples each
        global REPS
        REPS = 5
    sections = {"decode": lambda: decode_section(dtypes, args.sweep, bandwidth),
                "prefill": lambda: prefill_section(dtypes, args.sweep),
                "gemm": lambda: gemm_section(dtypes, args.sweep),
                "linear": lambda: linear_section(dtypes, args.sweep)}
    try:
        for name in args.sections.split(","):
            print(f"== {name}", flush=True)
            sections[name]()
    finally:
        if args.json:
            with open(args.json, "w") as fh:
                for r in RECORDS:
                    fh.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
