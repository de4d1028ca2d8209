"""The prompt an LLM proposer gets: the language, generated from the families' schema; the
chip's facts; the parent program and how it does shape by shape (against the best
configuration known for each shape, and against the roofline where the chip's peaks are
known); the best and a few diverse programs; the most recent rejections with the checker's
messages; and how to answer (a whole program, or SEARCH/REPLACE edits of the parent).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..chips import FACTS, Chip, fact
from ..dsl.reference import tables
from ..tune.score import ProgramScore
from ..tune.workloads import AttentionShape, MatmulShape, Shape
from .archive import Member

LANGUAGE = """\
A .kevo program maps an op call to one kernel configuration. It reads:

    kevo 1
    target {backend}
    chips {chip}

    matmul {{
      let small = M * N * K <= 1 << 25        # optional bindings, before the rules
      when M <= 16 and transpose_b {{ <family> name=value ... }}
      when small and dtype == bf16 {{ <family> name=value ... }}
      else {{ <family> name=value ... }}        # required, last
    }}

    attention {{
      when q_len * gqa <= 8 {{ <family> ... }}
      else {{ <family> ... }}
    }}

Rules are tried in order; the first whose condition holds chooses. Conditions combine the
call's features and chip facts (`chip.cores`) with + - * / // % << >>, comparisons
(== != < <= > >=, no chaining), `x in {{a, b}}`, and/or/not, `a if c else b`, and the
functions below. Every parameter of the family must be given; a value may be an expression
(`threads=chip.cores`). A configuration must meet its family's constraints for every call
its rule can select: a rule choosing `gemv` (M <= 64 on the CPU) must itself say `M <= 64`.
Comments start with #.
"""

REPLY_FORMAT = """\
Answer with ONE of:
1. the whole improved program in a single ```kevo fenced block; or
2. edits of the parent program, each as

<<<<<<< SEARCH
(lines copied exactly from the parent)
=======
(the lines that replace them)
>>>>>>> REPLACE

Say in one or two sentences before it what you changed and why. Keep the program small:
rules that serve ranges of sizes generalise to shapes nobody measured; one rule per
measured shape does not, and programs are judged on shapes held out from you."""


def _bytes(shape: Shape) -> float:
    size = 4 if shape.dtype == "f32" else 2
    if isinstance(shape, MatmulShape):
        return size * shape.batch * (shape.M * shape.K + shape.K * shape.N + shape.M * shape.N)
    assert isinstance(shape, AttentionShape)
    q = shape.batch * shape.heads * shape.q_len * shape.head_dim
    kv = 2 * shape.batch * shape.kv_heads * shape.kv_len * shape.head_dim
    return size * (2 * q + kv)


def roofline_share(shape: Shape, seconds: float | None, chip: Chip) -> float | None:
    """The share of the chip's roofline a time reaches (time the peaks allow / time taken)."""
    if not seconds or not chip.peak_f32_gflops or not chip.bandwidth_gbs:
        return None
    bound = max(shape.flops / (chip.peak_f32_gflops * 1e9), _bytes(shape) / (chip.bandwidth_gbs * 1e9))
    return bound / seconds


def shape_table(score: ProgramScore, best_known: dict[str, tuple[str, float]], chip: Chip) -> str:
    lines = ["| shape | rule | selected configuration | speedup over shipped | best known here | roofline |",
             "|---|---|---|---|---|---|"]
    for s in score.shapes:
        best = best_known.get(s.shape.key)
        best_text = f"{1 / best[1]:.2f}x with `{best[0]}`" if best else "-"
        seconds = s.measurement.median_s if s.measurement is not None and s.measurement.ok else None
        share = roofline_share(s.shape, seconds, chip)
        speed = f"{s.speedup:.2f}x" if s.speedup else s.status
        lines.append(f"| {s.shape} | {s.rule} | `{s.selected}` | {speed} | {best_text} | "
                     + (f"{share:.0%}" if share else "-") + " |")
    return "\n".join(lines)


def chip_facts(chip: Chip) -> str:
    rows = [f"- chip.{f.name} = {fact(chip, f.name)}" for f in FACTS if fact(chip, f.name)]
    return f"{chip.id} ({chip.name})\n" + "\n".join(rows)


def build(backend: str, chip: Chip, parent: Member, parent_score: ProgramScore,
          best_known: dict[str, tuple[str, float]], others: Sequence[Member],
          rejections: Sequence[tuple[str, str]]) -> list[dict]:
    """The chat messages for one proposal."""
    system = ("You improve kernelevo heuristics: small programs in the .kevo language that choose "
              "kernel configurations (tile sizes, threads, engines) for matmul and attention calls "
              "on one chip. Your program is measured on real kernels; its fitness is the geometric-"
              "mean speedup over the shipped heuristics on the training shapes listed, and it is "
              "finally judged on shapes you are not shown.")
    parts = [
        "# The language\n\n" + LANGUAGE.format(backend=backend, chip=chip.id),
        "## Reference (features, chip facts, functions, kernel families)\n\n" + tables((backend,)),
        "# The chip\n\n" + chip_facts(chip),
        f"# The parent program (fitness {parent.score:.3f}x, {parent.rules} rules, "
        f"{parent.configs} distinct configurations)\n\n```kevo\n{parent.text}```",
        "# How the parent does, shape by shape\n\n" + shape_table(parent_score, best_known, chip),
    ]
    if others:
        shown = "\n\n".join(f"Fitness {m.score:.3f}x, {m.rules} rules, {m.configs} configurations:\n"
                            f"```kevo\n{m.text}```" for m in others)
        parts.append("# Other programs (the best so far and different ones)\n\n" + shown)
    if rejections:
        shown = "\n".join(f"- {stage}: {message.strip()[:600]}" for stage, message in rejections)
        parts.append("# Recent proposals that were rejected, and why\n\n" + shown)
    parts.append("# Your answer\n\n" + REPLY_FORMAT)
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n\n".join(parts)}]


def repair(messages: list[dict], reply: str, stage: str, message: str) -> list[dict]:
    """The conversation again, with the checker's located message, asking for a fix."""
    return messages + [
        {"role": "assistant", "content": reply},
        {"role": "user", "content": f"The {stage} step rejected that program:\n\n{message}\n\n"
                                    "Reply with the corrected whole program in one ```kevo block."},
    ]
