"""What the model is for: its training loss, its distillation term and its held-out metric.

A search needs three things from a task: a loss to pre-train and fine-tune with (distilled from
the dense model), a score to maximise (higher is better), and its name for the tables. The
default, :class:`ClassificationTask`, is cross-entropy + KL distillation on the logits, scored by
top-1 accuracy; :class:`SegmentationTask` is per-pixel cross-entropy + per-pixel KL, scored by
mean IoU. A run config names one (``task: classification``, ``task: segmentation``) or brings
its own (``task: package.module:object``): a :class:`Task` subclass or instance, or any object
or module with ``loss(model, batch)`` and ``evaluate(model, loader)`` (see :func:`load_task`).

Every task sees a model's *main* output (``autoprune.outputs``), so GoogLeNet's namedtuple and a
segmentation model's ``{"out": ...}`` dict need no special code here.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from autoprune.coderef import import_ref
from autoprune.errors import ConfigError
from autoprune.outputs import OutputAdapter, load_adapter, main_output
from autoprune.registry import TASKS

Batch = tuple[torch.Tensor, torch.Tensor]


class Task(ABC):
    """A training objective and a held-out metric. Subclasses give :meth:`criterion` and
    :meth:`evaluate`; :meth:`distill` has a per-position KL default; :meth:`loss` combines them."""

    #: Name of :meth:`evaluate`'s value in trial attributes, pareto.json and the tables.
    metric_name: str = "score"
    #: False: fine-tune on :meth:`criterion` alone, whatever ``finetune.distill_alpha`` says.
    distills: bool = True

    def __init__(self, output: Optional[OutputAdapter] = None) -> None:
        self.output: OutputAdapter = output or main_output

    def outputs(self, model: Callable[[torch.Tensor], Any], x: torch.Tensor) -> torch.Tensor:
        """The model's main output for ``x`` (the run config's ``output`` adapter applied)."""
        return self.output(model(x))

    @abstractmethod
    def criterion(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The supervised loss of main outputs against the batch's targets."""

    def distill(self, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> Optional[torch.Tensor]:
        """Distillation term (Hinton et al.): KL between softened distributions over dim 1,
        averaged over every other position (samples, pixels), times T². None: no distillation."""
        T = temperature
        kl = F.kl_div(F.log_softmax(student / T, 1), F.log_softmax(teacher / T, 1), reduction="sum", log_target=True)
        return kl / max(student.numel() // max(student.shape[1], 1), 1) * (T * T)

    def loss(self, model: torch.nn.Module, batch: Batch, teacher: Optional[torch.nn.Module] = None,
             alpha: float = 0.0, temperature: float = 1.0) -> torch.Tensor:
        """Training loss of ``model`` on ``batch``: the criterion, blended with the distillation
        term from ``teacher`` (weight ``alpha``) when there is a teacher and ``alpha > 0``."""
        x, y = batch
        out = self.outputs(model, x)
        sup = self.criterion(out, y)
        if teacher is None or alpha <= 0 or not self.distills:
            return sup
        with torch.no_grad():
            t_out = self.outputs(teacher, x)
        kd = self.distill(out, t_out, temperature)
        return sup if kd is None else (1 - alpha) * sup + alpha * kd

    @abstractmethod
    def evaluate(self, model: Callable[[torch.Tensor], Any], loader: Iterable[Batch]) -> float:
        """The metric (higher is better) over ``loader``; the caller has put the model in eval
        mode under ``torch.no_grad``. ``model`` may be any callable (an ONNX runner for int8)."""

    def example_input(self, data: Any, batch_size: int) -> Optional[torch.Tensor]:
        """An input batch to trace, export and time with; None: random data of the data's shape."""
        return None


class ClassificationTask(Task):
    """Cross-entropy + KL distillation on the logits, scored by top-1 accuracy."""

    metric_name = "accuracy"

    def criterion(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, target)

    def distill(self, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> Optional[torch.Tensor]:
        T = temperature
        return F.kl_div(F.log_softmax(student / T, 1), F.log_softmax(teacher / T, 1), reduction="batchmean",
                        log_target=True) * (T * T)

    def evaluate(self, model: Callable[[torch.Tensor], Any], loader: Iterable[Batch]) -> float:
        correct = total = 0
        for x, y in loader:
            correct += int((self.outputs(model, x).argmax(1) == y).sum())
            total += int(y.numel())
        return correct / max(total, 1)


class SegmentationTask(Task):
    """Per-pixel cross-entropy + per-pixel KL distillation, scored by mean IoU over the classes
    that occur (in the targets or the predictions). Targets are (N, H, W) class indices;
    ``ignore_index`` pixels (e.g. 255 borders) count nowhere. Outputs smaller than the target are
    upsampled bilinearly (torchvision's segmentation models already return full size)."""

    metric_name = "miou"

    def __init__(self, output: Optional[OutputAdapter] = None, ignore_index: int = 255) -> None:
        super().__init__(output)
        self.ignore_index = ignore_index

    def _sized(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if outputs.shape[-2:] != target.shape[-2:]:
            outputs = F.interpolate(outputs, size=target.shape[-2:], mode="bilinear", align_corners=False)
        return outputs

    def criterion(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self._sized(outputs, target), target.long(), ignore_index=self.ignore_index)

    def evaluate(self, model: Callable[[torch.Tensor], Any], loader: Iterable[Batch]) -> float:
        conf: Optional[torch.Tensor] = None
        for x, y in loader:
            out = self._sized(self.outputs(model, x), y)
            c = out.shape[1]
            if conf is None:
                conf = torch.zeros(c, c, dtype=torch.long, device=y.device)
            pred, y = out.argmax(1).flatten(), y.long().flatten()
            keep = y != self.ignore_index
            conf += torch.bincount(y[keep] * c + pred[keep], minlength=c * c).view(c, c)
        if conf is None:
            return 0.0
        inter = conf.diag().double()
        union = conf.sum(0).double() + conf.sum(1).double() - inter
        seen = union > 0
        return float((inter[seen] / union[seen]).mean()) if bool(seen.any()) else 0.0


TASKS.register("classification", ClassificationTask)
TASKS.register("segmentation", SegmentationTask)


class _ObjectTask(Task):
    """A user's object or module with ``loss(model, batch)`` and ``evaluate(model, loader)``
    (optional: ``metric_name``, ``example_input(batch_size)``; ``loss`` may also take ``teacher``,
    ``alpha``, ``temperature`` keywords to distil) seen through the :class:`Task` interface."""

    def __init__(self, obj: Any, output: Optional[OutputAdapter] = None) -> None:
        super().__init__(output)
        self.obj = obj
        self.metric_name = str(getattr(obj, "metric_name", "score"))
        params = inspect.signature(obj.loss).parameters
        self._distils = "teacher" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())

    def criterion(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # pragma: no cover - loss is overridden
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: Batch, teacher: Optional[torch.nn.Module] = None,
             alpha: float = 0.0, temperature: float = 1.0) -> torch.Tensor:
        if self._distils:
            return self.obj.loss(model, batch, teacher=teacher, alpha=alpha, temperature=temperature)
        return self.obj.loss(model, batch)

    def evaluate(self, model: Callable[[torch.Tensor], Any], loader: Iterable[Batch]) -> float:
        return float(self.obj.evaluate(model, loader))

    def example_input(self, data: Any, batch_size: int) -> Optional[torch.Tensor]:
        fn = getattr(self.obj, "example_input", None)
        return fn(batch_size) if callable(fn) else None


def load_task(ref: Optional[str], output: Optional[str] = None, source: str = "run config") -> Task:
    """The task a run config names: a registered name (``classification``, ``segmentation``) or
    ``package.module:object`` (a Task subclass, a Task instance, or any object or module with
    ``loss`` and ``evaluate``), with the config's ``output`` adapter for :class:`Task` ones."""
    adapter = load_adapter(output, source)
    ref = ref or "classification"
    if ":" not in ref:
        if ref not in TASKS:
            raise ConfigError(f"{source}: key 'task': unknown task {ref!r}; use one of {', '.join(TASKS.available())} "
                              "or 'package.module:object' (an object with loss(model, batch) and evaluate(model, loader))")
        task: Task = TASKS.get(ref)
        task.output = adapter
        return task
    obj: Any = import_ref(ref, f"{source}: key 'task'", "package.module:object",
                          " importable from the working directory or PYTHONPATH", module_alone=True)
    if isinstance(obj, type) and issubclass(obj, Task):
        obj = obj()
    if isinstance(obj, Task):
        if output:
            obj.output = adapter
        return obj
    if isinstance(obj, type):
        obj = obj()
    missing = [m for m in ("loss", "evaluate") if not callable(getattr(obj, m, None))]
    if missing:
        raise ConfigError(f"{source}: key 'task': {ref!r} has no {' or '.join(missing)}; a task provides "
                          "loss(model, batch) -> Tensor and evaluate(model, loader) -> float (higher is better)")
    return _ObjectTask(obj, adapter)
