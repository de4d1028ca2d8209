"""A tuning worker whose timings follow a script, for tests of what the tuner decides.

    scripted_worker.py SCRIPT.json

Kernels run and are verified as in the real worker; only the clock is replaced. The time
of a configuration on a shape is `flops / 1e11 * speed(config)`, where speed is 1.0 for
the configuration the shipped heuristics choose and otherwise comes from the script:

    {"speed": {"<name=value ...>": 0.5, ...},   # configurations containing every part
     "search_speed": {...},                       # the same, for search-phase jobs only
     "default": 1.2,                              # any other configuration
     "noise": 0.02,                               # lognormal sigma of every sample
     "aa_ratio": 0.5,                             # what an A/A pair (config == baseline) shows
     "bimodal": ["threads=1"],                    # these flip between 1x and 3x, per sample
     "loaded": false}                             # report every block as run on a busy machine

A key is a set of `name=value` parts joined by '+' (as in faulty_worker.py), or `shape:KEY`
followed by '+' parts to apply to one shape only. The first key that matches wins.
"""

import json
import math
import random
import statistics
import sys

from kernelevo.tune import timing
from kernelevo.tune import worker as real
from kernelevo.tune.measure import shipped_program
from kernelevo import chips

script = json.loads(open(sys.argv[1]).read())
_shipped = shipped_program("cpu", chips.detect("cpu"))
_rng = random.Random(script.get("seed", 0))


def _matches(key: str, config: str, shape_key: str) -> bool:
    parts = key.split("+")
    if parts[0].startswith("shape:"):
        if parts[0][len("shape:"):] != shape_key:
            return False
        parts = parts[1:]
    return all(f" {p} " in f" {config} " for p in parts)


_phase = ["search"]


def speed(config: str, shape) -> float:
    if config == _shipped.select(shape.op, shape.features()).config.to_dsl():
        return 1.0
    tables = ([script.get("search_speed", {})] if _phase[0] == "search" else []) + [script.get("speed", {})]
    for table in tables:
        for key, value in table.items():
            if _matches(key, config, shape.key):
                return value
    return script.get("default", 1.2)


def sample(config: str, shape) -> float:
    t = shape.flops / 1e11 * speed(config, shape)
    if any(_matches(k, config, shape.key) for k in script.get("bimodal", [])):
        t *= _rng.choice((1.0, 3.0))
    return t * math.exp(_rng.gauss(0.0, script.get("noise", 0.0)))


def _summary(samples):
    return timing._summary(list(samples), 1)


def scripted_pair(candidate, baseline, reps=5, warmup=1, patience_s=10.0):
    (c_cfg, shape), (b_cfg, _) = candidate.scripted, baseline.scripted
    cs = [sample(c_cfg, shape) for _ in range(reps)]
    bs = [sample(b_cfg, shape) for _ in range(reps)]
    if c_cfg == b_cfg and "aa_ratio" in script:
        cs = [b * script["aa_ratio"] for b in bs]
    ratios = tuple(c / b for c, b in zip(cs, bs))
    share = 0.6 if script.get("loaded") else 0.0
    load = timing.Load(True, share, share, 0, 0.0)
    return timing.PairedTiming(_summary(cs), _summary(bs), statistics.median(ratios), ratios, load)


class _Tagged:
    """A launch that carries what the script needs to know about it."""

    def __init__(self, launch):
        self.launch = launch
        self.scripted = None

    def __call__(self, after=None):
        return self.launch(after)


_original_launcher = real.Worker.launcher


def _launcher(self, shape, inputs, config_text, backend):
    tagged = _Tagged(_original_launcher(self, shape, inputs, config_text, backend))
    tagged.scripted = (config_text, shape)
    return tagged


_original_measure = real.Worker.measure


def _measure(self, job):
    _phase[0] = job.get("phase", "search")
    return _original_measure(self, job)


real.Worker.launcher = _launcher
real.Worker.measure = _measure
real.time_paired = scripted_pair

if __name__ == "__main__":
    sys.exit(real.main())
