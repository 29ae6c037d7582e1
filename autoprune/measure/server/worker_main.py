"""The measuring process of ``autoprune serve-latency`` (the parent side is
:mod:`autoprune.measure.server.worker`).

``python -m autoprune.measure.server.worker_main JOB_FD REPLY_FD CONFIG_JSON``: imports the runtimes,
runs a tiny model once on each served backend (so their plug-in libraries are mapped before the
limit is set), caps its own address space at what it then uses plus ``max_memory_mb``, says
ready, and answers jobs until the job pipe closes. A job that hits the memory limit gets an
error reply, and the process exits after it so the next job starts from a clean heap.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO, Optional

import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper as oh

from autoprune.config import DeviceProfile, validate
from autoprune.errors import BackendUnavailable, ConfigError
from autoprune.measure import backends
from autoprune.measure.backends.remote import remote_input
from autoprune.measure.ov_core import shared_core
from autoprune.measure.server.model_check import ModelRejected, redact_paths, static_input_shape, validate_onnx
from autoprune.measure.server.worker import FRAME, finite_json
from autoprune.measure.onnx import ModelArtifact

try:
    import resource
except ImportError:  # not POSIX: no address-space limit (the time limit still holds)
    resource = None  # type: ignore[assignment]

__all__ = ["main", "handle", "check_job", "limit_memory", "runtime_info", "warm_up", "vm_bytes", "ClientError"]

#: How runtimes and libc say "out of memory".
_MEMORY = re.compile(r"bad_alloc|failed to allocate|cannot allocate|out of memory|MemoryError|ENOMEM", re.I)


def vm_bytes() -> Optional[int]:
    """This process's address-space size (what RLIMIT_AS limits), where /proc tells it."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _tiny_model(path: Path) -> Path:
    x = oh.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = oh.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    onnx.save(oh.make_model(oh.make_graph([oh.make_node("Relu", ["x"], ["y"])], "warm-up", [x], [y]),
                            opset_imports=[oh.make_opsetid("", 17)]), str(path))
    return path


