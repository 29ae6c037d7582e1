"""Configuration: YAML files → validated pydantic models.

Three kinds of file exist, each in its own folder so users can mix and match:

* search spaces – which groups may be pruned, ratio ranges, per-layer overrides;
* device profiles – the target backend, how to measure latency, and budgets;
* a run config – model, data, fine-tune and search settings that point at one search space
  and one device profile.

Each is a YAML path or a name: ``./<folder>/<name>.yaml`` in the working directory wins (a user's
own ``device_profiles/openvino-cpu.yaml``), else the one shipped with autoprune (:func:`shipped_dir`).
The folders are ``device_profiles/``, ``search_spaces/`` and ``run_configs/``: the same names as
the repository's top-level folders the shipped files live in.

Every loader raises :class:`ConfigError` naming the file, the key and what is allowed, because
a search that dies on a typo twenty minutes in is the worst user experience we can offer.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from autoprune.errors import ConfigError
from autoprune.prune import methods as registry
from autoprune.prune.methods.granularity import GRANULARITY_HELP, parse

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
    return Path(__file__).resolve().parent.parent / folder


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- search space
class LayerRule(_Strict):
    """Override for groups whose root module name matches ``pattern`` (fnmatch glob)."""

    #: fnmatch glob on a group's root module name or any of its member names (first matching rule wins;
    #: a pattern matching no group is an error).
    pattern: str
    #: Leave matching groups unpruned.
    skip: bool = False
    #: Lower bound of matching groups' ratio (null = the search space's ``low``).
    low: Optional[float] = None
    #: Upper bound of matching groups' ratio (null = the search space's ``high``).
    high: Optional[float] = None
    #: Pruning criteria allowed for matching groups (null = the search space's ``methods``).
    methods: Optional[list[str]] = None
    #: Granularities allowed for matching groups (see SearchSpace.granularities).
    granularities: Optional[list[str]] = None

    @model_validator(mode="after")
    def _range(self) -> "LayerRule":
        _check_range(self.low, self.high)
        _check_methods(self.methods, self.granularities)
        return self


def _check_methods(methods: Optional[list[str]], granularities: Optional[list[str]]) -> None:
    """Unknown criterion or granularity names fail at load time with the allowed values."""

    for m in methods or []:
        if m not in registry.available():
            raise ValueError(f"methods: unknown pruning method {m!r}; allowed: {', '.join(registry.available())}")
    if methods is not None and not methods:
        raise ValueError(f"methods: empty list; allowed: {', '.join(registry.available())}")
    for g in granularities or []:
        parse(g)
    if granularities is not None and not granularities:
        raise ValueError(f"granularities: empty list; allowed: {GRANULARITY_HELP}")


def _check_range(low: Optional[float], high: Optional[float]) -> None:
    for name, v in (("low", low), ("high", high)):
        if v is not None and not (0.0 <= v < 1.0):
            raise ValueError(f"{name}={v} is outside [0, 1): a ratio is the fraction of channels removed")
    if low is not None and high is not None and low > high:
        raise ValueError(f"low={low} is greater than high={high}")


#: Kept widths are multiples of this with ``round_to: auto`` when no staircases were measured:
#: odd channel counts can be slower than the dense model on vectorised kernels.
DEFAULT_ROUND_TO = 8


class SearchSpace(_Strict):
    """Per-group sparsity search space.

    ``low``/``high`` bound the fraction of output channels removed from every prunable group;
    ``layers`` refines that per group with glob patterns on module names (first match wins).
    """

    #: Name shown in logs and stored with the study.
    name: str = "default"
    #: Smallest fraction of a group's channels removed (``ratio/<group>`` lower bound), in [0, 1).
    low: float = 0.0
    #: Largest fraction of a group's channels removed, in [0, 1).
    high: float = 0.7
    #: Ratio grid step (null = continuous ratios).
    step: Optional[float] = 0.05
    #: Kept widths are a multiple of this many channels (an integer: exactly that, as always), or
    #: ``auto``/null: the widths learned from latency staircases (``efficiency.staircases: true``,
    #: measure/staircase.py), falling back to DEFAULT_ROUND_TO when staircases are off.
    round_to: Optional[int] = Field(None, ge=1, description="keep a multiple of this many channels; auto/null = learned")
    #: Pruning criteria (importance) to search: l1, l2, random, taylor, grad_norm, hessian, act_mean,
    #: apoz, bn_scale.
    methods: list[str] = Field(default_factory=lambda: ["l1"])
    #: One criterion for the whole model per trial (true) or one per group, ``method/<group>`` (false).
    global_method: bool = True
    #: What a group's ratio removes: structured (channels, physically) | unstructured (weights
    #: zeroed) | nm:N:M | hybrid (channels, then weights). Sampled like methods.
    granularities: list[str] = Field(default_factory=lambda: ["structured"])
    #: One granularity for the whole model per trial (true) or one per group (false).
    global_granularity: bool = True
    #: hybrid: range of ``wratio/<group>``, the fraction of the remaining weights zeroed.
    weight_low: float = 0.0
    #: Upper end of the ``wratio/<group>`` range (hybrid granularity).
    weight_high: float = 0.8
    #: bn_scale: L1 penalty on BN scales for bn_l1_steps steps before ranking (network slimming).
    bn_l1: float = Field(0.0, ge=0)
    #: Steps of the BN-scale L1 fine-tune (bn_scale criterion with bn_l1 > 0).
    bn_l1_steps: int = Field(20, ge=0)
    #: oneshot | iterative (all groups, ratio·k/steps per round) | layerwise (groups in chunks);
    #: rounds are separated by fine-tunes of finetune.steps // schedule_steps steps.
    schedule: Literal["oneshot", "iterative", "layerwise"] = "oneshot"
    #: Rounds of an iterative or layerwise schedule.
    schedule_steps: int = Field(1, ge=1)
    layers: list[LayerRule] = Field(default_factory=list)
    #: Also search a transformer's embedding width (the model width every block, attention and
    #: residual add shares): one group that touches every layer, so off unless asked for.
    embedding: bool = False
    #: Uniform ratios enqueued as first trials: cheap, strong seeds for the sampler.
    seed_uniform: list[float] = Field(default_factory=lambda: [0.25, 0.5])
    #: With the sensitivity scan on, each uniform seed also gets a non-uniform twin around the
    #: same level: groups that lose least accuracy per FLOP saved pruned up to ``seed_spread``/2
    #: more, the dearest ones that much less (efficiency.allocate_ratios). 0 = uniform seeds only.
    seed_spread: float = Field(0.3, ge=0, le=1)

    @model_validator(mode="before")
    @classmethod
    def _auto_round_to(cls, data: Any) -> Any:
        """``round_to: auto`` is spelled null internally (one value for "learned")."""
        if isinstance(data, dict) and isinstance(data.get("round_to"), str) and data["round_to"].strip().lower() == "auto":
            return {**data, "round_to": None}
        return data

    @property
    def round_unit(self) -> int:
        """The rounding unit wherever no learned widths apply: ``round_to``, or 8 for auto."""
        return self.round_to or DEFAULT_ROUND_TO

    @model_validator(mode="after")
    def _range(self) -> "SearchSpace":
        _check_range(self.low, self.high)
        for r in self.seed_uniform:
            _check_range(r, None)
        if self.step is not None and not (0 < self.step < 1):
            raise ValueError(f"step={self.step} must be in (0, 1) or null")
        _check_range(self.weight_low, self.weight_high)
        _check_methods(self.methods, self.granularities)
        return self


# --------------------------------------------------------------------------- device profile


class Budget(_Strict):
    """Hard limits; a trial over any of them is infeasible (an Optuna constraint > 0)."""

    #: Median latency on this profile, in milliseconds.
    max_latency_ms: Optional[float] = Field(None, gt=0)
    #: Parameters of the pruned model.
    max_params: Optional[int] = Field(None, gt=0)
    #: FLOPs of one inference (fvcore count).
    max_flops: Optional[float] = Field(None, gt=0)
    #: Size of the exported ONNX file in MB (10^6 bytes).
    max_size_mb: Optional[float] = Field(None, gt=0)


class DeviceProfile(_Strict):
    """Where and how latency is measured. Numbers agree with ``benchmark_app -hint none
    -nstreams 1 -nthreads N -nireq 1 -api sync -infer_precision f32`` when backend is openvino."""

    #: Profile name: recorded with every measurement; ``pick --profile`` and ``remeasure`` use it.
    name: str
    #: Runtime that times the model: onnxruntime, openvino, torch or remote (a ``serve-latency``
    #: server).
    backend: Literal["onnxruntime", "openvino", "torch", "remote"]
    #: Device of that runtime: cpu, cuda or tensorrt (onnxruntime); CPU, GPU, NPU or AUTO:… (OpenVINO);
    #: cpu or cuda (torch).
    device: str = "cpu"
    #: Intra-op threads of the runtime (inter-op 1; OpenVINO INFERENCE_NUM_THREADS, one stream).
    threads: int = Field(1, ge=1)
    #: Untimed inferences before timing.
    warmup: int = Field(10, ge=0)
    #: Most timed inferences per measurement (fewer when target_rel_ci is reached first).
    repeats: int = Field(50, ge=1)
    #: Stop repeating early once the median's 95% CI half-width is below this fraction.
    target_rel_ci: Optional[float] = Field(0.02, gt=0)
    #: Time cap of one measurement in seconds.
    max_time_s: float = Field(5.0, gt=0)
    #: Batch size of the timed input.
    batch_size: int = Field(1, ge=1)
    #: Input shape without the batch dimension; null = take it from the data.
    input_shape: Optional[list[int]] = None
    #: onnxruntime execution providers, overriding the ones ``device`` implies.
    providers: Optional[list[str]] = None
    budget: Budget = Field(default_factory=Budget)
    #: fp32 | fp16 (torch CUDA, OpenVINO inference-precision hint, onnxruntime TensorRT) | int8
    #: (post-training quantization on calibration batches: NNCF for OpenVINO, onnxruntime.quantization
    #: otherwise); with int8 the trial accuracy is measured on the quantized model.
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    #: latency: batch_size is usually 1 and median ms is the headline; throughput: a larger
    #: batch_size, samples/s is the headline (OpenVINO gets the THROUGHPUT hint, still one stream).
    mode: Literal["latency", "throughput"] = "latency"
    #: torch backend only: torch.compile the model before timing (needs a C++ compiler on CPU).
    compile: bool = False
    #: OpenVINO on a CPU device: pin inference threads to cores (``ENABLE_CPU_PINNING``), as
    #: ``benchmark_app`` does by default. Pinned threads do not migrate between cores, which
    #: steadies sub-millisecond readings and matches how a dedicated target runs; set false on a
    #: machine whose cores other work shares (pinned threads then wait for their core).
    cpu_pinning: bool = True
    #: Time the dense model in the same session, interleaved with the candidate, and report the
    #: speed-up ratio: more trustworthy than absolute times for sub-millisecond models on shared CPUs.
    measure_reference: bool = False
    #: Reuse the latency of an identical architecture (same exported graph shapes) in a run folder.
    cache: bool = True
    #: int8: number of single-input calibration samples fed to post-training quantization.
    calib_samples: int = Field(64, ge=1)
    #: Latency predictor (measure/predictor.py, calibrated on the run's measured models): once its
    #: held-out error is known, skip candidates predicted over budget.max_latency_ms × (1 + margin)
    #: without exporting or measuring them; margin = 1.5 × its worst held-out over-prediction, at
    #: least lut_margin. (The key keeps its name from the per-layer lookup table it replaced.)
    lut: bool = False
    #: Smallest safety margin of the latency predictor's rejections (fraction of max_latency_ms).
    lut_margin: float = Field(0.25, ge=0)
    #: Export parity (measure/parity.py): each exported candidate and the dense model run on this many
    #: calibration samples must match PyTorch within parity_atol + parity_rtol x max |logit| (and agree
    #: on top-1), else the trial fails with the difference; 0 samples turns the check off.
    parity_samples: int = Field(8, ge=0)
    #: Absolute tolerance of the export parity check.
    parity_atol: float = Field(1e-4, ge=0)
    #: Relative tolerance of the export parity check (times the largest |logit|).
    parity_rtol: float = Field(1e-3, ge=0)
    #: backend: remote — URL of `autoprune serve-latency` on the target, the environment variable
    #: holding its token, the runtime the server should use, and the HTTP timeout.
    url: Optional[str] = None
    #: Latency staircases of this device measured elsewhere (a ``staircases/<fingerprint>.json`` of
    #: another run folder, e.g. one measured on the remote target): used instead of measuring when
    #: its fingerprint matches this run's model and settings (measure/staircase.py).
    staircases: Optional[str] = None
    #: backend: remote: environment variable holding the server's token.
    token_env: str = "AUTOPRUNE_LATENCY_TOKEN"
    #: backend: remote: the runtime the server times with (onnxruntime or openvino).
    remote_backend: Literal["onnxruntime", "openvino"] = "onnxruntime"
    #: backend: remote: HTTP timeout of one measurement request in seconds.
    request_timeout_s: float = Field(300.0, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> "DeviceProfile":
        if self.backend == "remote" and not self.url:
            raise ValueError("backend: remote needs url: http://<target>:<port> (where `autoprune serve-latency` runs)")
        if self.backend == "torch" and self.precision == "int8":
            raise ValueError("precision: int8 is supported on backends onnxruntime, openvino and remote, not torch")
        if self.backend == "torch" and self.precision == "fp16" and not self.device.lower().startswith("cuda"):
            raise ValueError("precision: fp16 with backend torch needs device: cuda (CPU fp16 kernels are slow/partial)")
        if self.compile and self.backend != "torch":
            raise ValueError("compile: true applies to backend torch only")
        return self


# --------------------------------------------------------------------------- run config
class FinetuneConfig(_Strict):
    """The short distilled fine-tune every trial gets before it is scored."""

    #: Distilled fine-tune steps of every trial (0 = score right after pruning and BN recalibration).
    steps: int = Field(40, ge=0)
    #: Batch size of the fine-tune, pre-training and calibration batches.
    batch_size: int = Field(64, ge=1)
    #: Learning rate of the fine-tune (Adam).
    lr: float = Field(1e-3, gt=0)
    #: Weight of the distillation term (0 = plain cross-entropy, 1 = pure distillation).
    distill_alpha: float = Field(0.5, ge=0, le=1)
    #: Distillation temperature (softened logits of the dense teacher).
    temperature: float = Field(4.0, gt=0)


class SearchSettings(_Strict):
    """How many trials, with which sampler and seed, in which storage; accuracy floor and budget-mode targets."""

    #: Complete trials the study ends with (over all workers); a resumed run counts finished ones.
    trials: int = Field(20, ge=1)
    #: The accuracy you are prepared to lose (fraction, e.g. 0.05 = 5 points below the dense
    #: model). Trials below it are infeasible (an Optuna constraint), so NSGA-II spends its
    #: population on the region you would deploy from. null = no floor.
    max_accuracy_drop: Optional[float] = Field(None, gt=0, le=1)
    #: Optuna sampler: nsga2 (multi-objective genetic), tpe, random or gp.
    sampler: Literal["nsga2", "tpe", "random", "gp"] = "nsga2"
    #: NSGA-II population size (null = Optuna's default, capped by the trial count).
    population_size: Optional[int] = Field(None, ge=2)
    #: Sampler and fine-tune seed; the k-th worker session seeds its sampler with seed + k.
    seed: int = 0
    #: Optuna storage URL shared by several workers (e.g. postgresql://...); null = SQLite ``study.db``
    #: in the run folder.
    storage: Optional[str] = None
    #: Study name in the storage (null = derived from the run folder).
    study_name: Optional[str] = None
    #: Stop starting new trials after this many seconds (finished trials stay).
    timeout_s: Optional[float] = Field(None, gt=0)
    #: Seconds between a running trial's heartbeats in the storage (Optuna RDB heartbeat).
    heartbeat_interval: int = Field(10, ge=1)
    #: A RUNNING trial whose heartbeat is older than this is taken as a dead worker's: it is
    #: marked FAIL and its parameters are re-queued (at most ``max_retries`` times).
    grace_period: int = Field(30, ge=2)
    #: How many times a dead worker's trial is re-queued.
    max_retries: int = Field(2, ge=0)
    #: Add a third objective: gzip-compressed ONNX size (bytes, minimized) — what unstructured and
    #: N:M zeros actually save. Default off: (accuracy, latency) only.
    size_objective: bool = False
    #: MLflow tracking URI (``file:///path/mlruns``, ``http://host:5000``): every finished trial is
    #: logged as a run (parameters, accuracy, latency, artifact paths). null = no MLflow.
    #: Needs ``pip install autoprune[mlflow]``.
    mlflow: Optional[str] = None
    #: Budget mode: one or more latency targets on the device profile, each a speed-up over the
    #: dense model (``"3x"``) or milliseconds (``2.5`` or ``"2.5ms"``). Trials are aimed at them
    #: (study/budget.py): seed trials are allocated per target, every other trial's ratios are
    #: shifted to the target it is assigned, and trials slower than the loosest target are
    #: infeasible and skip the fine-tune. All targets share one study and one front.
    target: Optional[list[Union[str, float]]] = None

    @field_validator("target", mode="before")
    @classmethod
    def _targets(cls, v: Any) -> Any:
        if v is None:
            return None
        items = v if isinstance(v, list) else [v]
        for item in items:
            parse_target(item)  # raises ValueError with the accepted forms
        return items


def parse_target(v: Union[str, float, int]) -> tuple[str, float]:
    """``"3x"`` → ("speedup", 3.0); ``2.5`` or ``"2.5ms"`` → ("ms", 2.5)."""
    text = str(v).strip().lower()
    kind, num = ("speedup", text[:-1]) if text.endswith("x") else ("ms", text[:-2] if text.endswith("ms") else text)
    try:
        value = float(num)
    except ValueError:
        value = float("nan")
    if not value > 0 or (kind == "speedup" and value <= 1):
        raise ValueError(f"target {v!r}: give a speed-up over the dense model above 1 (\"3x\") or a latency in ms (2.5 or \"2.5ms\")")
    return kind, value


class EfficiencyConfig(_Strict):
    """What makes trials cheap and predictive (see efficiency.py)."""

    #: Re-estimate BatchNorm statistics after pruning, before fine-tune/evaluation (EagleEye).
    bn_recalibration: bool = True
    #: Training batches used for BN recalibration.
    bn_batches: int = Field(8, ge=1)
    #: Prune each group alone once per run; narrow sensitive groups' ratio ranges.
    sensitivity_scan: bool = True
    #: Ratio each group is pruned by, alone, in the sensitivity scan.
    sensitivity_ratio: float = Field(0.5, gt=0, lt=1)
    #: How far the scan narrows the most sensitive group's upper ratio bound (fraction of its range).
    sensitivity_strength: float = Field(0.5, ge=0, le=1)
    #: Fine-tune a fraction of the steps first; stop trials already dominated at that fidelity.
    multi_fidelity: bool = True
    #: Share of the fine-tune steps run before the multi-fidelity stop decision.
    rung0_fraction: float = Field(0.34, gt=0, lt=1)
    #: Latency staircases (measure/staircase.py): time each group at a few kept widths on the target
    #: once per run and device; with the search space's ``round_to: auto`` kept widths snap to the
    #: lower edge of each latency step (most channels for the time). Off by default: it costs an
    #: export and a timing per width (seconds for the demo, minutes for a ResNet).
    staircases: bool = False
    #: Export candidates by writing their weights and widths into the dense model's translated ONNX graph (measure/onnx_slice.py).
    onnx_slicing: bool = True
    #: Widths probed per group (the full width included), and how much faster (a fraction of the
    #: next wider allowed width's latency) a narrower width must be to count as a new step.
    staircase_widths: int = Field(8, ge=2, le=32)
    #: A narrower width must be this much faster (fraction) to count as a new step of the staircase.
    staircase_tolerance: float = Field(0.03, ge=0, lt=1)
    #: Longer fine-tune for the Pareto models at the end (0 = off); report short vs final accuracy.
    final_finetune_steps: int = Field(0, ge=0)


#: ``train.device`` values: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``.
TRAIN_DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]+)?)$"


class TrainConfig(_Strict):
    """Where and how the *training side* runs: pre-training, fine-tunes, BN recalibration, the
    sensitivity scan and accuracy evaluation. Latency is never measured here: the device
    profile's backend times a CPU fp32 copy exported to ONNX, whatever trains the model.

    Not part of the study's resume check: workers of one study may train on different machines
    (a GPU box and a CPU box), and a run resumed on another machine keeps its finished trials."""

    #: auto = the first CUDA device when torch sees one, else the CPU; ``cuda`` without a CUDA
    #: device is an error, never a silent CPU run.
    device: str = Field("auto", pattern=TRAIN_DEVICE_PATTERN)
    #: torch.autocast precision of training and evaluation (weights stay fp32): bf16 (CUDA and
    #: CPU) or fp16 (CUDA only, with a GradScaler).
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    #: Train in channels_last memory format (faster convolutions on tensor-core GPUs).
    channels_last: bool = False
    #: torch.compile the model inside each training loop (pays a compile per trial; worth it only
    #: for long fine-tunes; needs a C++ compiler on CPU).
    compile: bool = False
    #: CPU intra-op threads while training/evaluating (restored afterwards). null = this
    #: process's cores (``--workers N`` gives each worker its share of them).
    threads: Optional[int] = Field(None, ge=1)
    #: DataLoader options for every loader of the run (``train.data.DataBundle.loader_kwargs``).
    num_workers: int = Field(0, ge=0)
    #: null = pin host memory when training on CUDA (faster, asynchronous copies).
    pin_memory: Optional[bool] = None
    #: Keep DataLoader worker processes alive between epochs.
    persistent_workers: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if self.precision == "fp16" and self.device == "cpu":
            raise ValueError("train.precision: fp16 needs a CUDA device (train.device: cuda or auto on a GPU machine); "
                             "on CPU use bf16 or fp32")
        return self


#: Wall-time pretrain budget when ``pretrain_steps: null`` is given without ``pretrain_seconds``.
DEFAULT_PRETRAIN_SECONDS = 10.0


class RunConfig(_Strict):
    """One search: what to prune, on what data, for which device, and how hard to look."""

    #: demo | a torchvision name | ``package.module:function`` | a checkpoint file (``.pt``);
    #: ``object:...`` for an nn.Module given to the Python API.
    model: str = "demo"
    #: Classes of the model's output (null = the data's).
    num_classes: Optional[int] = None
    #: digits | digits-cluttered | fashion-mnist[:DIR] | cifar10:DIR | cifar100:DIR | an ImageFolder
    #: directory | ``package.module:function``.
    data: str = "digits"
    #: Input height and width the images are resized to (null = the data's default: digits 16,
    #: ImageFolder 224).
    image_size: Optional[int] = None
    #: Share of the training data held out to score trials (when the data has no held-out split).
    val_fraction: float = Field(0.25, gt=0, lt=1)
    #: Seed of the train/validation split (and of generated data such as digits-cluttered). Kept
    #: apart from ``search.seed`` so that repeating a search with another sampler seed scores
    #: its trials on the same held-out images the dense model was never trained on.
    data_seed: int = 0
    #: Augmentation of the training split only (held-out and test splits are never augmented):
    #: ``default`` (the data's own: none for digits and factories, pad-crop for Fashion-MNIST,
    #: pad-crop + flip for CIFAR, RandomResizedCrop + flip for ImageFolders), ``none``, or a list
    #: of torchvision.transforms.v2 classes with their arguments (``- RandomCrop: {size: 32}``).
    augment: Union[Literal["default", "none"], list[Union[str, dict[str, Optional[dict[str, Any]]]]]] = "default"
    #: Score trials on this many held-out images (a fixed subset chosen by ``data_seed``: the same
    #: images for every trial and worker); the final stage scores the whole split. null = all.
    val_samples: Optional[int] = Field(None, ge=1)
    #: Models without trained weights (demo, torchvision names) are trained first, for ONE of:
    #: exactly ``pretrain_steps`` steps (reproducible however busy the machine is; ~10-15 s for the
    #: demo on 2 cores), or ``pretrain_seconds`` of wall time (then ``pretrain_steps`` is null).
    #: Giving ``pretrain_seconds`` alone switches to the wall-time budget; giving both with a
    #: non-null ``pretrain_steps`` is refused, because one of them would be silently ignored.
    #: ``pretrain_steps: null`` alone trains for DEFAULT_PRETRAIN_SECONDS. Checkpoints never train.
    pretrain_steps: Optional[int] = Field(150, ge=0)
    #: Wall-time pre-training budget, instead of pretrain_steps (not reproducible on a busy machine).
    pretrain_seconds: Optional[float] = Field(None, ge=0)
    #: What the model is for: its loss, distillation and metric (``autoprune.train.task``): a
    #: registered name (classification, segmentation) or ``package.module:object``.
    task: str = "classification"
    #: How to find the main output when the model returns a namedtuple, dict or tuple:
    #: ``package.module:function``; null = ``autoprune.outputs.main_output`` (logits, out, first item).
    output: Optional[str] = None
    #: Search space: a YAML path or a name in ./search_spaces/ or the shipped ones.
    search_space: str = "default"
    #: Device profile latency is measured on: a YAML path or a name in ./device_profiles/ or the shipped
    #: ones.
    device_profile: str = "onnxruntime-cpu"
    #: Run folder: the study, the dense model, trial files and the front; the same folder again resumes.
    out: str = "runs/digits-demo"
    #: ONNX exporter: dynamo (torch.onnx.export(dynamo=True)) or torchscript (faster, older).
    exporter: Literal["dynamo", "torchscript"] = "dynamo"
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    search: SearchSettings = Field(default_factory=SearchSettings)
    efficiency: EfficiencyConfig = Field(default_factory=EfficiencyConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    #: Load full-model pickles (``--model x.pt`` saved with ``torch.save(model)``, model files of
    #: an older autoprune): unpickling runs whatever code a file names, so only for files you
    #: trust. Weights-only files never need it. Left out of every dump of the config (study,
    #: metadata, resume hash): trust is given by whoever runs the command, never by a run folder.
    trust_pickle: bool = Field(False, exclude=True)

    @field_validator("augment", mode="before")
    @classmethod
    def _augment_form(cls, v: Any) -> Any:
        """One readable message instead of pydantic's per-branch ones (class names are checked
        against torchvision when the data loads: train/data.py augment_steps)."""
        if v in ("default", "none") or (isinstance(v, list) and all(isinstance(i, str) or (isinstance(i, dict) and len(i) == 1)
                                                                    for i in v)):
            return v
        raise ValueError(f"expected 'default', 'none' or a list of torchvision.transforms.v2 classes, each '- Name: {{args}}' "
                         f"(e.g. '- RandomHorizontalFlip: {{}}'), got {v!r}")

    @model_validator(mode="before")
    @classmethod
    def _one_pretrain_budget(cls, data: Any) -> Any:
        """Exactly one pretrain budget is in force, so neither key can be silently ignored (the
        dump of a valid config has the unused one null and validates again unchanged)."""
        if not isinstance(data, dict):
            return data
        seconds = data.get("pretrain_seconds")
        if seconds is not None:
            if "pretrain_steps" not in data:
                return {**data, "pretrain_steps": None}
            if data["pretrain_steps"] is not None:
                raise ValueError(
                    f"pretrain_steps ({data['pretrain_steps']}) and pretrain_seconds ({seconds}) are both set, but the dense "
                    "model trains for one budget only: remove one of them (pretrain_seconds needs pretrain_steps: null)"
                )
        elif "pretrain_steps" in data and data["pretrain_steps"] is None:
            return {**data, "pretrain_seconds": DEFAULT_PRETRAIN_SECONDS}
        return data


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
            # A check across keys (no location) names its keys in the message itself.
            lines.append(f"key '{_fmt_loc(loc)}': {msg}" if loc else msg.removeprefix("Value error, "))
        # One line: the CLI prints it after "error: " and users grep and paste it.
        raise ConfigError(f"{source}: invalid {model_cls.__name__}: " + "; ".join(lines)) from None


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
    candidates = [Path.cwd() / folder / f"{ref}.yaml", shipped_dir(folder) / f"{ref}.yaml"]
    for c in candidates:
        if c.is_file():
            return c
    shipped = sorted(q.stem for q in shipped_dir(folder).glob("*.yaml"))
    raise ConfigError(
        f"{ref!r} is neither a YAML file nor a name in ./{folder}/ (shipped: {', '.join(shipped)})"
    )


def load_search_space(ref: str) -> SearchSpace:
    path = resolve_named(ref, "search_spaces")
    return validate(SearchSpace, load_yaml(path), str(path))


def load_device_profile(ref: str) -> DeviceProfile:
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
