"""Compiling kernels into emulator executables, cached by content hash.

A kernel executable is the kernel's translation unit (emulation header + MLX prelude +
the generated source, instrumented so every load and store calls the runtime's checks)
linked with the runtime object (compiled once per runtime version). Both live in the
cache directory ($MSLEMU_CACHE_DIR, else the user cache dir); an entry's name is the hash
of everything that went into it, so a stale entry is never used.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import platformdirs

from . import prelude
from .errors import CompileError

HERE = Path(__file__).parent
INCLUDE = HERE / "include"
RUNTIME_SOURCES = [HERE / "csrc" / "runtime.cpp", INCLUDE / "mslemu" / "runtime.h"]
CACHE_DIR = Path(os.environ.get("MSLEMU_CACHE_DIR") or platformdirs.user_cache_dir("kernelevo-mslemu"))
CXX = os.environ.get("MSLEMU_CXX", "g++")

COMMON_FLAGS = ["-std=c++20", "-fno-pie", "-fno-omit-frame-pointer", "-fno-strict-aliasing", "-fwrapv",
                "-I", str(INCLUDE)]
# Every load and store of the kernel becomes a call to __tsan_{read,write}N, which the
# runtime implements (GCC's ThreadSanitizer instrumentation without its library: unlike
# the AddressSanitizer's, it reports reads and writes apart and merges no checks).
INSTRUMENT_FLAGS = ["-fsanitize=thread", "--param", "tsan-instrument-func-entry-exit=0"]
# No tail calls: a barrier or collective must return into the code that called it, or
# the same call would look like different call sites.
KERNEL_FLAGS = ["-O2", "-g1", "-fno-optimize-sibling-calls", "-w", "-Wno-attributes", "-Wno-unknown-pragmas", *INSTRUMENT_FLAGS]
RUNTIME_FLAGS = ["-O2", "-g1", "-pthread"]
# How fibers switch: hand-written on x86-64 ("auto"), else ucontext, which x86-64 can
# also be asked for (the portable path, so it is tested too).
CONTEXT_SWITCHES = {"auto": [], "ucontext": ["-DMSLEMU_UCONTEXT"]}


@functools.cache
def compiler_version() -> str:
    try:
        out = subprocess.run([CXX, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise CompileError(f"mslemu needs GCC >= 12 as {CXX!r} (set MSLEMU_CXX): {e}") from None
    if "clang" in out.lower() or not re.search(r"\b(1[2-9]|[2-9]\d)\.\d+", out.splitlines()[0]):
        raise CompileError(f"mslemu needs GCC >= 12 (thread-sanitizer instrumentation hooks, _Float16); found: "
                           f"{out.splitlines()[0]}")
    return out.splitlines()[0]


def _digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:20]


@functools.cache
def header_digest() -> str:
    files = sorted(p for p in INCLUDE.rglob("*") if p.is_file())
    return _digest(*(p.read_bytes() for p in files), prelude.emulator_prelude())


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished build directory into place; another process may have won."""
    try:
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def _run_compiler(cmd: list[str], cwd: Path, what: str) -> None:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise CompileError(f"{what} failed:\n{_trim(r.stderr)}", details={"stderr": r.stderr})


def _trim(diagnostics: str, limit: int = 60) -> str:
    lines = diagnostics.splitlines()
    keep = [l for l in lines if ": error" in l or ": note" in l or l.startswith(" ")]
    keep = keep or lines
    return "\n".join(keep[:limit]) + ("\n..." if len(keep) > limit else "")


@functools.cache
def runtime_object(context_switch: str = "auto") -> Path:
    flags = RUNTIME_FLAGS + CONTEXT_SWITCHES[context_switch]
    key = _digest(compiler_version(), " ".join(COMMON_FLAGS + flags), *(p.read_bytes() for p in RUNTIME_SOURCES))
    final = CACHE_DIR / f"runtime-{key}"
    obj = final / "runtime.o"
    if obj.exists():
        return obj
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=CACHE_DIR, prefix=".tmp-runtime-"))
    _run_compiler([CXX, *COMMON_FLAGS, *flags, "-c", str(HERE / "csrc" / "runtime.cpp"), "-o", "runtime.o"],
                  tmp, "compiling the mslemu runtime")
    _publish(tmp, final)
    return obj


class Build:
    """A compiled kernel: its executable and the generated Metal source beside it."""

    def __init__(self, directory: Path, kernel_name: str, compile_seconds: float):
        self.directory = directory
        self.executable = directory / "kernel"
        self.metal_path = directory / f"{kernel_name}.metal"
        self.compile_seconds = compile_seconds
        self._lines: list[str] | None = None

    def source_line(self, line: int) -> str:
        if self._lines is None:
            self._lines = self.metal_path.read_text().splitlines()
        return self._lines[line - 1] if 0 < line <= len(self._lines) else ""


_builds: dict[str, Build] = {}


