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

class _OneLineErrors(typer.core.TyperGroup):
    """A usage error (a bad option value, an unknown option) is one line, `error: ...`, as
    every other error of the command is, with exit status 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except Exception as error:  # click's exceptions (typer may vendor click: matched by shape)
            message = getattr(error, "format_message", None)
            if type(error).__name__ == "Abort":
                print("aborted", file=sys.stderr)
                sys.exit(1)
            if message is None:
                raise
            ctx = getattr(error, "ctx", None)
            if type(error).__name__ == "NoArgsIsHelpError":  # `kernelevo`: the help, printed already
                sys.exit(getattr(error, "exit_code", 2))
            hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            print(f"error: {' '.join(message().split())}{hint}", file=sys.stderr)
            sys.exit(getattr(error, "exit_code", 2))
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(add_completion=False, no_args_is_help=True, cls=_OneLineErrors,
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
    sizes = int(m.group(1)), int(m.group(2)), int(m.group(3))
    for name, size in zip("MNK", sizes):
        if size < 1:
            _fail(f"--shape {text.strip()}: {name} must be a positive integer, got {size}", 2)
    return sizes


@app.command()
def explain(op: str = typer.Argument(..., help="matmul or attention"),
            shape: Optional[str] = typer.Option(None, help="matmul: MxNxK (the product is M x N, contracted over K)"),
            dtype: str = typer.Option("f32", help="f32, f16 or bf16"),
            batch: int = typer.Option(1, min=1, help="matmul: independent products; attention: batch size"),
            transpose_a: bool = typer.Option(False, "--transpose-a"),
            transpose_b: bool = typer.Option(False, "--transpose-b", help="matmul: b is stored [N, K] (a linear layer's weight)"),
            q_len: Optional[int] = typer.Option(None, min=1, help="attention: query length"),
            kv_len: Optional[int] = typer.Option(None, min=1, help="attention: key/value length"),
            heads: int = typer.Option(32, min=1, help="attention: query heads"),
            kv_heads: Optional[int] = typer.Option(None, min=1, help="attention: key/value heads (default: heads)"),
            head_dim: int = typer.Option(128, min=1, help="attention: head dimension"),
            mask: str = typer.Option("none", help="attention: none, causal, bool or additive"),
            softcap: float = typer.Option(0.0, min=0, help="attention: logit soft-cap (0: off)"),
            window: int = typer.Option(0, min=0, help="attention: sliding window (0: off)"),
            backend: str = typer.Option("cpu", help="cpu, metal or cuda"),
            chip: Optional[str] = typer.Option(None, help="a GPU chip id (e.g. apple-m3-max) instead of this machine's")):
    """Show which rule of which .kevo file chooses the kernel for a call, and why."""
    from . import chips as chips_mod
    from .dsl import DSLError
    from .features import attention_features, matmul_features
    from .ops import _runtime
    from .tune.workloads import check_size

    try:
        target = chips_mod.from_id(chip) if chip else None
        if target is not None:
            backend = target.backend
        if op == "matmul":
            if shape is None:
                _fail("explain matmul needs --shape MxNxK", 2)
            M, N, K = _parse_shape(shape)
            for name, value in (("M", M), ("N", N), ("K", K), ("--batch", batch)):
                check_size(name, value)
            features = matmul_features(M, N, K, batch=batch, dtype=dtype, transpose_a=transpose_a,
                                       transpose_b=transpose_b)
        elif op == "attention":
            if q_len is None or kv_len is None:
                _fail("explain attention needs --q-len and --kv-len", 2)
            for name, value in (("--batch", batch), ("--heads", heads), ("--kv-heads", kv_heads or heads),
                                ("--q-len", q_len), ("--kv-len", kv_len), ("--head-dim", head_dim)):
                check_size(name, value)
            check_size("--window", window, zero=True)
            features = attention_features(batch=batch, heads=heads, kv_heads=kv_heads or heads,
                                          q_len=q_len, kv_len=kv_len, head_dim=head_dim,
                                          dtype=dtype, mask=mask, softcap=softcap, window=window)
        else:
            _fail(f"explain knows matmul and attention, not {op!r}", 2)
        e = _runtime.explain(op, features, backend, target)
    except DSLError as error:  # diagnostics with line:column and a caret, as `check` prints them
        print(error, file=sys.stderr)
        raise typer.Exit(1)
    except (ValueError, KeyError) as error:
        _fail(str(error))
    s = e.selection
    shown = " ".join(f"{k}={'yes' if v is True else 'no' if v is False else v}" for k, v in features.items())
    print(f"call     {op} {shown}")
    print(f"chip     {e.chip.id} ({e.chip.name})")
    print(f"file     {e.source.path}  [{e.source.origin}: {e.source.reason}]")
    if e.source.origin != "tuned":
        from .paths import tuned_heuristics_path

        print(f"tuned    {tuned_heuristics_path(e.chip.id)}  (none there yet: `kernelevo tune` writes "
              f"it; a .kevo file put there is the one in force for {e.chip.id})")
    print(f"rule     {s.rule_number} at line {s.line}: {s.rule_text}")
    print(f"config   {s.config.to_dsl()}")
    print(f"kernel   {s.config.name}")
    claim = _rule_claim(e, op)
    if claim:
        print(f"claim    {claim}")
    if target is None:
        for line in _evidence(op, features, backend, s.config):
            print(f"evidence {line}")


def _rule_claim(e, op: str) -> str | None:
    """The claim written above the rule that chose (tuned files), if any."""
    from .tune.reproduce import CLAIM

    section = e.program.program.section(op) if e.program is not None else None
    if section is None:
        return None
    rule = section.rules[e.selection.rule_number - 1]
    return next((c.lstrip("# ") for c in rule.comments.before if CLAIM.search(c)), None)


def _evidence(op: str, features: dict, backend: str, config) -> list[str]:
    """The stored measurements of this configuration on this exact call, newest first."""
    from .paths import database_path
    from .tune.db import Database
    from .tune.measure import Measurer, noise_band
    from .tune.workloads import shape_of

    path = database_path()
    shape = shape_of(op, features)
    if shape is None:
        return [f"(no tuning shape describes this call: {op} with these features is never timed)"]
    if not path.is_file():
        return [f"no tuning database at {path}"]
    with Database(path) as db:
        m = Measurer(backend, db)
        shipped = m.shipped_config(shape).to_dsl()
        rows = [r for r in db.measurements(**{k: v for k, v in m.key(shape, config.to_dsl()).items()
                                              if k != "op"}) if r.op == op]
        band = noise_band(db.latest(**m.key(shape, shipped), phase="control", baseline_config=shipped))
    lines = []
    for r in reversed(rows[-5:]):
        what = (f"A/A control, band ±{band:.1%}" if r.phase == "control" and band is not None else
                f"{r.status}: {r.reason}" if not r.ok else
                f"{r.ratio:.3f}x the shipped choice's time" + _pair_spread(r)
                + (" (busy machine)" if r.loaded else "") + (" (two states)" if r.bimodal else ""))
        lines.append(f"run {r.run_id}, {_when(r.created_at)}, {r.phase}: {what}")
    if not lines:
        lines.append(f"no measurement of this configuration on this call in {path}")
    elif band is not None and config.to_dsl() != shipped:
        lines.append(f"this call's A/A noise band: ±{band:.1%}")
    return lines


def _pair_spread(r) -> str:
    q = sorted(r.pair_ratios)
    if len(q) < 4:
        return f" ({len(q)} pairs)"
    return f" (pairs {q[len(q) // 4]:.3f}-{q[(3 * len(q)) // 4]:.3f}, {len(q)} of them)"


def _read_kevo(path: Path, hint: bool = False) -> str:
    """A .kevo file's text, or an exit with one line saying why not (no traceback); with
    `hint`, a missing file names the shipped program to start from."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        where = ""
        if hint:
            try:
                from . import chips as chips_mod
                from .heuristics import find_source

                backend = chips_mod.default_backend()
                chip = chips_mod.detect(backend)
                shipped = find_source(backend, chip, include_tuned=False).path
                where = (f"; start from the shipped heuristics for this machine's chip ({chip.id}): "
                         f"cp {shipped} {path}")
            except Exception:  # noqa: BLE001 — a hint is a courtesy; the error stands alone
                pass
        _fail(f"{path}: no such file{where}")
    except UnicodeDecodeError as error:
        _fail(f"{path}: not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset "
              f"{error.start}); .kevo files are UTF-8")
    except OSError as error:
        _fail(f"{path}: {error.strerror or error}")


