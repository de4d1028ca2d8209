"""Does what `kernelevo tune` writes hold up? A default tune, on a quiet machine and with
another process keeping one core busy for the whole run, each followed by `kernelevo
verify` of what it wrote, on a quiet machine, in fresh workers.

    python3 benchmarks/bench_tune_validity.py                  # both scenarios, records RESULTS.md
    python3 benchmarks/bench_tune_validity.py --scenario quiet

For each scenario: the run's length and measurement counts, how many measurements ran under
load, the rules written and those dropped (with why), the geometric means on the training
and held-out shapes, every rule's claim beside its re-timing by `verify` (within 5%?), the
held-out shapes slower than their A/A noise band, and each shape's band and speedup. Raw
output goes to benchmarks/results/tune-validity-<scenario>.{log,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recording import HERE, machine_line, record_section  # noqa: E402

RESULTS_DIR = HERE / "results"
SECTION = "`kernelevo tune`: do its claims reproduce? (bench_tune_validity.py)"
QUIET_BLAS = {"OPENBLAS_THREAD_TIMEOUT": "4", "OMP_WAIT_POLICY": "PASSIVE"}
VERDICT = re.compile(r"^rule (\d+) \(line (\d+)\): (.*)$")
ARROW = re.compile(r"^  -> (.*)$")
REPRO = re.compile(r"(reproduces|DOES NOT REPRODUCE) on (train|held-out)[:( ]+([\d.]+)x, claimed ([\d.]+)x")


def kernelevo(args: list[str], env: dict, log) -> subprocess.CompletedProcess:
    log.write(f"\n$ kernelevo {' '.join(args)}\n")
    log.flush()
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "kernelevo.cli", *args], capture_output=True, text=True,
                          env={**env, "COLUMNS": "220"})
    log.write(done.stdout + done.stderr + f"[exit {done.returncode}, {time.time() - started:.0f} s]\n")
    log.flush()
    return done


def scenario(name: str, work: Path, backend: str = "cpu", tune_args: tuple[str, ...] = ()) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **QUIET_BLAS, "KERNELEVO_CACHE_DIR": str(work / "cache"),
           "KERNELEVO_DATA_DIR": str(work / "data")}
    tuned = work / "tuned.kevo"
    log_path = RESULTS_DIR / f"tune-validity-{name}{'' if backend == 'cpu' else '-' + backend}.log"
    out: dict = {"scenario": name, "backend": backend, "machine": machine_line(backend),
                 "tune_args": list(tune_args)}
    with open(log_path, "w") as log:
        hog = None
        if name == "busy":  # another process keeps one core busy for the whole tune
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        started = time.time()
        try:
            done = kernelevo(["tune", "--chip", "auto", "--backend", backend, "--output", str(tuned),
                              *tune_args], env, log)
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
        out["tune_s"] = time.time() - started
        out["tune_exit"] = done.returncode
        if done.returncode != 0:
            raise SystemExit(f"tune failed: see {log_path}")
        time.sleep(2)
        verify = kernelevo(["verify", str(tuned)], env, log)  # quiet, fresh workers
        out["verify_exit"] = verify.returncode
        out["verify_output"] = verify.stdout
    db = sqlite3.connect(work / "cache" / "tuning.sqlite")
    db.row_factory = sqlite3.Row
    run = db.execute("SELECT * FROM runs ORDER BY id DESC LIMIT 1").fetchone()
    out["summary"] = json.loads(run["summary"])
    out["shapes"] = [dict(r) for r in db.execute(
        "SELECT r.split, r.label, r.shape_key, r.band, r.ratio, r.shipped_config = r.chosen_config AS same "
        "FROM shape_results r JOIN run_shapes s ON s.run_id = r.run_id AND s.shape_key = r.shape_key "
        "WHERE r.run_id = ? ORDER BY s.position", (run["id"],))]
    out["measurements"] = db.execute("SELECT COUNT(*) FROM measurements WHERE run_id = ?", (run["id"],)).fetchone()[0]
    out["rules"] = parse_verify(verify.stdout)
    (RESULTS_DIR / f"tune-validity-{name}{'' if backend == 'cpu' else '-' + backend}.json").write_text(
        json.dumps(out, indent=1))
    return out


def parse_verify(text: str) -> list[dict]:
    rules, current = [], None
    for line in text.splitlines():
        m = VERDICT.match(line)
        if m:
            current = {"rule": int(m.group(1)), "line": int(m.group(2)), "condition": m.group(3), "checks": []}
            rules.append(current)
            continue
        m = ARROW.match(line)
        if m and current is not None:
            current["verdict"] = m.group(1)
            for what, split, got, claimed in REPRO.findall(m.group(1)):
                current["checks"].append({"split": split, "reproduces": what == "reproduces",
                                          "retimed": float(got), "claimed": float(claimed)})
    return rules


def section_text(results: list[dict], command: str) -> str:
    lines = [f"Machine: {results[0]['machine']}.", "",
             f"Command: `{command}` (under `flock /tmp/kernelevo-bench.lock`). Each scenario starts "
             "from empty cache and data directories: `kernelevo tune --chip auto --output tuned.kevo`, "
             "then `kernelevo verify tuned.kevo` on the quiet machine (two rounds in fresh workers). "
             "`busy`: `python3 -c 'while True: pass'` runs beside the whole tune.", ""]
    lines += ["| scenario | tune | measurements | under load | rules written | not written | train geomean | "
              "held-out geomean | claims re-timed by verify | within 5% | held-out shapes slower than their band |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        s = r["summary"]
        checks = [c for rule in r["rules"] for c in rule["checks"]]
        within = sum(abs(c["retimed"] / c["claimed"] - 1) <= 0.05 for c in checks)
        slower = [x for x in r["shapes"] if x["split"] == "held-out" and x["ratio"]
                  and x["ratio"] > 1 + (x["band"] or 0)]
        lines.append(f"| {r['scenario']} | {r['tune_s'] / 60:.1f} min | {r['measurements']} | {s['loaded']} | "
                     f"{s['rules']} | {len(s['dropped'])} | {s['train_speedup']:.3f}x | "
                     f"{s['held_out_speedup']:.3f}x | {len(checks)} | {within} of {len(checks)} | {len(slower)} |")
    if any(r["tune_args"] for r in results):
        lines += ["", "Tune arguments: " + "; ".join(f"{r['scenario']}: `{' '.join(r['tune_args'])}`"
                                                    for r in results if r["tune_args"])]
    for r in results:
        lines += ["", f"### {r['scenario']}: every rule, its claim and its re-timing", ""]
        if not r["rules"]:
            lines.append("No rule was written (verify had nothing to re-time).")
        else:
            lines += ["| rule | claimed (train / held-out) | re-timed by verify | verdict |", "|---|---|---|---|"]
            for rule in r["rules"]:
                claimed = " / ".join(f"{c['claimed']:.2f}x" for c in rule["checks"]) or "-"
                got = " / ".join(f"{c['retimed']:.2f}x" for c in rule["checks"]) or "-"
                lines.append(f"| {rule['rule']} (line {rule['line']}) | {claimed} | {got} | {rule.get('verdict', '-')} |")
        dropped = r["summary"]["dropped"]
        if dropped:
            lines += ["", f"Not written ({len(dropped)}):", ""] + [f"- {d}" for d in dropped]
        lines += ["", f"### {r['scenario']}: each shape's A/A band and the written program's speedup "
                      "(re-timed in fresh workers; 1.00x where the shipped choice is kept)", "",
                  "| split | shape | A/A band | speedup |", "|---|---|---|---|"]
        for x in r["shapes"]:
            band = f"±{x['band']:.1%}" if x["band"] is not None else "-"
            speed = "1.00x (shipped kept)" if x["same"] else f"{1 / x['ratio']:.2f}x"
            lines.append(f"| {x['split']} | {x['label'] or x['shape_key']} | {band} | {speed} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=("quiet", "busy", "both"), default="both")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--backend", default="cpu", help="cpu or cuda")
    parser.add_argument("--tune-args", default="", help="more arguments for kernelevo tune")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--from-json", type=Path, nargs="+", help="record results written by an earlier run "
                        "(e.g. on the GPU machine) instead of running")
    args = parser.parse_args()
    RESULTS_DIR.mkdir(exist_ok=True)
    if args.from_json:
        results = [json.loads(p.read_text()) for p in args.from_json]
    else:
        work = args.workdir or Path(tempfile.mkdtemp(prefix="tune-validity-"))
        names = ("quiet", "busy") if args.scenario == "both" else (args.scenario,)
        results = [scenario(n, work / n, args.backend, tuple(args.tune_args.split())) for n in names]
    backend = results[0]["backend"]
    command = "python3 benchmarks/bench_tune_validity.py" + (
        f" --scenario {args.scenario}" if args.scenario != "both" else "") + (
        f" --backend {backend}" if backend != "cpu" else "") + (
        f" --tune-args '{' '.join(results[0]['tune_args'])}'" if results[0]["tune_args"] else "")
    text = section_text(results, command)
    print(text)
    if not args.no_record:
        record_section(SECTION + ("" if backend == "cpu" else f", {backend}"), text)
        print(f"\nrecorded in {HERE / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
