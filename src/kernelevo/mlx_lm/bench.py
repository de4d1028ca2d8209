"""Prompt and generation tokens/s of an mlx-lm model, stock MLX against patched, in one
process: interleaved rounds through mlx-lm's own generation path (`generate_step`, KV
cache), after a logits check; which kernels ran; what share of a token the patched ops are.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import replace
from pathlib import Path
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .parity import LogitsCheck, check_logits, vocab_size
from .patching import Call, linear, patch, recording, rms_norm, rope

VARIANTS = ("stock", "patched")


@dataclass(frozen=True)
class Run:
    """One generation: P prompt tokens, then G tokens; times as mlx-lm's stream_generate
    takes them (prompt: until the first token; generation: the G - 1 tokens after it)."""

    variant: str
    prompt_tokens: int
    prompt_s: float
    generated_tokens: int  # after the first
    generation_s: float
    peak_memory_bytes: int  # MLX's allocator (weights, activations, KV cache)
    peak_rss_bytes: int | None = None  # the process (kernelevo's own workspace too); Linux only
    load: float = 0.0  # share of the machine other processes used just before the run
    load_during: float | None = None  # ... and while it ran (Linux)

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_s

    @property
    def generation_tps(self) -> float:
        return self.generated_tokens / self.generation_s if self.generation_s > 0 else float("nan")


def generate(model: nn.Module, prompt: mx.array, generation_tokens: int, variant: str = "") -> Run:
    """One generation through mlx_lm.generate.generate_step (greedy), timed."""
    from mlx_lm.generate import generate_step, generation_stream

    mx.synchronize()
    mx.reset_peak_memory()
    rss_reset = _reset_peak_rss()
    others = _OthersProbe()
    tic = time.perf_counter()
    prompt_s, n = 0.0, 0
    for n, _ in enumerate(generate_step(prompt, model, max_tokens=generation_tokens)):
        if n == 0:
            prompt_s = time.perf_counter() - tic
            tic = time.perf_counter()
    generation_s = time.perf_counter() - tic
    # generate_step queues one more step before it stops: let it finish outside the timing.
    mx.synchronize(generation_stream)
    return Run(variant, int(prompt.size), prompt_s, n, generation_s, int(mx.get_peak_memory()),
               _status_bytes("VmHWM") if rss_reset else None, load_during=others.share())


class _OthersProbe:
    """The share of the machine's CPU time that other processes used since it was made:
    all CPUs' busy time (/proc/stat) less this process's own (Linux; None elsewhere)."""

    def __init__(self):
        self.start = self._read()

    @staticmethod
    def _read():
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        own = os.times()
        return sum(fields) - fields[3] - fields[4], sum(fields), own.user + own.system

    def share(self) -> float | None:
        end = self._read()
        if self.start is None or end is None or end[1] <= self.start[1]:
            return None
        hz = os.sysconf("SC_CLK_TCK")
        busy_s, total_s = (end[0] - self.start[0]) / hz, (end[1] - self.start[1]) / hz
        return max(0.0, busy_s - (end[2] - self.start[2])) / total_s


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # the peak resident size restarts from now
        return True
    except OSError:
        return False


def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def background_load(seconds: float = 0.3) -> float:
    """Share of the machine's CPU time used over a short window while this process sleeps,
    i.e. by others (Linux; 0 where /proc/stat cannot be read)."""
    def busy():
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields) - fields[3] - fields[4], sum(fields)

    try:
        b0, t0 = busy()
        time.sleep(seconds)
        b1, t1 = busy()
    except (OSError, ValueError, IndexError):
        return 0.0
    return (b1 - b0) / max(1, t1 - t0)


def wait_for_quiet(limit: float = 0.1, max_wait_s: float = 60.0) -> float:
    """The machine may be shared: waits (up to max_wait_s) until others use less than
    `limit` of it, and returns the share they used last (recorded with the run)."""
    deadline = time.monotonic() + max_wait_s
    while True:
        load = background_load()
        if load < limit or time.monotonic() > deadline:
            return load


@dataclass(frozen=True)
class Spread:
    """Median and quartiles of a set of samples."""

    median: float
    q1: float
    q3: float
    n: int

    @classmethod
    def of(cls, values) -> "Spread":
        values = [v for v in values if v == v]
        if not values:
            return cls(float("nan"), float("nan"), float("nan"), 0)
        q1, q3 = np.percentile(values, [25, 75])
        return cls(statistics.median(values), float(q1), float(q3), len(values))

    def __str__(self) -> str:
        return f"{figure(self.median)} [{figure(self.q1)}, {figure(self.q3)}]"


def figure(x: float) -> str:
    """A figure with three significant digits, without exponents."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