@app.command()
def check(files: list[Path] = typer.Argument(..., help=".kevo files")):
    """Check .kevo files: syntax, names, types, families, parameters, constraints, reachability."""
    from .dsl import DSLError, check as check_program, parse

    failed = False
    for path in files:
        text = _read_kevo(path, hint=True)
        try:
            diagnostics = check_program(parse(text, str(path)), text, str(path))
        except DSLError as error:
            diagnostics = error.diagnostics
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
        text = _read_kevo(path)
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


def _workload(workload: Optional[str], model: Optional[Path], shapes: Optional[Path]):
    """The workload named by --workload / --model / --shapes (at most one of them; none: the
    default preset), or an exit with the reason."""
    from .tune import workloads as wl

    given = [f"--{name}" for name, value in (("workload", workload), ("model", model), ("shapes", shapes))
             if value is not None]
    if len(given) > 1:
        _fail(f"{' and '.join(given)} each name a workload: give one of them", 2)
    workload = workload if workload is not None else wl.DEFAULT_WORKLOAD
    try:
        if model is not None and model.is_dir():
            from .mlx_lm.record import workload_from_model_dir

            return workload_from_model_dir(model)
        if model is not None:
            return wl.from_config(model)
        if shapes is not None:
            return wl.from_shapes_file(shapes)
        if workload in wl.PRESETS:
            return wl.PRESETS[workload]
    except (ValueError, ImportError) as error:
        _fail(" ".join(str(error).split()), 2)
    _fail(f"unknown workload {workload!r}; presets: {', '.join(wl.PRESETS)}", 2)


def _backend(backend: Optional[str], what: str = "tune") -> str:
    """The backend to time on: as asked (refused with the reason where this machine lacks
    it), else MLX's default device."""
    from . import chips as chips_mod

    backend = backend or chips_mod.default_backend()
    if backend not in ("cpu", "cuda", "metal"):
        _fail(f"unknown backend {backend!r}; expected cpu, cuda or metal", 2)
    if backend != "cpu":
        from .ops import BackendNotSupportedError, gpu

        try:
            if gpu.require_gpu(what) != backend:
                raise BackendNotSupportedError(f"this machine's GPU is not a {backend} device")
        except BackendNotSupportedError as error:
            _fail(f"cannot time {backend} kernels here: {error}", 2)
    return backend


class _Bar:
    """A progress bar drawn only between measurements (never while a kernel is timed: the
    tuner does not compete with what it measures), or one plain line per step when the
    output is not a terminal."""

    def __init__(self, title: str):
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=err, transient=True, auto_refresh=False)
        self.task = self.progress.add_task(title, total=1)

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def __call__(self, done: int, total: int | None, what: str) -> None:
        self.progress.update(self.task, completed=done, total=total, description=what, refresh=True)

    def step(self, what: str) -> None:
        """One more measurement starts (for counts not known in advance)."""
        self.steps = getattr(self, "steps", 0) + 1
        self(self.steps - 1, None, what)


