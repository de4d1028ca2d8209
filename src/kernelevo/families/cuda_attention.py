"""CUDA attention families (templates in cuda/): `flash` on tensor cores for prefill,
`decode` and `decode_split` on CUDA cores for few queries against many keys."""

from __future__ import annotations

from .cuda_matmul import SMEM_PAD
from .gpu_common import CAUSAL_ALIGNMENT, ITEMSIZE_EXPR, SCALE_AT, builtin, itemsize, threads_fit
from .schema import Constraint, Family, Param

MAX_SLICES = 1024  # split-KV slices the merge kernel holds (cuda/attention_decode.cuh)


def flash_smem(p, call) -> int:
    """A Q tile and `stages` K and V tiles, rows padded by 16 bytes (cuda/attention_flash.cuh)."""
    return (p["bq"] + 2 * p["stages"] * p["bk"]) * (call["head_dim"] + SMEM_PAD) * itemsize(call)


def decode_rows(p, call) -> int:
    """Query rows one block serves: all heads of a KV head when packed."""
    return call["q_len"] * (call["gqa"] if p["pack_gqa"] else 1)


def decode_registers(p, call) -> int:
    """An upper estimate of a thread's registers in cuda/attention_decode.cuh (checked against
    ptxas's report by tests/test_cuda_nvrtc.py)."""
    rows = decode_rows(p, call)
    return (2 * rows + 6) * call["head_dim"] // p["key_lanes"] + 4 * rows + 48


def decode_smem(p, call) -> int:
    """Each warp's partial output and softmax state for every row (f32)."""
    return p["warps"] * decode_rows(p, call) * (call["head_dim"] + 2) * 4


#: query rows one decode block serves (decode_rows), in a constraint
_ROWS = "q_len * (gqa if pack_gqa else 1)"

_pack_gqa = Param("pack_gqa", "bool", "one block serves all query heads of a KV head, so K and "
                  "V are read once per KV head")
_key_lanes = Param("key_lanes", "int", "lanes sharing one key (each holds head_dim / key_lanes "
                   "elements of it; fewer lanes: fewer shuffles, more registers)",
                   allowed=(4, 8, 16, 32))
_decode_constraints = (
    threads_fit(lambda p: 32 * p["warps"], "32 * warps threads"),
    Constraint.on_call_expr("q_len <= 16"),
    Constraint.on_call_expr(f"head_dim * {ITEMSIZE_EXPR} % (16 * key_lanes) == 0",
                            "whole 16-byte loads per lane"),
    Constraint.on_call_expr(f"(2 * {_ROWS} + 6) * head_dim // key_lanes + 4 * {_ROWS} + 48 <= "
                            "min(255, 65536 // (32 * warps))",
                            "queries, outputs and loads in flight in registers"),
    Constraint.on_call_expr(f"warps * {_ROWS} * (head_dim + 2) * 4 <= chip.threadgroup_memory",
                            "each warp's partial output and softmax state"),
    CAUSAL_ALIGNMENT,
)

CUDA_FLASH = Family(
    op="attention", backend="cuda", name="flash",
    doc="Flash attention on tensor cores: a bq-row query tile per block (16 rows per MMA "
        "tile, split across the warps), keys bk at a time through a `stages`-deep cp.async "
        "pipeline, online softmax in f32 on the score fragments. With pack_gqa the rows are "
        "all query heads of a KV head and with kv_splits the keys are sliced across blocks: "
        "bq=16 makes it decode on tensor cores.",
    params=(
        Param("bq", "int", "query rows per block", allowed=(16, 32, 64, 128)),
        Param("bk", "int", "keys per step", allowed=(16, 32, 64, 128)),
        Param("warps", "int", "warps per block (each owns bq / warps query rows)", allowed=(1, 2, 4, 8)),
        Param("stages", "int", "K/V tiles in flight (1: load, then compute)", allowed=(1, 2, 3)),
        Param("skip_masked_blocks", "bool", "skip key blocks the causal or window mask hides "
              "from the whole query tile (no: visit and mask them)"),
        SCALE_AT,
        Param("pack_gqa", "bool", "a block's rows are the query heads of one KV head, "
              "interleaved, so K and V are read once for all of them"),
        Param("kv_splits", "int", "slices of the keys, each a block whose partial softmax a "
              "second kernel merges (1: one pass)", lo=1, hi=MAX_SLICES, search=(1, 4, 16, 64)),
    ),
    constraints=(
        Constraint("bq % (16 * warps) == 0", lambda p, chip, call: p["bq"] % (16 * p["warps"]) == 0),
        threads_fit(lambda p: 32 * p["warps"], "32 * warps threads"),
        Constraint.on_call_expr(f"(bq + 2 * stages * bk) * (head_dim + {SMEM_PAD}) * {ITEMSIZE_EXPR} "
                                "<= chip.threadgroup_memory"),
        Constraint.on_call_expr("head_dim % 16 == 0"),
        Constraint.on_call_expr("bq // (16 * warps) * (3 * head_dim // 4 + bk // 2) <= 160",
                                "query fragments, scores and outputs in registers"),
        Constraint.on_call_expr("dtype in {f16, bf16}", "tensor-core MMA"),
        CAUSAL_ALIGNMENT,
    ),
)

CUDA_DECODE = Family(
    op="attention", backend="cuda", name="decode",
    doc="Single-pass decode attention on CUDA cores: one block per (KV head or query head, "
        "batch) covers every key; groups of `key_lanes` lanes take keys in turn, warps merge "
        "their partial softmaxes in shared memory.",
    params=(Param("warps", "int", "warps splitting the keys", allowed=(1, 2, 4, 8, 16, 32)),
            _key_lanes, _pack_gqa, SCALE_AT),
    constraints=_decode_constraints,
)

CUDA_DECODE_SPLIT = Family(
    op="attention", backend="cuda", name="decode_split",
    doc="Split-KV decode attention: up to `blocks` blocks per head each reduce a slice of the "
        "keys to a partial softmax, so long caches fill the GPU; a second kernel merges them.",
    params=(
        Param("blocks", "int", "slices of the key sequence (at most; each slice a multiple of "
              "the block's key groups)", lo=2, hi=MAX_SLICES, search=(8, 16, 32, 64, 128, 256)),
        Param("warps", "int", "warps per block", allowed=(1, 2, 4, 8)),
        _key_lanes, _pack_gqa, SCALE_AT,
    ),
    constraints=_decode_constraints,
)

CUDA_ATTENTION_FAMILIES: tuple[Family, ...] = (CUDA_FLASH, CUDA_DECODE, CUDA_DECODE_SPLIT,
                                               builtin("attention", "cuda"))
