"""The shipped Apple files choose what MLX 0.32 itself chooses on each device class.

Each expected configuration below was worked out by hand from MLX's dispatch code
(mlx/backend/metal/matmul.cpp: GEMM_TPARAM_MACRO, steel_gemm_splitk, gemv, gemv_wide_config;
mlx/backend/metal/scaled_dot_product_attention.cpp: use_fallback, sdpa_vector_2pass)."""

import pytest

from kernelevo import heuristics
from kernelevo.chips import apple_from_device_info
from kernelevo.features import attention_features, matmul_features

CHIPS = {
    "m1": apple_from_device_info("applegpu_g13g", "Apple M1"),
    "m3": apple_from_device_info("applegpu_g15g", "Apple M3"),
    "m2-pro": apple_from_device_info("applegpu_g14s", "Apple M2 Pro"),
    "m3-max": apple_from_device_info("applegpu_g15c", "Apple M3 Max"),
    "m2-ultra": apple_from_device_info("applegpu_g14d", "Apple M2 Ultra"),
}


def chosen(chip, op, features):
    active = heuristics.active("metal", CHIPS[chip])
    return active.program.select(op, features).config.to_dsl()


def mm(M, N, K, dtype="f16", tb=False, ta=False, batch=1):
    return matmul_features(M, N, K, dtype=dtype, transpose_a=ta, transpose_b=tb, batch=batch)


MATMUL = [
    # a vector times a transposed weight (x @ W.T): the row-major gemv kernel
    ("m1", mm(1, 4096, 4096, tb=True), "gemv bm=8 bn=1 sm=1 sn=32 tm=4 tn=4"),
    # a vector times a row-major matrix: the transposed-matrix kernel
    ("m1", mm(1, 4096, 4096), "gemv bm=1 bn=16 sm=8 sn=4 tm=4 tn=4"),
    ("m1", mm(1, 4096, 16384), "gemv bm=1 bn=16 sm=4 sn=8 tm=4 tn=4"),
    ("m1", mm(1, 300, 40, tb=True), "gemv bm=1 bn=1 sm=8 sn=4 tm=4 tn=4"),
    ("m1", mm(1, 2, 4096, tb=True), "gemv bm=1 bn=8 sm=1 sn=32 tm=1 tn=4"),
    # four rows: split-K on M1; the wide gemv from M3 on
    ("m1", mm(4, 4096, 4096, tb=True), "splitk bm=16 bn=32 bk=16 wm=2 wn=2 parts=2"),
    ("m3", mm(4, 4096, 4096, tb=True), "gemv_wide vecs=4 lanes=32 split_passes=yes"),
    ("m3", mm(12, 4096, 4096, tb=True), "gemv_wide vecs=4 lanes=16 split_passes=yes"),
    ("m3", mm(12, 70000, 4096, tb=True), "gemv_wide vecs=4 lanes=16 split_passes=no"),
    ("m3", mm(12, 4096, 4096, dtype="f32", tb=True), "splitk bm=16 bn=32 bk=16 wm=2 wn=2 parts=2"),
    ("m1", mm(512, 512, 512, dtype="f32"), "splitk bm=32 bn=32 bk=16 wm=2 wn=2 parts=2"),
    ("m1", mm(16, 16, 8192, dtype="f32"), "splitk bm=16 bn=16 bk=16 wm=2 wn=2 parts=32"),
    # large products: tiles by device class
    ("m1", mm(2048, 2048, 2048, dtype="bf16", tb=True), "gemm bm=64 bn=32 bk=32 wm=2 wn=2 swizzle=0 epilogue=fused"),
    ("m1", mm(2048, 2048, 2048, dtype="bf16"), "gemm bm=64 bn=64 bk=16 wm=1 wn=2 swizzle=0 epilogue=fused"),
    ("m1", mm(2048, 2048, 2048, dtype="f32"), "gemm bm=64 bn=64 bk=16 wm=2 wn=2 swizzle=0 epilogue=fused"),
    ("m2-pro", mm(2048, 2048, 2048, dtype="bf16", tb=True), "gemm bm=64 bn=64 bk=16 wm=2 wn=2 swizzle=0 epilogue=fused"),
    ("m3-max", mm(2048, 2048, 2048, dtype="f32"), "gemm bm=64 bn=64 bk=16 wm=2 wn=2 swizzle=0 epilogue=fused"),
    ("m2-ultra", mm(2048, 2048, 2048, dtype="bf16", tb=True), "gemm bm=64 bn=64 bk=16 wm=1 wn=2 swizzle=0 epilogue=fused"),
    ("m2-ultra", mm(2048, 2048, 8192, dtype="f16", tb=True), "gemm bm=64 bn=32 bk=32 wm=2 wn=2 swizzle=0 epilogue=fused"),
    ("m2-ultra", mm(2048, 2048, 8192, dtype="f16"), "gemm bm=32 bn=64 bk=16 wm=1 wn=2 swizzle=0 epilogue=fused"),
    ("m2-ultra", mm(256, 1024, 256, dtype="f32", tb=True), "gemm bm=32 bn=64 bk=16 wm=1 wn=2 swizzle=0 epilogue=fused"),
    ("m2-ultra", mm(256, 1024, 256, dtype="f32"), "gemm bm=64 bn=32 bk=32 wm=2 wn=2 swizzle=0 epilogue=fused"),
    # split-K thresholds: 1024 tiles on base/Max, 2048 on Pro/Ultra
    ("m3-max", mm(512, 1024, 4096, dtype="f32"), "gemm bm=64 bn=64 bk=16 wm=2 wn=2 swizzle=0 epilogue=fused"),
    ("m2-pro", mm(512, 1024, 4096, dtype="f32"), "splitk bm=32 bn=32 bk=16 wm=2 wn=2 parts=2"),
    ("m1", mm(64, 64, 512, dtype="f32", batch=2), "gemm bm=64 bn=64 bk=16 wm=2 wn=2 swizzle=0 epilogue=fused"),
]


