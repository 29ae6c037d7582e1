"""Where the training side runs: device, autocast precision, CPU threads, loader options.

The run config's ``train:`` section (:class:`autoprune.config.TrainConfig`) becomes one
:class:`TrainSetup`, resolved once per run (``study/context.py``). Training code never asks the
config which device to use: batches go to *the model's* device (:func:`model_device`), so a
model loaded from a file (CPU) and the dense model on a GPU are both handled by the same code,
and callers only pass the setup for precision and threads.

Latency is never measured here: the device profile's backend times a CPU fp32 copy
(``measure/onnx.py::cpu_fp32``).

Threads: a torch process uses every core by default, so three of them on two cores oversubscribe
the CPU (a 40-step fine-tune measured 20x slower); :func:`torch_threads` sets the intra-op
threads for one training call and restores the previous value, so the latency backends (which
set their own) and the caller's code are not affected.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.nn as nn

from autoprune.config import TrainConfig
from autoprune.errors import ConfigError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class TrainSetup:
    """The resolved ``train:`` section: a concrete device and the thread count to train with."""

    device: torch.device
    precision: str = "fp32"
    threads: Optional[int] = None
    channels_last: bool = False
    compile: bool = False
    num_workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = False

    def loader_kwargs(self) -> dict[str, Any]:
        """What every DataLoader of the run gets (``DataBundle.loader_kwargs``)."""
        kw: dict[str, Any] = {"num_workers": self.num_workers, "pin_memory": self.pin_memory}
        if self.num_workers:
            kw["persistent_workers"] = self.persistent_workers
        return kw


def cuda_count() -> int:
    """CUDA devices torch sees (0 without a CUDA build or driver)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(name: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` → a torch device that exists on this machine.

    Asking for CUDA where there is none is an error, not a silent CPU run: a search planned for a
    GPU would otherwise take 50x longer without saying why."""
    name = name.strip().lower()
    n = cuda_count()
    if name == "auto":
        return torch.device("cuda", 0) if n else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        index = int(name.partition(":")[2] or 0)
        if n == 0:
            raise ConfigError(
                f"train.device: {name} but torch sees no CUDA device here (torch {torch.__version__}, "
                f"torch.cuda.is_available() is False); install a CUDA build of torch, or set train.device: auto or cpu "
                "(--set train.device=cpu)"
            )
        if index >= n:
            raise ConfigError(f"train.device: {name} but torch sees {n} CUDA device(s) (cuda:0..cuda:{n - 1}); "
                              "pick one of those or train.device: cuda")
        return torch.device("cuda", index)
    raise ConfigError(f"train.device: {name!r} is not one of auto, cpu, cuda, cuda:N")


def _default_threads(workers: int = 1) -> int:
    """This process's share of the cores it may run on: all of them alone, 1/N with N workers."""
    return max(1, len(available_cores()) // max(1, workers))


def available_cores() -> list[int]:
    """The CPU cores this process may run on (its affinity where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def setup_from_config(cfg: TrainConfig) -> TrainSetup:
    """Resolve the ``train:`` section on this machine; every impossible request is a ConfigError
    naming the key and the fix (checked before the dense model trains)."""
    device = resolve_device(cfg.device)
    if cfg.precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision: fp16 needs a CUDA device, and training runs on the CPU here "
                          f"(train.device: {cfg.device}); use train.precision: bf16 or fp32 on CPU")
    if cfg.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"train.precision: bf16 is not supported by {torch.cuda.get_device_name(device)}; "
                          "use train.precision: fp16 or fp32")
    pin = cfg.pin_memory if cfg.pin_memory is not None else device.type == "cuda"
    return TrainSetup(device, cfg.precision, cfg.threads or _default_threads(), cfg.channels_last, cfg.compile,
                      cfg.num_workers, pin, cfg.persistent_workers)


# --------------------------------------------------------------------------- used by training code
def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s weights are (the CPU for a model without parameters or buffers)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def prepare_model(model: nn.Module, setup: TrainSetup) -> nn.Module:
    """Move ``model`` to the setup's device (and memory format), in place; returns it."""
    model.to(setup.device)
    if setup.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """One batch tensor on ``device`` (asynchronous from pinned memory), channels-last if asked."""
    if x.device != device:
        x = x.to(device, non_blocking=x.is_pinned())
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def batches_to(batches: Sequence[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A list of (x, y) batches on ``device`` (the same tensors when they are there already)."""
    return [(to_device(x, device), to_device(y, device)) for x, y in batches]


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """torch.autocast for the setup's precision on ``device``; nothing for fp32, and fp16 on a CPU
    model (a model loaded from a file and evaluated where it is) runs in fp32."""
    dtype = _DTYPES.get(precision)
    if dtype is None or (device.type == "cpu" and dtype is torch.float16):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> Optional[torch.amp.GradScaler]:
    """fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none."""
    if precision == "fp16" and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, scaler: Optional[torch.amp.GradScaler]) -> None:
    """Backward and step, through ``scaler`` (:func:`grad_scaler`, fp16) when there is one."""
    if scaler is None:
        loss.backward()
        opt.step()
        return
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


@contextlib.contextmanager
def torch_threads(n: Optional[int]) -> Iterator[None]:
    """Intra-op CPU threads = ``n`` inside the block (None or 0: unchanged); the previous value
    is restored on the way out, also on errors.

    ``torch.set_num_threads`` is process-wide: a training step or a measurement that left it
    changed would set the speed of everything after it. Already at ``n`` this costs two
    ``get_num_threads`` calls, nothing a timing notices."""
    if not n:
        yield
        return
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def training(setup: Optional[TrainSetup]) -> contextlib.AbstractContextManager[Any]:
    """The block a training or evaluation call runs in: the setup's threads (nothing without a setup)."""
    return torch_threads(setup.threads if setup is not None else None)


def precision_of(setup: Optional[TrainSetup]) -> str:
    return setup.precision if setup is not None else "fp32"


def compiled(model: nn.Module, setup: Optional[TrainSetup]) -> nn.Module:
    """The module the training loop calls: ``torch.compile(model)`` when asked (sharing
    ``model``'s parameters, so the caller keeps the plain module), else ``model`` itself."""
    if setup is not None and setup.compile:
        return torch.compile(model)  # type: ignore[return-value]
    return model
