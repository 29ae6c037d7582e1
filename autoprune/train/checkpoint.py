"""The model files autoprune writes and reads: a state dict plus the recipe that rebuilds the module.

``torch.save(model)`` pickles the module, and loading a pickle runs whatever code the file names:
a ``.pt`` planted in a run folder or a bundle would run under ``pick``, ``export`` or
``remeasure``. So every model file autoprune writes (``base_model.pt``, ``trials/N/model.pt``,
``model_final.pt``, ``pareto/trial_N/model.pt``, a bundle's ``model.pt``) holds only tensors and
plain data and loads with ``torch.load(weights_only=True)``::

    {"format": "autoprune.model/1",
     "recipe": {"build": {"model": "demo", "num_classes": 10, "in_channels": 1, "pickle": None},
                "num_classes": 10, "example_shape": [1, 16, 16],
                "widths": {"stem.0": [32, 16], ...},          # {} for the dense model
                "built_from": {"model": "demo", "checkpoint_sha256": None, "num_classes": 10,
                               "in_channels": 1, "input_size": [16, 16]},
                "trained": {...} or None},
     "state_dict": {...}, "weights_sha256": "..."}

:func:`load_model` builds the dense architecture (``train.models.build_model``), cuts every group
to its recorded kept width (``prune.plan.slice_to_widths``, the dependency graph the search
pruned with), loads the state dict strictly and checks the weights' hash. The only code that
runs is autoprune's and torchvision's: a ``module:function`` the recipe names is built only when
the user gave that reference in this run, or ``trust_code`` (:mod:`autoprune.trust`), because a
file must never choose which code runs. A model whose architecture exists only as a user's full-model pickle
(``--model x.pt --trust-pickle``) records that file and its hash; rebuilding it unpickles that
file again, so it needs ``trust_pickle`` too. A model file that is a full pickle loads only with
``trust_pickle``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from autoprune import objects
from autoprune.errors import ConfigError, UntrustedPickle
from autoprune.prune.plan import slice_to_widths
from autoprune.files import atomic_torch_save, torch_load
from autoprune.train.models import build_model, checkpoint_arch, read_checkpoint
from autoprune.trust import CodePolicy

FORMAT = "autoprune.model/1"

#: Why a model file that is not weights-only is refused, and how to proceed.
RUN_FILE_REFUSAL = (
    "a full pickle, not a weights-only autoprune model file, and unpickling runs whatever code it names; "
    "run folders and bundles of an older autoprune hold such files: if you trust this one, rerun with --trust-pickle"
)


def _file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (a checkpoint given as ``--model``)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_hash(model: nn.Module) -> str:
    """Hash of the weights (names, shapes, bytes), not of a file, whose bytes vary between saves.
    The study stores this hash of the dense model to refuse workers with another one."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _is_checkpoint(ref: str) -> bool:
    """The test ``build_model`` uses for "a checkpoint file"."""
    p = Path(ref)
    return ref != "demo" and (p.suffix in (".pt", ".pth", ".ckpt") or p.is_file())


def dense_recipe(
    ref: str,
    num_classes: int,
    in_channels: int,
    input_size: tuple[int, ...],
    example_shape: tuple[int, ...],
    trained: Optional[dict[str, Any]] = None,
    trust_pickle: bool = False,
) -> dict[str, Any]:
    """The recipe of the dense model that ``build_model(ref, num_classes, in_channels)`` builds.

    ``build`` is what rebuilds the architecture: a checkpoint ``{'arch': ..., 'state_dict': ...}``
    is replaced by its ``arch`` (a run folder then needs no copy of the checkpoint), a full-model
    pickle by its absolute path and hash. ``built_from`` is what :func:`check_built_from`
    compares with a config before a stored dense model is reused; ``trained`` says how it was
    pre-trained (None: weights from a checkpoint). ``example_shape`` (C, H, W) is the input the
    dependency graph is traced with.
    """
    build: dict[str, Any] = {"model": ref, "num_classes": int(num_classes), "in_channels": int(in_channels), "pickle": None}
    sha = None
    if _is_checkpoint(ref) and Path(ref).is_file():
        path = Path(ref).resolve()
        sha = _file_sha256(path)
        try:  # weights-only even when trusted: a full pickle's architecture is the file itself
            obj: Any = read_checkpoint(path)
        except UntrustedPickle:
            if not trust_pickle:
                raise
            obj = None
        arch = checkpoint_arch(obj)
        if arch is not None:
            build.update(model=arch, num_classes=int(obj.get("num_classes", num_classes)))
        else:
            build.update(model=str(path), pickle={"path": str(path), "sha256": sha})
    return {
        "build": build,
        "num_classes": int(num_classes),
        "example_shape": [int(s) for s in example_shape],
        "widths": {},
        "built_from": {"model": ref, "checkpoint_sha256": sha, "num_classes": int(num_classes),
                       "in_channels": int(in_channels), "input_size": [int(s) for s in input_size]},
        "trained": trained,
    }