@dataclass
class Profile:
    """One decode token taken apart: the patched ops alone, replayed on the token's own
    inputs in one evaluation (kernelevo's and, on the same inputs, MLX's), against the
    whole token; and the time to build a token's graph in Python."""

    context: int  # tokens in the KV cache
    calls: Counter  # op -> calls per token
    replay_s: dict  # (variant, op) -> seconds per token, median
    build_s: dict  # variant -> seconds to build one token's graph (no evaluation)
    # MLX ops neither variant replaces, replayed the same way: name -> (calls, seconds)
    unpatched: dict = field(default_factory=dict)


@dataclass
class BenchResult:
    model: str
    dtype: str
    prompt_tokens: int
    generation_tokens: int
    check: LogitsCheck
    runs: list[Run]
    patch_summary: str
    counts: dict
    kernels: dict  # "prefill" / "decode" -> Counter of "op family" -> calls per forward pass
    profile: Profile | None = None
    pairs: list[tuple[Run, Run]] = field(default_factory=list)  # (stock, patched) per round

    def spread(self, variant: str, what: str) -> Spread:
        return Spread.of(getattr(r, what) for r in self.runs if r.variant == variant)

    def ratio(self, what: str) -> Spread:
        """patched / stock tokens/s, per round (> 1: patched faster)."""
        return Spread.of(getattr(p, what) / getattr(s, what) for s, p in self.pairs)

    def token_s(self, variant: str) -> float:
        return 1.0 / self.spread(variant, "generation_tps").median


def bench_model(model: nn.Module, *, name: str, prompt_tokens: int = 512,
                generation_tokens: int = 128, rounds: int = 5, seed: int = 0,
                profile: bool = True, wait: bool = True, log=print) -> BenchResult:
    """Checks the logits, then times `rounds` interleaved stock/patched generations (after
    a short warm-up of each; the order alternates per round), records which kernels ran
    and, with `profile`, takes a decode token apart. With `wait`, each run waits (up to a
    minute) until other processes use < 10% of the machine, and records what they used."""
    if generation_tokens < 2:
        raise ValueError("generation needs at least 2 tokens (the first one ends the prompt's time)")
    check = check_logits(model)
    log(str(check))
    if not check.ok:
        raise RuntimeError(f"the patched model's logits are wrong ({check}); nothing was timed")
    vocab = vocab_size(model)
    prompt = mx.array(np.random.default_rng(seed).integers(0, vocab, prompt_tokens), dtype=mx.int32)

    handle = patch(model)
    summary, counts = handle.summary(), handle.counts
    kernels = kernel_census(model, prompt)
    handle.unpatch()

    def run(variant: str, tokens: mx.array = prompt, generated: int = generation_tokens) -> Run:
        load = wait_for_quiet() if wait else 0.0
        if variant == "stock":
            return replace(generate(model, tokens, generated, variant), load=load)
        with patch(model):
            return replace(generate(model, tokens, generated, variant), load=load)

    for variant in VARIANTS:  # warm-up (short): first calls, heuristics, allocations
        run(variant, prompt[:16], 4)
    runs, pairs = [], []
    for i in range(rounds):
        order = VARIANTS if i % 2 == 0 else VARIANTS[::-1]
        done = {v: run(v) for v in order}
        runs += [done[v] for v in order]
        pairs.append((done["stock"], done["patched"]))
        log(f"round {i + 1}/{rounds}: " + ", ".join(
            f"{v} prompt {done[v].prompt_tps:.1f} tok/s, generation {done[v].generation_tps:.2f} tok/s"
            f" (others' load before {done[v].load:.0%}, during {_share(done[v].load_during)})"
            for v in VARIANTS))
    result = BenchResult(name, check.dtype, prompt_tokens, generation_tokens, check, runs, summary,
                         counts, kernels, pairs=pairs)
    if profile:
        result.profile = profile_token(model, prompt)
    return result


