"""`kernelevo bench-model`: an mlx-lm model's prompt and generation tokens/s, stock MLX
against kernelevo-patched, in one process. cli.py registers it into its app; the helpers of
cli.py are imported when the command runs (under `python -m kernelevo.cli` the app lives in
__main__, so nothing here may import cli.py at import time)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table



def register(app: typer.Typer) -> None:
    app.command("bench-model")(bench_model)


def bench_model(model: str = typer.Argument(..., help="a preset (e.g. qwen3-0.6b), a config.json, or an mlx-lm model directory"),
                prompt_tokens: int = typer.Option(512, "--prompt-tokens", "-p", help="prompt length P"),
                generation_tokens: int = typer.Option(128, "--generation-tokens", "-g", help="tokens generated G"),
                rounds: int = typer.Option(5, help="interleaved stock/patched rounds timed (after a warm-up)"),
                dtype: Optional[str] = typer.Option(None, help="f32, f16 or bf16 (default: bf16 for random weights, "
                                                           "the weights' own otherwise)"),
                seed: int = typer.Option(0, help="seed of the random weights and the prompt"),
                profile: bool = typer.Option(True, help="take a decode token apart: the patched ops' share"),
                wait: bool = typer.Option(True, help="before each run, wait (up to a minute) until other "
                                                     "processes use < 10% of the machine"),
                plot: Optional[Path] = typer.Option(None, help="write a PNG of the rounds and the token's parts"),
                json_path: Optional[Path] = typer.Option(None, "--json", help="write every run's figures as JSON")):
    """Time prompt processing and generation through mlx-lm, stock and patched, interleaved."""
    from . import chips
    from .cli import _fail

    try:
        from .mlx_lm import build_model, resolve_source
        from .mlx_lm import bench
        from .mlx_lm.models import parameter_bytes, parameter_count
    except ImportError as error:
        _fail(str(error), 2)
    if prompt_tokens < 1 or generation_tokens < 2 or rounds < 1:
        _fail("--prompt-tokens must be >= 1, --generation-tokens >= 2 and --rounds >= 1", 2)
    try:
        source = resolve_source(model)
        if dtype is None and source.weights_dir is None:
            dtype = "bf16"
        built = build_model(source, dtype=dtype, seed=seed)
    except ValueError as error:
        _fail(str(error), 2)
    chip = chips.detect(chips.default_backend())
    count = parameter_count(built)
    count_text = f"{count / 1e9:.2f} B" if count >= 1e9 else f"{count / 1e6:.2f} M"
    print(f"model    {source.description}: {count_text} parameters, {parameter_bytes(built) / 1e6:.0f} MB")
    print(f"machine  {chip.id} ({chip.name}); prompt {prompt_tokens} tokens, generation "
          f"{generation_tokens}, {rounds} rounds")
    try:
        result = bench.bench_model(built, name=source.name, prompt_tokens=prompt_tokens,
                                   generation_tokens=generation_tokens, rounds=rounds, seed=seed,
                                   profile=profile, wait=wait)
    except RuntimeError as error:
        _fail(str(error))
    _print_result(result, bench)
    if plot is not None:
        print(f"plot: {bench.plot(result, plot)}")
    if json_path is not None:
        json_path.write_text(json.dumps(_as_json(result, bench), indent=1))
        print(f"wrote {json_path}")


def _print_result(result, bench) -> None:
    from .cli import out

    print(result.patch_summary)
    for phase, families in result.kernels.items():
        shown = ", ".join(f"{name} x{n}" for name, n in sorted(families.items()))
        print(f"kernels per {phase} pass: {shown or 'none'}")
    table = Table(title=escape(f"{result.model} {result.dtype}: median [quartiles] over "
                               f"{len(result.pairs)} rounds"), title_justify="left")
    for column in ("", "prompt tok/s", "generation tok/s", "MLX peak MB", "RSS peak MB"):
        table.add_column(column, justify="right" if column else "left")
    for variant in bench.VARIANTS:
        memory = result.spread(variant, "peak_memory_bytes")
        rss = [r.peak_rss_bytes for r in result.runs if r.variant == variant and r.peak_rss_bytes]
        table.add_row(variant, escape(str(result.spread(variant, "prompt_tps"))),
                      escape(str(result.spread(variant, "generation_tps"))),
                      f"{memory.median / 1e6:.0f}", f"{max(rss) / 1e6:.0f}" if rss else "-")
    table.add_row("patched / stock", *(escape(f"{r.median:.2f}x [{r.q1:.2f}, {r.q3:.2f}]")
                                       for r in (result.ratio("prompt_tps"), result.ratio("generation_tps"))), "", "")
    out.print(table)
    if result.profile is None:
        return
    parts = bench.token_breakdown(result)
    calls = ", ".join(f"{n} {op}" for op, n in result.profile.calls.items())
    print(f"a decode token at context {result.profile.context} ({calls} calls), ms "
          f"(patched ops replayed alone on the token's inputs, in one evaluation):")
    for variant in bench.VARIANTS:
        p = parts[variant]
        share = p["patched"] / p["token"]
        print(f"  {variant:8s} token {p['token'] * 1e3:7.1f}  linears {p['linears'] * 1e3:7.1f}  attention "
              f"{p['attention'] * 1e3:6.2f}  norms and rope {p['norms and rope'] * 1e3:6.2f}  "
              f"rest {p['rest'] * 1e3:6.1f}  (patched ops {share:.0%} of the "
              f"token; graph building {result.profile.build_s[variant] * 1e3:.1f})")
    for name, (n, seconds) in result.profile.unpatched.items():
        print(f"  of the rest, MLX's mx.fast.{name}: {n} calls, {seconds * 1e3:.1f} ms (the same in both)")
    rest = parts["patched"]["rest"]
    if rest > 0:
        print(f"bound: with the patched ops at zero cost a token would still take {rest * 1e3:.1f} ms: "
              f"at most {1 / rest:.1f} tok/s, {parts['stock']['token'] / rest:.1f}x stock")


def _as_json(result, bench) -> dict:
    def spread(s):
        return {"median": s.median, "q1": s.q1, "q3": s.q3, "n": s.n}

    data = {
        "model": result.model, "dtype": result.dtype, "prompt_tokens": result.prompt_tokens,
        "generation_tokens": result.generation_tokens, "check": str(result.check),
        "replaced": result.counts, "summary": result.patch_summary,
        "kernels": {phase: dict(c) for phase, c in result.kernels.items()},
        "runs": [{**vars(r), "prompt_tps": r.prompt_tps, "generation_tps": r.generation_tps}
                 for r in result.runs],
        "median": {v: {w: spread(result.spread(v, w)) for w in ("prompt_tps", "generation_tps", "peak_memory_bytes")}
                   for v in bench.VARIANTS},
        "ratio": {w: spread(result.ratio(w)) for w in ("prompt_tps", "generation_tps")},
    }
    if result.profile is not None:
        data["token_breakdown_s"] = bench.token_breakdown(result)
        data["graph_build_s"] = result.profile.build_s
        data["unpatched_ops_s"] = {name: {"calls": n, "s": t} for name, (n, t) in result.profile.unpatched.items()}
    return data
