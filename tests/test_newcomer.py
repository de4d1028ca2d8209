"""The path a newcomer takes: the README's examples and commands work as written, help
screens say what there is (workload presets, the shapes file's defaults) without type
markers, explain says where the tuned file goes, conflicting options are refused, report
names the runs there are, a time budget covers the baselines, a tune that changes nothing
rewrites nothing, and a piped tune prints its progress.

Tunes here time through the scripted worker (tests/support/scripted_worker.py): real
kernels, verified, on a scripted clock, with tiny settings."""

import json
import re
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kernelevo import chips
from kernelevo.cli import app
from kernelevo.paths import database_path, tuned_heuristics_path
from kernelevo.tune import runner as runner_mod
from kernelevo.tune import workloads as wl
from kernelevo.tune.db import Database
from kernelevo.tune.runner import Tuner, TuneSettings
from kernelevo.tune.workloads import MatmulShape, Workload

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
LOCAL = chips.detect("cpu")
SCRIPTED = str(Path(__file__).parent / "support" / "scripted_worker.py")
RUNNER = CliRunner()
TINY = TuneSettings(strategy="random", candidates=2, reps=2, warmup=0, confirm=1)
SHAPES = (MatmulShape(16, 64, 48, "f32", label="s1"), MatmulShape(32, 64, 48, "f32", label="s2"))


def invoke(*args, env=None):
    return RUNNER.invoke(app, [str(a) for a in args], env={"COLUMNS": "200", **(env or {})})


def script(tmp_path) -> list[str]:
    path = tmp_path / "script.json"
    path.write_text(json.dumps({"default": 1.0, "noise": 0.01}))  # nothing faster: no rule
    return [sys.executable, SCRIPTED, str(path)]


class Reached(Exception):
    pass


@pytest.fixture
def no_tuning(monkeypatch):
    def stub(*args, **kwargs):
        raise Reached()

    monkeypatch.setattr(runner_mod, "Tuner", stub)


# -- explain ------------------------------------------------------------------------------

def test_explain_prints_where_the_tuned_file_goes_when_there_is_none_yet():
    path = tuned_heuristics_path(LOCAL.id)
    assert not path.exists()
    result = invoke("explain", "matmul", "--shape", "16x4096x4096", "--dtype", "bf16")
    assert result.exit_code == 0, result.output
    assert f"tuned    {path}" in result.stdout and "none there yet" in result.stdout


# -- the README ---------------------------------------------------------------------------

def _kevo_example() -> str:
    return re.search(r"```\n(kevo 1\n.*?)```", README, re.S).group(1)


def test_the_readme_kevo_example_checks_with_and_without_its_chips_line(tmp_path):
    text = _kevo_example()
    assert re.search(r"^chips ", text, re.M)
    for name, body in (("example.kevo", text), ("no-chips.kevo", re.sub(r"^chips .*\n", "", text, flags=re.M))):
        path = tmp_path / name
        path.write_text(body)
        result = invoke("check", path)
        assert result.exit_code == 0, (name, result.output)
        assert invoke("fmt", "--check", path).exit_code == 0, name


def test_the_readme_python_examples_run_as_written():
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "import kernelevo as ke" in b]
    assert any("ke.attention(q, k, v)" in b for b in blocks) and any("ke.matmul(" in b for b in blocks)
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 — the README's own code


def test_the_readme_attention_example_matches_the_signature():
    import inspect

    import kernelevo as ke

    params = inspect.signature(ke.attention).parameters
    assert params["scale"].default is None  # shown without scale: 1/sqrt(head_dim)
    for name in re.findall(r"ke\.attention\([^)]*?(\w+)=", README):
        assert name in params, name


def _readme_commands() -> list[list[str]]:
    commands = []
    for line in README.splitlines():  # the indented command lines
        if line.startswith("    kernelevo "):
            commands.append(line.split("#")[0].split()[1:])
    return commands


def test_every_readme_command_names_real_commands_and_options():
    commands = _readme_commands()
    assert len(commands) > 15 and ["tune", "--help"] in commands
    for args in commands:
        if "--help" in args:
            args = [a for a in args if a != "--help"]
        result = invoke(*args, "--help")
        assert result.exit_code == 0, (args, result.output)


# -- help screens ----------------------------------------------------------------------

def test_tune_help_lists_every_workload_preset_with_a_line():
    result = invoke("tune", "--help")
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    for name, line in wl.PRESET_SUMMARIES.items():
        assert f"{name} {' '.join(line.split())}" in text, name
    assert set(wl.PRESET_SUMMARIES) == set(wl.PRESETS)


@pytest.mark.parametrize("command", [["tune"], ["explain"], ["score"], ["report"], ["check"], ["verify"],
                                     ["db", "list"], []])
