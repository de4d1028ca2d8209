"""The Metal kernels' test matrix: every family over hand-picked configurations and shapes
(odd sizes, transposes, batches, epilogues, GQA ratios 1/2/4/5/8, masks, softcap, windows,
f32/f16/bf16), the configurations the shipped M1-M4 heuristics choose, and a seeded
sample of each family's parameter space. Cases reuse cuda_cases' case types and float64
references: they run through kernelevo's GPU op layer, whatever launches the kernels.
"""

from __future__ import annotations

import random

from cuda_cases import AttentionCase, MatmulCase
from kernelevo.config import KernelConfig
from kernelevo.families import families_for
from kernelevo.features import attention_features, matmul_features
from kernelevo.features import Epilogue
from metal_emulated import CHIPS

GEMM = "gemm bm={} bn={} bk={} wm={} wn={} swizzle={} epilogue={}"
SPLITK = "splitk bm={} bn={} bk={} wm={} wn={} parts={}"
GEMV = "gemv bm={} bn={} sm={} sn={} tm={} tn={}"
WIDE = "gemv_wide vecs={} lanes={} split_passes={}"
GELU_BIAS = Epilogue(bias=True, activation="gelu")
ALL = Epilogue(bias=True, activation="silu", residual=True, alpha=0.5)
RELU = Epilogue(activation="relu")
TANH_RES = Epilogue(activation="gelu_tanh", residual=True)

MATMUL_CASES = [
    # every transpose combination, edges in M, N and K, tile shapes from 16x16 to 128x64
    MatmulCase(GEMM.format(32, 32, 16, 2, 2, 0, "fused"), 37, 45, 40, dtype="f32", ta=False, tb=False),
    MatmulCase(GEMM.format(32, 64, 16, 1, 2, 1, "fused"), 37, 45, 40, dtype="f16", ta=True, tb=False),
    MatmulCase(GEMM.format(64, 32, 32, 2, 2, 0, "fused"), 70, 33, 75, dtype="bf16", ta=False, tb=True),
    MatmulCase(GEMM.format(64, 64, 16, 1, 2, 2, "fused"), 100, 70, 24, dtype="f16", ta=True, tb=True),
    MatmulCase(GEMM.format(16, 16, 8, 1, 1, 0, "fused"), 17, 9, 13, dtype="f32", tb=False),
    MatmulCase(GEMM.format(128, 64, 16, 4, 2, 1, "fused"), 130, 70, 20, dtype="bf16", tb=False),
    MatmulCase(GEMM.format(16, 128, 32, 1, 4, 0, "fused"), 20, 130, 40, dtype="f16"),
    # batches: both operands, a broadcast weight (folded into M), a broadcast a
    MatmulCase(GEMM.format(32, 32, 16, 2, 2, 0, "fused"), 33, 20, 24, dtype="f32", tb=False, a_batch=(3,),
               b_batch=(3,)),
    MatmulCase(GEMM.format(32, 32, 16, 2, 2, 0, "fused"), 17, 40, 24, dtype="f32", tb=False, a_batch=(2, 3)),
    MatmulCase(GEMM.format(32, 32, 32, 1, 2, 0, "fused"), 20, 24, 40, a_batch=(1,), b_batch=(4,)),
    # epilogues: fused and separate
    MatmulCase(GEMM.format(64, 64, 16, 2, 2, 1, "fused"), 70, 90, 32, dtype="f32", epilogue=GELU_BIAS),
    MatmulCase(GEMM.format(64, 64, 16, 2, 2, 1, "fused"), 70, 90, 32, dtype="f16", epilogue=ALL),
    MatmulCase(GEMM.format(64, 64, 16, 2, 2, 1, "separate"), 70, 90, 32, epilogue=ALL),
    MatmulCase(GEMM.format(32, 32, 16, 2, 2, 0, "fused"), 37, 45, 40, dtype="f32", tb=False, epilogue=TANH_RES),
    # split-K: the reduction applies the epilogue
    MatmulCase(SPLITK.format(16, 32, 16, 2, 2, 4), 20, 50, 300, dtype="f32", epilogue=GELU_BIAS),
    MatmulCase(SPLITK.format(32, 32, 16, 2, 2, 8), 33, 40, 1000, dtype="f16", ta=True, tb=False),
    MatmulCase(SPLITK.format(16, 16, 8, 1, 1, 2), 9, 7, 100, epilogue=ALL),
    # gemv: the matrix stored [out, K] and [K, out], as a or as b, edges, batch
    MatmulCase(GEMV.format(8, 1, 1, 32, 4, 4), 1, 300, 77, dtype="f16", tb=True),
    MatmulCase(GEMV.format(1, 16, 8, 4, 4, 4), 1, 300, 130, dtype="f32", tb=False, epilogue=GELU_BIAS),
    MatmulCase(GEMV.format(1, 8, 1, 32, 1, 4), 1, 3, 1000, tb=True),
    MatmulCase(GEMV.format(4, 1, 1, 32, 4, 4), 37, 1, 64, dtype="f32", tb=False, epilogue=ALL),
    MatmulCase(GEMV.format(1, 2, 8, 4, 4, 1), 45, 1, 33, dtype="f16", ta=True, tb=False),
    MatmulCase(GEMV.format(1, 1, 8, 4, 4, 4), 1, 150, 40, dtype="f32", a_batch=(3,), b_batch=(3,)),
    MatmulCase(GEMV.format(2, 4, 16, 2, 1, 4), 1, 70, 50, dtype="bf16", tb=False, epilogue=RELU),
    # gemv_wide: one and three passes, in separate threadgroup columns or one
    MatmulCase(WIDE.format(4, 32, "yes"), 4, 70, 132, dtype="f16"),
    MatmulCase(WIDE.format(4, 16, "yes"), 12, 70, 132, dtype="bf16", epilogue=ALL),
    MatmulCase(WIDE.format(4, 16, "no"), 12, 33, 64, dtype="f16", epilogue=GELU_BIAS),
    MatmulCase(WIDE.format(1, 32, "no"), 3, 9, 36, dtype="bf16", a_batch=(2,), b_batch=(2,)),
]

