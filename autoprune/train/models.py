"""Model loading: the demo residual CNN, torchvision architectures, factories and checkpoints.

Also holds the short pre-training used for the embedded demo, and accuracy evaluation, because
both are needed before anything is pruned.
"""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from autoprune.coderef import import_ref
from autoprune.errors import ConfigError
from autoprune.files import torch_load
from autoprune.outputs import drop_aux_heads, without_dropped
from autoprune.train.data import DataBundle
from autoprune.train.device import (
    TrainSetup,
    autocast,
    compiled,
    grad_scaler,
    model_device,
    optimizer_step,
    precision_of,
    to_device,
    training,
)
from autoprune.train.task import ClassificationTask, Task


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class DemoResNet(nn.Module):
    """A small ResNet for 1×16×16 digits: residual adds couple channels across blocks, which is
    exactly what a naive per-layer pruner gets wrong and the dependency graph gets right."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, widths: tuple[int, ...] = (32, 64, 128)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers = []
        cin = widths[0]
        for i, w in enumerate(widths):
            layers.append(BasicBlock(cin, w, stride=1 if i == 0 else 2))
            layers.append(BasicBlock(w, w))
            cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def _adapt_input_channels(model: nn.Module, in_channels: int) -> nn.Module:
    """torchvision nets expect RGB; swap the first conv when the data has another channel count."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            if m.in_channels == in_channels:
                return model
            new = nn.Conv2d(in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, 1, m.bias is not None)
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], new)
            return model
    return model


def _torchvision(name: str, num_classes: int) -> Optional[nn.Module]:
    import torchvision.models as tvm

    if name not in tvm.list_models(module=tvm):
        return None
    # weights=None: nothing is downloaded; users bring trained weights as a checkpoint.
    model = tvm.get_model(name, weights=None, num_classes=num_classes)
    drop_aux_heads(model)  # GoogLeNet / Inception v3: one output, pruned consistently (autoprune.outputs)
    return model


