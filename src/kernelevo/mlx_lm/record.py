"""The call shapes of a real model, as a tuning workload: one prefill and one decode step of
the patched model, recorded as they are built (`kernelevo tune --model DIR`)."""

from __future__ import annotations

from collections import Counter
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..tune.workloads import HELD_OUT_TOKENS, AttentionShape, MatmulShape, Workload, check_shape
from .models import build_model, resolve_source
from .parity import vocab_size
from .patching import Call, is_patched, patch, recording


def record_calls(model, prompt_tokens: int = 512, seed: int = 0) -> dict[str, list[Call]]:
    """The calls the patched model builds for a prompt of `prompt_tokens` random tokens
    (prefill) and for the next token (decode), in order. The model is patched for the
    recording unless it already is."""
    from mlx_lm.models.cache import make_prompt_cache

    prompt = mx.array(np.random.default_rng(seed).integers(0, vocab_size(model), prompt_tokens),
                      dtype=mx.int32)
    cache = make_prompt_cache(model)
    phases = {}
    with nullcontext() if is_patched(model) else patch(model):
        for phase, tokens in (("prefill", prompt[None]), ("decode", prompt[None, -1:])):
            with recording() as recorder:
                logits = model(tokens, cache=cache)
            mx.eval(logits)
            phases[phase] = [c for c in recorder.calls if c.op in ("matmul", "attention")]  # what tune times
    return phases


def shape_of(call: Call, label: str) -> MatmulShape | AttentionShape:
    f = call.features
    if call.op == "matmul":
        return MatmulShape(f["M"], f["N"], f["K"], f["dtype"], f["batch"], f["transpose_b"], label=label)
    # The tuner times masks as "none" or "causal": a mask array (a sliding window's, or a
    # padded batch's) is timed as the causal mask of the same lengths.
    mask = f["mask"] if f["mask"] in ("none", "causal") else ("causal" if f["q_len"] > 1 else "none")
    return AttentionShape(f["batch"], f["heads"], f["kv_heads"], f["q_len"], f["kv_len"], f["head_dim"],
                          f["dtype"], mask, f["softcap"], f["window"], label=label)


def workload_from_calls(name: str, phases: dict[str, list[Call]], description: str) -> Workload:
    """One shape per distinct call (in order of first use), labelled with its phase and how
    often one pass makes it: the training set. Held out: the same layers at other token
    counts (HELD_OUT_TOKENS), decode at twice the context, prefill at half the length."""
    shapes, seen = [], set()
    for phase, calls in phases.items():
        for shape, n in Counter(shape_of(c, "") for c in calls).items():
            if shape not in seen:
                seen.add(shape)
                shapes.append(replace(shape, label=f"{name} {phase}: {shape} (x{n} per pass)"))
    held_out = []
    for shape in shapes:
        if isinstance(shape, MatmulShape):
            others = [replace(shape, M=m) for m in HELD_OUT_TOKENS]
        elif shape.q_len == 1:
            others = [replace(shape, kv_len=2 * shape.kv_len)]
        else:
            others = [replace(shape, q_len=max(1, shape.q_len // 2), kv_len=max(1, shape.kv_len // 2))]
        for other in others:
            if other not in seen:
                seen.add(other)
                held_out.append(replace(other, label=f"{name} held out: {other}"))
    for shape in shapes + held_out:  # a model's calls are sizes like any shapes file's
        try:
            check_shape(shape)
        except ValueError as error:
            raise ValueError(f"{name}: the call {shape} cannot be tuned: {error}") from None
    return Workload(name, description, tuple(shapes), tuple(held_out))


def workload_from_model_dir(path: Path | str, prompt_tokens: int = 512) -> Workload:
    """The matmul and attention calls of one real forward pass — a prefill of `prompt_tokens`
    tokens and one decode step — of the mlx-lm model in `path` (its weights, or random ones
    where the directory has none), as a tuning workload. Raises ValueError for a directory
    that is not an mlx-lm model."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory")
    source = resolve_source(path)
    model = build_model(source, dtype=None if source.weights_dir else "bf16")
    phases = record_calls(model, prompt_tokens)
    total = sum(len(c) for c in phases.values())
    workload = workload_from_calls(
        source.name, phases,
        f"{source.description}: the {total} calls of a {prompt_tokens}-token prefill and one "
        f"decode step, recorded through kernelevo.mlx_lm")
    return replace(workload, source=f"--model {path}")