_WORKLOAD_HELP = "a built-in workload preset (`kernelevo tune --help` lists them; default: qwen3-0.6b)"
_MODEL_HELP = ("derive the workload from a Hugging Face / mlx-lm config.json, or record it from "
               "an mlx-lm model directory's forward pass")
_SHAPES_HELP = ("a JSON list of explicit shapes, e.g. [{\"op\": \"matmul\", \"M\": 16, \"N\": 4096, \"K\": "
                "4096}]; defaults: dtype bf16, batch 1, transpose_b true (b stored [N, K], a linear "
                "layer's weight); \"split\": \"held-out\" marks shapes to judge on (docs/tuning.md)")


def _presets_help() -> str:
    from .tune.workloads import PRESET_SUMMARIES

    width = max(map(len, PRESET_SUMMARIES))
    return ("\b\nWorkload presets (--workload NAME; --model or --shapes instead name your own):\n"
            + "\n".join(f"  {name:{width}}  {line}" for name, line in PRESET_SUMMARIES.items()))


def _positive_seconds(value: Optional[float]) -> Optional[float]:
    import math

    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"must be a number of seconds above 0, got {value:g}")
    return value


@app.command(help="Time candidate kernels on this chip and write the winners as .kevo heuristics.\n\n"
             + _presets_help())
def tune(chip: str = typer.Option("auto", help="'auto' (this machine's chip) or its id; other chips cannot be timed here"),
         backend: Optional[str] = typer.Option(None, help="cpu, metal or cuda (default: MLX's default device)"),
         workload: Optional[str] = typer.Option(None, help=_WORKLOAD_HELP, show_default=False),
         model: Optional[Path] = typer.Option(None, help=_MODEL_HELP),
         shapes: Optional[Path] = typer.Option(None, help=_SHAPES_HELP),
         strategy: str = typer.Option("evolve", help="evolve, random or exhaustive"),
         candidates: int = typer.Option(DEFAULT_CANDIDATES, min=1, help="configurations searched per shape, besides the shipped one"),
         reps: int = typer.Option(5, min=1, help="timed pairs per search measurement (confirmations take 3x)"),
         time_budget: Optional[float] = typer.Option(
             None, callback=_positive_seconds,
             help="seconds for tuning the training shapes, their baselines (A/A control, MLX's op) included: "
                  "shapes not reached are skipped. The rules found are then judged on the held-out shapes "
                  "and re-timed in fresh workers, which takes longer"),
         seed: int = typer.Option(0, help="seed of the search"),
         output: Optional[Path] = typer.Option(None, help="write the heuristics here instead of the user data directory"),
         database: Optional[Path] = typer.Option(None, "--db", help="the tuning database (default: user cache directory)")):
    """Time candidate kernels on this chip and write the winners as .kevo heuristics."""
    from . import chips as chips_mod
    from .paths import database_path
    from .tune.db import Database
    from .tune.runner import Tuner, TuneSettings
    from .tune.search import STRATEGIES

    backend = _backend(backend)
    local = chips_mod.detect(backend)
    if chip not in ("auto", local.id):
        _fail(f"a chip can only be timed on itself: this machine's {backend} chip is {local.id}, "
              f"not {chip}. Run `kernelevo tune --chip auto` on that machine.", 2)
    if strategy not in STRATEGIES:
        _fail(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}", 2)
    chosen = _workload(workload, model, shapes)
    settings = TuneSettings(strategy=strategy, candidates=candidates, reps=reps, seed=seed,
                            time_budget_s=time_budget)
    db_path = database or database_path()
    print(f"tuning {chosen.description}\n  {len(chosen.shapes)} training shapes, "
          f"{len(chosen.held_out)} held out; chip {local.id} ({local.name}), database {db_path}")
    with Database(db_path) as db, _Bar("tuning") as bar:
        try:
            tuner = Tuner(backend, db, settings, bar)
            if not out.is_terminal:  # piped or logged: no bar there, a plain line per shape
                tuner.announce = lambda line: print(line, flush=True)
            result = tuner.run(chosen, output)
        except KeyboardInterrupt:
            print("interrupted: finished measurements are kept; run the same command to resume",
                  file=sys.stderr)
            raise typer.Exit(130)
    with Database(db_path) as db:
        _print_report(db, result.run_id)
    for reason in result.skipped:
        print(f"skipped {reason}")
    print(f"{result.measured} measured, {result.reused} reused from the database, {result.failed} "
          f"rejected (wrong, failed, crashed or hung), {result.restarts} worker restarts, "
          f"{result.elapsed_s:.0f} s")
    if time_budget is not None:
        print(f"time budget {time_budget:g} s: the training shapes, baselines included, took "
              f"{result.tuning_s:.0f} s; what follows it (judging rules on the held-out shapes, re-timing "
              f"them in fresh workers) took {max(result.elapsed_s - result.tuning_s, 0):.0f} s more")
    _print_load(result.loaded, result.measured + result.reused, result.watched)
    rules = result.distilled.rules if result.distilled else []
    print(f"{len(rules)} rule(s) written, each re-timed in fresh workers; {len(result.dropped)} not written:")
    for reason in result.dropped:
        print(f"  - {reason}")
    print(f"training shapes: {result.geomean_speedup('train'):.3f}x geometric mean over the shipped "
          f"heuristics (each shape's own confirmed best: {result.geomean_best:.3f}x)")
    if any(o.split == "held-out" for o in result.outcomes):
        print(f"held-out shapes (nothing was fitted to them): {result.geomean_speedup('held-out'):.3f}x")
    else:
        print("no held-out shapes: nothing checked that the rules generalise beyond the shapes "
              "they were fitted to")
    if result.output and result.unchanged:
        print(f"unchanged: {result.output} already holds these rules (not rewritten)")
    elif result.output:
        print(f"wrote {result.output}")


