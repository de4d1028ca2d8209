"""The kernelevo command: chips, check, fmt, explain (tune has its own tests)."""

import os
import subprocess
import sys

from kernelevo import chips


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "kernelevo.cli", *args], capture_output=True,
                          text=True, env=dict(os.environ), cwd=cwd, timeout=300)


def test_chips_prints_the_local_chip():
    result = run("chips", "--backend", "cpu")
    assert result.returncode == 0, result.stderr
    assert chips.detect("cpu").id in result.stdout and "chip.cores" in result.stdout


def test_check_reports_every_error_and_fails(tmp_path):
    bad = tmp_path / "bad.kevo"
    bad.write_text("kevo 1\ntarget cpu\nmatmul {\n  when Q > 1 { gemv nb=16 threads=1 kb=256 epilogue=fused }\n"
                   "  when dtype == f8 { gemv nb=16 threads=1 kb=256 epilogue=fused }\n}\n")
    result = run("check", str(bad))
    assert result.returncode == 1
    assert f"{bad}:4:8: error: unknown name 'Q'" in result.stderr
    assert f"{bad}:5:17: error: 'f8' is not a value of dtype" in result.stderr
    assert "needs a final `else" in result.stderr
    good = tmp_path / "good.kevo"
    good.write_text("kevo 1\ntarget cpu\n\nmatmul {\n  else { gemv nb=16 threads=1 kb=256 epilogue=fused }\n}\n")
    result = run("check", str(good))
    assert result.returncode == 0 and f"{good}: ok" in result.stdout


def test_fmt_prints_rewrites_and_checks(tmp_path):
    path = tmp_path / "messy.kevo"
    path.write_text("kevo 1 target cpu matmul{ # keep me\nelse{gemv nb=8*2 threads = 1}}")
    result = run("fmt", str(path))
    assert result.returncode == 0
    assert result.stdout == ("kevo 1\ntarget cpu\n\nmatmul {  # keep me\n"
                             "  else { gemv nb=8 * 2 threads=1 }\n}\n")
    assert run("fmt", "--check", str(path)).returncode == 1
    assert run("fmt", "--write", str(path)).returncode == 0
    assert path.read_text() == result.stdout
    assert run("fmt", "--check", str(path)).returncode == 0


def test_explain_matmul_here_and_attention_on_a_named_chip():
    result = run("explain", "matmul", "--shape", "16x4096x4096", "--dtype", "bf16")
    assert result.returncode == 0, result.stderr
    assert "cpu.kevo" in result.stdout and "config   gem" in result.stdout
    result = run("explain", "attention", "--q-len", "1", "--kv-len", "8192", "--heads", "32",
                 "--kv-heads", "8", "--chip", "apple-m3-pro")
    assert result.returncode == 0, result.stderr
    # untuned, a Mac runs MLX's own op (kernelevo's Metal kernels are untimed on Apple GPUs)
    assert "apple-pro.kevo" in result.stdout and "config   mlx" in result.stdout


def test_explain_errors_are_clear():
    result = run("explain", "matmul", "--shape", "16x4096")
    assert result.returncode == 2 and "MxNxK" in result.stderr
    result = run("explain", "attention", "--q-len", "1", "--kv-len", "8", "--chip", "apple-m9")
    assert result.returncode == 1 and "unknown chip id 'apple-m9'" in result.stderr
