"""mlx-lm models on the CPU, stock MLX against kernelevo-patched: prompt and generation
tokens/s through mlx-lm's generate_step (kernelevo.mlx_lm.bench, what `kernelevo
bench-model` runs), random weights, one process, interleaved rounds.

    OPENBLAS_THREAD_TIMEOUT=4 OMP_WAIT_POLICY=PASSIVE flock /tmp/kernelevo-bench.lock \\
        python3 benchmarks/bench_model.py qwen3-0.6b --rounds 5
    python3 benchmarks/bench_model.py qwen3-0.6b qwen3-1.7b --record-only   # RESULTS.md section

Each model's figures go to benchmarks/results/bench-model-<model>-<dtype>.json (with the
machine, its read bandwidth measured just before, the date, the command and the versions)
and a PNG beside it; --record and --record-only rewrite this script's section of RESULTS.md
from those files.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import platform
import sys
from pathlib import Path

import mlx.core as mx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from machine_limits import measure  # noqa: E402

RESULTS = HERE / "results"
RESULTS_MD = HERE / "RESULTS.md"
BEGIN, END = "<!-- bench_model: begin -->", "<!-- bench_model: end -->"


def result_path(model: str, dtype: str, suffix: str) -> Path:
    return RESULTS / f"bench-model-{model}-{dtype}.{suffix}"


def run(model: str, args) -> dict:
    from kernelevo import chips
    from kernelevo.cli_model import _as_json
    from kernelevo.mlx_lm import bench, build_model, resolve_source
    from kernelevo.mlx_lm.models import parameter_bytes, parameter_count

    source = resolve_source(model)
    built = build_model(source, dtype=args.dtype, seed=0)
    bench.wait_for_quiet()
    limits = measure()
    print(f"{source.description}: {parameter_count(built) / 1e9:.3f} B parameters, "
          f"{parameter_bytes(built) / 1e9:.3f} GB; read bandwidth now {limits['read_gbs']:.1f} GB/s",
          flush=True)
    result = bench.bench_model(built, name=source.name, prompt_tokens=args.prompt_tokens,
                               generation_tokens=args.generation_tokens, rounds=args.rounds,
                               log=lambda text: print(text, flush=True))
    data = _as_json(result, bench)
    chip = chips.detect("cpu")
    data.update(
        parameters=parameter_count(built), weight_bytes=parameter_bytes(built),
        machine={"chip": chip.id, "cpu": chip.name, "cores": chip.cores, "read_gbs_now": limits["read_gbs"],
                 "read_gbs_one_core_now": limits["read_gbs_one_core"], "python": platform.python_version()},
        versions={"mlx": mx.__version__, "mlx-lm": importlib.metadata.version("mlx-lm"),
                  "kernelevo": importlib.metadata.version("kernelevo")},
        date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        command="python3 " + " ".join([f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
        profile_calls=dict(result.profile.calls) if result.profile else {},
        profile_context=result.profile.context if result.profile else None)
    RESULTS.mkdir(exist_ok=True)
    result_path(source.name, result.dtype, "json").write_text(json.dumps(data, indent=1) + "\n")
    bench.plot(result, result_path(source.name, result.dtype, "png"))
    print(json.dumps({"median": data["median"], "ratio": data["ratio"]}, indent=1), flush=True)
    return data


def fmt(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def spread(s: dict) -> str:
    return f"{fmt(s['median'])} [{fmt(s['q1'])}, {fmt(s['q3'])}]"


def section(datasets: list[dict]) -> str:
    lines = [BEGIN, "## mlx-lm models on the CPU, stock MLX vs kernelevo-patched (`bench_model.py`)", ""]
    for d in datasets:
        m, v = d["machine"], d["versions"]
        lines += [
            f"### {d['model']} ({d['dtype']}, {d['parameters'] / 1e9:.2f} B parameters, "
            f"{d['weight_bytes'] / 1e9:.2f} GB of weights, random)", "",
            f"Machine: `{m['chip']}` ({m['cpu']}, {m['cores']} cores), read bandwidth measured just "
            f"before: {m['read_gbs_now']:.1f} GB/s ({m['read_gbs_one_core_now']:.1f} on one core). "
            f"{d['date']}; mlx {v['mlx']}, mlx-lm {v['mlx-lm']}, Python {m['python']}.",
            f"Command: `OPENBLAS_THREAD_TIMEOUT=4 OMP_WAIT_POLICY=PASSIVE flock /tmp/kernelevo-bench.lock "
            f"{d['command']}`.",
            f"Prompt {d['prompt_tokens']} tokens, generation {d['generation_tokens']} (tok/s of the "
            f"{d['generation_tokens'] - 1} after the first), {d['ratio']['generation_tps']['n']} "
            f"interleaved rounds after a short warm-up; median [quartiles]; ratio = patched / stock "
            f"per round. {d['check']}.", "",
            "| | prompt tok/s | generation tok/s | MLX peak memory |",
            "|---|---|---|---|",
        ]
        for variant in ("stock", "patched"):
            med = d["median"][variant]
            lines.append(f"| {variant} | {spread(med['prompt_tps'])} | {spread(med['generation_tps'])} | "
                         f"{med['peak_memory_bytes']['median'] / 1e9:.2f} GB |")
        lines.append(f"| patched / stock | {spread(d['ratio']['prompt_tps'])}x | "
                     f"{spread(d['ratio']['generation_tps'])}x | |")
        loads = [r["load"] for r in d["runs"]]
        during = [r["load_during"] for r in d["runs"] if r.get("load_during") is not None]
        lines += ["", f"Other processes' share of the machine just before a run: at most {max(loads):.0%}"
                      + (f"; during a run: median {sorted(during)[len(during) // 2]:.0%}, at most "
                         f"{max(during):.0%}" if during else "") + ".",
                  f"Replaced: {', '.join(f'{n} {k}' for k, n in d['replaced'].items())}. Kernels per "
                  f"pass: prefill {_families(d['kernels']['prefill'])}; decode "
                  f"{_families(d['kernels']['decode'])}."]
        if "token_breakdown_s" in d:
            t = d["token_breakdown_s"]
            lines += ["", f"A decode token at context {d['profile_context']}, ms (the patched ops replayed "
                          f"alone on the token's own inputs in one evaluation, kernelevo's and MLX's):", "",
                      "| | token | linears | attention | norms and rope | rest | patched ops' share | graph building |",
                      "|---|---|---|---|---|---|---|---|"]
            for variant in ("stock", "patched"):
                p = t[variant]
                lines.append(f"| {variant} | {p['token'] * 1e3:.1f} | {p['linears'] * 1e3:.1f} | "
                             f"{p['attention'] * 1e3:.2f} | {_ms(p.get('norms and rope'))} | "
                             f"{p['rest'] * 1e3:.1f} | "
                             f"{(p['token'] - p['rest']) / p['token']:.0%} | "
                             f"{d['graph_build_s'][variant] * 1e3:.1f} |")
            unpatched = "; ".join(f"`mx.fast.{n}` {u['calls']} calls {u['s'] * 1e3:.1f} ms"
                                  for n, u in d.get("unpatched_ops_s", {}).items())
            weights_ms = d["weight_bytes"] / (m["read_gbs_now"] * 1e9) * 1e3
            unpatched = (f"Of the rest (MLX's, the same ops in both): {unpatched}." if unpatched
                         else "No MLX op among those timed alone is left unpatched.")
            lines += ["", f"{unpatched} Reading the weights once at the bandwidth measured before the run takes {weights_ms:.0f} ms "
                          f"({1e3 / weights_ms:.1f} tok/s); the patched linears read them at "
                          f"{d['weight_bytes'] / t['patched']['linears'] / 1e9:.1f} GB/s."]
        lines.append("")
    lines.append(END)
    return "\n".join(lines) + "\n"


def _ms(seconds: float | None) -> str:
    """A part a run did not time (results from before it was a part of its own) is shown as such."""
    return "not timed" if seconds is None else f"{seconds * 1e3:.2f}"


def _families(counter: dict) -> str:
    return ", ".join(f"{name} x{n}" for name, n in sorted(counter.items()))


def record(datasets: list[dict]) -> None:
    text = RESULTS_MD.read_text()
    body = section(datasets)
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + body.rstrip("\n") + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + body
    RESULTS_MD.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="presets, config.json files or model directories")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--generation-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--record", action="store_true", help="also rewrite RESULTS.md's section")
    parser.add_argument("--record-only", action="store_true",
                        help="rewrite RESULTS.md's section from the saved results of the models")
    args = parser.parse_args()
    if not args.record_only:
        for model in args.models:
            run(model, args)
    if args.record or args.record_only:
        datasets = [json.loads(result_path(m.lower(), args.dtype, "json").read_text()) for m in args.models]
        record(datasets)
        print(f"recorded in {RESULTS_MD}")


if __name__ == "__main__":
    main()