def _print_load(loaded: int, total: int, watched: bool) -> None:
    if not watched:
        print("load: this machine does not report CPU pressure; other work during timing went unseen")
    elif loaded:
        print(f"load: {loaded} of {total} measurements ran while other work kept the machine busy "
              f"(past the wait for quiet); none of them decided anything")
    else:
        print("load: every measurement ran on a quiet machine (or waited for one)")


def _ms(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f}"


def _spread(mid: Optional[float], lo: Optional[float], hi: Optional[float]) -> str:
    if mid is None:
        return "-"
    if lo is None or hi is None:
        return _ms(mid)
    return f"{_ms(mid)} [{lo * 1e3:.3f}-{hi * 1e3:.3f}]"


def _print_report(db, run_id: int) -> list[dict]:
    from .tune.report import run_rows, summary

    rows = run_rows(db, run_id)
    run = db.run(run_id)
    for op in dict.fromkeys(r["op"] for r in rows):
        for split in ("train", "held-out"):
            mine = [r for r in rows if r["op"] == op and r["split"] == split]
            if not mine:
                continue
            table = Table(title=f"{op}, {split} shapes, on {run.chip} (run {run_id})", title_justify="left")
            for column in ("shape", "A/A band", "shipped ms [q1-q3]", "tuned ms [q1-q3]", "speedup [q1-q3]",
                           "vs mlx", "chosen configuration"):
                table.add_column(column, justify="left" if column in ("shape", "chosen configuration") else "right")
            for r in mine:
                if r["same"]:
                    tuned, speed = "same", "1.00x (same)"
                else:
                    tuned = _spread(r["chosen_s"], r["chosen_q1_s"], r["chosen_q3_s"])
                    speed = f"{r['speedup']:.2f}x" + (f" [{1 / r['ratio_q3']:.2f}-{1 / r['ratio_q1']:.2f}]"
                                                     if r["ratio_q1"] and r["ratio_q3"] else "")
                table.add_row(r["label"] or r["shape_key"], f"±{r['band']:.1%}" if r["band"] is not None else "-",
                              _spread(r["shipped_s"], r["shipped_q1_s"], r["shipped_q3_s"]), tuned, speed,
                              f"{r['vs_mlx']:.2f}x" if r["vs_mlx"] else "-",
                              r["chosen_config"] + ("" if r["same"] else f"  (rule {r['rule']})"))
            out.print(table)
            g = summary(rows, split, op)
            print(f"{op}, {split}: geometric-mean speedup "
                  + (f"{g:.3f}x" if g else "-") + " over the shipped heuristics")
    return rows


@app.command()
def score(file: Path = typer.Argument(..., help="the .kevo program to score"),
          workload: Optional[str] = typer.Option(None, help=_WORKLOAD_HELP, show_default=False),
          model: Optional[Path] = typer.Option(None, help=_MODEL_HELP),
          shapes: Optional[Path] = typer.Option(None, help=_SHAPES_HELP),
          split: str = typer.Option("all", help="train, held-out or all"),
          replay: bool = typer.Option(False, "--replay", help="use stored measurements only; touch no device"),
          backend: Optional[str] = typer.Option(None, help="cpu, metal or cuda (default: the file's target)"),
          reps: int = typer.Option(5, min=1, help="timed pairs per search measurement (scores take 3x)"),
          database: Optional[Path] = typer.Option(None, "--db")):
    """Measure a program on a workload: per shape, what it selects against what the shipped
    heuristics select, and the geometric mean per split. The fitness `kernelevo evolve` uses."""
    from .paths import database_path
    from .tune.db import Database
    from .tune.measure import MeasureSettings, Measurer
    from .tune.score import Scorer
    from .tune.workloads import SPLITS

    if split not in SPLITS:
        _fail(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}", 2)
    program, backend = _load_program(file, backend, timed=not replay)
    chosen = _workload(workload, model, shapes)
    pairs = [(sp, s) for sp, s in chosen.labelled() if split == "all" or sp == split]
    with Database(database or database_path()) as db:
        program = _compile_for(program, backend, file)
        measurer = Measurer(backend, db, MeasureSettings(reps=reps))
        if replay:
            result = Scorer(measurer, live=False).score(program, pairs)
        else:
            with measurer, _Bar("scoring") as bar:
                measurer.progress = bar.step
                result = Scorer(measurer).score(program, pairs)
    table = Table(title=f"{file} on {chosen.name} ({'replayed' if replay else 'live'})", title_justify="left")
    for column in ("split", "shape", "rule", "selected", "speedup [q1-q3]", "A/A band", "vs mlx", "evidence"):
        table.add_column(column, justify="right" if column in ("speedup [q1-q3]", "A/A band", "vs mlx", "rule") else "left")
    for s in result.shapes:
        m = s.measurement
        if s.status == "same":
            speed, evidence = "1.00x (shipped)", "same configuration as the shipped rules"
        elif s.status == "measured":
            q = sorted(m.pair_ratios)
            quart = f" [{1 / q[(3 * len(q)) // 4]:.2f}-{1 / q[len(q) // 4]:.2f}]" if len(q) >= 4 else ""
            speed = f"{s.speedup:.2f}x{quart}"
            evidence = f"{m.phase}, run {m.run_id}, {_when(m.created_at)}, {len(q)} pairs"
        else:
            speed, evidence = s.status, s.reason
        table.add_row(s.split, s.shape.label or str(s.shape), str(s.rule or "-"),
                      s.selected or "-", speed, f"±{s.band:.1%}" if s.band is not None else "-",
                      f"{s.vs_mlx:.2f}x" if s.vs_mlx else "-", evidence)
    out.print(table)
    for sp in ("train", "held-out"):
        if any(s.split == sp for s in result.shapes):
            g, gm = result.geomean(sp), result.geomean_vs_mlx(sp)
            n = len(result.split(sp))
            print(f"{sp}: " + (f"{g:.3f}x geometric mean over the shipped heuristics on {n} shapes"
                               if g else f"incomplete ({sum(1 for s in result.split(sp) if s.ratio is None)} "
                                         f"of {n} shapes without a usable measurement)")
                  + (f", {gm:.3f}x over MLX's own op" if gm else ""))
    if result.unmeasured:
        print(f"unmeasured (shape, configuration) pairs: {len(result.unmeasured)}")
        for s in result.unmeasured:
            print(f"  {s.shape.key}  {s.selected}")


