"""The main output of any model: what its predictions are when it returns more than one tensor.

Models return a tensor (most classifiers), a namedtuple in train mode (torchvision GoogLeNet's
``GoogLeNetOutputs``, Inception v3's ``InceptionOutputs``: logits plus auxiliary logits), a dict
(torchvision segmentation models: ``{"out": ..., "aux": ...}``; Hugging Face style
``{"logits": ...}``) or a tuple/list (``(logits, features)``). Every place that uses a model's
predictions (loss, evaluation, gradient-based importance, export) goes through one adapter, so
such a model searches like any other. A run config may name its own (``output: module:function``).

This sits at the top of the package, beside ``errors`` and ``registry``, because three stages use
it: prune (gradient-based importance), measure (export of one output) and train (loss, metrics).
It also drops torchvision's auxiliary classifier heads (:func:`drop_aux_heads`): they run only in
train mode, so the dependency graph (traced in eval mode) never sees them and pruning the layers
that feed them would leave them reading channels that no longer exist.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn as nn

from autoprune.coderef import import_ref, split_ref
from autoprune.errors import ConfigError

#: A function from whatever a model returns to its main output tensor.
OutputAdapter = Callable[[Any], torch.Tensor]

#: Dict keys that hold the main output, in order of preference (torchvision segmentation: ``out``;
#: Hugging Face and many others: ``logits``).
MAIN_KEYS = ("out", "logits")


def main_output(out: Any) -> torch.Tensor:
    """The main output of ``out``: a tensor itself; ``.logits`` of a namedtuple that has it;
    ``out`` or ``logits`` of a dict (else its first value); the first item of a tuple/list."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(out, tuple) and hasattr(out, "_fields") and logits is not None:
        return main_output(logits)
    if isinstance(out, Mapping):
        for key in MAIN_KEYS:
            if key in out:
                return main_output(out[key])
        if out:
            return main_output(next(iter(out.values())))
    if isinstance(out, (tuple, list)) and out:
        return main_output(out[0])
    if logits is not None:  # dataclass-style outputs (ModelOutput objects with attributes)
        return main_output(logits)
    raise TypeError(f"cannot find the main output in a {type(out).__name__}; name an adapter with "
                    "'output: module:function' in the run config")


def load_adapter(ref: Optional[str], source: str = "run config") -> OutputAdapter:
    """The adapter a run config names (``output: package.module:function``), or :func:`main_output`."""
    if not ref:
        return main_output
    mod_name, fn_name = split_ref(ref)
    if not mod_name or not fn_name:
        raise ConfigError(f"{source}: key 'output': {ref!r} is not 'package.module:function'; name a function that "
                          "takes what the model returns and gives its main output tensor")
    fn = import_ref(ref, f"{source}: key 'output'", hint=" importable from the working directory or PYTHONPATH")
    if not callable(fn):
        raise ConfigError(f"{source}: key 'output': {ref!r} is a {type(fn).__name__}, not a function; name a function "
                          "that takes what the model returns and gives its main output tensor")
    return fn


class MainOutput(nn.Module):
    """``model`` with only its main output: what is exported, so the ONNX file has one output."""

    def __init__(self, model: nn.Module, adapter: OutputAdapter = main_output) -> None:
        super().__init__()
        self.model = model
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.model(x))


#: Auxiliary classifier attributes of torchvision's GoogLeNet (aux1, aux2) and Inception v3 (AuxLogits).
AUX_HEADS = ("aux1", "aux2", "AuxLogits")


def drop_aux_heads(model: nn.Module) -> list[str]:
    """Remove the auxiliary classifier heads of a model that has ``aux_logits`` (torchvision
    GoogLeNet, Inception v3), exactly as torchvision does when it loads weights for
    ``aux_logits=False``: the flag is cleared and the heads set to None, so train mode returns
    plain logits and the pruned and exported model has one output. Returns the dropped names."""
    if not getattr(model, "aux_logits", False):
        return []
    dropped = [n for n in AUX_HEADS if isinstance(getattr(model, n, None), nn.Module)]
    if not dropped:
        return []
    model.aux_logits = False
    for n in dropped:
        setattr(model, n, None)
    return dropped


def without_dropped(state_dict: Mapping[str, Any], model: nn.Module) -> dict[str, Any]:
    """``state_dict`` without the entries of submodules ``model`` has set to None (the dropped
    auxiliary heads): a checkpoint trained with them still loads strictly into the model without."""
    gone = {n for n in AUX_HEADS if hasattr(model, n) and getattr(model, n) is None}
    return {k: v for k, v in state_dict.items() if k.split(".", 1)[0] not in gone}


def train_only_modules(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the modules with parameters that run in train mode but not in eval mode: the
    auxiliary heads of a model its own code builds (torchvision's are dropped by
    :func:`drop_aux_heads`). The dependency graph is traced in eval mode, so pruning would leave
    such a head reading channels that no longer exist and every fine-tune would fail; the search
    refuses the model before training instead. Runs on a copy (train-mode BatchNorm would move
    the running statistics); a model whose train-mode forward fails here is left to the search."""
    probe = copy.deepcopy(model)
    x = example[:1].repeat(2, *([1] * (example.dim() - 1)))  # BatchNorm in train mode needs 2+ values
    reached: dict[bool, set[str]] = {}
    for training in (False, True):
        seen: set[str] = set()
        hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.add(n)) for n, m in probe.named_modules()]
        try:
            with torch.no_grad():
                probe.train(training)(x)
        except Exception:  # noqa: BLE001 - only a probe: the search reports real failures itself
            return []
        finally:
            for h in hooks:
                h.remove()
        reached[training] = seen
    only = sorted(reached[True] - reached[False])
    with_params = [n for n in only if any(True for _ in probe.get_submodule(n).parameters())]
    return [n for n in with_params if not any(n.startswith(o + ".") for o in with_params)]  # outermost only