def pruned_recipe(recipe: dict[str, Any], widths: dict[str, Any]) -> dict[str, Any]:
    """The recipe of a model pruned from ``recipe``'s dense model to ``widths`` ({group: (before, after)})."""
    return {**recipe, "widths": {str(g): [int(w[0]), int(w[1])] for g, w in widths.items()}}


def check_built_from(stored: dict[str, Any], wanted: dict[str, Any], path: Path) -> None:
    """Refuse to reuse a stored dense model that another model reference (or checkpoint, class
    count, input) built: its trials would search one model while the study records another."""
    s, w = stored.get("built_from") or {}, wanted["built_from"]
    keys = ["num_classes", "in_channels", "input_size"]
    if s.get("checkpoint_sha256") and w.get("checkpoint_sha256"):
        keys.insert(0, "checkpoint_sha256")  # the same file may sit at another path on each worker
    else:
        keys.insert(0, "model")
    changed = [f"{k}: {s.get(k)} -> {w.get(k)}" for k in keys if s.get(k) != w.get(k)]
    if changed:
        def shown(d: dict[str, Any]) -> str:
            size = "x".join(str(v) for v in d.get("input_size") or [])
            return f"{d.get('model')} ({d.get('num_classes')} classes, {d.get('in_channels')}x{size} input)"

        raise ConfigError(
            f"{path}: the dense model here was built from {shown(s)} but the config asks for {shown(w)} "
            f"({'; '.join(changed)}); use a new --out, or delete {path.name} if you mean to retrain it"
        )


def save_model(model: nn.Module, path: Path, recipe: dict[str, Any]) -> Path:
    """Write ``model`` as a weights-only file: its state dict, the recipe that rebuilds it, and
    the weights' hash (atomically, like every file in a run folder)."""
    plain = json.loads(json.dumps(recipe))  # tuples -> lists; anything else would not load weights-only
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return atomic_torch_save({"format": FORMAT, "recipe": plain, "state_dict": state,
                              "weights_sha256": weights_hash(model)}, Path(path))


def read_model_file(path: Path, *, trust_pickle: bool = False) -> dict[str, Any] | nn.Module:
    """The content of a model file: the weights-only dict, or (``trust_pickle`` only) the module
    of a full pickle."""
    path = Path(path)
    obj = torch_load(path, trust_pickle=trust_pickle, refusal=RUN_FILE_REFUSAL)
    if isinstance(obj, nn.Module):
        return obj
    if not (isinstance(obj, dict) and obj.get("format") == FORMAT and isinstance(obj.get("recipe"), dict)):
        raise ConfigError(f"{path}: not an autoprune model file (no format {FORMAT!r}); "
                          "re-export it with the autoprune that wrote the run folder")
    return obj


def _build_architecture(recipe: dict[str, Any], *, trust_pickle: bool = False, where: Path | str = "model",
                       code: CodePolicy = CodePolicy()) -> nn.Module:
    """The (randomly initialised) module a recipe describes: the dense model, cut to the widths.
    The model reference must be built-in, given by the user (``code``) or trusted (``code.trust``):
    checked before anything is imported."""
    b = recipe.get("build") if isinstance(recipe, dict) else None
    if not isinstance(b, dict) or not isinstance(b.get("model"), str):
        raise ConfigError(f"{where}: its recipe names no model to rebuild; the file is damaged")
    if not b.get("pickle"):
        code.check(b["model"], where, key="recipe")
    else:
        src = Path(b["pickle"]["path"])
        if b["model"] != b["pickle"]["path"]:
            raise ConfigError(f"{where}: its recipe names the full-model pickle {src} but builds {b['model']!r}; the file is damaged")
        if not trust_pickle:
            raise UntrustedPickle(f"{where}: its architecture is the full-model pickle {src} given as --model, and unpickling "
                                  "runs whatever code that file names; pass --trust-pickle if you trust it")
        if not src.is_file():
            raise ConfigError(f"{where}: its architecture is the full-model pickle {src}, which is gone; put it back there")
        if _file_sha256(src) != b["pickle"]["sha256"]:
            raise ConfigError(f"{where}: its architecture is the full-model pickle {src}, which changed since the model was "
                              "written; put the original back")
    model = build_model(b["model"], b["num_classes"], b["in_channels"], trust_pickle=trust_pickle)
    widths = {g: w for g, w in (recipe.get("widths") or {}).items()}
    if any(after < before for before, after in widths.values()):
        try:
            slice_to_widths(model, torch.zeros(1, *recipe["example_shape"]), widths, recipe.get("num_classes"))
        except ValueError as exc:
            raise ConfigError(f"{where}: its pruned widths do not fit the dense model {b['model']} builds here ({exc}); "
                              "the model code changed since the file was written") from None
    return model


