"""CUDA attention families (templates in cuda/)."""

from __future__ import annotations

from .gpu_common import SCALE_AT, builtin, itemsize, memory_fit, threads_fit
from .schema import Constraint, Family, Param


def _flash_bytes(p, call) -> int:
    d = call.get("head_dim", 128)
    return (p["bq"] + 2 * p["bk"] * p["stages"]) * d * itemsize(call)


_pack_gqa = Param("pack_gqa", "bool", "one block serves all query heads of a KV head, so K and "
                  "V are read once per KV head")
_decode_calls = (
    Constraint("q_len <= 16", lambda p, chip, call: call["q_len"] <= 16, on_call=True),
    Constraint("head_dim % 8 == 0", lambda p, chip, call: call["head_dim"] % 8 == 0, on_call=True),
)

CUDA_FLASH = Family(
    op="attention", backend="cuda", name="flash",
    doc="Prefill flash attention with tensor-core MMA: a bq-row query tile per block, "
        "keys bk at a time through a `stages`-deep pipeline, online softmax in f32.",
    params=(
        Param("bq", "int", "query rows per block", allowed=(16, 32, 64, 128)),
        Param("bk", "int", "keys per step", allowed=(16, 32, 64, 128)),
        Param("warps", "int", "warps per block (each owns bq / warps query rows)", allowed=(1, 2, 4, 8)),
        Param("stages", "int", "K/V tiles in flight", allowed=(1, 2)),
        Param("skip_masked_blocks", "bool", "skip key blocks the causal or window mask removes "
              "entirely (no: compute and mask them)"),
        SCALE_AT,
    ),
    constraints=(
        Constraint("bq % (16 * warps) == 0", lambda p, chip, call: p["bq"] % (16 * p["warps"]) == 0),
        threads_fit(lambda p: 32 * p["warps"], "32 * warps threads"),
        memory_fit(_flash_bytes, "(bq + 2 * bk * stages) * head_dim * itemsize"),
        Constraint("head_dim % 16 == 0", lambda p, chip, call: call["head_dim"] % 16 == 0,
                   on_call=True),
    ),
)

CUDA_DECODE = Family(
    op="attention", backend="cuda", name="decode",
    doc="Single-pass decode attention: the warps of one block split the keys and merge their "
        "partial softmaxes in shared memory.",
    params=(Param("warps", "int", "warps splitting the keys", allowed=(1, 2, 4, 8, 16, 32)),
            _pack_gqa, SCALE_AT),
    constraints=(threads_fit(lambda p: 32 * p["warps"], "32 * warps threads"), *_decode_calls),
)

CUDA_DECODE_SPLIT = Family(
    op="attention", backend="cuda", name="decode_split",
    doc="Split-KV decode attention: `blocks` blocks per head each reduce a slice of the keys "
        "to a partial softmax; a second kernel merges them.",
    params=(
        Param("blocks", "int", "slices of the key sequence", lo=2, hi=1024,
              search=(8, 16, 32, 64, 128, 256)),
        Param("warps", "int", "warps per block", allowed=(1, 2, 4, 8)),
        _pack_gqa,
        SCALE_AT,
    ),
    constraints=(threads_fit(lambda p: 32 * p["warps"], "32 * warps threads"), *_decode_calls),
)

CUDA_ATTENTION_FAMILIES: tuple[Family, ...] = (CUDA_FLASH, CUDA_DECODE, CUDA_DECODE_SPLIT,
                                               builtin("attention", "cuda"))