DECODE = "decode simdgroups={} pack_gqa={} scale_at={}"
SPLIT = "decode_split blocks={} pack_gqa={} scale_at={}"
FLASH = "flash bq={} bk={} wm={} wn={} skip_masked_blocks={} scale_at={}"

ATTENTION_CASES = [
    AttentionCase(DECODE.format(4, "yes", "q"), 1, 8, 2, 1, 77, 64, "f16"),
    AttentionCase(DECODE.format(32, "no", "q"), 1, 4, 4, 1, 100, 128, "bf16"),
    AttentionCase(DECODE.format(2, "yes", "scores"), 2, 5, 1, 2, 50, 80, "f32", mask="causal"),
    AttentionCase(DECODE.format(8, "yes", "q"), 1, 8, 1, 1, 130, 96, "bf16", mask="bool",
                  mask_shape=(1, 1, 1, 130)),
    AttentionCase(DECODE.format(1, "yes", "q"), 1, 4, 2, 3, 40, 72, "f16", mask="additive",
                  mask_shape=(1, 4, 3, 40), window=20, softcap=30.0),
    AttentionCase(SPLIT.format(32, "yes", "q"), 1, 8, 2, 1, 300, 128, "bf16"),
    AttentionCase(SPLIT.format(64, "yes", "scores"), 1, 4, 4, 1, 333, 64, "f32", mask="bool",
                  mask_shape=(1, 4, 1, 333)),
    AttentionCase(SPLIT.format(1024, "yes", "q"), 1, 10, 2, 1, 150, 64, "f16"),
    AttentionCase(SPLIT.format(128, "no", "q"), 2, 4, 1, 4, 200, 96, "bf16", mask="causal", softcap=20.0),
    AttentionCase(FLASH.format(32, 16, 4, 1, "yes", "q"), 1, 2, 1, 50, 50, 64, "bf16", mask="causal"),
    AttentionCase(FLASH.format(32, 32, 4, 1, "yes", "q"), 1, 2, 2, 40, 70, 64, "f16"),
    AttentionCase(FLASH.format(16, 8, 2, 2, "no", "scores"), 1, 5, 1, 33, 47, 72, "f32", mask="bool",
                  mask_shape=(1, 1, 33, 47), softcap=30.0),
    AttentionCase(FLASH.format(64, 16, 8, 1, "yes", "q"), 1, 8, 1, 70, 70, 64, "bf16", mask="causal", window=20),
    AttentionCase(FLASH.format(16, 64, 1, 2, "yes", "scores"), 1, 2, 2, 20, 90, 80, "f16", mask="additive",
                  mask_shape=(1, 2, 20, 90)),
    AttentionCase(FLASH.format(32, 16, 2, 2, "yes", "q"), 1, 4, 2, 45, 45, 128, "f16", mask="causal"),
]


# ---- the shipped heuristics' choices, run on small shapes of the same kind -----------


def shipped_matmul_cases(table) -> list[MatmulCase]:
    """One case per distinct kernelevo configuration the shipped files choose for the
    table's calls (chip, features, expected): the configuration on a small, odd shape
    with the call's dtype, transposes and batch, sized to meet its call constraints."""
    cases, seen = [], set()
    for _, f, expected in table:
        family = expected.split()[0]
        if family == "mlx" or expected in seen:
            continue
        seen.add(expected)
        batch = (f["batch"],) if f["batch"] > 1 else ()
        kind = dict(dtype=f["dtype"], ta=f["transpose_a"], tb=f["transpose_b"], a_batch=batch, b_batch=batch)
        if family == "gemv":
            M, N = (1, 100) if f["M"] == 1 else (100, 1)
            cases.append(MatmulCase(expected, M, N, 70, **kind))
        elif family == "gemv_wide":
            cases.append(MatmulCase(expected, f["M"], 70, 132, **kind))
        elif family == "splitk":
            parts = KernelConfig.parse(expected, "matmul", "metal").get("parts")
            cases.append(MatmulCase(expected, 20, 33, 16 * parts + 13, **kind))
        else:
            cases.append(MatmulCase(expected, 70, 45, 40, **kind))
    return cases


