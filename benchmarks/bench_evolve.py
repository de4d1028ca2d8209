"""Does evolution beat distillation, and sampling? Two parts, on one tuning database.

    python3 benchmarks/bench_evolve.py --db DIR/cache/tuning.sqlite --tuned DIR/tuned.kevo
    python3 benchmarks/bench_evolve.py ... --skip-live     # only the replayed comparison

1. Live: `kernelevo evolve` offline from the shipped file alone for --budget seconds (the
   database's stored measurements are reused; the tuned file is not a seed), then
   `kernelevo verify` of the evolved and of the tuned program in fresh workers: their
   held-out geometric means as re-timed, shape by shape.
2. Replayed, at equal budgets (the same number of programs scored, the same stored
   measurements): random programs (the shipped file after 1-6 random mutations, no
   selection), best-of-N (N independent single mutations of the shipped file), offline
   evolution (N iterations), and tune's distilled program; the best of each by training
   score, then judged on the held-out shapes (pairs not stored are measured live, once, for
   these finalists only). Three seeds each.
Records its section of RESULTS.md; raw output in benchmarks/results/evolve-*.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recording import HERE, machine_line, record_section  # noqa: E402

from kernelevo import chips  # noqa: E402
from kernelevo.dsl import parse  # noqa: E402
from kernelevo.dsl.select import CompiledProgram  # noqa: E402
from kernelevo.evolve.fitness import Fitness, Rejected  # noqa: E402
from kernelevo.evolve.loop import Evolution, EvolveSettings  # noqa: E402
from kernelevo.evolve.mutate import Mutator, vocabulary_from  # noqa: E402
from kernelevo.heuristics import find_source  # noqa: E402
from kernelevo.tune.db import Database  # noqa: E402
from kernelevo.tune.measure import MeasureSettings, Measurer, geomean  # noqa: E402
from kernelevo.tune.workloads import PRESETS  # noqa: E402

RESULTS_DIR = HERE / "results"
SECTION = "`kernelevo evolve` against tune's distillation and against sampling (bench_evolve.py)"
QUIET_BLAS = {"OPENBLAS_THREAD_TIMEOUT": "4", "OMP_WAIT_POLICY": "PASSIVE"}
SHAPE_LINE = re.compile(r"^    (train|held-out) +(.*?): ([\d.]+)x ")


def kernelevo(args, env, log) -> subprocess.CompletedProcess:
    log.write(f"\n$ kernelevo {' '.join(map(str, args))}\n")
    log.flush()
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "kernelevo.cli", *map(str, args)], capture_output=True,
                          text=True, env={**env, "COLUMNS": "220"})
    log.write(done.stdout + done.stderr + f"[exit {done.returncode}, {time.time() - started:.0f} s]\n")
    log.flush()
    return done


def retimed_held_out(verify_output: str, n_held_out: int) -> tuple[float, int]:
    """The held-out geometric mean as verify re-timed it: shapes it did not list select
    what the shipped rules select (1.00x)."""
    speedups = [float(m.group(3)) for m in map(SHAPE_LINE.match, verify_output.splitlines())
                if m and m.group(1) == "held-out"]
    values = speedups + [1.0] * (n_held_out - len(speedups))
    return geomean(values), len(speedups)


def live_part(db_path: Path, tuned: Path, budget: float, work: Path, backend: str = "cpu") -> dict:
    env = {**os.environ, **QUIET_BLAS, "KERNELEVO_CACHE_DIR": str(db_path.parent),
           "KERNELEVO_DATA_DIR": str(work / "data")}
    evolved = work / "evolved.kevo"
    workload = PRESETS["qwen3-0.6b"]
    out = {"budget_s": budget, "backend": backend, "machine": machine_line(backend)}
    with open(RESULTS_DIR / f"evolve-live{'' if backend == 'cpu' else '-' + backend}.log", "w") as log:
        started = time.time()
        done = kernelevo(["evolve", "--backend", backend, "--time-budget", budget, "--iterations", 100000,
                          "--output", evolved], env, log)
        out["evolve_s"] = time.time() - started
        out["evolve_output"] = done.stdout
        if done.returncode != 0:
            raise SystemExit("evolve failed: see benchmarks/results/evolve-live.log")
        for name, path in (("evolved", evolved), ("tuned", tuned)):
            if not path.exists():
                out[name] = {"written": False}
                continue
            verify = kernelevo(["verify", path], env, log)
            held, listed = retimed_held_out(verify.stdout, len(workload.held_out))
            out[name] = {"written": True, "verify_exit": verify.returncode, "held_out_retimed": held,
                         "held_out_changed": listed, "text": path.read_text()}
    return out


def replay_part(db_path: Path, tuned: Path, n: int, seeds: list[int]) -> dict:
    backend, chip = "cpu", chips.detect("cpu")
    workload = PRESETS["qwen3-0.6b"]
    shipped_text = find_source(backend, chip, include_tuned=False).path.read_text()
    out = {"n": n, "seeds": seeds, "methods": {}}
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "tuning.sqlite"
        shutil.copy(db_path, copy)
        with Database(copy) as db:
            measurer = Measurer(backend, db, MeasureSettings())
            fitness = Fitness(measurer, workload.shapes, workload.held_out, live=False)
            vocab = vocabulary_from(db.measurements(chip=chip.id, backend=backend,
                                                    template_hash=measurer.template_hash), workload.shapes)
            shipped = fitness.compile(shipped_text)

            def train_score(program):
                try:
                    return fitness.evaluate(program).value
                except Rejected:
                    return None

            def sample(seed: int, steps_of) -> tuple[CompiledProgram | None, float, int]:
                rng = random.Random(seed)
                mutator = Mutator(backend, chip, workload.shapes, vocab, rng)
                best, best_score, scored = None, -1.0, 0
                for _ in range(n):
                    program = shipped
                    for _ in range(steps_of(rng)):
                        proposal = mutator.propose(program, shipped)
                        if proposal is None:
                            break
                        program = fitness.compile(proposal[0])
                    score = train_score(program)
                    scored += score is not None
                    if score is not None and score > best_score:
                        best, best_score = program, score
                return best, best_score, scored

            finalists: dict[str, list[tuple[int, CompiledProgram, float]]] = {}
            for seed in seeds:
                for name, steps in (("random programs", lambda r: r.randint(1, 6)),
                                    ("best-of-N sampling", lambda r: 1)):
                    program, score, scored = sample(seed, steps)
                    finalists.setdefault(name, []).append((seed, program, score))
                evolution = Evolution(backend, db, workload, [("cpu.kevo", shipped_text)], EvolveSettings(
                    iterations=n, time_budget_s=None, replay=True, seed=seed))
                result = evolution.run(write=False)
                best = result.winner
                finalists.setdefault("offline evolution", []).append(
                    (seed, evolution.programs[best.id], best.score))
            tuned_program = fitness.compile(tuned.read_text()) if tuned.exists() else None
            if tuned_program is not None:
                finalists["tune's distillation"] = [(0, tuned_program, train_score(tuned_program) or float("nan"))]
        # Held-out, for the finalists only: stored pairs where they exist, measured live where not.
        with Database(db_path) as db, Measurer(backend, db, MeasureSettings()) as measurer:
            judge = Fitness(measurer, workload.shapes, workload.held_out, live=True)
            before = measurer.measured
            for name, rows in finalists.items():
                entries = []
                for seed, program, score in rows:
                    held = None
                    if program is not None:
                        text = program.text
                        try:
                            held = judge.evaluate(judge.compile(text), "held-out").value
                        except Rejected as err:
                            held = f"rejected: {err.message}"
                    entries.append({"seed": seed, "train": score, "held_out": held,
                                    "rules": sum(len(s.rules) for s in program.program.sections) if program else None})
                out["methods"][name] = entries
            out["held_out_measured_live"] = measurer.measured - before
    return out


def _mean_text(values) -> str:
    nums = [v for v in values if isinstance(v, float) and math.isfinite(v)]
    if not nums:
        return "-"
    lo, hi = min(nums), max(nums)
    return f"{geomean(nums):.3f}x" + (f" ({lo:.3f}-{hi:.3f})" if len(nums) > 1 else "")


def section_text(live: dict | None, replay: dict | None, command: str) -> str:
    machine = live["machine"] if live else machine_line()
    lines = [f"Machine: {machine}.", "", f"Command: `{command}` (under `flock /tmp/kernelevo-bench.lock`), "
             "on the database of the quiet `bench_tune_validity.py` run (its stored measurements are "
             "shared; the tuned file is not a seed of evolution). Workload: the default "
             f"(qwen3-0.6b: {len(PRESETS['qwen3-0.6b'].shapes)} training, {len(PRESETS['qwen3-0.6b'].held_out)} "
             "held-out shapes). Speedups are geometric means over the shipped heuristics.", ""]
    if live:
        lines += [f"### Live: offline evolution for {live['budget_s'] / 60:.0f} minutes, then `kernelevo verify` "
                  "of both programs", "",
                  "| program | written | held-out, re-timed by verify in fresh workers | held-out shapes it changes |",
                  "|---|---|---|---|"]
        for name in ("evolved", "tuned"):
            r = live[name]
            if not r.get("written"):
                lines.append(f"| {name} | no | - | - |")
            else:
                lines.append(f"| {name} | yes | {r['held_out_retimed']:.3f}x | {r['held_out_changed']} |")
        summary = [l for l in live["evolve_output"].splitlines()
                   if l.startswith(("run ", "proposals:", "winner", "lineage", "wrote", "removed", "  - "))]
        lines += ["", f"`kernelevo evolve` took {live['evolve_s']:.0f} s of its {live['budget_s']:.0f} s budget "
                  "(judging the finalists and re-timing the winner included). Its own summary:", "",
                  "```", *summary, "```"]
    if replay is None:
        return "\n".join(lines)
    lines += ["", f"### Replayed at equal budgets: {replay['n']} programs scored per method and seed "
                  f"(seeds {', '.join(map(str, replay['seeds']))}), stored measurements only", "",
              "The best program of each by training score, then judged on the held-out shapes "
              f"({replay['held_out_measured_live']} held-out pairs were not stored and were measured live for "
              "these finalists). Geometric mean over seeds (range).", "",
              "| method | training | held-out | rules |", "|---|---|---|---|"]
    for name, rows in replay["methods"].items():
        lines.append(f"| {name} | {_mean_text([r['train'] for r in rows])} | "
                     f"{_mean_text([r['held_out'] for r in rows])} | "
                     f"{', '.join(str(r['rules']) for r in rows)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", type=Path, required=True, help="a tuning database (the quiet tune's)")
    parser.add_argument("--tuned", type=Path, required=True, help="the program that tune wrote from it")
    parser.add_argument("--budget", type=float, default=900.0, help="seconds of live evolution")
    parser.add_argument("--n", type=int, default=300, help="programs per method in the replayed comparison")
    parser.add_argument("--skip-live", action="store_true")
    parser.add_argument("--skip-replay", action="store_true")
    parser.add_argument("--backend", default="cpu", help="cpu or cuda (the replayed part is CPU only)")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--from-json", type=Path, help="record an earlier run's results instead of running")
    args = parser.parse_args()
    RESULTS_DIR.mkdir(exist_ok=True)
    suffix = "" if args.backend == "cpu" else "-" + args.backend
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        live, replay = data["live"], data["replay"]
    else:
        work = Path(tempfile.mkdtemp(prefix="evolve-bench-"))
        live = None if args.skip_live else live_part(args.db, args.tuned, args.budget, work, args.backend)
        replay = None if args.skip_replay else replay_part(args.db, args.tuned, args.n, [1, 2, 3])
        (RESULTS_DIR / f"evolve-bench{suffix}.json").write_text(
            json.dumps({"live": live, "replay": replay}, indent=1, default=str))
    backend = live["backend"] if live else "cpu"
    text = section_text(live, replay, "python3 benchmarks/bench_evolve.py --db ... --tuned ..."
                        + (f" --backend {backend}" if backend != "cpu" else "")
                        + (" --skip-live" if live is None else f" --budget {live['budget_s']:g}")
                        + (" --skip-replay" if replay is None else ""))
    print(text)
    if not args.no_record:
        record_section(SECTION + ("" if backend == "cpu" else f", {backend}"), text)


if __name__ == "__main__":
    main()
