"""Measures this machine's limits, the yardstick the other benchmarks report against:
peak f32 FMA, bf16 dot-product (AVX512-BF16) and AMX bf16 throughput of all cores, and
memory read bandwidth.

    python3 benchmarks/machine_limits.py

Compiles limits.cpp with the system C++ compiler (-O3 -march=native), runs it, prints
the figures and saves them to benchmarks/results/limits-<chip>.json.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def build() -> Path:
    source = HERE / "limits.cpp"
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    binary = Path(tempfile.gettempdir()) / f"kernelevo-limits-{digest}"
    if not binary.exists():
        subprocess.run(["c++", "-O3", "-march=native", "-std=c++17", "-pthread", str(source),
                        "-o", str(binary)], check=True)
    return binary


def measure(threads: int | None = None) -> dict:
    from kernelevo import chips

    chip = chips.detect("cpu")
    args = [str(build())] + ([str(threads)] if threads else [str(chip.cores)])
    limits = json.loads(subprocess.run(args, check=True, capture_output=True, text=True).stdout)
    limits.update(chip=chip.id, cpu=chip.name, isa=list(chip.isa))
    return limits


def load_or_measure() -> dict:
    """The saved limits of this machine's chip, measuring them when there are none."""
    from kernelevo import chips

    path = RESULTS / f"limits-{chips.detect('cpu').id}.json"
    if path.is_file():
        return json.loads(path.read_text())
    return save(measure())


def save(limits: dict) -> dict:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"limits-{limits['chip']}.json").write_text(json.dumps(limits, indent=2) + "\n")
    return limits


def main() -> None:
    limits = save(measure())
    print(f"machine limits on {limits['chip']} ({limits['cpu']}), {limits['threads']} threads")
    print(f"  f32 FMA peak      {limits['f32_fma_gflops']:8.1f} GFLOP/s "
          f"({limits['f32_fma_gflops_one_core']:.1f} on one core)")
    print(f"  bf16 dot peak     {limits['bf16_dot_gflops']:8.1f} GFLOP/s"
          + ("" if limits["bf16_dot_gflops"] else "  (no AVX512-BF16)"))
    print(f"  AMX bf16 peak     {limits['amx_bf16_gflops']:8.1f} GFLOP/s"
          + ("" if limits["amx_bf16_gflops"] else "  (no AMX)"))
    print(f"  memory read       {limits['read_gbs']:8.2f} GB/s "
          f"({limits['read_gbs_one_core']:.2f} on one core)")


if __name__ == "__main__":
    sys.exit(main())
