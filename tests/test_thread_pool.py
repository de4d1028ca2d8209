"""The CPU kernels' thread pool (cpp/common/threadpool.cpp): helpers that spin a while and
then sleep must never miss a call, whichever way they wait. Each case runs in a fresh
process (the spin time is read once), with calls that come back to back, after pauses
longer than the spin (the helpers asleep), and from several Python threads at once."""

import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import random, threading, time
import mlx.core as mx
import numpy as np
import kernelevo as ke

rng = np.random.default_rng(0)
gemm = "gemm mc=32 nc=64 kc=64 mr=4 nr=16 threads=2 split={split} engine=fma pack_a=yes epilogue=fused"
def case(M, N, K, split):
    a = rng.standard_normal((M, K)).astype(np.float32)
    b = rng.standard_normal((K, N)).astype(np.float32)
    return mx.array(a), mx.array(b), a.astype(np.float64) @ b.astype(np.float64), gemm.format(split=split)

cases = [case(37, 83, 71, "m"), case(64, 130, 129, "n"), case(5, 300, 64, "n")]
def check(a, b, want, config):
    got = np.array(ke.matmul(a, b, config=config), dtype=np.float64)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 1e-5, (config, err)

pauses = random.Random(1)
for i in range(300):
    check(*cases[i % len(cases)])
    if i % 10 == 0:
        time.sleep(pauses.choice([0.0, 0.0005, 0.003]))  # shorter and longer than the spin

def many(seed):
    for i in range(60):
        check(*cases[(i + seed) % len(cases)])
threads = [threading.Thread(target=many, args=(s,)) for s in range(3)]
for t in threads: t.start()
for t in threads: t.join()
print("ok")
"""


@pytest.mark.parametrize("spin_us", ["0", "1", "200", "not-a-number"])
def test_every_call_completes_and_is_right_however_the_helpers_wait(spin_us):
    env = {**os.environ, "KERNELEVO_SPIN_US": spin_us}
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                            timeout=240)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
