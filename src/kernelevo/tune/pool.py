"""Runs tuning jobs in a worker process (tune/worker.py) that can die without harm.

A job that kills the worker (a crash in a kernel) is reported as `crash` with the signal;
one that outlives its time limit (a hang) as `timeout`; either way the worker is
replaced and the run goes on.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

DEFAULT_COMMAND = (sys.executable, "-m", "kernelevo.tune.worker")

#: numpy's BLAS threads (the float64 references) must sleep between calls, or their
#: spinning takes the cores the next timing needs
QUIET_BLAS = {"OPENBLAS_THREAD_TIMEOUT": "4", "OMP_WAIT_POLICY": "PASSIVE"}


class WorkerPool:
    def __init__(self, command: Sequence[str] = DEFAULT_COMMAND, timeout_s: float = 300.0,
                 start_timeout_s: float = 120.0):
        self.command = list(command)
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self.restarts = 0
        self.started = 0  # worker processes started (a fresh worker per `fresh()`)
        self._proc: subprocess.Popen | None = None
        self._buffer = b""
        self._stderr = tempfile.TemporaryFile()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.stdin.close()
                try:
                    self._proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._proc = None

    def fresh(self) -> None:
        """The next job runs in a new worker process (nothing cached, nothing warm)."""
        self.close()

    def _start(self) -> None:
        self._stderr.seek(0)
        self._stderr.truncate()
        self._buffer = b""
        self._proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._stderr, env={**QUIET_BLAS, **os.environ})
        self.started += 1
        ready, _ = self._read_line(self.start_timeout_s)
        if ready is None or not json.loads(ready).get("ready"):
            raise RuntimeError(f"the tuning worker did not start: {self._stderr_tail()}")

    def _stderr_tail(self, limit: int = 800) -> str:
        self._stderr.seek(0)
        text = self._stderr.read().decode(errors="replace").strip()
        return text[-limit:] if text else "(no output)"

    def _read_line(self, timeout: float) -> tuple[bytes | None, bool]:
        """(a line, False), or (None, True) when the worker closed its output (it died),
        or (None, False) when the time ran out."""
        deadline = time.monotonic() + timeout
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                return None, False
            readable, _, _ = select.select([fd], [], [], left)
            if not readable:
                return None, False
            chunk = os.read(fd, 65536)
            if not chunk:
                return None, True
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line, False

    def run(self, job: dict) -> dict:
        if self._proc is None or self._proc.poll() is not None:
            self._start()
        try:
            self._proc.stdin.write((json.dumps(job) + "\n").encode())
            self._proc.stdin.flush()
        except BrokenPipeError:
            pass
        line, died = self._read_line(self.timeout_s)
        if line is not None:
            return json.loads(line)
        status = None
        if died:  # its output closed: wait for the exit status that says how it died
            try:
                status = self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                status = None
        if status is None:  # still running: it hangs
            self._proc.kill()
            self._proc.wait()
            result = {"status": "timeout", "reason": f"no result within {self.timeout_s:.0f} s; "
                                                      f"the worker was killed"}
        else:
            how = (f"signal {signal.Signals(-status).name}" if status < 0
                   else f"exit status {status}")
            result = {"status": "crash", "reason": f"the worker died ({how}): {self._stderr_tail()}"}
        self._proc = None
        self.restarts += 1
        return result
