"""Device profiles: the target backend, how latency is measured on it, and the budgets.

``backend`` names a registered latency backend. It is checked against the backend registry's
names (:meth:`autoprune.registry.Registry.names`), not a fixed list, so a backend added with
``autoprune.measure.backends.register()`` can be named in a YAML file; the registry answers
without importing the runtimes, so a profile validates without torch.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from autoprune.config.base import StrictModel, added, resume
from autoprune.registry import BACKENDS




class Budget(StrictModel):
    """Hard limits; a trial over any of them is infeasible (an Optuna constraint > 0)."""

    #: Median latency on this profile, in milliseconds.
    max_latency_ms: Optional[float] = Field(None, gt=0)
    #: Parameters of the pruned model.
    max_params: Optional[int] = Field(None, gt=0)
    #: FLOPs of one inference (fvcore count).
    max_flops: Optional[float] = Field(None, gt=0)
    #: Size of the exported ONNX file in MB (10^6 bytes).
    max_size_mb: Optional[float] = Field(None, gt=0)


class DeviceProfile(StrictModel):
    """Where and how latency is measured. Numbers agree with ``benchmark_app -hint none
    -nstreams 1 -nthreads N -nireq 1 -api sync -infer_precision f32`` when backend is openvino."""

    #: Profile name: recorded with every measurement; ``pick --profile`` and ``remeasure`` use it.
    name: str
    #: Runtime that times the model: onnxruntime, openvino, torch, remote (a ``serve-latency``
    #: server), or a backend registered with ``autoprune.measure.backends.register``.
    backend: str
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
    cpu_pinning: bool = Field(True, json_schema_extra=added(True))
    #: Time the dense model in the same session, interleaved with the candidate in rounds, and
    #: report the ratio to dense with its 95% interval plus ms corrected by the dense model's quiet
    #: estimate: load on a busy machine cancels in the ratio (false: absolute times only).
    measure_reference: bool = True
    #: wall: each inference's wall-clock time (or the runtime's own timer). cpu: the process's CPU
    #: time (CPU devices, threads: 1): time slices other jobs take are not counted, so it holds on
    #: an oversubscribed machine where wall time measures the scheduler.
    clock: Literal["wall", "cpu"] = Field("wall", json_schema_extra=added("wall"))
    #: Reuse the latency of an identical architecture (same exported graph shapes) in a run folder.
    cache: bool = True
    #: int8: number of single-input calibration samples fed to post-training quantization.
    calib_samples: int = Field(64, ge=1)
    #: Latency predictor (measure/predictor.py, calibrated on the run's measured models): once its
    #: held-out error is known, skip candidates predicted over budget.max_latency_ms × (1 + margin)
    #: without exporting or measuring them; margin = 1.5 × its worst held-out over-prediction, at
    #: least lut_margin.
    lut: bool = False
    #: Smallest safety margin of the latency predictor's rejections (fraction of max_latency_ms).
    lut_margin: float = Field(0.25, ge=0)
    #: Export parity (measure/parity.py): each exported candidate and the dense model run on this many
    #: calibration samples must match PyTorch within parity_atol + parity_rtol x max |logit| (and agree
    #: on top-1), else the trial fails with the difference; 0 samples turns the check off.
    parity_samples: int = Field(8, ge=0, json_schema_extra=added(8))
    #: Absolute tolerance of the export parity check.
    parity_atol: float = Field(1e-4, ge=0, json_schema_extra=added(1e-4))
    #: Relative tolerance of the export parity check (times the largest |logit|).
    parity_rtol: float = Field(1e-3, ge=0, json_schema_extra=added(1e-3))
    #: backend: remote — URL of `autoprune serve-latency` on the target, the environment variable
    #: holding its token, the runtime the server should use, and the HTTP timeout.
    url: Optional[str] = None
    #: Latency staircases of this device measured elsewhere (a ``staircases/<fingerprint>.json`` of
    #: another run folder, e.g. one measured on the remote target): used instead of measuring when
    #: its fingerprint matches this run's model and settings (measure/staircase.py).
    staircases: Optional[str] = Field(None, json_schema_extra=added(None))
    #: backend: remote: environment variable holding the server's token.
    token_env: str = Field("AUTOPRUNE_LATENCY_TOKEN", json_schema_extra=resume("free"))
    #: backend: remote: the runtime the server times with (onnxruntime or openvino).
    remote_backend: Literal["onnxruntime", "openvino"] = "onnxruntime"
    #: backend: remote: HTTP timeout of one measurement request in seconds.
    request_timeout_s: float = Field(300.0, gt=0, json_schema_extra=resume("free"))

    @field_validator("backend")
    @classmethod
    def _registered_backend(cls, v: str) -> str:
        """Any registered backend, shipped or added with ``autoprune.measure.backends.register()``."""
        if v not in BACKENDS:
            raise ValueError(f"unknown backend {v!r}; known backends: {', '.join(BACKENDS.names())} "
                             "(add one with autoprune.measure.backends.register)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "DeviceProfile":
        if self.backend == "remote" and not self.url:
            raise ValueError("backend: remote needs url: http://<target>:<port> (where `autoprune serve-latency` runs)")
        if self.backend == "torch" and self.precision == "int8":
            raise ValueError("precision: int8 is supported on backends onnxruntime, openvino and remote, not torch")
        if self.backend == "torch" and self.precision == "fp16" and not self.device.lower().startswith("cuda"):
            raise ValueError("precision: fp16 with backend torch needs device: cuda (CPU fp16 kernels are slow/partial)")
        if self.clock == "cpu" and not self.device.lower().startswith("cpu"):
            raise ValueError("clock: cpu times CPU work; use clock: wall with a GPU or NPU device")
        if self.compile and self.backend != "torch":
            raise ValueError("compile: true applies to backend torch only")
        return self


__all__ = ["Budget", "DeviceProfile"]