def _examples(keys: list[str], n: int = 2) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _state_dict_mismatch(path: Path, ckpt: dict[str, Any], model: nn.Module) -> str:
    """One line on why ``ckpt['state_dict']`` does not load into ``model`` (built from
    ``ckpt['arch']``): counts of missing, unexpected and reshaped keys with a couple of examples.

    torch's own message lists every key (kilobytes for a ResNet) on many lines; what a user needs
    is whether this is another architecture, another class count, or a wrapper's key prefix.
    """
    arch, sd = ckpt["arch"], ckpt["state_dict"]
    where = f"model: checkpoint {path}: its state_dict does not fit arch {arch!r}"
    if not isinstance(sd, dict):
        return f"{where}: 'state_dict' holds {type(sd).__name__}, not a dict of tensors; save model.state_dict() under 'state_dict'"
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    reshaped = [k for k in own if k in sd and hasattr(sd[k], "shape") and tuple(sd[k].shape) != tuple(own[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} of the model's {len(own)} keys missing ({_examples(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_examples(unexpected)})")
    if reshaped:
        k = reshaped[0]
        parts.append(f"{len(reshaped)} with another shape (e.g. {k}: checkpoint {list(sd[k].shape)} vs model {list(own[k].shape)})")
    prefixes = {k.split(".", 1)[0] + "." for k in sd}
    if len(prefixes) == 1 and {k.split(".", 1)[-1] for k in sd} >= set(own):
        fix = f"every key starts with {prefixes.pop()!r} (a wrapper such as DataParallel): save the inner model's state_dict"
    elif reshaped and not missing and not unexpected:
        fix = ("same layers, other widths: store the class count these weights were trained for as 'num_classes' in the "
               f"checkpoint (now {ckpt.get('num_classes', 'not set')})")
    else:
        fix = "set 'arch' to the model these weights come from, or save the state_dict of the model 'arch' names"
    return f"{where}: {'; '.join(parts) or 'torch refused it'}; {fix}"


#: Why a full-model pickle given as ``--model`` is refused, and the two ways forward.
PICKLE_REFUSAL = (
    "a full pickle (e.g. torch.save(model)), and unpickling runs whatever code the file names; "
    "save {'arch': ..., 'state_dict': model.state_dict(), 'num_classes': N} instead (loads weights-only), "
    "or pass --trust-pickle (trust_pickle: true) if you trust this file"
)


def read_checkpoint(path: Path, trust_pickle: bool = False) -> Any:
    """The content of a checkpoint given as ``--model``, read weights-only: a dict
    ``{'arch', 'state_dict'[, 'num_classes', 'in_channels']}`` (see :func:`checkpoint_arch`), or,
    with ``trust_pickle`` only, a pickled module; every reader of such a file goes through here,
    so they all refuse the same files with the same message."""
    return torch_load(path, trust_pickle=trust_pickle, refusal=f"model checkpoint is {PICKLE_REFUSAL}")


def checkpoint_arch(obj: Any) -> Optional[str]:
    """The model reference a checkpoint read by :func:`read_checkpoint` rebuilds its weights into
    (its ``arch``), or None when it holds no ``{'arch', 'state_dict'}`` dict."""
    return str(obj["arch"]) if isinstance(obj, dict) and "arch" in obj and "state_dict" in obj else None


def _from_checkpoint(path: Path, num_classes: int, trust_pickle: bool = False) -> nn.Module:
    obj: Any = read_checkpoint(path, trust_pickle)
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict) and isinstance(obj.get("model"), nn.Module):
        return obj["model"]
    arch = checkpoint_arch(obj)
    if arch is not None:
        # ``in_channels``: a torchvision net trained on other than RGB (its first conv swapped,
        # as ``build_model`` does for the data) must be rebuilt that way before its weights load.
        cin = obj.get("in_channels")
        model = build_model(arch, int(obj.get("num_classes", num_classes)), in_channels=None if cin is None else int(cin))
        try:
            model.load_state_dict(without_dropped(obj["state_dict"], model) if isinstance(obj["state_dict"], dict) else obj["state_dict"])
        except (RuntimeError, TypeError):
            raise ConfigError(_state_dict_mismatch(path, obj, model)) from None
        return model
    raise ConfigError(
        f"model: {path} holds {type(obj).__name__}; save a dict {{'arch': <torchvision name or module:function>, "
        "'state_dict': ..., 'num_classes': N} (or the nn.Module itself, which then needs --trust-pickle)"
    )


def build_model(ref: str, num_classes: int, in_channels: Optional[int] = None, trust_pickle: bool = False) -> nn.Module:
    """``demo`` | a torchvision name (random weights) | ``module:function`` | a checkpoint file.

    A checkpoint loads weights-only (``{'arch', 'state_dict'}``); a full-model pickle only with
    ``trust_pickle``, because unpickling can run any code the file names."""
    if ref.startswith("object:"):  # an nn.Module given to the Python API (autoprune/objects.py)
        from autoprune import objects

        return objects.build(ref)
    p = Path(ref)
    if ref == "demo":
        return DemoResNet(num_classes, in_channels or 1)
    if p.suffix in (".pt", ".pth", ".ckpt") or p.is_file():
        if not p.is_file():
            raise ConfigError(f"model: checkpoint file {ref} not found")
        model = _from_checkpoint(p, num_classes, trust_pickle)
    elif ":" in ref:
        fn = import_ref(ref, "model")
        try:
            model = fn(num_classes=num_classes)
        except TypeError:
            model = fn()
    else:
        tv = _torchvision(ref, num_classes)
        if tv is None:
            raise ConfigError(
                f"model: {ref!r} is not 'demo', a checkpoint file, 'module:function' or a torchvision model name "
                "(e.g. resnet18, mobilenet_v2)"
            )
        model = tv
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model: {ref} gave {type(model).__name__}, not a torch.nn.Module")
    if in_channels is not None:
        model = _adapt_input_channels(model, in_channels)
    return model


@torch.no_grad()
def evaluate(model: nn.Module, data: DataBundle, batch_size: int = 256, max_batches: Optional[int] = None,
             split: str = "val", setup: Optional[TrainSetup] = None, task: Optional[Task] = None) -> float:
    """The ``task``'s metric (default: top-1 accuracy) on ``split``: ``val`` the whole held-out
    split, ``search`` the part trials are scored on (``val_samples``), ``test`` the official test
    split (see ``DataBundle.loader``); on the model's device (``setup``: autocast precision and
    CPU threads of the run's ``train:``)."""
    model.eval()
    dev, cl = model_device(model), bool(setup and setup.channels_last)
    batches: Any = ((to_device(x, dev, cl), to_device(y, dev)) for x, y in data.loader(split, batch_size))
    if max_batches is not None:
        batches = itertools.islice(batches, max_batches)
    with training(setup), autocast(dev, precision_of(setup)):
        return (task or ClassificationTask()).evaluate(model, batches)


def held_out_accuracy(model: nn.Module, data: DataBundle, setup: Optional[TrainSetup] = None,
                      task: Optional[Task] = None) -> dict[str, float]:
    """Beside the accuracy on the whole held-out split: ``search_accuracy`` on the images trials
    are scored on when that is a subset (``val_samples``), ``test_accuracy`` where the data has an
    official test split. For the dense model (dense.json) and the final stage, never in a trial."""
    out = {}
    if data.search_val is not None:
        out["search_accuracy"] = evaluate(model, data, split="search", setup=setup, task=task)
    if data.test is not None:
        out["test_accuracy"] = evaluate(model, data, split="test", setup=setup, task=task)
    return out


def pretrain(
    model: nn.Module, data: DataBundle, seconds: float, lr: float = 3e-3, batch_size: int = 64, seed: int = 0, steps: Optional[int] = None,
    setup: Optional[TrainSetup] = None,
    task: Optional[Task] = None,
) -> int:
    """Train for a wall-clock budget, or exactly ``steps`` steps when given (reproducible on a
    loaded machine). The demo needs a trained dense model to prune. Returns the steps taken.
    Runs on the model's device; ``setup`` gives precision, threads, compile."""
    with training(setup):
        return _pretrain(model, data, seconds, lr, batch_size, seed, steps, setup, task or ClassificationTask())


def _pretrain(model: nn.Module, data: DataBundle, seconds: float, lr: float, batch_size: int, seed: int, steps: Optional[int],
              setup: Optional[TrainSetup], task: Task) -> int:
    torch.manual_seed(seed)
    dev, precision, cl = model_device(model), precision_of(setup), bool(setup and setup.channels_last)
    scaler = grad_scaler(dev, precision)
    fwd = compiled(model, setup)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    # A known step count gets a cosine decay: the last steps settle the weights instead of
    # leaving them wherever the constant-rate noise put them (a few points on small data).
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))) if steps else None
    model.train()
    target = steps
    done, t0, epoch = 0, time.perf_counter(), 0

    def finished() -> bool:
        return done >= target if target is not None else time.perf_counter() - t0 >= seconds

    while not finished():
        for x, y in data.loader("train", batch_size, shuffle=True, seed=seed + epoch):
            x, y = to_device(x, dev, cl), to_device(y, dev)
            opt.zero_grad(set_to_none=True)
            with autocast(dev, precision):
                loss = task.loss(fwd, (x, y))
            optimizer_step(loss, opt, scaler)
            if sched is not None:
                sched.step()
            done += 1
            if finished():
                break
        epoch += 1
    model.eval()
    return done


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _prod(shape: Sequence[int]) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


