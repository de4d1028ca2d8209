"""What the emulator reports. Every failure of a kernel is a KernelError (a RuntimeError);
bad arguments to the API are ValueErrors."""

from __future__ import annotations


class KernelError(RuntimeError):
    """A kernel failed to compile or run. `location` is "file:line" in the generated
    Metal source (the file lies in the emulator's cache, see `source_path`), `line` its
    line number, `code` the text of that line."""

    kind = "error"

    def __init__(self, message: str, *, location: str | None = None, line: int | None = None,
                 code: str | None = None, source_path: str | None = None, details: dict | None = None):
        super().__init__(message)
        self.message = message
        self.location = location
        self.line = line
        self.code = code
        self.source_path = source_path
        self.details = details or {}


class CompileError(KernelError):
    """The source does not compile as MSL under the emulator (GCC's diagnostics)."""

    kind = "compile"


class OutOfBoundsError(KernelError):
    """A device access outside its buffer, or a threadgroup access outside its variable."""

    kind = "out_of_bounds"


class UninitializedReadError(KernelError):
    """A read of threadgroup memory no thread wrote, or of an output no thread wrote."""

    kind = "uninitialized"


class RaceError(KernelError):
    """Two threads touched the same threadgroup byte (at least one writing) with no
    barrier between them: a missing threadgroup_barrier (or simdgroup_barrier)."""

    kind = "race"


class DivergenceError(KernelError):
    """Threads of one threadgroup (barrier) or simdgroup (collective) reached different
    calls."""

    kind = "divergence"


class DeadlockError(KernelError):
    """Threads wait for something that never happens: a barrier that threads which
    returned never reach, or a loop that makes no progress (watchdog)."""

    kind = "deadlock"


class LimitError(KernelError):
    """A Metal pipeline limit is exceeded (threadgroup memory, threads per threadgroup)."""

    kind = "limit"


class KernelCrash(KernelError):
    """The kernel faulted (e.g. a wild pointer, integer division by zero, stack overflow)."""

    kind = "crash"


class ScheduleMismatchError(KernelError):
    """Outputs differ between fiber schedules: the result depends on thread order."""

    kind = "schedule"


BY_KIND = {c.kind: c for c in (CompileError, OutOfBoundsError, UninitializedReadError, RaceError,
                               DivergenceError, DeadlockError, LimitError, KernelCrash, ScheduleMismatchError)}