def build_kernel(kernel_name: str, metal_source: str, translation_unit: str, context_switch: str = "auto") -> Build:
    """Compile (or find in the cache) the executable for one generated kernel.
    `metal_source` is the exact MLX source (kept for reports); `translation_unit` what is
    compiled."""
    key = _digest(compiler_version(), " ".join(COMMON_FLAGS + KERNEL_FLAGS), header_digest(),
                  str(runtime_object(context_switch)), translation_unit)
    final = CACHE_DIR / f"k-{key}"
    if key in _builds or (final / "kernel").exists():
        _builds[key] = Build(final, kernel_name, 0.0)
        return _builds[key]
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=CACHE_DIR, prefix=".tmp-k-"))
    (tmp / f"{kernel_name}.metal").write_text(metal_source)
    (tmp / "prelude.h").write_text(prelude.emulator_prelude())
    (tmp / "kernel.cpp").write_text(translation_unit)
    t0 = time.perf_counter()
    try:
        r = subprocess.run([CXX, *COMMON_FLAGS, *KERNEL_FLAGS, "-c", "kernel.cpp", "-o", "kernel.o"], cwd=tmp,
                           capture_output=True, text=True)
        if r.returncode != 0:
            # Keep the sources for inspection; the error points at them.
            failed = CACHE_DIR / f"failed-{key}"
            shutil.rmtree(failed, ignore_errors=True)
            os.rename(tmp, failed)
            raise _compile_error(r.stderr, kernel_name, failed)
        _run_compiler([CXX, "-no-pie", "-pthread", "kernel.o", str(runtime_object(context_switch)), "-o", "kernel"], tmp,
                      "linking the kernel")
        (tmp / "sites.txt").write_text(_site_table(tmp / "kernel"))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - t0
    (tmp / "kernel.o").unlink()
    _publish(tmp, final)
    _builds[key] = Build(final, kernel_name, 0.0)
    return Build(final, kernel_name, seconds)


def _compile_error(stderr: str, kernel_name: str, directory: Path) -> CompileError:
    """GCC's diagnostics, pointing at the first error in the kernel's own source."""
    lines = (directory / f"{kernel_name}.metal").read_text().splitlines()
    m = re.search(rf"{re.escape(kernel_name)}\.metal:(\d+):\d+: error: (.*)", stderr)
    location = line = code = None
    if m:
        line = int(m.group(1))
        location = f"{kernel_name}.metal:{line}"
        code = lines[line - 1] if line <= len(lines) else ""
    head = f"kernel {kernel_name} does not compile"
    if m:
        head += f": {m.group(2)} at {location}\n    {line} | {code.strip()}"
    return CompileError(f"{head}\n{_trim(stderr)}", location=location, line=line, code=code,
                        source_path=str(directory / f"{kernel_name}.metal"), details={"stderr": stderr})


# Functions of the runtime and the C++ library: their calls are never a kernel's call site.
_NOT_KERNEL = re.compile(r"^(_ZN6mslemu|_ZNSt|_ZSt|_ZNKSt|_ZN9__gnu_cxx|__tsan|main$|_start|_init|_fini|frame_dummy|"
                         r"register_tm_clones|deregister_tm_clones|__do_global|__libc|_dl_|.*@plt)")


def _site_table(executable: Path) -> str:
    """Call sites of the kernel, grouped by source position: "<return address> <id>" lines.

    The runtime tells apart the barriers and collectives threads wait at by the return
    addresses of the calls. The compiler may duplicate a call (jump threading) or merge
    two calls from different lines (tail merging); two return addresses that map to the
    same chain of (file, line) positions, inlined calls included, are the same site."""
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-w", str(executable)], capture_output=True,
                         text=True, check=True).stdout.splitlines()
    returns, in_kernel, pending = [], False, False
    for line in asm:
        if m := re.match(r"^[0-9a-f]+ <(.+)>:$", line):
            in_kernel, pending = not _NOT_KERNEL.match(m.group(1)), False
            continue
        m = re.match(r"^\s*([0-9a-f]+):\s+(\S+)\s*(.*)$", line)
        if not m:
            continue
        if pending:
            returns.append(m.group(1))
        pending = in_kernel and m.group(2).startswith("call") and "__tsan" not in m.group(3)
    if not returns:
        return ""
    frames = symbolize(executable, [[f"0x{r}"] for r in returns])
    ids: dict[tuple, int] = {}
    rows = []
    for r, chain in zip(returns, frames):
        key = tuple((os.path.basename(f), line) for _, f, line in chain)
        rows.append(f"{r} {ids.setdefault(key, len(ids) + 1)}")
    return "\n".join(rows) + "\n"


def symbolize(executable: Path, chains: list[list[str]]) -> list[list[tuple[str, str, int]]]:
    """Each chain of return addresses as frames (function, file, line), innermost first,
    inlined calls expanded."""
    addrs = [hex(int(a, 16) - 1) for chain in chains for a in chain]
    if not addrs:
        return [[] for _ in chains]
    out = subprocess.run(["addr2line", "-a", "-f", "-i", "-C", "-e", str(executable), *addrs],
                         capture_output=True, text=True).stdout.splitlines()
    per_addr: list[list[tuple[str, str, int]]] = []
    i = 0
    while i < len(out):
        if out[i].startswith("0x"):
            per_addr.append([])
            i += 1
            continue
        func = out[i]
        loc = out[i + 1] if i + 1 < len(out) else "??:0"
        file, _, ln = loc.rpartition(":")
        m = re.match(r"(\d+)", ln)
        per_addr[-1].append((func, file, int(m.group(1)) if m else 0))
        i += 2
    result, k = [], 0
    for chain in chains:
        frames = []
        for _ in chain:
            frames += per_addr[k] if k < len(per_addr) else []
            k += 1
        result.append(frames)
    return result