def _fused_mha_macs(inputs: list, outputs: list) -> int:
    """MACs of ``aten::_native_multi_head_attention`` (``nn.MultiheadAttention``'s fused eval path).

    fvcore has no handle for it, so a dense transformer's attention counted as zero while the
    pruned model's :class:`~autoprune.prune.attention.SlimAttention` (plain linear/matmul ops)
    was counted in full. This counts the same terms fvcore counts on that module: the q, k, v
    and output projections plus the ``QK^T`` and ``AV`` matmuls (softmax and scaling, like all
    element-wise ops, are not counted).
    """
    from fvcore.nn.jit_handles import get_shape

    q, k = get_shape(inputs[0]), get_shape(inputs[1])
    qkv_w, proj_w = get_shape(inputs[5]), get_shape(inputs[7])
    if not (q and k and qkv_w and proj_w):
        return 0
    inner = qkv_w[0] // 3  # num_heads * head_dim
    nq, nk = _prod(q[:-1]), _prod(k[:-1])  # batch × query length, batch × key length
    lk = k[-2] if len(k) >= 2 else 1
    proj = nq * q[-1] * inner + 2 * nk * k[-1] * inner + nq * proj_w[0] * proj_w[1]
    return proj + 2 * nq * lk * inner


def _sdpa_macs(inputs: list, outputs: list) -> int:
    """MACs of ``aten::scaled_dot_product_attention``: the ``QK^T`` and ``AV`` matmuls it fuses
    (what fvcore counts when the same attention is written with ``torch.matmul``)."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(inputs[i]) for i in range(3))
    if not (q and k and v):
        return 0
    return _prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


def count_flops(model: nn.Module, example: torch.Tensor) -> float:
    """Multiply-accumulate count by fvcore (what papers call FLOPs), for one forward of ``example``.

    Fused attention ops get handles of their own (:func:`_fused_mha_macs`, :func:`_sdpa_macs`)
    so dense ``nn.MultiheadAttention`` and its pruned replacement are counted alike.
    """
    import logging

    from fvcore.nn import FlopCountAnalysis

    model.eval()
    fca = FlopCountAnalysis(model, example.to(model_device(model)))
    fca.set_op_handle("aten::_native_multi_head_attention", _fused_mha_macs,
                      "aten::scaled_dot_product_attention", _sdpa_macs)
    fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    with torch.no_grad():
        return float(fca.total())


#: fvcore's count per module type, for one forward (eval mode), as its op handles count them:
#: convs and linears their MACs, eval BatchNorm 2 per element (1 without affine), layer/group
#: norm 5 (4), instance norm as fvcore's 1-index affine rule, adaptive average pooling its input.
_NORM5 = (nn.LayerNorm, nn.GroupNorm)


def _module_flops(m: nn.Module, x: torch.Tensor, out: Any) -> float:
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return float(x.shape[0] * m.weight.numel() * out[0, 0].numel())
    if isinstance(m, nn.Linear):
        return float(out.numel() * m.in_features)
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return float(x.numel() * (2 if m.weight is not None else 1))
    if isinstance(m, _NORM5):
        return float(x.numel() * (5 if getattr(m, "weight", None) is not None else 4))
    if isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
        return float(x.numel())
    return 0.0


_COUNTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.modules.batchnorm._BatchNorm, *_NORM5,
            nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)


def count_flops_hooked(model: nn.Module, example: torch.Tensor) -> float:
    """fvcore's count for the module types it counts, read off one plain forward pass (forward
    hooks, no TorchScript trace: milliseconds instead of seconds). Ops called functionally (a
    ``torch.matmul`` in an attention block) are not seen, so this equals :func:`count_flops`
    only where that agreement was checked: :func:`flop_counter` does the check."""
    total = 0.0

    def hook(m: nn.Module, args: tuple, out: Any) -> None:
        nonlocal total
        if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
            total += _module_flops(m, args[0], out)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _COUNTED)]
    try:
        with torch.no_grad():
            model.eval()(example.to(model_device(model)))
    finally:
        for h in handles:
            h.remove()
    return total


def flop_counter(model: nn.Module, example: torch.Tensor) -> tuple[Any, float]:
    """(counter, dense FLOPs): the forward-hook counter when it agrees exactly with fvcore on the
    dense ``model`` (structured pruning changes widths, never which ops run, so it then agrees on
    every pruned copy too), else fvcore itself. Trials count with it instead of re-tracing."""
    dense = count_flops(model, example)
    if count_flops_hooked(model, example) == dense:
        return count_flops_hooked, dense
    return count_flops, dense