def test_help_screens_show_no_type_markers(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0, result.output
    markers = re.findall(r"<(?:str|int|bool|float|path|text)>", result.stdout)
    assert not markers, (command, markers)


def test_the_transpose_b_default_is_documented_and_true(tmp_path):
    help_text = " ".join(invoke("tune", "--help").stdout.split())
    assert "transpose_b true" in help_text
    assert "**`transpose_b` to `true`**" in (ROOT / "docs" / "tuning.md").read_text()
    assert "`transpose_b` defaults to **true**" in README
    path = tmp_path / "shapes.json"
    path.write_text('[{"M": 16, "N": 64, "K": 48}]')
    assert wl.from_shapes_file(path).shapes[0].transpose_b is True


# -- options ------------------------------------------------------------------------------

def test_shapes_model_and_workload_are_exclusive(no_tuning, tmp_path):
    shapes = tmp_path / "shapes.json"
    shapes.write_text('[{"M": 16, "N": 64, "K": 48}]')
    config = tmp_path / "config.json"
    config.write_text('{"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2}')
    for args, named in ((["--workload", "tiny", "--shapes", shapes], "--workload and --shapes"),
                        (["--model", config, "--shapes", shapes], "--model and --shapes"),
                        (["--workload", "qwen3-0.6b", "--model", config], "--workload and --model")):
        result = invoke("tune", *args)
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
        assert result.stderr.strip() == f"error: {named} each name a workload: give one of them"
    result = invoke("score", ROOT / "src" / "kernelevo" / "heuristics" / "cpu.kevo", "--replay",
                    "--workload", "tiny", "--shapes", shapes)
    assert result.exit_code == 2 and "give one of them" in result.stderr
    for args in (["--shapes", shapes], ["--model", config], ["--workload", "tiny"], []):
        assert isinstance(invoke("tune", *args).exception, Reached), args


def test_report_of_a_run_that_does_not_exist_names_the_runs_there_are():
    with Database(database_path()) as db:
        for _ in range(3):
            db.finish_run(db.start_run(LOCAL.id, "cpu", "tiny", {}), "finished", None)
    result = invoke("report", "--run", "99")
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: no run 99; runs are 1–3 (`kernelevo db list`)"


# -- tuning -------------------------------------------------------------------------------

def test_the_time_budget_covers_the_baselines(tmp_path):
    """A budget spent before the first shape: no shape's A/A control or MLX baseline is
    timed (before, every training shape's baselines ran whatever the budget)."""
    from dataclasses import replace

    workload = Workload("budget", "budget", SHAPES)
    with Database(database_path()) as db:
        result = Tuner("cpu", db, replace(TINY, time_budget_s=1e-9), worker_command=script(tmp_path)).run(
            workload, write=False)
        rows = db.measurements(run_id=result.run_id)
    assert not [r for r in rows if r.phase in ("control", "confirm")], [(r.phase, r.config) for r in rows]
    assert any("not reached within the time budget" in s for s in result.skipped), result.skipped
    help_text = " ".join(invoke("tune", "--help").stdout.split())
    assert "baselines (A/A control, MLX's op) included" in help_text


def test_a_tune_that_changes_nothing_rewrites_nothing_and_one_backup_is_kept(tmp_path):
    output = tmp_path / "out" / "tuned.kevo"
    workload = Workload("same", "same", SHAPES[:1])
    command = script(tmp_path)

    def tune():
        with Database(database_path()) as db:
            return Tuner("cpu", db, TINY, worker_command=command).run(workload, output=output)

    first = tune()
    assert output.is_file() and not first.unchanged
    before = output.read_text()
    second = tune()
    assert second.unchanged and output.read_text() == before
    assert not list(output.parent.glob("*.prev")), list(output.parent.iterdir())
    for stamp in ("20261201-101010", "20261202-111111"):  # dated backups of earlier versions
        (output.parent / f"tuned.kevo.{stamp}.prev").write_text("old")
    for edit in ("# a hand-made note\n", "# another one\n"):  # a changed file is replaced...
        output.write_text(before + edit)
        assert not tune().unchanged and output.read_text() != before + edit
        assert [p.name for p in output.parent.glob("*.prev*")] == ["tuned.kevo.prev"]  # ...one backup
    assert (output.parent / "tuned.kevo.prev").read_text() == before + "# another one\n"


def test_a_piped_tune_prints_a_line_per_shape(tmp_path, monkeypatch):
    monkeypatch.setattr(runner_mod.Tuner.__init__, "__defaults__", (TuneSettings(), None, script(tmp_path)))
    shapes = tmp_path / "shapes.json"
    shapes.write_text(json.dumps([{"M": s.M, "N": s.N, "K": s.K, "dtype": "f32", "label": s.label}
                                  for s in SHAPES]))
    result = invoke("tune", "--shapes", shapes, "--candidates", "1", "--reps", "2", "--strategy", "random",
                    "--output", tmp_path / "tuned.kevo", "--time-budget", "600")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert any(line.startswith("[1/2] s1: 16x64x48 f32") for line in lines), result.stdout
    assert any(line.startswith("[2/2] s2: 32x64x48 f32") for line in lines), result.stdout
    assert "time budget 600 s: the training shapes, baselines included, took" in result.stdout