@pytest.mark.parametrize("chip,features,expected", MATMUL)
def test_matmul_matches_mlx(chip, features, expected):
    assert chosen(chip, "matmul", features) == expected


def at(q_len, kv_len, heads=32, kv_heads=8, head_dim=128, mask="none"):
    return attention_features(batch=1, heads=heads, kv_heads=kv_heads, q_len=q_len, kv_len=kv_len,
                              head_dim=head_dim, dtype="f16", mask=mask)


ATTENTION = [
    ("m1", at(1, 8192), "decode_split blocks=64 pack_gqa=yes scale_at=q"),
    ("m1", at(1, 8192, heads=8), "decode simdgroups=32 pack_gqa=no scale_at=q"),
    ("m1", at(1, 2048), "decode simdgroups=32 pack_gqa=no scale_at=q"),
    ("m1", at(1, 8192, heads=16, kv_heads=8), "decode_split blocks=32 pack_gqa=yes scale_at=q"),
    ("m2-pro", at(1, 2048, heads=8), "decode_split blocks=64 pack_gqa=yes scale_at=q"),
    ("m2-pro", at(1, 8192), "decode_split blocks=64 pack_gqa=yes scale_at=q"),
    ("m2-pro", at(1, 8192, heads=64), "decode_split blocks=128 pack_gqa=yes scale_at=q"),
    ("m2-pro", at(1, 40000, heads=64), "decode_split blocks=512 pack_gqa=yes scale_at=q"),
    ("m2-ultra", at(1, 8192), "decode_split blocks=128 pack_gqa=yes scale_at=q"),
    ("m2-ultra", at(1, 16384, heads=16), "decode_split blocks=256 pack_gqa=yes scale_at=q"),
    ("m2-ultra", at(1, 70000, heads=64), "decode_split blocks=1024 pack_gqa=yes scale_at=q"),
    ("m3-max", at(1, 2048, heads=8), "decode simdgroups=32 pack_gqa=no scale_at=q"),
    # the vector kernels' limits: MLX runs its unfused path
    ("m1", at(8, 8192, heads=64), "mlx"),
    ("m1", at(1, 4096, head_dim=80), "mlx"),
    ("m1", at(4, 2, heads=8), "mlx"),
    # prefill
    ("m1", at(1024, 1024, mask="causal"), "flash bq=32 bk=16 wm=4 wn=1 skip_masked_blocks=yes scale_at=q"),
    ("m2-ultra", at(1024, 1024, head_dim=64), "flash bq=32 bk=32 wm=4 wn=1 skip_masked_blocks=yes scale_at=q"),
    ("m1", at(1024, 1024, head_dim=256), "mlx"),
    ("m1", at(2048, 1024, mask="causal"), "mlx"),
]


@pytest.mark.parametrize("chip,features,expected", ATTENTION)
def test_attention_matches_mlx(chip, features, expected):
    assert chosen(chip, "attention", features) == expected


def test_every_apple_chip_has_a_file_and_only_unknown_ones_get_the_generic_rules():
    for arch, name in [("applegpu_g13g", "Apple M1"), ("applegpu_g16s", "Apple M4 Pro"),
                       ("applegpu_g15c", "Apple M3 Max"), ("applegpu_g14d", "Apple M2 Ultra")]:
        source = heuristics.find_source("metal", apple_from_device_info(arch, name))
        assert source.origin == "shipped"
    unknown = apple_from_device_info("applegpu_g99g", "Apple M9")
    assert heuristics.find_source("metal", unknown).origin == "generic"
