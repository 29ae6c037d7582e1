"""Loading: YAML files or shipped names → validated config models, with one-line errors.

Each file is a YAML path or a name: ``./<folder>/<name>.yaml`` in the working directory wins (a
user's own ``device_profiles/openvino-cpu.yaml``), else the one shipped with autoprune
(:func:`shipped_dir`). The folders are ``device_profiles/``, ``search_spaces/`` and
``run_configs/``: the same names as the repository's top-level folders the shipped files live in.

Every loader raises :class:`ConfigError` naming the file, the key and what is allowed, because
a search that dies on a typo twenty minutes in is the worst user experience we can offer.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml
from pydantic import BaseModel, ValidationError

from autoprune.config.device_profile import DeviceProfile
from autoprune.config.run_config import RunConfig
from autoprune.config.search_space import SearchSpace
from autoprune.errors import ConfigError

#: Device profiles, search spaces and example run configs: top-level folders of the repository
#: (the files users read and copy), shipped inside the wheel as ``autoprune/shipped/<folder>/``
#: (setup.py maps them). Run configs are not in ``examples/``: that folder holds example code
#: (``examples/python_api.py``, ``examples/segmentation/``), and ``--config NAME`` looking in
#: ``./examples/`` would have matched the repository's own files from its root.
SHIPPED_FOLDERS = ("device_profiles", "search_spaces", "run_configs")


def shipped_dir(folder: str) -> Path:
    """The folder of shipped YAML files of one kind (``device_profiles`` ...): inside the installed
    wheel, or the repository's top-level folder when autoprune runs from a source checkout (an
    editable install, ``PYTHONPATH``), where the package holds no copy."""
    if folder not in SHIPPED_FOLDERS:
        raise ValueError(f"unknown shipped folder {folder!r}; one of {SHIPPED_FOLDERS}")
    packaged = Path(str(importlib.resources.files("autoprune") / "shipped" / folder))
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / folder


def _fmt_loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "<top level>"


def _allowed_hint(model_cls: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """Name the keys allowed where the bad key was found, so typos are easy to fix."""
    cls: Any = model_cls
    for part in loc[:-1]:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            break
        ann = field.annotation
        nested = getattr(ann, "__args__", None)
        cand = [a for a in (nested or (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not cand:
            break
        cls = cand[0]
    fields = getattr(cls, "model_fields", None)
    return f" (allowed keys: {', '.join(sorted(fields))})" if fields else ""


def validate(model_cls: type[BaseModel], data: Any, source: str) -> Any:
    """Validate ``data`` against ``model_cls``; turn pydantic errors into a readable ConfigError."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values at the top level, got {type(data).__name__}")
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key" + _allowed_hint(model_cls, loc)
            elif err["type"] == "literal_error":
                msg = f"{msg} (got {err.get('input')!r})"
            msg = msg.removeprefix("Value error, ")  # our validators' messages are whole sentences
            # A check across keys (no location) names its keys in the message itself.
            lines.append(f"key '{_fmt_loc(loc)}': {msg}" if loc else msg)
        # One line: the CLI prints it after "error: " and users grep and paste it.
        raise ConfigError(f"{source}: invalid {model_cls.__name__}: " + "; ".join(lines)) from None


def load_yaml(path: Path) -> Any:
    """The YAML document in ``path``; a missing file or bad YAML is a ConfigError naming the file."""
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None


def resolve_named(ref: str, folder: str) -> Path:
    """Turn ``ref`` into a YAML path: an existing path, or a shipped name such as ``openvino-cpu``.

    Shipped names are looked up in ``./<folder>/`` first (the user's project), then in the
    folder that ships with autoprune.
    """
    p = Path(ref)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"{ref}: file not found")
        return p
    candidates = [Path.cwd() / folder / f"{ref}.yaml", shipped_dir(folder) / f"{ref}.yaml"]
    for c in candidates:
        if c.is_file():
            return c
    shipped = sorted(q.stem for q in shipped_dir(folder).glob("*.yaml"))
    raise ConfigError(
        f"{ref!r} is neither a YAML file nor a name in ./{folder}/ (shipped: {', '.join(shipped)})"
    )


