"""kernelevo's Metal kernels, executed in the MSL emulator (tests/mslemu/) through the GPU op
layer on a pretend Mac: every family over hand-picked cases, the configurations the
shipped M1-M4 heuristics choose, and a seeded sample of each parameter space — odd sizes,
all dtypes, GQA ratios 1/2/4/5/8, masks — each against a float64 reference in the dtype
that runs. Then what the emulator's counters say: the kernels' device traffic against its
analytic minimum, threadgroup memory against the schema's formula, the MMA count, and
bitwise-identical results under forward, reverse and random thread orders."""

from __future__ import annotations

import math
import shutil

import mlx.core as mx
import numpy as np
import pytest

import test_shipped_heuristics as shipped
from cuda_cases import assert_close, attention_reference, run_attention_case, run_matmul_case
from kernelevo.config import KernelConfig
from kernelevo.families.metal_attention import flash_tile_bytes
from kernelevo.families.metal_matmul import gemm_tile_bytes
from kernelevo.features import attention_features, matmul_features
from kernelevo.lowering import metal as lowering
from kernelevo.tune.correctness import random_operand
from metal_cases import (ATTENTION_CASES, MATMUL_CASES, sampled_attention_cases, sampled_matmul_cases,
                         shipped_attention_cases, shipped_matmul_cases)
from metal_emulated import pretend_metal, run_plan, run_plan_schedules

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the MSL emulator needs g++")


@pytest.fixture
def metal(monkeypatch):
    return pretend_metal(monkeypatch, "m1")


def _ids(cases):
    return [str(c) for c in cases]


SHIPPED_MATMUL = shipped_matmul_cases(shipped.MATMUL)
SHIPPED_ATTENTION = shipped_attention_cases(shipped.ATTENTION)
SAMPLED_MATMUL = sampled_matmul_cases()
SAMPLED_ATTENTION = sampled_attention_cases()


def test_the_shipped_choices_cover_every_family():
    families = {c.config.split()[0] for c in SHIPPED_MATMUL + SHIPPED_ATTENTION}
    assert families == {"gemm", "splitk", "gemv", "gemv_wide", "flash", "decode", "decode_split"}


@pytest.mark.parametrize("case", MATMUL_CASES + SHIPPED_MATMUL + SAMPLED_MATMUL,
                         ids=_ids(MATMUL_CASES + SHIPPED_MATMUL + SAMPLED_MATMUL))
def test_matmul(case, metal, rng):
    out, ref = run_matmul_case(case, rng)
    assert_close(out, ref, case.dtype)
    assert metal.launched and all(name.startswith(case.config.split()[0]) or name.startswith("splitk_reduce")
                                  for name in metal.launched)


@pytest.mark.parametrize("case", ATTENTION_CASES + SHIPPED_ATTENTION + SAMPLED_ATTENTION,
                         ids=_ids(ATTENTION_CASES + SHIPPED_ATTENTION + SAMPLED_ATTENTION))
def test_attention(case, metal, rng):
    out, ref = run_attention_case(case, rng)
    assert_close(out, ref, case.dtype)
    assert metal.launched


# ---- traffic, memory and work, from the emulator's counters --------------------------


def _operand(shape, dtype, seed):
    return random_operand(tuple(shape), dtype, seed)


def _matmul_plan(config, M, N, K, dtype="f16", ta=False, tb=False, batch=1):
    cfg = KernelConfig.parse(config, "matmul", "metal")
    f = matmul_features(M, N, K, batch=batch, dtype=dtype, transpose_a=ta, transpose_b=tb)
    a = _operand(((batch,) if batch > 1 else ()) + ((K, M) if ta else (M, K)), dtype, 1)
    b = _operand(((batch,) if batch > 1 else ()) + ((N, K) if tb else (K, N)), dtype, 2)
    plan = lowering.lower_matmul(cfg, f, a_batched=batch > 1, b_batched=batch > 1)
    a64 = np.array(a.astype(mx.float32), np.float64)
    b64 = np.array(b.astype(mx.float32), np.float64)
    ref = (np.swapaxes(a64, -1, -2) if ta else a64) @ (np.swapaxes(b64, -1, -2) if tb else b64)
    return cfg, f, plan, {"a": a, "b": b}, ref.reshape(batch, M, N)


