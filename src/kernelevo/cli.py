"""The `kernelevo` command."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .tune import DEFAULT_CANDIDATES

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Autotuned matmul and attention kernels for MLX, steered by .kevo heuristics.")
db_app = typer.Typer(no_args_is_help=True, help="The tuning database.")
app.add_typer(db_app, name="db")
out = Console()
err = Console(stderr=True)


def _fail(message: str, code: int = 1):
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(code)


@app.command()
def chips(backend: Optional[str] = typer.Option(None, help="cpu, metal or cuda (default: all present)")):
    """Show the chips kernelevo detects on this machine, with their facts."""
    from . import chips as chips_mod

    backends = [backend] if backend else list(chips_mod.available_backends())
    for name in backends:
        chip = chips_mod.detect(name)
        table = Table(title=f"{name}: {chip.id}", show_header=False, title_justify="left")
        table.add_row("name", chip.name)
        table.add_row("recognised", "yes" if chip.known else "no (generic heuristics)")
        for f in chips_mod.FACTS:
            value = chips_mod.fact(chip, f.name)
            if value:
                table.add_row(f"chip.{f.name}", str(value))
        if chip.isa:
            table.add_row("features", " ".join(chip.isa))
        out.print(table)


def _parse_shape(text: str) -> tuple[int, int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if not m:
        _fail(f"--shape takes MxNxK (e.g. 16x4096x4096), not {text!r}", 2)
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


@app.command()
def explain(op: str = typer.Argument(..., help="matmul or attention"),
            shape: Optional[str] = typer.Option(None, help="matmul: MxNxK (the product is M x N, contracted over K)"),
            dtype: str = typer.Option("f32", help="f32, f16 or bf16"),
            batch: int = typer.Option(1, help="matmul: independent products; attention: batch size"),
            transpose_a: bool = typer.Option(False, "--transpose-a"),
            transpose_b: bool = typer.Option(False, "--transpose-b", help="matmul: b is stored [N, K] (a linear layer's weight)"),
            q_len: Optional[int] = typer.Option(None, help="attention: query length"),
            kv_len: Optional[int] = typer.Option(None, help="attention: key/value length"),
            heads: int = typer.Option(32, help="attention: query heads"),
            kv_heads: Optional[int] = typer.Option(None, help="attention: key/value heads (default: heads)"),
            head_dim: int = typer.Option(128, help="attention: head dimension"),
            mask: str = typer.Option("none", help="attention: none, causal, bool or additive"),
            softcap: float = typer.Option(0.0, help="attention: logit soft-cap (0: off)"),
            window: int = typer.Option(0, help="attention: sliding window (0: off)"),
            backend: str = typer.Option("cpu", help="cpu, metal or cuda"),
            chip: Optional[str] = typer.Option(None, help="a GPU chip id (e.g. apple-m3-max) instead of this machine's")):
    """Show which rule of which .kevo file chooses the kernel for a call, and why."""
    from . import chips as chips_mod
    from .dsl import DSLError
    from .features import attention_features, matmul_features
    from .ops import _runtime

    try:
        target = chips_mod.from_id(chip) if chip else None
        if target is not None:
            backend = target.backend
        if op == "matmul":
            if shape is None:
                _fail("explain matmul needs --shape MxNxK", 2)
            M, N, K = _parse_shape(shape)
            features = matmul_features(M, N, K, batch=batch, dtype=dtype, transpose_a=transpose_a,
                                       transpose_b=transpose_b)
        elif op == "attention":
            if q_len is None or kv_len is None:
                _fail("explain attention needs --q-len and --kv-len", 2)
            features = attention_features(batch=batch, heads=heads, kv_heads=kv_heads or heads,
                                          q_len=q_len, kv_len=kv_len, head_dim=head_dim,
                                          dtype=dtype, mask=mask, softcap=softcap, window=window)
        else:
            _fail(f"explain knows matmul and attention, not {op!r}", 2)
        e = _runtime.explain(op, features, backend, target)
    except (DSLError, ValueError, KeyError) as error:
        _fail(str(error))
    s = e.selection
    shown = " ".join(f"{k}={'yes' if v is True else 'no' if v is False else v}" for k, v in features.items())
    print(f"call     {op} {shown}")
    print(f"chip     {e.chip.id} ({e.chip.name})")
    print(f"file     {e.source.path}  [{e.source.origin}: {e.source.reason}]")
    print(f"rule     {s.rule_number} at line {s.line}: {s.rule_text}")
    print(f"config   {s.config.to_dsl()}")
    print(f"kernel   {s.config.name}")


@app.command()
def check(files: list[Path] = typer.Argument(..., help=".kevo files")):
    """Check .kevo files: syntax, names, types, families, parameters, constraints, reachability."""
    from .dsl import DSLError, check as check_program, parse

    failed = False
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
            diagnostics = check_program(parse(text, str(path)), text, str(path))
        except DSLError as error:
            diagnostics = error.diagnostics
        except OSError as error:
            _fail(f"{path}: {error.strerror}")
        for d in diagnostics:
            print(d.render(), file=sys.stderr)
        errors = [d for d in diagnostics if d.severity == "error"]
        failed |= bool(errors)
        if not errors:
            print(f"{path}: ok")
    if failed:
        raise typer.Exit(1)


@app.command()
def fmt(files: list[Path] = typer.Argument(..., help=".kevo files"),
        write: bool = typer.Option(False, "--write", "-w", help="rewrite the files in place"),
        check_only: bool = typer.Option(False, "--check", help="exit 1 if a file is not in canonical form")):
    """Print .kevo files in canonical form (comments kept)."""
    from .dsl import DSLError, format_program, parse

    changed = False
    for path in files:
        text = path.read_text(encoding="utf-8")
        try:
            canonical = format_program(parse(text, str(path)))
        except DSLError as error:
            print(error, file=sys.stderr)
            raise typer.Exit(1)
        if check_only:
            if canonical != text:
                changed = True
                err.print(f"{path}: not in canonical form", highlight=False, markup=False)
        elif write:
            if canonical != text:
                path.write_text(canonical, encoding="utf-8")
        else:
            sys.stdout.write(canonical)
    if changed:
        raise typer.Exit(1)


@app.command()
def tune(chip: str = typer.Option("auto", help="'auto' (this machine's chip) or its id; other chips cannot be timed here"),
         backend: Optional[str] = typer.Option(None, help="cpu, metal or cuda (default: MLX's default device)"),
         workload: str = typer.Option("qwen3-0.6b", help="a built-in workload preset"),
         model: Optional[Path] = typer.Option(None, help="derive the workload from a Hugging Face / mlx-lm config.json, "
                                              "or record it from an mlx-lm model directory's forward pass"),
         shapes: Optional[Path] = typer.Option(None, help="a JSON file of explicit shapes"),
         strategy: str = typer.Option("evolve", help="evolve, random or exhaustive"),
         candidates: int = typer.Option(DEFAULT_CANDIDATES, help="configurations searched per shape, besides the shipped one"),
         reps: int = typer.Option(5, help="timed repetitions per configuration (paired with the baseline)"),
         time_budget: Optional[float] = typer.Option(None, help="stop searching after this many seconds"),
         seed: int = typer.Option(0, help="seed of the search"),
         output: Optional[Path] = typer.Option(None, help="write the heuristics here instead of the user data directory"),
         database: Optional[Path] = typer.Option(None, "--db", help="the tuning database (default: user cache directory)")):
    """Time candidate kernels on this chip and write the winners as .kevo heuristics."""
    from . import chips as chips_mod
    from .paths import database_path
    from .tune import workloads as wl
    from .tune.db import Database
    from .tune.runner import Tuner, TuneSettings
    from .tune.search import STRATEGIES

    backend = backend or chips_mod.default_backend()
    if backend not in ("cpu", "cuda", "metal"):
        _fail(f"unknown backend {backend!r}; expected cpu, cuda or metal", 2)
    if backend != "cpu":
        from .ops import BackendNotSupportedError, gpu

        try:
            if gpu.require_gpu("tune") != backend:
                raise BackendNotSupportedError(f"this machine's GPU is not a {backend} device")
        except BackendNotSupportedError as error:
            _fail(f"cannot time {backend} kernels here: {error}", 2)
    local = chips_mod.detect(backend)
    if chip not in ("auto", local.id):
        _fail(f"a chip can only be timed on itself: this machine's {backend} chip is {local.id}, "
              f"not {chip}. Run `kernelevo tune --chip auto` on that machine.", 2)
    if strategy not in STRATEGIES:
        _fail(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}", 2)
    try:
        if model is not None and model.is_dir():
            from .mlx_lm.record import workload_from_model_dir

            chosen = workload_from_model_dir(model)
        elif model is not None:
            chosen = wl.from_config(model)
        elif shapes is not None:
            chosen = wl.from_shapes_file(shapes)
        elif workload in wl.PRESETS:
            chosen = wl.PRESETS[workload]
        else:
            _fail(f"unknown workload {workload!r}; presets: {', '.join(wl.PRESETS)}", 2)
    except (ValueError, ImportError) as error:
        _fail(str(error), 2)
    settings = TuneSettings(strategy=strategy, candidates=candidates, reps=reps, seed=seed,
                            time_budget_s=time_budget)
    db_path = database or database_path()
    print(f"tuning {chosen.description}\n  chip {local.id} ({local.name}), database {db_path}")
    with Database(db_path) as db, Progress(TextColumn("{task.description}"), BarColumn(),
                                           MofNCompleteColumn(), TimeElapsedColumn(),
                                           console=err, transient=True) as bar:
        task = bar.add_task("tuning", total=1)

        def progress(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=what)

        try:
            result = Tuner(backend, db, settings, progress).run(chosen, output)
        except KeyboardInterrupt:
            print("interrupted: finished measurements are kept; run the same command to resume",
                  file=sys.stderr)
            raise typer.Exit(130)
        _print_report(db, result.run_id)
    for reason in result.skipped:
        print(f"skipped {reason}")
    print(f"{sum(s.measured for s in result.shapes)} measured, "
          f"{sum(s.reused for s in result.shapes)} reused from the database, "
          f"{sum(s.failed for s in result.shapes)} rejected (wrong, failed, crashed or hung), "
          f"{result.restarts} worker restarts, {result.elapsed_s:.0f} s")
    print(f"geometric-mean speedup over the shipped heuristics: {result.geomean_speedup:.3f}x "
          f"(each shape's own best: {result.geomean_best:.3f}x)")
    if result.output:
        print(f"wrote {result.output}")


def _ms(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f}"


def _print_report(db, run_id: int) -> list[dict]:
    from .tune.report import geomean, run_rows

    rows = run_rows(db, run_id)
    run = db.run(run_id)
    for op in dict.fromkeys(r["op"] for r in rows):
        table = Table(title=f"{op} on {run.chip} (run {run_id})", title_justify="left")
        for column in ("shape", "mlx ms", "shipped ms", "tuned ms", "speedup", "chosen configuration"):
            table.add_column(column, justify="right" if "ms" in column or column == "speedup" else "left")
        mine = [r for r in rows if r["op"] == op]
        for r in mine:
            same = r["chosen_config"] == r["shipped_config"]
            table.add_row(r["label"] or r["shape_key"], _ms(r["mlx_s"]), _ms(r["shipped_s"]),
                          _ms(r["tuned_s"]), f"{r['speedup']:.2f}x",
                          r["chosen_config"] + ("  (shipped)" if same else ""))
        out.print(table)
        print(f"{op}: geometric-mean speedup {geomean(r['speedup'] for r in mine):.3f}x over the "
              f"shipped heuristics, {geomean(r['vs_mlx'] for r in mine):.3f}x over MLX's own op")
    return rows


@app.command()
def report(run: Optional[int] = typer.Option(None, help="the run (default: the latest finished one)"),
           plot: Optional[Path] = typer.Option(None, help="where to write the PNG plot "
                                               "(default: tune-report-<run>.png in the cache directory)"),
           database: Optional[Path] = typer.Option(None, "--db")):
    """Print the results of a tuning run per op and plot the speedups."""
    from .paths import cache_dir, database_path
    from .tune.db import Database
    from .tune.report import plot as draw

    with Database(database or database_path()) as db:
        finished = [r for r in db.runs() if r.status == "finished"]
        chosen = db.run(run) if run is not None else (finished[-1] if finished else None)
        if chosen is None:
            _fail("no finished tuning run in the database; run `kernelevo tune --chip auto`")
        rows = _print_report(db, chosen.id)
        if not rows:
            _fail(f"run {chosen.id} recorded no results")
        path = draw(rows, plot or cache_dir() / f"tune-report-{chosen.id}.png",
                    f"kernelevo tune, run {chosen.id} on {chosen.chip} ({chosen.workload})")
        print(f"plot: {path}")


@db_app.command("list")
def db_list(database: Optional[Path] = typer.Option(None, "--db")):
    """List tuning runs."""
    import time

    from .paths import database_path
    from .tune.db import Database

    with Database(database or database_path()) as db:
        table = Table("run", "started", "chip", "workload", "status", "measurements", "output")
        for run in db.runs():
            n = len(db.measurements(run_id=run.id))
            table.add_row(str(run.id), time.strftime("%Y-%m-%d %H:%M", time.localtime(run.started_at)),
                          run.chip, run.workload, run.status, str(n), run.output or "")
        out.print(table)


@db_app.command("show")
def db_show(run: Optional[int] = typer.Option(None, help="only this run"),
            database: Optional[Path] = typer.Option(None, "--db")):
    """Show measurements."""
    from .paths import database_path
    from .tune.db import Database

    with Database(database or database_path()) as db:
        table = Table("id", "shape", "config", "status", "median ms", "vs baseline", "reason")
        for m in db.measurements(run_id=run):
            table.add_row(str(m.id), m.shape_key, m.config, m.status, _ms(m.median_s),
                          f"{m.ratio:.3f}" if m.ratio else "", m.reason or "")
        out.print(table)


@db_app.command("export")
def db_export(output: Path = typer.Argument(..., help="a JSON file"),
              database: Optional[Path] = typer.Option(None, "--db")):
    """Write every run and measurement to a JSON file."""
    import json

    from .paths import database_path
    from .tune.db import Database

    with Database(database or database_path()) as db:
        data = db.export()
    output.write_text(json.dumps(data, indent=1))
    print(f"wrote {len(data['runs'])} runs and {len(data['measurements'])} measurements to {output}")


@db_app.command("prune")
def db_prune(stale: bool = typer.Option(False, help="measurements of kernels this build no longer has"),
             chip: Optional[str] = typer.Option(None, help="all measurements of this chip"),
             older_than_days: Optional[float] = typer.Option(None, help="measurements older than this"),
             database: Optional[Path] = typer.Option(None, "--db")):
    """Delete measurements."""
    import time

    from .paths import database_path
    from .tune.db import Database
    from .tune.runner import template_hash

    keep = {"cpu": template_hash("cpu")} if stale else None
    before = time.time() - older_than_days * 86400 if older_than_days is not None else None
    with Database(database or database_path()) as db:
        try:
            n = db.prune(keep_template_hashes=keep, chip=chip, before=before)
        except ValueError as error:
            _fail(str(error), 2)
    print(f"deleted {n} measurements")


def main() -> None:
    app()


from .cli_model import register as _register_model_commands  # noqa: E402 — `bench-model`
_register_model_commands(app)

if __name__ == "__main__":
    main()