def load_search_space(ref: str) -> SearchSpace:
    """A search space from a YAML path or a name (``./search_spaces/`` first, then the shipped ones)."""
    path = resolve_named(ref, "search_spaces")
    return validate(SearchSpace, load_yaml(path), str(path))


def load_device_profile(ref: str) -> DeviceProfile:
    """A device profile from a YAML path or a name (``./device_profiles/`` first, then the shipped ones)."""
    path = resolve_named(ref, "device_profiles")
    return validate(DeviceProfile, load_yaml(path), str(path))


def parse_assignments(items: Optional[Sequence[str]]) -> dict[str, Any]:
    """``["finetune.steps=20", "pretrain_steps=null"]`` → ``{"finetune.steps": 20, "pretrain_steps": None}``.

    Values are YAML (numbers, booleans, ``null``, lists), so ``--set`` writes exactly what the
    same key in a run-config file would. Keys are checked when the config is validated.
    """
    out: dict[str, Any] = {}
    for item in items or ():
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key into the run config, "
                              "e.g. --set finetune.steps=20 or --set pretrain_steps=null")
        if not text.strip():
            raise ConfigError(f"--set {item!r}: no value after '='; write {key}=null to set it to null")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({str(exc).splitlines()[0]}); quote it") from None
        if key in out and out[key] != value:
            raise ConfigError(f"--set {key} is given twice ({out[key]!r} and {value!r}); keep one")
        out[key] = value
    return out


def _set_dotted(data: dict[str, Any], key: str, value: Any, source: str) -> None:
    """``data["search"]["trials"] = value`` for ``key="search.trials"``, creating sections."""
    *heads, last = key.split(".")
    node = data
    for i, head in enumerate(heads):
        child = node.setdefault(head, {})
        if not isinstance(child, dict):
            where = ".".join(heads[: i + 1])
            raise ConfigError(f"{source}: key '{key}': '{where}' is a value ({child!r}), not a section with keys; "
                              f"set '{where}' itself")
        node = child
    node[last] = value


def load_run_config(path: Optional[str], assignments: Optional[Mapping[str, Any]] = None, **overrides: Any) -> RunConfig:
    """Read a run config (or the built-in default) and apply non-None ``overrides`` (CLI flags,
    dotted keys) and then ``assignments`` (``--set``: applied even when the value is None) on top.

    Given on top of a file, one pretrain budget replaces the file's other one (a command-line
    ``--pretrain-seconds`` over a file's ``pretrain_steps`` means: train by wall time).
    """
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        p = resolve_named(path, "run_configs")
        source = str(p)
        data = load_yaml(p) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level")
    given = {k: v for k, v in overrides.items() if v is not None}
    sets = dict(assignments or {})
    for key in sorted(set(given) & set(sets)):
        if given[key] != sets[key]:
            raise ConfigError(f"{key} is given twice: as an option ({given[key]!r}) and as --set {key}={sets[key]!r}; keep one")
    given.update(sets)
    if given:
        source += " with command-line settings"
    pretrain = {"pretrain_steps", "pretrain_seconds"} & set(given)
    if len(pretrain) == 1:
        data.pop(({"pretrain_steps", "pretrain_seconds"} - pretrain).pop(), None)
    for key, value in given.items():
        _set_dotted(data, key, value, source)
    return validate(RunConfig, data, source)


def config_hash(*parts: BaseModel | Mapping[str, Any]) -> str:
    """Stable hash of everything that shapes the search space, stored in the study to refuse mixing.
    Parts are models or their JSON dumps (the same hash either way)."""
    blob = json.dumps([p.model_dump(mode="json") if isinstance(p, BaseModel) else p for p in parts], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


__all__ = ["SHIPPED_FOLDERS", "config_hash", "load_device_profile", "load_run_config", "load_search_space", "load_yaml",
           "parse_assignments", "resolve_named", "shipped_dir", "validate"]