@pytest.mark.parametrize("config,M,N,K,ta,tb", [
    ("gemm bm=32 bn=64 bk=16 wm=2 wn=2 swizzle=1 epilogue=fused", 70, 130, 40, False, True),
    ("gemm bm=64 bn=32 bk=32 wm=2 wn=2 swizzle=0 epilogue=fused", 64, 96, 75, True, False),
])
def test_gemm_reads_each_tile_once_and_does_no_redundant_work(config, M, N, K, ta, tb):
    """The analytic minimum of a BM x BN tiling without cross-threadgroup sharing: each
    threadgroup reads its A rows and B columns once over K, so A is read once per tile
    column (cdiv(N, bn) times) and B once per tile row (cdiv(M, bm) times); elements past
    the matrices' edges are never read. The output is written once; threadgroup memory
    is exactly the schema's formula; MMAs are one per 8x8x8 block of the padded tiles."""
    cfg, f, plan, env, ref = _matmul_plan(config, M, N, K, ta=ta, tb=tb)
    out, (st,) = run_plan(plan, env)
    assert_close(out, ref, "f16")
    p = cfg.as_dict()
    tiles_m, tiles_n = math.ceil(M / p["bm"]), math.ceil(N / p["bn"])
    a, b, o = st.buffers["a"], st.buffers["b"], st.buffers["out"]
    assert (a.bytes_read, a.unique_bytes_read) == (tiles_n * a.nbytes, a.nbytes)
    assert (b.bytes_read, b.unique_bytes_read) == (tiles_m * b.nbytes, b.nbytes)
    assert o.bytes_written == o.unique_bytes_written == o.nbytes
    assert st.threadgroup_memory == gemm_tile_bytes(p, f)
    steps = math.ceil(K / p["bk"]) * p["bk"] // 8
    assert st.mma == tiles_m * tiles_n * (p["bm"] // 8) * (p["bn"] // 8) * steps


def test_splitk_reads_each_operand_as_gemm_does_and_sums_every_part():
    config = "splitk bm=16 bn=32 bk=16 wm=2 wn=2 parts=8"
    cfg, f, plan, env, ref = _matmul_plan(config, 20, 50, 300, dtype="f32")
    out, (part, reduce) = run_plan(plan, env)
    assert_close(out, ref, "f32")
    chunk = math.ceil(300 / 8 / 16) * 16  # K per part, whole steps
    parts = math.ceil(300 / chunk)
    a, b = part.buffers["a"], part.buffers["b"]
    assert a.bytes_read == math.ceil(50 / 32) * a.nbytes and a.unique_bytes_read == a.nbytes
    assert b.bytes_read == math.ceil(20 / 16) * b.nbytes and b.unique_bytes_read == b.nbytes
    partials = part.buffers["partials"]
    assert partials.nbytes == parts * 20 * 50 * 4 == partials.bytes_written == partials.unique_bytes_written
    assert reduce.buffers["partials"].bytes_read == partials.nbytes  # each partial summed once
    assert reduce.buffers["out"].bytes_written == 20 * 50 * 4


@pytest.mark.parametrize("config,M,N,K,ta,tb", [
    ("gemv bm=8 bn=1 sm=1 sn=32 tm=4 tn=4", 1, 300, 77, False, True),  # matrix [out, K]
    ("gemv bm=1 bn=16 sm=8 sn=4 tm=4 tn=4", 1, 300, 130, False, False),  # matrix [K, out]
    ("gemv bm=4 bn=2 sm=4 sn=8 tm=4 tn=1", 45, 1, 70, False, False),  # a is the matrix
])
def test_gemv_reads_the_matrix_exactly_once(config, M, N, K, ta, tb):
    cfg, f, plan, env, ref = _matmul_plan(config, M, N, K, dtype="bf16", ta=ta, tb=tb)
    out, (st,) = run_plan(plan, env)
    assert_close(out, ref, "bf16")
    matrix = st.buffers["a" if N == 1 else "b"]
    assert matrix.bytes_read == matrix.unique_bytes_read == matrix.nbytes
    assert st.buffers["out"].bytes_written == max(M, N) * 2


def test_gemv_wide_reads_the_weight_once_per_pass():
    config = "gemv_wide vecs=4 lanes=16 split_passes=yes"
    cfg, f, plan, env, ref = _matmul_plan(config, 10, 37, 68, tb=True)
    out, (st,) = run_plan(plan, env)
    assert_close(out, ref, "f16")
    w = st.buffers["b"]
    assert w.bytes_read == math.ceil(10 / 4) * w.nbytes and w.unique_bytes_read == w.nbytes


def _attention_plan(config, B, Hq, Hkv, Lq, Lk, D, dtype="f16", mask="none"):
    cfg = KernelConfig.parse(config, "attention", "metal")
    f = attention_features(batch=B, heads=Hq, kv_heads=Hkv, q_len=Lq, kv_len=Lk, head_dim=D, dtype=dtype,
                           mask=mask)
    env = {"q": _operand((B, Hq, Lq, D), dtype, 3), "k": _operand((B, Hkv, Lk, D), dtype, 4),
           "v": _operand((B, Hkv, Lk, D), dtype, 5)}
    return cfg, f, lowering.lower_attention(cfg, f, scale=D ** -0.5), env


def _attention_reference(env, causal=False):
    D = env["q"].shape[-1]
    return attention_reference(env["q"], env["k"], env["v"], D ** -0.5, "causal" if causal else "none",
                               None, 0.0, 0)


@pytest.mark.parametrize("family", ["decode simdgroups=4", "decode_split blocks=32"])
def test_decode_with_pack_gqa_reads_each_key_and_value_once_per_kv_head(family):
    """One threadgroup (or, split, one per slice) serves every query row of a KV head:
    each K and V element is read exactly once. Without packing each of the gqa * q_len
    query rows reads its KV head again."""
    reads = {}
    for pack in ("yes", "no"):
        config = f"{family} pack_gqa={pack} scale_at=q"
        cfg, f, plan, env = _attention_plan(config, 2, 8, 2, 2, 150, 64)
        out, stats = run_plan(plan, env)
        assert_close(out, _attention_reference(env), "f16")
        k, v = stats[0].buffers["k"], stats[0].buffers["v"]
        assert k.unique_bytes_read == k.nbytes and v.unique_bytes_read == v.nbytes
        reads[pack] = (k.bytes_read // k.nbytes, v.bytes_read // v.nbytes)
        assert k.bytes_read % k.nbytes == 0 and v.bytes_read % v.nbytes == 0
    assert reads == {"yes": (1, 1), "no": (8, 8)}  # gqa 4, q_len 2


@pytest.mark.parametrize("skip", ["yes", "no"])
def test_flash_visits_exactly_the_key_blocks_the_causal_mask_leaves(skip):
    """Each query tile reads the K and V blocks it visits once; with skip_masked_blocks
    those are the blocks up to its last row's diagonal, otherwise all of them. Threadgroup
    memory is the schema's formula."""
    bq, bk = 16, 16
    config = f"flash bq={bq} bk={bk} wm=2 wn=1 skip_masked_blocks={skip} scale_at=q"
    B, Hq, Hkv, L, D = 1, 2, 1, 50, 64
    cfg, f, plan, env = _attention_plan(config, B, Hq, Hkv, L, L, D, mask="causal")
    out, (st,) = run_plan(plan, env)
    assert_close(out, _attention_reference(env, causal=True), "f16")
    blocks = math.ceil(L / bk)
    keys = 0
    for tile in range(math.ceil(L / bq)):
        last_row = min((tile + 1) * bq, L) - 1
        visited = min(blocks, math.ceil((last_row + 1) / bk)) if skip == "yes" else blocks
        keys += min(L, visited * bk)
    row_bytes = D * 2
    assert st.buffers["k"].bytes_read == st.buffers["v"].bytes_read == B * Hq * keys * row_bytes
    assert st.buffers["q"].bytes_read == st.buffers["q"].nbytes
    assert st.threadgroup_memory == flash_tile_bytes(cfg.as_dict(), f)


# ---- thread order: a missing barrier shows up as a difference between schedules -------


@pytest.mark.parametrize("kind,config", [
    ("matmul", "gemm bm=32 bn=32 bk=16 wm=2 wn=2 swizzle=1 epilogue=fused"),
    ("matmul", "splitk bm=16 bn=16 bk=8 wm=1 wn=2 parts=4"),
    ("matmul", "gemv bm=1 bn=4 sm=8 sn=4 tm=4 tn=4"),
    ("attention", "flash bq=16 bk=16 wm=2 wn=2 skip_masked_blocks=yes scale_at=q"),
    ("attention", "decode simdgroups=4 pack_gqa=yes scale_at=scores"),
    ("attention", "decode_split blocks=64 pack_gqa=yes scale_at=q"),
])
def test_results_do_not_depend_on_thread_order(kind, config):
    if kind == "matmul":
        M, N, K = (1, 70, 45) if config.startswith("gemv") else (37, 40, 70)
        _, _, plan, env, ref = _matmul_plan(config, M, N, K, dtype="f32", tb=config.startswith("gemm"))
        out = run_plan_schedules(plan, env)
        assert_close(out, ref, "f32")
    else:
        Lq = 2 if config.startswith("decode") else 40
        _, _, plan, env = _attention_plan(config, 1, 4, 2, Lq, 40, 64, dtype="f32", mask="causal")
        out = run_plan_schedules(plan, env)
        assert_close(out, _attention_reference(env, causal=True), "f32")
