"""A tuning worker with planted faults, for tests: run as the worker command.

    faulty_worker.py crash=mr=4+nr=64 hang=mr=6+nr=32+threads=1 wrong=mr=8+nr=16

A candidate whose configuration contains every `name=value` of a fault crashes the
process (SIGSEGV), hangs, or returns a result 1.5x too large.
"""

import os
import signal
import sys
import time

import mlx.core as mx

from kernelevo.tune import worker as real
from kernelevo.tune.adapters import ADAPTERS

faults = dict(arg.split("=", 1) for arg in sys.argv[1:])


def planted(kind: str, config: str) -> bool:
    return kind in faults and all(f" {part} " in f" {config} " for part in faults[kind].split("+"))


adapter = ADAPTERS["matmul"]
original_launcher = adapter.launcher


def launcher(shape, inputs, config):
    launch = original_launcher(shape, inputs, config)
    text = config.to_dsl()
    if planted("crash", text):
        os.kill(os.getpid(), signal.SIGSEGV)
    if planted("hang", text):
        time.sleep(3600)
    if planted("wrong", text):
        return lambda after=None: launch(after) * mx.array(1.5, dtype=launch().dtype)
    return launch


adapter.launcher = launcher

if __name__ == "__main__":
    sys.exit(real.main())
