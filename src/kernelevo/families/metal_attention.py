"""Metal attention families (templates in metal/)."""

from __future__ import annotations

from .gpu_common import CAUSAL_ALIGNMENT, ITEMSIZE_EXPR, SCALE_AT, builtin, itemsize, memory_fit, threads_fit
from .schema import Constraint, Family, Param

HEAD_DIMS = (64, 72, 80, 96, 128, 192, 256)


def flash_tile_bytes(p, call) -> int:
    """Threadgroup memory of metal/attention.h's flash tiles (FlashTiles): the Q tile and
    one K/V tile (K and V take turns in it), rows padded by 16 bytes. Checked statically
    (no call) for a 128-wide head in f32; at selection for the call's."""
    size = itemsize(call)
    d = (call or {}).get("head_dim", 128)
    return (p["bq"] + p["bk"]) * (d + 16 // size) * size


_HEAD_DIMS = Constraint.on_call_expr("head_dim in {" + ", ".join(map(str, HEAD_DIMS)) + "}")

_pack_gqa = Param("pack_gqa", "bool", "one threadgroup serves every query row of a KV head (its "
                  "gqa query heads, q_len queries each), so K and V are read once per KV head (no: one "
                  "threadgroup per query row, as MLX's vector kernels)")
_decode_calls = (
    Constraint.on_call_expr("q_len <= 8"),
    Constraint.on_call_expr("q_len <= kv_len"),
    Constraint.on_call_expr("not pack_gqa or gqa * q_len <= 32",
                            "every query row of a KV head held in registers"),
    _HEAD_DIMS,
)

METAL_FLASH = Family(
    op="attention", backend="metal", name="flash",
    doc="Prefill flash attention: a bq-row query tile per threadgroup walks the keys bk at a "
        "time with an online softmax (f32 statistics); wm x wn simdgroups.",
    params=(
        Param("bq", "int", "query rows per threadgroup", allowed=(16, 32, 64)),
        Param("bk", "int", "keys per step", allowed=(8, 16, 32, 64)),
        Param("wm", "int", "simdgroups along the query rows", allowed=(1, 2, 4, 8)),
        Param("wn", "int", "simdgroups along the head dimension of the output (each computes "
              "the scores of its query rows itself)", allowed=(1, 2)),
        Param("skip_masked_blocks", "bool", "skip key blocks that the causal or window mask "
              "removes entirely (no: compute and mask them)"),
        SCALE_AT,
    ),
    constraints=(
        Constraint("bq % (8 * wm) == 0", lambda p, chip, call: p["bq"] % (8 * p["wm"]) == 0),
        threads_fit(lambda p: 32 * p["wm"] * p["wn"], "32 * wm * wn threads"),
        *memory_fit(flash_tile_bytes, "(bq + bk) * (head_dim + 16 / itemsize) * itemsize, for "
                    "head_dim 128 in f32", f"(bq + bk) * (head_dim + 16 // {ITEMSIZE_EXPR}) * "
                    f"{ITEMSIZE_EXPR}"),
        _HEAD_DIMS,
        CAUSAL_ALIGNMENT,
    ),
)

METAL_DECODE = Family(
    op="attention", backend="metal", name="decode",
    doc="Single-pass decode attention for q_len <= 8: simdgroups split the keys, each keeps "
        "an online softmax, and one threadgroup reduction merges them.",
    params=(
        Param("simdgroups", "int", "simdgroups splitting the keys", allowed=(1, 2, 4, 8, 16, 32)),
        _pack_gqa,
        SCALE_AT,
    ),
    constraints=(threads_fit(lambda p: 32 * p["simdgroups"], "32 * simdgroups threads"),
                 *_decode_calls),
)

METAL_DECODE_SPLIT = Family(
    op="attention", backend="metal", name="decode_split",
    doc="Two-pass decode attention for long contexts: `blocks` threadgroups (one simdgroup "
        "each) per head each reduce a slice of the keys to a partial softmax; a second kernel "
        "merges them.",
    params=(
        Param("blocks", "int", "slices of the key sequence", lo=32, hi=1024, multiple_of=32,
              search=(32, 64, 128, 256, 512, 1024)),
        _pack_gqa,
        SCALE_AT,
    ),
    constraints=_decode_calls,
)

METAL_ATTENTION_FAMILIES: tuple[Family, ...] = (METAL_FLASH, METAL_DECODE, METAL_DECODE_SPLIT,
                                                builtin("attention", "metal"))