def _when(stamp: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp))


def _load_program(file: Path, backend: Optional[str], timed: bool):
    """The parsed program and the backend to score it on (its target unless told)."""
    from .dsl import DSLError, parse

    try:
        text = file.read_text(encoding="utf-8")
        program = parse(text, str(file))
    except OSError as error:
        _fail(f"{file}: {error.strerror}", 2)
    except UnicodeDecodeError:
        _fail(f"{file}: not UTF-8 text", 2)
    except DSLError as error:  # the diagnostics as `check` prints them: line:column, a caret
        print(error, file=sys.stderr)
        raise typer.Exit(1)
    backend = backend or program.target or "cpu"
    if timed:
        backend = _backend(backend, "score")
    return (program, text), backend


def _compile_for(loaded, backend: str, file: Path):
    from . import chips as chips_mod
    from .dsl import DSLError
    from .dsl.select import CompiledProgram

    program, text = loaded
    if program.target != backend:
        _fail(f"{file} targets {program.target}, not {backend}", 2)
    try:
        return CompiledProgram(program, text, str(file), chips_mod.detect(backend))
    except DSLError as error:
        print(error, file=sys.stderr)
        raise typer.Exit(1)


@app.command()
def verify(file: Path = typer.Argument(..., help="the .kevo program whose rules to re-measure"),
           workload: Optional[str] = typer.Option(None, help="a preset (default: the one named in the file's header, else qwen3-0.6b)"),
           model: Optional[Path] = typer.Option(None, help=_MODEL_HELP),
           shapes: Optional[Path] = typer.Option(None, help=_SHAPES_HELP),
           rounds: int = typer.Option(2, min=1, help="fresh worker processes that re-time each pair"),
           reps: int = typer.Option(5, min=1, help="timed pairs per search measurement (re-timings take 3x per round)"),
           backend: Optional[str] = typer.Option(None, help="cpu, metal or cuda (default: the file's target)"),
           database: Optional[Path] = typer.Option(None, "--db")):
    """Re-time a program's rules against the shipped ones in fresh workers, and say for each
    rule whether the claim in its comment reproduces (within 5%)."""
    from .paths import database_path
    from .tune.db import Database
    from .tune.measure import MeasureSettings, Measurer
    from .tune.reproduce import check_rules, reproduce

    loaded, backend = _load_program(file, backend, timed=True)
    if workload is None and model is None and shapes is None:
        named = _header_workload(loaded[1])
        if named is not None:
            workload, model, shapes = named
    chosen = _workload(workload, model, shapes)
    with Database(database or database_path()) as db:
        program = _compile_for(loaded, backend, file)
        measurer = Measurer(backend, db, MeasureSettings(reps=reps))
        with measurer, _Bar("re-timing") as bar:
            measurer.progress = bar.step
            items = reproduce(measurer, program, chosen.labelled(), rounds)
        checks = check_rules(program, items)
        loaded_rows = sum(1 for i in items for r in i.rows if r.loaded)
    if not checks:
        print(f"{file}: on {chosen.name} every shape selects what the shipped heuristics select; "
              f"nothing to re-time")
        return
    failed = False
    for c in checks:
        print(f"rule {c.rule} (line {c.line}): {c.text}")
        print(f"  {c.config}")
        for i in c.items:
            ch, sh = i.times("chosen"), i.times("shipped")
            speed = f"{i.speedup:.2f}x" if i.speedup else "-"
            print(f"    {i.split:8s} {i.shape.label or i.shape}: {speed}  "
                  f"(shipped {_spread(*sh) if sh else '-'} ms, this rule {_spread(*ch) if ch else '-'} ms)")
        print(f"  -> {c.verdict}")
        failed |= not c.reproduces
    _print_load(loaded_rows, sum(len(i.rows) for i in items), any(r.load_watched for i in items for r in i.rows))
    if failed:
        raise typer.Exit(1)


def _header_workload(text: str):
    """(workload, model, shapes) from a tuned file's `# Workload: --workload NAME` line."""
    m = re.search(r"^# Workload: --(workload|model|shapes) (.+)$", text, re.MULTILINE)
    if not m:
        return None
    kind, value = m.group(1), m.group(2).strip()
    return (value if kind == "workload" else None, Path(value) if kind == "model" else None,
            Path(value) if kind == "shapes" else None)


evolve_app = typer.Typer(help="Evolve whole .kevo programs (offline mutation, or an LLM).")
app.add_typer(evolve_app, name="evolve")


