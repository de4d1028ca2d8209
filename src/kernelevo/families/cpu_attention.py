"""The CPU backend's attention families (kernels in cpp/attention/cpu_attention.cpp).

All three compute softmax(mask(softcap(scale * q k^T))) v with f32 statistics and never
hold more than one block of scores per task; they differ in how the work is cut.
"""

from __future__ import annotations

from .cpu_matmul import _threads, _threads_fit
from .gpu_common import SCALE_AT
from .schema import Constraint, Family, Param

#: the most query positions the decode families take (cpu_attention.h: kDecodeMaxQueries)
DECODE_MAX_QUERIES = 16

_pack_gqa = Param(
    "pack_gqa", "bool",
    "one task holds the query rows of every query head that shares a key/value head, so "
    "each key and value block is read once for all of them (no: one task per query head)")

_few_queries = Constraint.on_call_expr(f"q_len <= {DECODE_MAX_QUERIES}")

CPU_FLASH = Family(
    op="attention", backend="cpu", name="flash",
    doc="Prefill: tiles of bq query rows against blocks of bk keys with an online softmax "
        "(scores kept keys x queries, queries as vector lanes); causal and window masks "
        "skip the blocks no row of a tile can see.",
    params=(
        Param("bq", "int", "query rows per tile (with pack_gqa, rows of all the grouped heads)",
              lo=16, hi=512, multiple_of=16, search=(16, 32, 48, 64, 96, 128)),
        Param("bk", "int", "keys per block (scores held per task: bk x bq floats)",
              lo=1, hi=1024, search=(24, 48, 64, 96, 128, 192)),
        _threads,
        _pack_gqa,
        Param("skip_masked_blocks", "bool",
              "visit only the keys some row of the tile can see (no: every key, masked "
              "element-wise)"),
        SCALE_AT,
        Param("dot", "choice",
              "what multiplies: f32 FMAs on the vector units (any dtype), or bf16 tile "
              "products with f32 accumulation on AMX (bf16 inputs, chips with AMX-BF16)",
              choices=("fma", "amx")),
    ),
    constraints=(
        _threads_fit,
        Constraint("bq % 32 == 0 and bk % 32 == 0 when dot=amx (pairs of 16-row tiles)",
                   lambda p, chip, call: p["dot"] != "amx" or (p["bq"] % 32 == 0 and p["bk"] % 32 == 0)),
        Constraint("chip.amx == 1 when dot=amx (a CPU with AMX-BF16)",
                   lambda p, chip, call: p["dot"] != "amx" or chip.cores == 0 or chip.has_amx == 1),
        Constraint.on_call_expr("dot != amx or dtype == bf16", "dtype bf16 when dot=amx: AMX multiplies bf16"),
    ),
)

CPU_DECODE = Family(
    op="attention", backend="cpu", name="decode",
    doc="Few queries (LLM decode): the query rows of a unit stream its keys and values once, "
        "bk keys per softmax step; units (batch x heads) run in parallel.",
    params=(
        Param("bk", "int", "keys per online-softmax step", lo=1, hi=1024,
              search=(16, 32, 64, 128, 256)),
        _threads,
        _pack_gqa,
    ),
    constraints=(_threads_fit, _few_queries),
)

CPU_DECODE_SPLIT = Family(
    op="attention", backend="cpu", name="decode_split",
    doc="decode with each unit's key sequence split into `blocks` chunks that run in "
        "parallel; the chunks' partial softmaxes are merged at the end. For few units "
        "(small batch, few key/value heads) and long sequences.",
    params=(
        Param("bk", "int", "keys per online-softmax step", lo=1, hi=1024,
              search=(16, 32, 64, 128, 256)),
        Param("blocks", "int", "chunks each unit's key sequence is split into", lo=2, hi=1024,
              search=(2, 4, 8, 16, 32, 64)),
        _threads,
        _pack_gqa,
    ),
    constraints=(_threads_fit, _few_queries),
)

CPU_ATTENTION_FAMILIES: tuple[Family, ...] = (CPU_FLASH, CPU_DECODE, CPU_DECODE_SPLIT)
