"""Configuration: YAML files → validated pydantic models.

Three kinds of file exist, each in its own folder so users can mix and match:

* ``search_spaces/*.yaml``  – which groups may be pruned, ratio ranges, per-layer overrides;
* ``device_profiles/*.yaml`` – the target backend, how to measure latency, and budgets;
* a run config (``examples/*.yaml``) – model, data, fine-tune and search settings that
  point at one search space and one device profile.

Every loader raises :class:`ConfigError` naming the file, the key and what is allowed, because
a search that dies on a typo twenty minutes in is the worst user experience we can offer.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

#: Repository root when installed editable / run from a checkout; shipped YAML lives here.
PACKAGE_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_ROOT.parent


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message names file, key and allowed values."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- search space
class LayerRule(_Strict):
    """Override for groups whose root module name matches ``pattern`` (fnmatch glob)."""

    pattern: str
    skip: bool = False
    low: Optional[float] = None
    high: Optional[float] = None
    methods: Optional[list[str]] = None

    @model_validator(mode="after")
    def _range(self) -> "LayerRule":
        _check_range(self.low, self.high)
        return self


def _check_range(low: Optional[float], high: Optional[float]) -> None:
    for name, v in (("low", low), ("high", high)):
        if v is not None and not (0.0 <= v < 1.0):
            raise ValueError(f"{name}={v} is outside [0, 1): a ratio is the fraction of channels removed")
    if low is not None and high is not None and low > high:
        raise ValueError(f"low={low} is greater than high={high}")


class SearchSpace(_Strict):
    """Per-group sparsity search space.

    ``low``/``high`` bound the fraction of output channels removed from every prunable group;
    ``layers`` refines that per group with glob patterns on module names (first match wins).
    """

    name: str = "default"
    low: float = 0.0
    high: float = 0.7
    step: Optional[float] = 0.05
    round_to: int = Field(8, ge=1, description="keep a multiple of this many channels")
    methods: list[str] = Field(default_factory=lambda: ["l1"])
    global_method: bool = True
    layers: list[LayerRule] = Field(default_factory=list)
    #: Uniform ratios enqueued as first trials: cheap, strong seeds for the sampler.
    seed_uniform: list[float] = Field(default_factory=lambda: [0.25, 0.5])

    @model_validator(mode="after")
    def _range(self) -> "SearchSpace":
        _check_range(self.low, self.high)
        for r in self.seed_uniform:
            _check_range(r, None)
        if self.step is not None and not (0 < self.step < 1):
            raise ValueError(f"step={self.step} must be in (0, 1) or null")
        return self


# --------------------------------------------------------------------------- device profile
BACKENDS = ("onnxruntime", "openvino", "torch")


class Budget(_Strict):
    """Hard limits; a trial over any of them is infeasible (an Optuna constraint > 0)."""

    max_latency_ms: Optional[float] = Field(None, gt=0)
    max_params: Optional[int] = Field(None, gt=0)
    max_flops: Optional[float] = Field(None, gt=0)
    max_size_mb: Optional[float] = Field(None, gt=0)


class DeviceProfile(_Strict):
    """Where and how latency is measured. Numbers agree with ``benchmark_app -hint none
    -nstreams 1 -nthreads N -nireq 1 -api sync`` when backend is openvino."""

    name: str
    backend: Literal["onnxruntime", "openvino", "torch"]
    device: str = "cpu"
    threads: int = Field(1, ge=1)
    warmup: int = Field(10, ge=0)
    repeats: int = Field(50, ge=1)
    #: Stop repeating early once the median's 95% CI half-width is below this fraction.
    target_rel_ci: Optional[float] = Field(0.02, gt=0)
    max_time_s: float = Field(5.0, gt=0)
    batch_size: int = Field(1, ge=1)
    #: Input shape without the batch dimension; null = take it from the data.
    input_shape: Optional[list[int]] = None
    providers: Optional[list[str]] = None
    budget: Budget = Field(default_factory=Budget)


# --------------------------------------------------------------------------- run config
class FinetuneConfig(_Strict):
    steps: int = Field(40, ge=0)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    #: Weight of the distillation term (0 = plain cross-entropy, 1 = pure distillation).
    distill_alpha: float = Field(0.5, ge=0, le=1)
    temperature: float = Field(4.0, gt=0)


class SearchSettings(_Strict):
    trials: int = Field(20, ge=1)
    sampler: Literal["nsga2", "tpe", "random", "gp"] = "nsga2"
    population_size: Optional[int] = Field(None, ge=2)
    seed: int = 0
    storage: Optional[str] = None
    study_name: Optional[str] = None
    timeout_s: Optional[float] = Field(None, gt=0)


class RunConfig(_Strict):
    """One search: what to prune, on what data, for which device, and how hard to look."""

    model: str = "demo"
    num_classes: Optional[int] = None
    data: str = "digits"
    image_size: Optional[int] = None
    val_fraction: float = Field(0.25, gt=0, lt=1)
    pretrain_seconds: float = Field(10.0, ge=0)
    search_space: str = "default"
    device_profile: str = "onnxruntime-cpu"
    out: str = "runs/digits-demo"
    exporter: Literal["dynamo", "torchscript"] = "dynamo"
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    search: SearchSettings = Field(default_factory=SearchSettings)


# --------------------------------------------------------------------------- loading
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
            lines.append(f"  key '{_fmt_loc(loc)}': {msg}")
        raise ConfigError(f"{source}: invalid {model_cls.__name__}:\n" + "\n".join(lines)) from None


def load_yaml(path: Path) -> Any:
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
    candidates = [Path.cwd() / folder / f"{ref}.yaml", REPO_ROOT / folder / f"{ref}.yaml"]
    for c in candidates:
        if c.is_file():
            return c
    shipped = sorted(q.stem for q in (REPO_ROOT / folder).glob("*.yaml"))
    raise ConfigError(f"{ref!r} is neither a YAML file nor a shipped name in {folder}/ (shipped: {', '.join(shipped)})")


def load_search_space(ref: str) -> SearchSpace:
    path = resolve_named(ref, "search_spaces")
    return validate(SearchSpace, load_yaml(path), str(path))


def load_device_profile(ref: str) -> DeviceProfile:
    path = resolve_named(ref, "device_profiles")
    return validate(DeviceProfile, load_yaml(path), str(path))


def load_run_config(path: Optional[str], **overrides: Any) -> RunConfig:
    """Read a run config (or the built-in default) and apply non-None CLI overrides on top."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        p = Path(path)
        source = str(p)
        data = load_yaml(p) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level")
    for key, value in overrides.items():
        if value is None:
            continue
        if "." in key:
            head, tail = key.split(".", 1)
            data.setdefault(head, {})[tail] = value
        else:
            data[key] = value
    return validate(RunConfig, data, source)


def config_hash(*parts: BaseModel) -> str:
    """Stable hash of everything that shapes the search space, stored in the study to refuse mixing."""
    blob = json.dumps([p.model_dump(mode="json") for p in parts], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