@evolve_app.callback(invoke_without_command=True)
def evolve(ctx: typer.Context,
           backend: Optional[str] = typer.Option(None, help="cpu, metal or cuda (default: MLX's default device)"),
           workload: Optional[str] = typer.Option(None, help=_WORKLOAD_HELP, show_default=False),
           model: Optional[Path] = typer.Option(None, help=_MODEL_HELP),
           shapes: Optional[Path] = typer.Option(None, help=_SHAPES_HELP),
           seed: list[Path] = typer.Option([], "--seed", help="another program to start from (besides the "
                                           "shipped file and the tuned one)"),
           proposer: str = typer.Option("auto", help="offline, llm, or auto (llm when an endpoint is "
                                        "configured: --base-url or OPENAI_BASE_URL)"),
           base_url: Optional[str] = typer.Option(None, envvar="OPENAI_BASE_URL",
                                                  help="an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8080/v1"),
           llm_model: str = typer.Option("gpt-4o-mini", help="the model the endpoint serves"),
           temperature: float = typer.Option(0.7, min=0, max=2),
           parallel: int = typer.Option(2, min=1, help="LLM requests in flight at once"),
           request_timeout: float = typer.Option(120.0, min=0.1, help="seconds before an LLM request is given up"),
           price_in: float = typer.Option(0.0, min=0, help="cost per million prompt tokens (for --max-cost)"),
           price_out: float = typer.Option(0.0, min=0, help="cost per million completion tokens"),
           iterations: int = typer.Option(300, min=1, help="proposals to process"),
           time_budget: Optional[float] = typer.Option(900.0, min=0, help="seconds for the whole run, judging "
                                                       "and re-timing the winner included (0: none)"),
           max_measurements: Optional[int] = typer.Option(None, min=1, help="new measurements at most"),
           max_tokens: Optional[int] = typer.Option(None, min=1, help="LLM tokens at most"),
           max_cost: Optional[float] = typer.Option(None, min=0, help="LLM cost at most"),
           islands: int = typer.Option(2, min=1),
           population: int = typer.Option(12, min=2, help="programs kept per island (besides cell elites)"),
           replay: bool = typer.Option(False, "--replay", help="stored measurements only; touch no device"),
           rng_seed: int = typer.Option(0, help="seed of the proposer and the sampling"),
           reps: int = typer.Option(5, min=1, help="timed pairs per search measurement (scores take 3x)"),
           output: Optional[Path] = typer.Option(None, help="write the winner here instead of the user data directory"),
           show_prompt: bool = typer.Option(False, "--show-prompt", help="print the first prompt the LLM "
                                            "proposer would send (from stored measurements) and stop"),
           database: Optional[Path] = typer.Option(None, "--db")):
    """Evolve .kevo programs on the training shapes, choose on the held-out ones, and write
    the winner for this chip (the previous file kept). The same command resumes a run."""
    if ctx.invoked_subcommand is not None:
        return
    import os

    from . import chips as chips_mod
    from .evolve.llm import LLMSettings
    from .evolve.loop import Evolution, EvolveSettings
    from .heuristics import find_source
    from .paths import database_path, tuned_heuristics_path
    from .tune.db import Database

    if proposer not in ("auto", "offline", "llm"):
        _fail(f"--proposer takes offline, llm or auto, not {proposer!r}", 2)
    if proposer == "auto":
        proposer = "llm" if base_url else "offline"
    if proposer == "llm" and not base_url and not show_prompt:
        _fail("the LLM proposer needs an endpoint: --base-url or OPENAI_BASE_URL", 2)
    timed = not (replay or show_prompt)
    backend = _backend(backend, "evolve") if timed else (backend or chips_mod.default_backend())
    chosen = _workload(workload, model, shapes)
    chip = chips_mod.detect(backend)
    seeds = []
    shipped = find_source(backend, chip, include_tuned=False).path
    seeds.append((shipped.name, shipped.read_text(encoding="utf-8")))
    tuned = tuned_heuristics_path(chip.id)
    if tuned.is_file():
        seeds.append((f"tuned {tuned.name}", tuned.read_text(encoding="utf-8")))
    for path in seed:
        try:
            seeds.append((path.name, path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as error:
            _fail(f"{path}: {error}", 2)
    llm = None
    if proposer == "llm":
        llm = LLMSettings(base_url=base_url, api_key=os.environ.get("OPENAI_API_KEY", ""), model=llm_model,
                          temperature=temperature, timeout_s=request_timeout, parallel=parallel,
                          price_in=price_in, price_out=price_out)
    settings = EvolveSettings(iterations=iterations, time_budget_s=time_budget or None,
                              max_measurements=max_measurements, max_tokens=max_tokens, max_cost=max_cost,
                              islands=islands, population=population, seed=rng_seed, replay=replay, reps=reps)
    if show_prompt:
        with Database(database or database_path()) as db:
            try:
                messages = Evolution(backend, db, chosen, seeds, settings).first_prompt()
            except RuntimeError as error:
                _fail(str(error))
        for m in messages:
            print(f"=== {m['role']} ===\n{m['content']}\n")
        return
    print(f"evolving {backend} heuristics for {chip.id} on {chosen.name}: {len(chosen.shapes)} training, "
          f"{len(chosen.held_out)} held-out shapes; proposer "
          f"{'llm ' + llm_model + ' at ' + base_url if llm else 'offline'}; seeds: "
          f"{', '.join(n for n, _ in seeds)}{'; replaying stored measurements' if replay else ''}")
    with Database(database or database_path()) as db, _Lines() as lines:
        try:
            result = Evolution(backend, db, chosen, seeds, settings, llm, lines).run(output)
        except KeyboardInterrupt:
            print("interrupted: proposals and measurements are kept; run the same command to resume",
                  file=sys.stderr)
            raise typer.Exit(130)
        except RuntimeError as error:
            _fail(str(error))
    print(f"run {result.run_id}{' (resumed)' if result.resumed else ''}: {result.iterations} iterations, "
          f"stopped by {result.stopped_by}; {result.measurements} new measurements"
          + (f", {result.tokens} tokens, cost {result.cost:.4f}" if llm else ""))
    print("proposals: " + ", ".join(f"{k} {v}" for k, v in sorted(result.outcomes.items())))
    if result.winner is not None:
        held = f"{result.winner_held_out:.3f}x" if result.winner_held_out is not None else "not judged"
        print(f"winner #{result.winner.id} ({result.winner.rules} rules): training {result.winner_train:.3f}x, "
              f"held-out {held} over the shipped heuristics")
        for name, value in result.seed_held_out.items():
            if value is not None:
                print(f"  seed {name}: held-out {value:.3f}x")
        print("lineage: " + " -> ".join(result.lineage))
    if result.dropped:
        print("removed after re-timing in fresh workers:")
    for reason in result.dropped:
        print(f"  - {reason}")
    if result.retimed_train is not None:
        held = f", held-out {result.retimed_held_out:.3f}x" if result.retimed_held_out is not None else ""
        print(f"re-timed in fresh workers: training {result.retimed_train:.3f}x{held}; "
              + (f"wrote {result.output}" if result.output else "nothing written (below the minimum speedup)"))


class _Lines:
    """Progress of a long loop: a live line on a terminal, one plain line per step
    otherwise (logs, CI)."""

    def __enter__(self):
        self.live = sys.stderr.isatty()
        self.bar = _Bar("evolving").__enter__() if self.live else None
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def __call__(self, line: str) -> None:
        if self.bar is not None:
            self.bar.step(line[:150])
        else:
            print(line, flush=True)


@evolve_app.command("report")
def evolve_report(run: Optional[int] = typer.Option(None, help="the evolution run (default: the latest)"),
                  plot: Optional[Path] = typer.Option(None, help="where to write the PNG (default: "
                                                      "evolve-report-<run>.png in the cache directory)"),
                  database: Optional[Path] = typer.Option(None, "--db")):
    """The best programs, the winner against its seed, the proposals' fates, tokens and cost,
    and a plot of the best training and held-out scores over iterations."""
    from .evolve import report as evolve_report_mod
    from .evolve.store import EvolveStore
    from .paths import cache_dir, database_path
    from .tune.db import Database

    with Database(database or database_path(), readonly=True) as db:
        store = EvolveStore(db)
        runs = store.runs()
        if not runs:
            _fail("no evolution run in the database; run `kernelevo evolve`")
        chosen = store.run(run) if run is not None else runs[-1]
        if chosen is None:
            _fail(f"no evolution run {run}")
        r = evolve_report_mod.build(store, chosen.id)
        status = "died: its process is gone; the same command resumes it" if store.dead(chosen) else chosen.status
        table = Table(title=f"best programs of evolution run {chosen.id} on {chosen.chip} ({status})",
                      title_justify="left")
        for column in ("program", "iteration", "proposer", "training", "held-out", "rules", "configs", "re-timed"):
            table.add_column(column, justify="left" if column == "proposer" else "right")
        for p in r.best:
            table.add_row(f"#{p.id}", str(p.iteration), p.proposer, f"{p.train_score:.3f}x",
                          f"{p.held_out_score:.3f}x" if p.held_out_score is not None else "-",
                          str(p.rules), str(p.configs), "yes" if p.firm else "no")
        out.print(table)
        print("proposals: " + ", ".join(f"{k} {v}" for k, v in sorted(r.outcomes.items())))
        rejected = {k: v for k, v in r.outcomes.items() if k not in ("accepted", "pending")}
        print("rejected by reason: " + (", ".join(f"{k} {v}" for k, v in sorted(rejected.items())) or "none"))
        print(f"tokens: {r.tokens_in} prompt, {r.tokens_out} completion; cost {r.cost:.4f}")
        if r.winner is not None:
            s = r.summary
            held = f"{s['held_out']:.3f}x" if s.get("held_out") is not None else "not judged"
            print(f"winner #{r.winner.id}: training {s.get('train', 0):.3f}x, held-out {held}; "
                  f"lineage {' -> '.join(s.get('lineage', []))}")
            if r.diff:
                print(r.diff)
        path = evolve_report_mod.plot(store, chosen.id, plot or cache_dir() / f"evolve-report-{chosen.id}.png")
        print(f"plot: {path}")


def _id_ranges(ids: list[int]) -> str:
    """1-5, 7, 9-10"""
    parts, ids = [], sorted(ids)
    start = prev = ids[0]
    for i in ids[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(f"{start}–{prev}" if prev > start else str(start))
        if i is not None:
            start = prev = i
    return ", ".join(parts)


@app.command()
def report(run: Optional[int] = typer.Option(None, min=1, help="the run (default: the latest finished one)"),
           plot: Optional[Path] = typer.Option(None, help="where to write the PNG plot "
                                               "(default: tune-report-<run>.png in the cache directory)"),
           database: Optional[Path] = typer.Option(None, "--db")):
    """Print the results of a tuning run per op and plot the speedups."""
    from .paths import cache_dir, database_path
    from .tune.db import Database
    from .tune.report import plot as draw

    with Database(database or database_path(), readonly=True) as db:
        runs = db.runs()
        finished = [r for r in runs if r.status == "finished"]
        chosen = (db.run(run) if run < 1 << 62 else None) if run is not None else (
            finished[-1] if finished else None)
        if chosen is None and run is not None:
            _fail(f"no run {run}; " + (f"runs are {_id_ranges([r.id for r in runs])} (`kernelevo db list`)"
                                       if runs else "the database has no tuning run yet; run "
                                                    "`kernelevo tune --chip auto`"))
        if chosen is None:
            _fail("no finished tuning run in the database; run `kernelevo tune --chip auto`"
                  + (f" (runs {_id_ranges([r.id for r in runs])} did not finish: `kernelevo db list`)"
                     if runs else ""))
        rows = _print_report(db, chosen.id)
        if chosen.summary:
            import json

            info = json.loads(chosen.summary)
            print(f"{info['rules']} rule(s) written; {len(info['dropped'])} not written")
            for reason in info["dropped"]:
                print(f"  - {reason}")
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
    from .tune.db import Database, NoDatabase

    try:
        db = Database(database or database_path(), readonly=True)
    except NoDatabase as error:
        print(str(error))
        return
    with db:
        table = Table("run", "started", "chip", "workload", "status", "measurements", "output")
        notes = []
        for run in db.runs():
            n = len(db.measurements(run_id=run.id))
            status = run.status
            if db.dead(run):
                status = "died"
                notes.append(f"run {run.id}: its process (pid {run.pid}) is gone; the next "
                             "`kernelevo tune` marks it so")
            elif run.status == "running" and run.host and run.pid:
                status = f"running (pid {run.pid} on {run.host})"
            elif run.reason and run.status != "finished":
                notes.append(f"run {run.id} {run.status}: {run.reason}")
            table.add_row(str(run.id), time.strftime("%Y-%m-%d %H:%M", time.localtime(run.started_at)),
                          run.chip, run.workload, status, str(n), run.output or "")
        out.print(table)
        for note in notes:
            print(note)


@db_app.command("show")
def db_show(run: Optional[int] = typer.Option(None, help="only this run"),
            database: Optional[Path] = typer.Option(None, "--db")):
    """Show measurements."""
    from .paths import database_path
    from .tune.db import Database

    with Database(database or database_path(), readonly=True) as db:
        table = Table("id", "shape", "config", "status", "median ms", "vs baseline", "reason")
        for m in db.measurements(run_id=run):
            table.add_row(str(m.id), m.shape_key, m.config, m.status, _ms(m.median_s),
                          f"{m.ratio:.3f}" if m.ratio else "", m.reason or "")
        out.print(table)


@db_app.command("export")
def db_export(output: Path = typer.Argument(..., help="a JSON file (its folder must exist)"),
              database: Optional[Path] = typer.Option(None, "--db")):
    """Write every run and measurement to a JSON file."""
    import json
    import os

    from .paths import database_path
    from .tune.db import Database

    folder = output.parent
    if not folder.is_dir():
        _fail(f"cannot write {output}: the folder {folder} does not exist (make it first)", 2)
    with Database(database or database_path(), readonly=True) as db:
        data = db.export()
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, output)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    print(f"wrote {len(data['runs'])} runs and {len(data['measurements'])} measurements to {output}")


@db_app.command("prune")
def db_prune(stale: bool = typer.Option(False, help="measurements of kernels this build no longer has"),
             chip: Optional[str] = typer.Option(None, help="all measurements of this chip"),
             older_than_days: Optional[float] = typer.Option(None, help="measurements older than this many days"),
             yes: bool = typer.Option(False, "--yes", help="delete them (without it: only show what would go)"),
             database: Optional[Path] = typer.Option(None, "--db")):
    """Delete measurements: shows what would go, and deletes only with --yes."""
    import math
    import time

    from .paths import database_path
    from .tune.db import Database
    from .tune.measure import template_hash

    if older_than_days is not None and (not math.isfinite(older_than_days) or older_than_days < 0):
        _fail(f"--older-than-days takes a number of days, 0 or more, not {older_than_days:g}", 2)
    keep = {"cpu": template_hash("cpu")} if stale else None
    before = time.time() - older_than_days * 86400 if older_than_days is not None else None
    criteria = dict(keep_template_hashes=keep, chip=chip, before=before)
    with Database(database or database_path(), readonly=not yes) as db:
        try:
            groups = db.prune_preview(**criteria)
        except ValueError as error:
            _fail(f"{error}: --stale, --chip or --older-than-days", 2)
        total = sum(g["n"] for g in groups)
        if not total:
            print("nothing to delete: no measurement matches")
            return
        print(f"{'deleting' if yes else 'would delete'} {total} measurement(s):")
        for g in groups:
            days = time.strftime("%Y-%m-%d", time.localtime(g["first"]))
            last = time.strftime("%Y-%m-%d", time.localtime(g["last"]))
            print(f"  {g['n']:6d}  chip {g['chip']}, {g['backend']}, run {g['run_id'] or '-'}, "
                  f"taken {days}" + (f" to {last}" if last != days else ""))
        if not yes:
            print("nothing deleted (a dry run): pass --yes to delete them")
            return
        n = db.prune(**criteria)
    print(f"deleted {n} measurements")


@db_app.command("repair")
def db_repair(database: Optional[Path] = typer.Option(None, "--db")):
    """Check the database; a damaged one is moved aside (kept, never deleted) as
    <name>.damaged-<time> and a new one started."""
    from .paths import database_path
    from .tune.db import repair

    message, _ = repair(database or database_path())
    print(message)


def main() -> None:
    """The command, whose failures of files and the database end in one line, exit 1."""
    import sqlite3

    from .tune.db import DatabaseProblem, one_line

    try:
        app()
    except (DatabaseProblem, sqlite3.Error, OSError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        sys.exit(1)


from .cli_model import register as _register_model_commands  # noqa: E402 — `bench-model`
_register_model_commands(app)

if __name__ == "__main__":
    main()