def _share(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def kernel_census(model: nn.Module, prompt: mx.array) -> dict:
    """Calls per kernel family in one prefill of the prompt and one decode step (the model
    must be patched)."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    census = {}
    for phase, tokens in (("prefill", prompt[None]), ("decode", prompt[None, -1:])):
        with recording() as recorder:
            logits = model(tokens, cache=cache)
        mx.eval(logits)
        census[phase] = recorder.families()
    return census


def _mlx_call(call: Call) -> mx.array:
    """The recorded call as the stock model makes it, with MLX's ops."""
    from ..ops.gpu import apply_epilogue, mlx_attention
    from ..features import Epilogue

    if call.op == "matmul":
        x, w = call.args
        bias, activation = call.kwargs["bias"], call.kwargs["activation"]
        y = x @ w.T
        return apply_epilogue(y, Epilogue(bias=bias is not None, activation=activation or "none"), bias, None)
    if call.op == "rms_norm":
        return mx.fast.rms_norm(*call.args, call.kwargs["eps"])
    if call.op == "rope":
        return mx.fast.rope(*call.args, **call.kwargs)
    q, k, v = call.args
    return mlx_attention(q, k, v, scale=call.kwargs["scale"], mask=call.kwargs["mask"],
                         softcap=call.kwargs["softcap"], window=None)


def _ke_call(call: Call) -> mx.array:
    from ..ops import attention

    if call.op == "matmul":
        x, w = call.args
        return linear(x, w, call.kwargs["bias"], call.kwargs["activation"])
    if call.op == "rms_norm":
        return rms_norm(*call.args, call.kwargs["eps"])
    if call.op == "rope":
        return rope(*call.args, **call.kwargs)
    q, k, v = call.args
    return attention(q, k, v, scale=call.kwargs["scale"], mask=call.kwargs["mask"],
                     softcap=call.kwargs["softcap"])


def _median_time(fn, reps: int) -> float:
    fn()
    samples = []
    for _ in range(reps):
        tic = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - tic)
    return statistics.median(samples)


def profile_token(model: nn.Module, prompt: mx.array, reps: int = 15) -> Profile:
    """Times one decode token's patched calls alone: each op kind replayed on the token's own
    inputs, all calls built first and evaluated in one mx.eval (as in the model's own
    evaluation), with kernelevo's ops and with MLX's; and the Python time to build one
    token's graph, stock and patched."""
    from mlx_lm.models.cache import make_prompt_cache

    wait_for_quiet()
    cache = make_prompt_cache(model)
    mx.eval(model(prompt[None], cache=cache))
    token = prompt[None, -1:]
    with patch(model):
        with recording(keep_arguments=True) as recorder, _recording_mlx_fast(UNPATCHED) as fast:
            logits = model(token, cache=cache)
        mx.eval(logits, [c.args for c in recorder.calls], [a for _, a, _ in fast])
    calls = recorder.calls
    unpatched = {}
    for name in UNPATCHED:
        mine = [(getattr(mx.fast, name), a, k) for n, a, k in fast if n == name]
        if mine:
            unpatched[name] = (len(mine), _median_time(lambda: mx.eval([f(*a, **k) for f, a, k in mine]), reps))
    replay = {}
    for op in PATCHED_OPS:
        mine = [c for c in calls if c.op == op]
        for variant, build in (("stock", _mlx_call), ("patched", _ke_call)):
            replay[(variant, op)] = _median_time(lambda: mx.eval([build(c) for c in mine]), reps)
    build = {}
    for variant in VARIANTS:
        handle = patch(model) if variant == "patched" else None
        try:
            build[variant] = _median_time(lambda: _build_only(model, token, cache), reps)
        finally:
            if handle is not None:
                handle.unpatch()
    return Profile(int(prompt.size), Counter(c.op for c in calls), replay, build, unpatched)


