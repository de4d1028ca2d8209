"""The Python API: `metal_kernel(...)` mirrors `mx.fast.metal_kernel`; calling the result
generates MLX's exact source, compiles it for the emulator (cached), runs one dispatch in
a subprocess and returns the outputs with the dispatch's counters."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import build, cxx, mlx_source
from .errors import BY_KIND, CompileError, KernelError, ScheduleMismatchError

SCHEDULES = {"forward": 0, "reverse": 1, "random": 2}
MAX_THREADS_PER_THREADGROUP = 1024
DEFAULT_WORKERS = max(1, min(2, os.cpu_count() or 1))
_SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


@dataclass(frozen=True)
class BufferStats:
    """Traffic of one buffer. `bytes_*` count every access; `unique_bytes_*` count
    distinct bytes touched (a kernel that reads each element once has
    bytes_read == unique_bytes_read == nbytes)."""

    name: str
    # "input" (device address space), "constant" (an input of fewer than 8 elements, which
    # MLX binds in the constant address space), "output", or "meta" (*_shape/_strides/_ndim)
    role: str
    nbytes: int
    bytes_read: int
    bytes_written: int
    unique_bytes_read: int
    unique_bytes_written: int


@dataclass(frozen=True)
class Stats:
    """Counters of one dispatch. Device totals cover the buffers in the device address
    space (inputs of 8 or more elements, and outputs). Barrier counts are summed over threadgroups, simdgroup barriers,
    collectives and MMAs over simdgroups (an MMA is one 8x8x8 simdgroup_multiply)."""

    buffers: dict[str, BufferStats]
    device_bytes_read: int
    device_bytes_written: int
    threadgroup_memory: int  # bytes of threadgroup variables one threadgroup declared (max)
    threadgroup_bytes_read: int
    threadgroup_bytes_written: int
    threadgroup_barriers: int
    simdgroup_barriers: int
    simd_collectives: int
    mma: int
    atomics: int
    threadgroups: int
    threads: int
    run_seconds: float  # the dispatch inside the emulator process
    compile_seconds: float  # 0.0 when the build came from the cache
    kernel_name: str = ""
    source_path: str = ""


@dataclass
class _Buffer:
    name: str
    role: str
    data: np.ndarray | None  # bytes to send (inputs, meta)
    nbytes: int
    itemsize: int
    init: str = "data"  # data | poison | fill
    fill: str = ""
    dtype: mx.Dtype | None = None
    shape: tuple = ()


@dataclass
class _Input:
    data: np.ndarray  # the bytes MLX would bind (for strided inputs, the whole span)
    dtype: mx.Dtype
    shape: tuple
    strides: tuple  # in elements


def _as_input(x, ensure_row_contiguous: bool) -> _Input:
    if isinstance(x, mx.array):
        dtype = x.dtype
        host = np.array(x.view(mx.uint16)) if dtype == mx.bfloat16 else np.array(x)
    elif isinstance(x, (bool, np.bool_)):
        return _as_input(np.array(x, dtype=np.bool_), True)
    elif isinstance(x, (int, np.integer)) and not isinstance(x, np.ndarray):
        return _as_input(np.array(x, dtype=np.int32), True)
    elif isinstance(x, (float, np.floating)):
        return _as_input(np.array(x, dtype=np.float32), True)
    elif isinstance(x, np.ndarray):
        dtype = mlx_source.to_mx_dtype(x.dtype)
        host = x
    else:
        raise ValueError(f"kernel inputs must be mx.array, numpy arrays or scalars, not {type(x).__name__}")
    item = host.itemsize
    if ensure_row_contiguous or host.flags.c_contiguous:
        host = np.array(host, order="C", copy=not host.flags.c_contiguous)  # keeps 0-d arrays 0-d
        strides = tuple(s // item for s in host.strides) if host.ndim else ()
        return _Input(host.reshape(-1).view(np.uint8), dtype, host.shape, strides)
    # Bind the span the strided view covers, as MLX binds a strided array's buffer.
    if any(s < 0 or s % item for s in host.strides):
        raise ValueError("a non-contiguous input needs non-negative strides that are multiples of its itemsize")
    strides = tuple(s // item for s in host.strides)
    span = 1 + sum((n - 1) * s for n, s in zip(host.shape, strides)) if host.size else 0
    flat = np.zeros(span, dtype=host.dtype)
    if host.size:
        np.lib.stride_tricks.as_strided(flat, host.shape, host.strides)[...] = host
    return _Input(flat.view(np.uint8), dtype, host.shape, strides)


def _triple(v, what: str) -> tuple[int, int, int]:
    try:
        t = tuple(int(x) for x in v)
    except TypeError:
        raise ValueError(f"{what} must be a 3-tuple of positive ints, got {v!r}") from None
    if len(t) != 3 or min(t) < 1:
        raise ValueError(f"{what} must be a 3-tuple of positive ints, got {v!r}")
    return t


def _fill_bytes(value: float, dtype: mx.Dtype) -> str:
    a = mx.array(value).astype(dtype)
    host = np.array(a.view(mx.uint16)) if dtype == mx.bfloat16 else np.array(a)
    return host.tobytes().hex()


class MetalKernel:
    """A kernel as `mx.fast.metal_kernel` defines it, run by the emulator."""

    def __init__(self, name: str, input_names, output_names, source: str, header: str = "",
                 ensure_row_contiguous: bool = True, atomic_outputs: bool = False):
        if not output_names:
            raise ValueError("[metal_kernel] Must specify at least one output.")
        if not re.fullmatch(r"\w+", name):
            raise ValueError(f"kernel name must be an identifier, got {name!r}")
        for n in [*input_names, *output_names]:
            if not re.fullmatch(r"[A-Za-z_]\w*", n):
                raise ValueError(f"input/output names must be identifiers, got {n!r}")
        self.name = name
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.source = source
        self.header = header
        self.ensure_row_contiguous = ensure_row_contiguous
        self.atomic_outputs = atomic_outputs

    # ---- source generation
    def generated_source(self, *, inputs, output_dtypes, template=None) -> tuple[str, str]:
        """(kernel name, source) exactly as MLX would JIT it for these arguments (without
        the prelude MLX puts in front, prelude.mlx_utils())."""
        specs = [self._spec(_as_input(x, self.ensure_row_contiguous)) for x in inputs]
        return self._write(specs, [mlx_source.to_mx_dtype(d) for d in output_dtypes], self._template(template))

    def _spec(self, inp: _Input) -> mlx_source.ArgSpec:
        return mlx_source.ArgSpec(inp.dtype, len(inp.shape), int(math.prod(inp.shape)))

    @staticmethod
    def _template(template):
        template = list(template or [])
        for item in template:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
                raise ValueError(f"template entries must be (name, value) pairs, got {item!r}")
            mlx_source.template_value(item[1])
        return template

    def _write(self, specs, output_dtypes, template):
        return mlx_source.write_source(self.name, self.input_names, self.output_names, self.source, self.header,
                                       self.atomic_outputs, specs, output_dtypes, template)

    def _translation_unit(self, kname: str, metal: str, specs, output_dtypes, template) -> str:
        try:
            body = cxx.dedupe_address_space_overloads(cxx.protect_qualifier_attributes(metal))
            body = cxx.rewrite_threadgroup_declarations(body)
        except cxx.RewriteError as e:
            code = metal.splitlines()[e.line - 1]
            raise CompileError(f"kernel {kname}: {e}\n    {e.line} | {code.strip()}", location=f"{kname}.metal:{e.line}",
                               line=e.line, code=code) from None
        infos = mlx_source.shape_infos(self.source, self.input_names)
        args = []
        index = 0
        for spec, (has_shape, has_strides, has_ndim) in zip(specs, infos):
            t = mlx_source.type_string(spec.dtype)
            args.append(f"*static_cast<const {t}*>(b[{index}])" if spec.ndim == 0
                        else f"static_cast<const {t}*>(b[{index}])")
            index += 1
            if spec.ndim > 0:
                for used, t in ((has_shape, "int"), (has_strides, "int64_t")):
                    if used:
                        args.append(f"static_cast<const {t}*>(b[{index}])")
                        index += 1
                if has_ndim:
                    args.append(f"*static_cast<const int*>(b[{index}])")
                    index += 1
        for d in output_dtypes:
            t = mlx_source.type_string(d)
            t = f"metal::atomic<{t}>" if self.atomic_outputs else t
            args.append(f"static_cast<{t}*>(b[{index}])")
            index += 1
        for attr, t in mlx_source.used_attributes(self.source):
            args.append(f"uint3(a.{attr}.x, a.{attr}.y, a.{attr}.z)" if t == "uint3" else f"a.{attr}")
        call = kname + (mlx_source.kernel_name(self.name, specs, output_dtypes, template)[1] if template else "")
        arglist = ",\n      ".join(args)
        return (
            '#include "mslemu/metal.h"\n'
            '#include "prelude.h"\n'
            f'#line 1 "{kname}.metal"\n'
            f"{body}\n"
            '#line 1 "mslemu-entry"\n'
            'extern "C" void mslemu_kernel_thread(void* const* b) {\n'
            "  const mslemu::ThreadAttrs& a = *mslemu::current_attrs;\n"
            "  (void)a;\n"
            f"  {call}(\n      {arglist});\n"
            "}\n"
        )

    # ---- dispatch
    def __call__(self, *, inputs, output_shapes, output_dtypes, grid, threadgroup, template=None,
                 init_value=None, verbose=False, schedule="forward", seed=0, workers=None, timeout=60.0,
                 race_check=True, max_threadgroup_memory=32768, stack_bytes=128 * 1024, context_switch="auto"):
        """Run one dispatch. Returns (list of mx.array outputs, Stats). Raises a
        KernelError subclass when the kernel fails to compile or misbehaves."""
        if len(inputs) != len(self.input_names):
            raise ValueError(f"[metal_kernel] Expected `inputs` to have size {len(self.input_names)} but got size "
                             f"{len(inputs)}.")
        if len(output_shapes) != len(self.output_names):
            raise ValueError(f"[metal_kernel] Expected `output_shapes` to have size {len(self.output_names)} but got "
                             f"size {len(output_shapes)}.")
        if len(output_dtypes) != len(self.output_names):
            raise ValueError(f"[metal_kernel] Expected `output_dtypes` to have size {len(self.output_names)} but got "
                             f"size {len(output_dtypes)}.")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}")
        if context_switch not in build.CONTEXT_SWITCHES:
            raise ValueError(f"context_switch must be one of {sorted(build.CONTEXT_SWITCHES)}, got {context_switch!r}")
        grid = _triple(grid, "grid")
        threadgroup = _triple(threadgroup, "threadgroup")
        dispatched = tuple(min(t, g) for t, g in zip(threadgroup, grid))
        if math.prod(dispatched) > MAX_THREADS_PER_THREADGROUP:
            raise ValueError(f"Thread group size ({math.prod(dispatched)}) is greater than the maximum allowed "
                             f"threads per threadgroup ({MAX_THREADS_PER_THREADGROUP}).")
        ins = [_as_input(x, self.ensure_row_contiguous) for x in inputs]
        specs = [self._spec(i) for i in ins]
        out_dtypes = [mlx_source.to_mx_dtype(d) for d in output_dtypes]
        out_shapes = [tuple(int(s) for s in shape) for shape in output_shapes]
        template = self._template(template)
        kname, metal = self._write(specs, out_dtypes, template)
        if verbose:
            print(f"Generated source code for `{self.name}`:\n```\n{metal}\n```")
        b = build.build_kernel(kname, metal, self._translation_unit(kname, metal, specs, out_dtypes, template),
                               context_switch)

        buffers = self._buffers(ins, out_shapes, out_dtypes, init_value)
        with tempfile.TemporaryDirectory(prefix="mslemu-", dir=_SCRATCH) as tmp:
            request = Path(tmp) / "request"
            prefix = Path(tmp) / "response"
            self._write_request(request, buffers, grid, threadgroup, schedule, seed, workers, timeout, race_check,
                                max_threadgroup_memory, stack_bytes)
            try:
                r = subprocess.run([str(b.executable), str(request), str(prefix)], capture_output=True, text=True,
                                   timeout=timeout + 30)
            except subprocess.TimeoutExpired:
                raise BY_KIND["deadlock"](f"kernel {kname} did not finish within {timeout + 30:.0f} s and was killed",
                                          source_path=str(b.metal_path)) from None
            if r.returncode != 0:
                raise self._failure(r, prefix, b, kname)
            outputs = self._read_outputs(prefix.with_suffix(".out"), buffers)
            stats = self._stats(json.loads(prefix.with_suffix(".stats.json").read_text()), buffers, b, kname)
        return outputs, stats

    def _buffers(self, ins, out_shapes, out_dtypes, init_value) -> list[_Buffer]:
        infos = mlx_source.shape_infos(self.source, self.input_names)
        bufs = []
        for name, inp, (has_shape, has_strides, has_ndim) in zip(self.input_names, ins, infos):
            item = int(np.dtype(mlx_source.DTYPES[inp.dtype][1]).itemsize)
            role = "const" if math.prod(inp.shape) < mlx_source.MAX_CONSTANT_ARRAY_SIZE else "in"
            bufs.append(_Buffer(name, role, inp.data, inp.data.nbytes, item, dtype=inp.dtype, shape=inp.shape))
            if len(inp.shape) > 0:
                meta = []
                if has_shape:
                    meta.append((f"{name}_shape", np.array(inp.shape, dtype=np.int32)))
                if has_strides:
                    meta.append((f"{name}_strides", np.array(inp.strides, dtype=np.int64)))
                if has_ndim:
                    meta.append((f"{name}_ndim", np.array(len(inp.shape), dtype=np.int32)))
                for mname, arr in meta:
                    bufs.append(_Buffer(mname, "meta", arr.reshape(-1).view(np.uint8), arr.nbytes, arr.itemsize))
        for name, shape, dtype in zip(self.output_names, out_shapes, out_dtypes):
            item = int(np.dtype(mlx_source.DTYPES[dtype][1]).itemsize)
            nbytes = int(math.prod(shape)) * item
            if init_value is None:
                bufs.append(_Buffer(name, "out", None, nbytes, item, "poison", dtype=dtype, shape=shape))
            else:
                bufs.append(_Buffer(name, "out", None, nbytes, item, "fill", _fill_bytes(init_value, dtype),
                                    dtype=dtype, shape=shape))
        return bufs

    @staticmethod
    def _write_request(path, buffers, grid, threadgroup, schedule, seed, workers, timeout, race_check,
                       max_threadgroup_memory, stack_bytes):
        lines = [
            f"grid {grid[0]} {grid[1]} {grid[2]}",
            f"threadgroup {threadgroup[0]} {threadgroup[1]} {threadgroup[2]}",
            f"schedule {SCHEDULES[schedule]}",
            f"seed {int(seed) & (2**64 - 1)}",
            f"workers {int(workers or DEFAULT_WORKERS)}",
            f"timeout_ms {int(timeout * 1000)}",
            f"race_check {int(bool(race_check))}",
            f"max_threadgroup_memory {int(max_threadgroup_memory)}",
            f"stack_bytes {int(stack_bytes)}",
        ]
        for bf in buffers:
            lines.append(f"buffer {bf.name} {bf.nbytes} {bf.itemsize} {bf.role} {bf.init} {bf.fill}".rstrip())
        with open(path, "wb") as f:
            f.write(("\n".join(lines) + "\nend\n").encode())
            for bf in buffers:
                if bf.init == "data":
                    f.write(bf.data.tobytes())

    @staticmethod
    def _read_outputs(path: Path, buffers) -> list[mx.array]:
        raw = path.read_bytes()
        outs, pos = [], 0
        for bf in buffers:
            if bf.role != "out":
                continue
            np_dtype = mlx_source.DTYPES[bf.dtype][1]
            host = np.frombuffer(raw, dtype=np_dtype, count=bf.nbytes // bf.itemsize, offset=pos).reshape(bf.shape)
            pos += bf.nbytes
            arr = mx.array(host.copy())
            outs.append(arr.view(mx.bfloat16) if bf.dtype == mx.bfloat16 else arr)
        return outs

    @staticmethod
    def _stats(j: dict, buffers, b: build.Build, kname: str) -> Stats:
        roles = {"in": "input", "const": "constant", "out": "output", "meta": "meta"}
        per = {}
        for bf, c in zip(buffers, j["buffers"]):
            per[bf.name] = BufferStats(bf.name, roles[bf.role], bf.nbytes, c["read"], c["written"], c["unique_read"],
                                       c["unique_written"])
        device = [s for s in per.values() if s.role in ("input", "output")]
        return Stats(
            buffers=per,
            device_bytes_read=sum(s.bytes_read for s in device),
            device_bytes_written=sum(s.bytes_written for s in device),
            threadgroup_memory=j["threadgroup_memory"],
            threadgroup_bytes_read=j["threadgroup_bytes_read"],
            threadgroup_bytes_written=j["threadgroup_bytes_written"],
            threadgroup_barriers=j["threadgroup_barriers"],
            simdgroup_barriers=j["simdgroup_barriers"],
            simd_collectives=j["simd_collectives"],
            mma=j["mma"],
            atomics=j["atomics"],
            threadgroups=j["threadgroups"],
            threads=j["threads"],
            run_seconds=j["seconds"],
            compile_seconds=b.compile_seconds,
            kernel_name=kname,
            source_path=str(b.metal_path),
        )

    @staticmethod
    def _failure(r: subprocess.CompletedProcess, prefix: Path, b: build.Build, kname: str) -> KernelError:
        err_path = prefix.with_suffix(".error.json")
        if not err_path.exists():
            return KernelError(f"kernel {kname}: the emulator exited with status {r.returncode}:\n{r.stderr[-4000:]}",
                               source_path=str(b.metal_path))
        err = json.loads(err_path.read_text())
        frames = build.symbolize(b.executable, err["sites"])
        metal_name = f"{kname}.metal"
        locations = []
        for chain in frames:
            kernel_frames = [f for f in chain if os.path.basename(f[1]) == metal_name and f[2] > 0]
            if kernel_frames:
                locations.append((f"{metal_name}:{kernel_frames[0][2]}", kernel_frames[0][2]))
            elif chain:
                locations.append((f"{os.path.basename(chain[0][1])}:{chain[0][2]} (in {chain[0][0]})", None))
            else:
                locations.append(("<unknown location>", None))
        message = re.sub(r"\{site:(\d+)\}", lambda m: locations[int(m.group(1))][0], err["message"])
        location, line = locations[0] if locations else (None, None)
        code = b.source_line(line) if line else None
        if code is not None:
            message += f"\n    {line} | {code.strip()}"
        message += f"\n(kernel source: {b.metal_path})"
        cls = BY_KIND.get(err["kind"], KernelError)
        details = {k: v for k, v in err.items() if k not in ("kind", "message", "sites")}
        details["frames"] = frames
        return cls(f"kernel {kname}: {message}", location=location, line=line, code=code,
                   source_path=str(b.metal_path), details=details)


def metal_kernel(name: str, input_names, output_names, source: str, header: str = "",
                 ensure_row_contiguous: bool = True, atomic_outputs: bool = False) -> MetalKernel:
    """Same arguments as mx.fast.metal_kernel."""
    return MetalKernel(name, input_names, output_names, source, header, ensure_row_contiguous, atomic_outputs)


def run_schedules(kernel: MetalKernel, schedules=("forward", "reverse", "random"), **call):
    """Run one dispatch under several fiber schedules and require bitwise-equal outputs
    (a missing barrier makes them differ). Returns the first run's (outputs, stats)."""
    first = None
    for sched in schedules:
        outs, stats = kernel(schedule=sched, **call)
        if first is None:
            first = (sched, outs, stats)
            continue
        for name, a, b in zip(kernel.output_names, first[1], outs):
            ha = np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a)
            hb = np.array(b.view(mx.uint16) if b.dtype == mx.bfloat16 else b)
            if ha.tobytes() != hb.tobytes():
                diff = np.flatnonzero(ha.reshape(-1).view(np.uint8) != hb.reshape(-1).view(np.uint8))
                raise ScheduleMismatchError(
                    f"kernel {stats.kernel_name}: output '{name}' differs between schedules {first[0]!r} and "
                    f"{sched!r} (first differing byte {int(diff[0])} of {ha.nbytes}): the result depends on the "
                    "order threads run in, usually a missing threadgroup_barrier",
                    source_path=stats.source_path, details={"output": name, "schedules": (first[0], sched)})
    return first[1], first[2]