def model_from_file(obj: dict[str, Any], path: Path, *, trust_pickle: bool = False,
                    code: CodePolicy = CodePolicy()) -> nn.Module:
    """Rebuild the module of a weights-only file read by :func:`read_model_file` (``code``: see
    :func:`_build_architecture`)."""
    model = _build_architecture(obj["recipe"], trust_pickle=trust_pickle, where=path, code=code)
    try:
        model.load_state_dict(obj["state_dict"])
    except RuntimeError as exc:
        raise ConfigError(f"{path}: its weights do not fit the architecture its recipe rebuilds "
                          f"({' '.join(str(exc).split())[:200]}); the file is damaged or the model code changed") from None
    if obj.get("weights_sha256") and weights_hash(model) != obj["weights_sha256"]:
        raise ConfigError(f"{path}: its weights do not match their recorded hash; the file is damaged")
    return model.eval()


def load_checkpoint(path: Path, *, trust_pickle: bool = False,
                    code: CodePolicy = CodePolicy()) -> tuple[nn.Module, Optional[dict[str, Any]]]:
    """``(model, recipe)`` from a model file autoprune wrote; ``recipe`` is None for a trusted
    full pickle, which records none (the caller then knows the recipe from the run)."""
    obj = read_model_file(path, trust_pickle=trust_pickle)
    if isinstance(obj, nn.Module):
        return obj.eval(), None
    return model_from_file(obj, Path(path), trust_pickle=trust_pickle, code=code), obj["recipe"]


def load_model(path: str | Path, *, trust_pickle: bool = False, model: Optional[str] = None,
               trust_code: bool = False) -> nn.Module:
    """The module in a model file autoprune wrote (``model.pt`` of a trial, the front or a
    bundle; ``base_model.pt``), in eval mode, loaded weights-only.

    Demo and torchvision models rebuild as they are; a model whose code is your own
    ``package.module:function`` needs that reference as ``model`` (it must equal the one the file
    records), or ``trust_code=True``: the file alone never chooses which code runs."""
    return load_checkpoint(Path(path), trust_pickle=trust_pickle, code=CodePolicy.of(model, trust=trust_code))[0]


def _stored_model_ref(base_model: Path) -> Optional[str]:
    """The model reference a run folder's dense model was built from (None: no folder yet or a
    file this check cannot read, which the search itself then reports)."""
    if not Path(base_model).is_file():
        return None
    try:
        stored = read_model_file(Path(base_model))
    except Exception:  # noqa: BLE001 - the search names the problem with its own message
        return None
    if isinstance(stored, dict):
        return str((stored["recipe"].get("built_from") or {}).get("model") or "") or None
    return None


def check_same_model(base_model: Path, ref: str) -> None:
    """Refuse to resume a run folder with another model object, naming what differs."""
    stored = _stored_model_ref(base_model)
    if stored is None or stored == ref:
        return
    if not objects.is_object_ref(stored):
        raise ConfigError(f"{base_model.parent}: this run folder searched model {stored}, not a Python object; "
                          "pass out= a new folder for the object")

    def parts(r: str) -> tuple[str, str, str]:
        cls, _, fps = r[len(objects.PREFIX):].partition("@")
        arch, _, weights = fps.partition("-")
        return cls, arch, weights

    (c0, a0, w0), (c1, a1, w1) = parts(stored), parts(ref)
    what = "another architecture" if (c0, a0) != (c1, a1) else "the same architecture with other weights"
    raise ConfigError(
        f"{base_model.parent}: this run folder's search was started with another model object ({stored}); the model passed "
        f"now ({ref}) is {what}. Pass the object the search started with to resume it, or out= a new folder to search this one"
    )
