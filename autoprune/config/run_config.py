"""The run config: model, data, fine-tune, search and training settings of one search, pointing at
one search space and one device profile by name.

Keys that do not refuse a resume when changed carry a mark (:mod:`autoprune.config.base`):
``resume("free")``, ``resume("runtime")`` or ``added(default)``; every other key is a scoring key.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from autoprune.config.base import StrictModel, added, resume

#: What ``data:`` (and ``--data``) accepts: one text for the CLI help and the error an unknown value gets.
DATA_HELP = ("'digits', 'digits-cluttered', 'fashion-mnist', 'fashion-mnist:DIR', 'cifar10:DIR', 'cifar100:DIR', "
             "an existing ImageFolder directory, or 'module:function'")


class FinetuneConfig(StrictModel):
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


class ScreenSettings(StrictModel):
    """``search.screen``: screen many candidates cheaply, fine-tune only the best (study/screen.py)."""

    #: Candidates screened (pruned, BN re-estimated, scored on the ``val_samples`` subset, no fine-tune).
    candidates: int = Field(200, ge=1)
    #: Screened candidates fine-tuned and measured as ordinary trials: per target in budget mode,
    #: along the screened front otherwise (null = ``search.trials`` spread over the targets).
    finetune_top_k: Optional[int] = Field(None, ge=1)
    #: Training batches that re-estimate BatchNorm statistics of a screened candidate.
    bn_batches: int = Field(4, ge=1)
    #: Held-out batches a screened candidate is scored on (null = the whole ``val_samples`` subset).
    eval_batches: Optional[int] = Field(4, ge=1)


class SearchSettings(StrictModel):
    """How many trials, with which sampler and seed, in which storage; accuracy floor and budget-mode targets."""

    #: Complete trials the study ends with (over all workers); a resumed run counts finished ones.
    trials: int = Field(20, ge=1, json_schema_extra=resume("free"))
    #: The accuracy you are prepared to lose (fraction, e.g. 0.05 = 5 points below the dense
    #: model). Trials below it are infeasible (an Optuna constraint), so NSGA-II spends its
    #: population on the region you would deploy from. null = no floor.
    max_accuracy_drop: Optional[float] = Field(None, gt=0, le=1)
    #: Optuna sampler: nsga2 (multi-objective genetic), tpe, random or gp.
    sampler: Literal["nsga2", "tpe", "random", "gp"] = Field("nsga2", json_schema_extra=resume("free"))
    #: NSGA-II population size (null = Optuna's default, capped by the trial count).
    population_size: Optional[int] = Field(None, ge=2, json_schema_extra=resume("free"))
    #: Sampler and fine-tune seed; the k-th worker session seeds its sampler with seed + k.
    seed: int = 0
    #: Optuna storage URL shared by several workers (e.g. postgresql://...); null = SQLite ``study.db``
    #: in the run folder.
    storage: Optional[str] = Field(None, json_schema_extra=resume("free"))
    #: Study name in the storage (null = derived from the run folder).
    study_name: Optional[str] = Field(None, json_schema_extra=resume("free"))
    #: Stop starting new trials after this many seconds (finished trials stay).
    timeout_s: Optional[float] = Field(None, gt=0, json_schema_extra=resume("free"))
    #: Seconds between a running trial's heartbeats in the storage (Optuna RDB heartbeat).
    heartbeat_interval: int = Field(10, ge=1, json_schema_extra=resume("free"))
    #: A RUNNING trial whose heartbeat is older than this is taken as a dead worker's: it is
    #: marked FAIL and its parameters are re-queued (at most ``max_retries`` times).
    grace_period: int = Field(30, ge=2, json_schema_extra=resume("free"))
    #: How many times a dead worker's trial is re-queued.
    max_retries: int = Field(2, ge=0, json_schema_extra=resume("free"))
    #: Add a third objective: gzip-compressed ONNX size (bytes, minimized) — what unstructured and
    #: N:M zeros actually save. Default off: (accuracy, latency) only.
    size_objective: bool = False
    #: MLflow tracking URI (``file:///path/mlruns``, ``http://host:5000``): every finished trial is
    #: logged as a run (parameters, accuracy, latency, artifact paths). null = no MLflow.
    #: Needs ``pip install autoprune[mlflow]``.
    mlflow: Optional[str] = Field(None, json_schema_extra=resume("runtime"))
    #: Budget mode: one or more latency targets on the device profile, each a speed-up over the
    #: dense model (``"3x"``) or milliseconds (``2.5`` or ``"2.5ms"``). Trials are aimed at them
    #: (study/budget.py): seed trials are allocated per target, every other trial's ratios are
    #: shifted to the target it is assigned, and trials slower than the loosest target are
    #: infeasible and skip the fine-tune. All targets share one study and one front.
    target: Optional[list[Union[str, float]]] = Field(None, json_schema_extra=added(None))
    #: Screening (study/screen.py): null = off, every trial is fine-tuned. Which trials are
    #: fine-tuned does not change how one is scored, so a study resumes across it.
    screen: Optional[ScreenSettings] = Field(None, json_schema_extra=resume("runtime"))

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


class EfficiencyConfig(StrictModel):
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
    staircases: bool = Field(False, json_schema_extra=added(False))
    #: Export candidates by writing their weights and widths into the dense model's translated
    #: ONNX graph (measure/onnx_slice.py) instead of tracing each one: the same graph (checked
    #: against a fresh export first), so a study resumes across it.
    onnx_slicing: bool = Field(True, json_schema_extra=resume("runtime"))
    #: Widths probed per group (the full width included), and how much faster (a fraction of the
    #: next wider allowed width's latency) a narrower width must be to count as a new step.
    staircase_widths: int = Field(8, ge=2, le=32, json_schema_extra=added(8))
    #: A narrower width must be this much faster (fraction) to count as a new step of the staircase.
    staircase_tolerance: float = Field(0.03, ge=0, lt=1, json_schema_extra=added(0.03))
    #: Longer fine-tune for the Pareto models at the end (0 = off); report short vs final accuracy.
    final_finetune_steps: int = Field(0, ge=0, json_schema_extra=resume("free"))


#: ``train.device`` values: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``.
TRAIN_DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]+)?)$"


class TrainConfig(StrictModel):
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


class RunConfig(StrictModel):
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
    augment: Union[Literal["default", "none"], list[Union[str, dict[str, Optional[dict[str, Any]]]]]] = Field(
        "default", json_schema_extra=added("default"))
    #: Score trials on this many held-out images (a fixed subset chosen by ``data_seed``: the same
    #: images for every trial and worker); the final stage scores the whole split. null = all.
    val_samples: Optional[int] = Field(None, ge=1, json_schema_extra=added(None))
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
    task: str = Field("classification", json_schema_extra=added("classification"))
    #: How to find the main output when the model returns a namedtuple, dict or tuple:
    #: ``package.module:function``; null = ``autoprune.outputs.main_output`` (logits, out, first item).
    output: Optional[str] = Field(None, json_schema_extra=added(None))
    #: Search space: a YAML path or a name in ./search_spaces/ or the shipped ones.
    search_space: str = "default"
    #: Device profile latency is measured on: a YAML path or a name in ./device_profiles/ or the shipped
    #: ones.
    device_profile: str = "onnxruntime-cpu"
    #: Run folder: the study, the dense model, trial files and the front; the same folder again resumes.
    out: str = Field("runs/digits-demo", json_schema_extra=resume("free"))
    #: ONNX exporter: dynamo (torch.onnx.export(dynamo=True)) or torchscript (faster, older).
    exporter: Literal["dynamo", "torchscript"] = "dynamo"
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    search: SearchSettings = Field(default_factory=SearchSettings)
    efficiency: EfficiencyConfig = Field(default_factory=EfficiencyConfig)
    train: TrainConfig = Field(default_factory=TrainConfig, json_schema_extra=resume("runtime"))
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


__all__ = ["DATA_HELP", "ScreenSettings", "DEFAULT_PRETRAIN_SECONDS", "EfficiencyConfig", "FinetuneConfig", "RunConfig", "SearchSettings",
           "TRAIN_DEVICE_PATTERN", "TrainConfig", "parse_target"]
