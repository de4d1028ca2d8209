"""The process that runs candidate kernels for a tuning run.

A kernel that crashes or hangs takes this process down, not the run: the tuner
(tune/pool.py) sees the death or the timeout, records it and starts a new worker. Jobs
and results are JSON lines on stdin/stdout; everything else this process prints goes to
stderr. Timing happens here, in the process that runs the kernel.

    python -m kernelevo.tune.worker
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import traceback

import mlx.core as mx

from ..config import ConfigError, KernelConfig
from ..dsl import DSLError
from .adapters import ADAPTERS
from ..families import MLX_BUILTIN
from .timing import time_one, time_paired
from .correctness import compare
from .workloads import AttentionShape, MatmulShape

SHAPES = {"matmul": MatmulShape, "attention": AttentionShape}


def use_backend(backend: str) -> None:
    """Candidates, the baseline and MLX's op all run on the device of the tuned backend."""
    mx.set_default_device(mx.cpu if backend == "cpu" else mx.gpu)


class Worker:
    def __init__(self) -> None:
        self._inputs: dict[tuple, tuple] = {}  # the timing inputs, kept across jobs

    def inputs(self, shape, seed: int):
        key = (shape.op, shape.key, seed)
        if key not in self._inputs:
            if len(self._inputs) > 4:
                self._inputs.clear()
            self._inputs[key] = ADAPTERS[shape.op].inputs(shape, seed)
        return self._inputs[key]

    def launcher(self, shape, inputs, config_text: str, backend: str):
        use_backend(backend)
        adapter = ADAPTERS[shape.op]
        if config_text == MLX_BUILTIN:
            launch = adapter.builtin(shape, inputs)
            if launch is None:
                raise ValueError(f"MLX has no built-in {shape.op} for {shape}")
            return launch
        config = KernelConfig.parse(config_text, shape.op, backend)
        return adapter.launcher(shape, inputs, config)

    def verify(self, shape, config_text: str, backend: str, seed: int) -> tuple[bool, float, str]:
        """Fresh inputs at the shape and at an odd-sized neighbour, against float64."""
        use_backend(backend)
        adapter, worst = ADAPTERS[shape.op], 0.0
        for i, variant in enumerate(adapter.variants(shape)):
            inputs = adapter.inputs(variant, seed + 7919 * (i + 1))
            try:
                launch = self.launcher(variant, inputs, config_text, backend)
            except ConfigError:
                if i == 0:
                    raise
                continue  # the configuration does not apply at the odd neighbour (a call constraint)
            out = launch(None)
            check = compare(out, adapter.reference(variant, inputs), shape.dtype)
            worst = max(worst, check.error)
            if not check.ok:
                return False, check.error, f"wrong result at {variant}: {check.reason}"
        return True, worst, ""

    def measure(self, job: dict) -> dict:
        """Verifies (unless told not to) and times one configuration, paired with a baseline
        when the job names one (the baseline may be the configuration itself: an A/A
        control)."""
        shape = SHAPES[job["op"]](**job["shape"])
        backend, config, baseline = job["backend"], job["config"], job.get("baseline")
        try:
            error = None
            if job.get("verify", True) and config != MLX_BUILTIN:
                ok, error, reason = self.verify(shape, config, backend, job["seed"])
                if not ok:
                    return {"status": "wrong", "reason": reason, "error": error}
            inputs = self.inputs(shape, job["seed"])
            launch = self.launcher(shape, inputs, config, backend)
            if baseline is None:
                t = time_one(launch, job["reps"], job["warmup"])
                return {"status": "ok", "error": error, **_timing(t), "pid": os.getpid()}
            base = self.launcher(shape, inputs, baseline, backend)
            t = time_paired(launch, base, job["reps"], job["warmup"],
                            patience_s=job.get("patience_s", 10.0))
        except (ConfigError, DSLError, ValueError, RuntimeError, MemoryError) as err:
            return {"status": "error", "reason": f"{type(err).__name__}: {err}"}
        return {"status": "ok", "error": error, **_timing(t.candidate),
                **{f"baseline_{k}": v for k, v in _timing(t.baseline).items()},
                "ratio": t.ratio, "ratios": list(t.ratios), "bimodal": t.bimodal,
                "load": dataclasses.asdict(t.load), "pid": os.getpid()}


def _timing(t) -> dict:
    return {"median_s": t.median_s, "q1_s": t.q1_s, "q3_s": t.q3_s, "min_s": t.min_s,
            "samples": list(t.samples), "launches": t.launches_per_sample}


def main() -> int:
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr  # only results go to the protocol stream
    worker = Worker()
    protocol.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        job = json.loads(line)
        try:
            result = worker.measure(job)
        except Exception as err:  # noqa: BLE001 — report, never die on a Python error
            result = {"status": "error", "reason": f"{type(err).__name__}: {err}",
                      "traceback": traceback.format_exc(limit=5)}
        protocol.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