def warm_up(names: list[str], work: Path) -> dict[str, str]:
    """Load and run a tiny model on each backend's CPU device; returns name -> "ok" or the error."""
    art = ModelArtifact(_tiny_model(work / "warm-up.onnx"), quantized=True)
    out = {}
    for name in names:
        try:
            prof = DeviceProfile(name="warm-up", backend=name, device="CPU" if name == "openvino" else "cpu")
            backends.load(art, prof)(np.zeros((1, 4), np.float32))
            out[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - a runtime that is not installed is reported, not fatal
            out[name] = f"{type(exc).__name__}: {exc}"[:300]
    return out


def runtime_info() -> dict[str, Any]:
    """Versions, providers and devices of the runtimes, for ``GET /v1/info`` (asked here, so the
    server process never loads a runtime)."""
    info: dict[str, Any] = {}
    try:
        import onnxruntime as ort

        info["onnxruntime"] = {"version": ort.__version__, "providers": ort.get_available_providers()}
    except ImportError:
        pass
    try:
        import openvino as ov

        info["openvino"] = {"version": ov.__version__, "devices": shared_core().available_devices}
    except ImportError:
        pass
    return info


def limit_memory(max_memory_mb: float) -> dict[str, Any]:
    """Cap the address space at its current size plus ``max_memory_mb`` (soft and hard, so
    nothing in this process can raise it again); 0 or less means no cap."""
    base = vm_bytes()
    info: dict[str, Any] = {"vm_baseline_mb": round(base / 2**20) if base else None, "vm_limit_mb": None}
    if max_memory_mb > 0 and base is not None and resource is not None:
        lim = base + int(max_memory_mb * 2**20)
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            lim = min(lim, hard)
        try:
            resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
            info["vm_limit_mb"] = round(lim / 2**20)
        except (ValueError, OSError) as exc:
            info["warning"] = f"could not limit the address space: {exc}"
    elif max_memory_mb > 0:
        info["warning"] = "no address-space limit on this platform (needs Linux /proc and resource)"
    return info


def _read_job(f: BinaryIO) -> Optional[tuple[dict[str, Any], list[bytes]]]:
    head = f.read(FRAME.size)
    if len(head) < FRAME.size:
        return None
    job = json.loads(f.read(FRAME.unpack(head)[0]))
    blobs = [f.read(n) for n in job["blobs"]]
    if any(len(b) != n for b, n in zip(blobs, job["blobs"])):
        return None
    return job, blobs


def _send(f: BinaryIO, obj: dict[str, Any]) -> None:
    data = json.dumps(finite_json(obj), allow_nan=False).encode()
    f.write(FRAME.pack(len(data)) + data)
    f.flush()


class ClientError(ValueError):
    """The job asked for something this server does not return (e.g. an output over the limit)."""


def check_job(job: dict[str, Any], parts: dict[str, bytes]) -> list[int]:
    """The static checks of the uploaded model(s) (:func:`validate_onnx`) and the input shape,
    here under the memory limit: parsing, ``onnx.checker`` and shape inference allocate in
    proportion to what a model holds or implies, and the server process must not. Returns the
    input shape (the request's, else the model's static one); a rejection is a ClientError."""
    lim = job["check"]
    shape = job["input_shape"]
    try:
        model = validate_onnx(parts["model"], "model", int(lim["max_tensor_bytes"]), shape)
        model_shape = static_input_shape(model)
        del model
        if "reference" in parts:
            validate_onnx(parts["reference"], "reference", int(lim["max_tensor_bytes"]), shape or model_shape)
    except ModelRejected as exc:
        raise ClientError(str(exc)) from None
    if shape is None:
        shape = model_shape
        if shape is None:
            raise ClientError("the model's input has dynamic dimensions; send settings.input_shape (with the batch size)")
        size = int(np.prod(shape, dtype=object)) * 4
        if len(shape) > int(lim["max_input_rank"]) or size > int(lim["max_input_bytes"]):
            raise ClientError(f"the model's input shape {shape} is {size:,} bytes of float32, over this server's limit "
                              f"of {int(lim['max_input_bytes']):,} bytes (or more than {lim['max_input_rank']} dimensions)")
    if "input" in parts and len(parts["input"]) != int(np.prod(shape, dtype=object)) * 4:
        raise ClientError(f"input part has {len(parts['input'])} bytes, expected float32 of shape {shape}")
    return [int(s) for s in shape]


def handle(job: dict[str, Any], blobs: list[bytes], work: Path) -> dict[str, Any]:
    """Time one model (and its reference) as the job says; warm-up, repeats and an optional
    output all within ``max_measure_s`` of receiving the job."""
    deadline = time.perf_counter() + float(job["max_measure_s"])
    parts = dict(zip(job["parts"], blobs))
    try:
        profile = validate(DeviceProfile, {"name": "remote-request", **job["profile"]}, "request settings")
        backends.check(profile)  # a device or provider this machine lacks is the client's to change
    except (ConfigError, BackendUnavailable) as exc:
        raise ClientError(str(exc)) from None
    shape = check_job(job, parts) if "check" in job else [int(s) for s in job["input_shape"]]
    work.mkdir()
    (work / "model.onnx").write_bytes(parts["model"])
    art = ModelArtifact(work / "model.onnx", quantized=True)  # the client quantized it (or it is fp32 on purpose)
    ref = None
    if "reference" in parts:
        (work / "reference.onnx").write_bytes(parts["reference"])
        ref = ModelArtifact(work / "reference.onnx", quantized=True)
    if "input" in parts:
        x = np.frombuffer(parts["input"], dtype=np.float32).reshape(shape).copy()
    else:
        x = remote_input(shape, int(job["seed"]))
    out: dict[str, Any] = {}
    if job.get("return_output"):
        y = np.asarray(backends.load(art, profile)(x), dtype=np.float32)
        if y.nbytes > int(job["max_output_bytes"]):
            raise ClientError(f"the output has {y.nbytes} bytes; this server returns at most {job['max_output_bytes']}")
        out["output"] = y.ravel().tolist()
        out["output_shape"] = list(y.shape)
    stats = backends.measure(art, profile, x, reference=ref, deadline=deadline)
    out["latency"] = stats.to_dict()
    out["profile"] = profile.model_dump(mode="json")
    out["time_limited"] = time.perf_counter() >= deadline
    return out


def main(argv: list[str]) -> int:
    job_fd, reply_fd, cfg = int(argv[0]), int(argv[1]), json.loads(argv[2])
    work = Path(cfg["work_dir"])
    try:
        return _serve(job_fd, reply_fd, cfg, work)
    finally:  # also when the server died without cleaning up (its end of the job pipe closed)
        shutil.rmtree(work, ignore_errors=True)


def _serve(job_fd: int, reply_fd: int, cfg: dict[str, Any], work: Path) -> int:
    with os.fdopen(job_fd, "rb") as jobs, os.fdopen(reply_fd, "wb") as replies:
        warm = warm_up(cfg["backends"], work)
        runtimes = runtime_info()
        mem = limit_memory(float(cfg["max_memory_mb"]))
        _send(replies, {"ready": True, "pid": os.getpid(), "warm_up": warm, "runtimes": runtimes, **mem})
        grow_limit = (mem["vm_limit_mb"] - mem["vm_baseline_mb"]) / 2 if mem["vm_limit_mb"] else None
        n = 0
        while (got := _read_job(jobs)) is not None:
            n += 1
            job_dir = work / f"job-{n}"
            try:
                reply = {"ok": True, **handle(*got, job_dir)}
            except ClientError as exc:
                reply = {"ok": False, "kind": "client", "error": str(exc)}
            except Exception as exc:  # noqa: BLE001 - every failure goes back to the client; this process stays consistent
                msg = redact_paths(f"{type(exc).__name__}: {exc}", *(str(job_dir / f) for f in ("model.onnx", "reference.onnx")),
                                   str(job_dir), str(work))[:500]
                memory = isinstance(exc, MemoryError) or bool(_MEMORY.search(msg))
                reply = {"ok": False, "kind": "memory" if memory else "runtime", "error": msg}
            finally:
                shutil.rmtree(job_dir, ignore_errors=True)
            now = vm_bytes()
            # After running out of memory, or once the heap has grown by half the allowance, start
            # afresh: a fragmented heap must not make the next model fail at a lower size.
            if reply.get("kind") == "memory" or (grow_limit and now and (now / 2**20 - mem["vm_baseline_mb"]) > grow_limit):
                reply["exiting"] = True
            _send(replies, reply)
            if reply.get("exiting"):
                return 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