UNPATCHED = ("rms_norm", "layer_norm", "rope")  # mx.fast ops a token spends time in
PATCHED_OPS = ("matmul", "attention", "rms_norm", "rope")  # replayed, stock and patched
#: the parts of a decode token: (name, the patched ops replayed for it)
TOKEN_PARTS = (("linears", ("matmul",)), ("attention", ("attention",)),
               ("norms and rope", ("rms_norm", "rope")))


@contextmanager
def _recording_mlx_fast(names):
    """Records the calls of mx.fast functions (models look them up at call time)."""
    calls, originals = [], {name: getattr(mx.fast, name) for name in names}

    def recorder(name, fn):
        def wrapped(*args, **kwargs):
            calls.append((name, args, kwargs))
            return fn(*args, **kwargs)
        return wrapped

    for name, fn in originals.items():
        setattr(mx.fast, name, recorder(name, fn))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(mx.fast, name, fn)


def _build_only(model, token, cache):
    """Builds a decode token's graph without evaluating it, then puts the caches' attributes
    back (their arrays keep the unevaluated update, which nothing evaluates afterwards)."""
    saved = [dict(vars(c)) for c in cache]
    model(token, cache=cache)
    for c, state in zip(cache, saved):
        vars(c).clear()
        vars(c).update(state)


def token_breakdown(result: BenchResult) -> dict[str, dict[str, float]]:
    """Seconds per decode token, per variant: the patched ops replayed alone (linears,
    attention) and the rest of the token (norms, rotary embedding, cache updates, the other
    MLX ops, graph building not hidden by mlx-lm's pipelining)."""
    p = result.profile
    parts = {}
    for variant in VARIANTS:
        token = result.token_s(variant)
        parts[variant] = {"token": token}
        for name, ops in TOKEN_PARTS:
            parts[variant][name] = sum(p.replay_s.get((variant, op), 0.0) for op in ops)
        patched = sum(parts[variant][name] for name, _ in TOKEN_PARTS)
        parts[variant]["patched"] = patched
        parts[variant]["rest"] = max(token - patched, 0.0)
    return parts


def plot(result: BenchResult, path) -> "Path":
    """Prompt and generation tokens/s per round (stock and patched) and, when profiled, a
    decode token taken apart. Writes a PNG."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    panels = 3 if result.profile else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.6))
    colors = {"stock": "#9a9a9a", "patched": "#3b7dd8"}
    for ax, (what, title) in zip(axes, (("prompt_tps", f"prompt, {result.prompt_tokens} tokens"),
                                        ("generation_tps", f"generation, {result.generation_tokens} tokens"))):
        for i, variant in enumerate(VARIANTS):
            values = [getattr(r, what) for r in result.runs if r.variant == variant]
            ax.scatter([i] * len(values), values, color=colors[variant], alpha=0.6, s=18)
            s = result.spread(variant, what)
            ax.hlines(s.median, i - 0.25, i + 0.25, color=colors[variant], linewidth=2)
            ax.annotate(figure(s.median), (i + 0.28, s.median), fontsize=8, va="center")
        r = result.ratio(what)
        ax.set_xticks([0, 1], list(VARIANTS))
        ax.set_xlim(-0.6, 1.9)
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{title}\npatched/stock {r.median:.2f}x [{r.q1:.2f}, {r.q3:.2f}]", fontsize=9)
        ax.set_ylim(bottom=0)
    if result.profile:
        ax = axes[2]
        parts = token_breakdown(result)
        bottoms = [0.0, 0.0]
        for part, color in (("linears", "#3b7dd8"), ("attention", "#e3a23b"), ("norms and rope", "#5fb36b"),
                            ("rest", "#c9c9c9")):
            values = [parts[v][part] * 1e3 for v in VARIANTS]
            ax.bar([0, 1], values, bottom=bottoms, color=color, label=part, width=0.6)
            bottoms = [b + v for b, v in zip(bottoms, values)]
        ax.set_xticks([0, 1], list(VARIANTS))
        ax.set_ylabel("ms per decode token")
        ax.set_title(f"a decode token at context {result.profile.context}", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"{result.model} ({result.dtype}): stock MLX vs kernelevo-patched, "
                 f"{len(result.pairs)} rounds", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