def shipped_attention_cases(table) -> list[AttentionCase]:
    """As shipped_matmul_cases, for attention: the call's GQA ratio, head size, mask and
    dtype with few heads and short sequences."""
    cases, seen = [], set()
    for _, f, expected in table:
        family = expected.split()[0]
        if family == "mlx" or expected in seen:
            continue
        seen.add(expected)
        q_len, kv_len = (f["q_len"], 300) if f["q_len"] <= 8 else (40, 40)
        cases.append(AttentionCase(expected, 1, f["gqa"], 1, q_len, kv_len, f["head_dim"], f["dtype"],
                                   mask=f["mask"]))
    return cases


# ---- a seeded sample of each family's parameter space --------------------------------

# family -> the calls sampled configurations run on, in turn (matmul_features or
# attention_features keywords, with mask_shape for array masks)
SAMPLE_CALLS = {
    "gemm": [dict(M=37, N=45, K=40, dtype="f16", transpose_b=True),
             dict(M=50, N=29, K=33, dtype="f32", transpose_a=True),
             dict(M=20, N=70, K=24, dtype="bf16", transpose_a=True, transpose_b=True)],
    "splitk": [dict(M=20, N=33, K=16 * 64 + 5, dtype="f32"),
               dict(M=9, N=40, K=2100, dtype="bf16", transpose_b=True)],
    "gemv": [dict(M=1, N=90, K=70, dtype="bf16", transpose_b=True),
             dict(M=1, N=65, K=45, dtype="f32"),
             dict(M=41, N=1, K=50, dtype="f16")],
    "gemv_wide": [dict(M=7, N=21, K=68, dtype="f16", transpose_b=True),
                  dict(M=3, N=50, K=36, dtype="bf16", transpose_b=True)],
    "flash": [dict(batch=1, heads=4, kv_heads=2, q_len=33, kv_len=40, head_dim=64, dtype="bf16", mask="causal"),
              dict(batch=1, heads=5, kv_heads=1, q_len=20, kv_len=33, head_dim=80, dtype="f16", mask="bool",
                   mask_shape=(1, 5, 20, 33)),
              dict(batch=2, heads=2, kv_heads=2, q_len=17, kv_len=29, head_dim=96, dtype="f16",
                   mask="additive", mask_shape=(2, 1, 1, 29))],
    "decode": [dict(batch=1, heads=8, kv_heads=2, q_len=2, kv_len=70, head_dim=64, dtype="f16"),
               dict(batch=1, heads=5, kv_heads=1, q_len=1, kv_len=90, head_dim=128, dtype="bf16", mask="causal"),
               dict(batch=2, heads=4, kv_heads=4, q_len=3, kv_len=50, head_dim=72, dtype="f32", mask="bool",
                    mask_shape=(2, 1, 3, 50))],
    "decode_split": [dict(batch=1, heads=4, kv_heads=1, q_len=1, kv_len=300, head_dim=128, dtype="bf16"),
                     dict(batch=1, heads=8, kv_heads=1, q_len=2, kv_len=200, head_dim=64, dtype="f16",
                          mask="additive", mask_shape=(1, 8, 2, 200))],
}


def _features(op: str, call: dict) -> dict:
    call = {k: v for k, v in call.items() if k != "mask_shape"}
    return matmul_features(**call) if op == "matmul" else attention_features(**call)


def sampled_configs(op: str, count: int, seed: int) -> list[tuple[str, dict]]:
    """`count` configurations of each Metal family of `op`, drawn (seeded) from those its
    schema accepts on an M1 for every one of the family's sample calls; the i-th runs on
    the (i mod n)-th call."""
    rng = random.Random(seed)
    out = []
    for fam in families_for(op, "metal"):
        if fam.name == "mlx":
            continue
        calls = SAMPLE_CALLS[fam.name]
        space = [params for params in fam.search_space(CHIPS["m1"], _features(op, calls[0]))
                 if all(not fam.violations(params, CHIPS["m1"], _features(op, c)) for c in calls[1:])]
        for i, params in enumerate(rng.sample(space, min(count, len(space)))):
            out.append((KernelConfig.make(op, "metal", fam.name, params).to_dsl(), calls[i % len(calls)]))
    return out


def sampled_matmul_cases(count: int = 6, seed: int = 5) -> list[MatmulCase]:
    return [MatmulCase(cfg, s["M"], s["N"], s["K"], dtype=s["dtype"], ta=s.get("transpose_a", False),
                       tb=s.get("transpose_b", False))
            for cfg, s in sampled_configs("matmul", count, seed)]


def sampled_attention_cases(count: int = 6, seed: int = 5) -> list[AttentionCase]:
    return [AttentionCase(cfg, s["batch"], s["heads"], s["kv_heads"], s["q_len"], s["kv_len"], s["head_dim"],
                          s["dtype"], mask=s.get("mask", "none"), mask_shape=s.get("mask_shape"))
            for cfg, s in sampled_configs("attention", count, seed)]
