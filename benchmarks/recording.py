"""Writing one benchmark's section of RESULTS.md (the others are kept), and the line that
says which machine a result came from. Shared by the benchmarks of tuning and evolution."""

from __future__ import annotations

import platform
import re
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"


def record_section(title: str, text: str) -> None:
    """Replaces the section `## {title}` of RESULTS.md, or appends it."""
    current = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"\n## {re.escape(title)}\n.*?(?=\n## |\Z)", re.S)
    block = f"\n## {title}\n\n{text.strip()}\n"
    current = pattern.sub(lambda m: block, current) if pattern.search(current) else current.rstrip() + "\n" + block
    RESULTS.write_text(current)


def machine_line(backend: str = "cpu") -> str:
    import mlx.core as mx

    from kernelevo import chips

    chip = chips.detect(backend)
    isa = f"; {', '.join(chip.isa)}" if chip.isa else ""
    return (f"{chip.name} ({chip.id}{isa}), {chip.cores} cores; mlx {mx.__version__}, Python "
            f"{platform.python_version()}; {time.strftime('%Y-%m-%d %H:%M')}")
