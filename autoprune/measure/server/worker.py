"""The latency server's measuring process: a memory limit and a hard time limit for each request.

A model can allocate far more than its file size (a 76-byte ``ConstantOfShape`` asks for 2 GB)
or run forever (a ``Loop`` with 10**12 iterations); static checks catch only what is known
before running. So the server never runs a model itself: a persistent child process
(:mod:`autoprune.measure.server.worker_main`) does, with ``RLIMIT_AS`` set to the address space it
had after loading the runtimes plus ``max_memory_mb``. An allocation past that fails inside the
child (the request gets an error, the child is replaced); a request that outlives its time
limit gets the child killed. The server process only ever holds bytes and JSON.

Why persistent, and why it does not disturb timing: importing torch and the runtimes and loading
their plug-ins takes seconds, paid once per child instead of per request; the timing loop runs
inside the child exactly as it would in-process (the parent is blocked in ``select`` meanwhile),
and the server's measurement lock still admits one request at a time.

Wire format on two pipes (no pickle in either direction: a child running hostile models must
not be able to run code in the server by what it replies): a frame is an 8-byte big-endian
length and that many bytes of JSON; a job frame is followed by the raw byte blobs whose sizes
it lists in ``blobs``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import autoprune

__all__ = ["MeasureWorker", "WorkerFailure", "finite_json", "read_frame", "FRAME", "CHILD_MODULE"]

log = logging.getLogger("autoprune.serve")

FRAME = struct.Struct(">Q")
#: The directory that holds the ``autoprune`` package: the child must import this same code.
_ROOT = str(Path(autoprune.__file__).resolve().parents[1])
#: The measuring process, run as ``python -m`` (its module path is part of how the child starts).
CHILD_MODULE = "autoprune.measure.server.worker_main"
Blob = Union[bytes, bytearray, memoryview]


class WorkerFailure(Exception):
    """The measuring process did not answer: ``kind`` is "timeout", "died" or "startup"."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def finite_json(obj: Any) -> Any:
    """``obj`` with NaN and infinities replaced by None: JSON has no such numbers, and
    ``json.dumps`` would write ``Infinity`` (which strict parsers reject) unless told not to."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def _write_all(fd: int, data: Blob, deadline: float) -> None:
    view = memoryview(data).cast("B")
    while view:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        _, w, _ = select.select([], [fd], [], left)
        if w:
            n = os.write(fd, view[: 1 << 20])
            view = view[n:]


def _read_exact(fd: int, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        r, _, _ = select.select([fd], [], [], left)
        if r:
            chunk = os.read(fd, min(n - len(buf), 1 << 20))
            if not chunk:
                raise EOFError
            buf += chunk
    return bytes(buf)


def read_frame(fd: int, deadline: float, max_bytes: int) -> dict[str, Any]:
    """One JSON frame from ``fd`` (non-blocking) before ``deadline`` (``time.monotonic()``)."""
    (n,) = FRAME.unpack(_read_exact(fd, FRAME.size, deadline))
    if n > max_bytes:
        raise EOFError(f"reply of {n} bytes is over the limit of {max_bytes}")
    obj = json.loads(_read_exact(fd, n, deadline))
    if not isinstance(obj, dict):
        raise EOFError("reply is not a JSON object")
    return obj


class MeasureWorker:
    """Parent-side handle of the measuring process; started eagerly, restarted after a failure.

    Not thread-safe on purpose beyond its own lock: the server calls :meth:`run` while holding
    its measurement lock, so jobs never overlap.
    """

    def __init__(self, backends: Sequence[str], max_memory_mb: float, max_reply_bytes: int,
                 startup_timeout_s: float = 300.0) -> None:
        self.backends = list(backends)
        self.max_memory_mb = max_memory_mb
        self.max_reply_bytes = max_reply_bytes
        self.startup_timeout_s = startup_timeout_s
        self.info: dict[str, Any] = {}
        self._proc: Optional[subprocess.Popen] = None
        self._to_child = -1
        self._from_child = -1
        self._work_dir: Optional[str] = None
        self._lock = threading.Lock()

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None else None

    def _alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> dict[str, Any]:
        """Start the child if it is not running; wait for it to load the runtimes. Returns its
        ready message (baseline and limit of its address space, runtimes warmed up)."""
        with self._lock:
            return self._start()

    def _start(self) -> dict[str, Any]:
        if self._alive():
            return self.info
        self._stop()
        # The parent owns the child's scratch folder, so a killed child leaves nothing behind.
        self._work_dir = tempfile.mkdtemp(prefix="autoprune-serve-")
        job_r, job_w = os.pipe()
        rep_r, rep_w = os.pipe()
        cfg = json.dumps({"backends": self.backends, "max_memory_mb": self.max_memory_mb, "work_dir": self._work_dir})
        env = dict(os.environ)
        # glibc reserves 64 MB of address space per malloc arena and thread; under RLIMIT_AS that
        # would be spent on reservations, not on memory. Two arenas are plenty for a timing loop.
        env.setdefault("MALLOC_ARENA_MAX", "2")
        env["PYTHONPATH"] = _ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", CHILD_MODULE, str(job_r), str(rep_w), cfg],
                pass_fds=(job_r, rep_w), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env,
                start_new_session=True,  # Ctrl-C at the server's terminal is the server's to handle
            )
        finally:
            os.close(job_r)
            os.close(rep_w)
        self._to_child, self._from_child = job_w, rep_r
        os.set_blocking(job_w, False)
        os.set_blocking(rep_r, False)
        try:
            ready = read_frame(rep_r, time.monotonic() + self.startup_timeout_s, 1 << 20)
        except (TimeoutError, EOFError, ValueError) as exc:
            self._stop()
            raise WorkerFailure("startup", f"the measuring process did not start ({type(exc).__name__}); "
                                           "see the server's log") from None
        self.info = ready
        log.info("measuring process %s ready: %s", self._proc.pid, ready)
        return ready

    def run(self, job: dict[str, Any], blobs: Sequence[Blob], timeout_s: float) -> dict[str, Any]:
        """Send one job and return the child's reply; kill the child if it takes over ``timeout_s``
        or dies. Raises :class:`WorkerFailure`."""
        with self._lock:
            self._start()
            deadline = time.monotonic() + timeout_s
            header = json.dumps({**job, "blobs": [len(memoryview(b).cast("B")) for b in blobs]}).encode()
            try:
                _write_all(self._to_child, FRAME.pack(len(header)) + header, deadline)
                for b in blobs:
                    _write_all(self._to_child, b, deadline)
                reply = read_frame(self._from_child, deadline, self.max_reply_bytes)
            except TimeoutError:
                self._stop()
                raise WorkerFailure("timeout", f"the measurement took longer than {timeout_s:g} s") from None
            except (EOFError, BrokenPipeError, ValueError, OSError):
                code = self._stop()
                how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit status {code}"
                raise WorkerFailure("died", f"the measuring process died ({how})") from None
            if reply.get("exiting"):  # it asked to be replaced (memory error, or its heap has grown)
                self._stop()
            return reply

    def _stop(self) -> Optional[int]:
        """Kill the child (if any) and close the pipes; returns its exit status."""
        code = None
        for fd in (self._to_child, self._from_child):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._to_child = self._from_child = -1
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            try:
                code = self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                log.error("measuring process %s did not exit after SIGKILL", self._proc.pid)
            self._proc = None
        if self._work_dir is not None:
            shutil.rmtree(self._work_dir, ignore_errors=True)
            self._work_dir = None
        return code

    def close(self) -> None:
        """Stop the child; after 5 s of waiting for a running job, kill it anyway (shutdown must
        not wait out a long measurement)."""
        got = self._lock.acquire(timeout=5)
        try:
            self._stop()
        finally:
            if got:
                self._lock.release()
