"""Optional MLflow logging of every finished trial (``search.mlflow: <tracking URI>``).

One MLflow run per finished trial, in the experiment ``autoprune/<study name>``: the trial's
parameters (per-group ratios, methods), its metrics (accuracy, latency, params, FLOPs, sizes,
seconds per phase), and tags with its state, worker and the paths of its files (``model.pt``,
``model.onnx``) in the run folder; the files themselves stay there (nothing is uploaded, so a
remote tracking server is not filled with a copy of every trial).

Plain ``mlflow.tracking.MlflowClient`` rather than optuna-integration's ``MLflowCallback``:
that one needs a second package and logs only values and parameters, not the trial's user
attributes (latency statistics, sizes, file paths) nor its failures.

mlflow is an optional dependency (``pip install autoprune[mlflow]``, mlflow-skinny). A trial
whose logging fails (server down) is not failed for it: the study is the record, MLflow a view.
A tracking server that cannot be reached when the search starts is said once and then left
alone: MLflow's client retries every request for minutes, so the search would otherwise stall
at each trial. The same after the first trial whose logging fails; that trial's MLflow run is
deleted where the server still answers, so no run is left logged half-way.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import socket
import time
import urllib.parse
from typing import Any, Optional

import optuna

from autoprune.errors import ConfigError
from autoprune.runfolder import RunFolder
from autoprune.runlog import capture_library_loggers

log = logging.getLogger("autoprune")

#: Numeric trial attributes logged as MLflow metrics (besides the objectives).
METRIC_ATTRS = ("params", "flops", "onnx_bytes", "onnx_gzip_bytes", "weight_sparsity", "finetune_steps", "accuracy_rung0",
                "accuracy_fp32", "prune_s", "finetune_s", "trial_s")
INSTALL_HINT = "pip install 'autoprune[mlflow]' (mlflow-skinny)"


def check_available(uri: Optional[str]) -> None:
    """Refuse ``search.mlflow`` without the mlflow package, before anything trains."""
    if uri and importlib.util.find_spec("mlflow") is None:
        raise ConfigError(f"search.mlflow: {uri} is set but the mlflow package is not installed; {INSTALL_HINT}, "
                          "or set search.mlflow: null")


#: Seconds to wait for a TCP connection to an http(s) tracking server before calling it unreachable.
CONNECT_TIMEOUT_S = 5.0


def unreachable(uri: str, timeout: float = CONNECT_TIMEOUT_S) -> Optional[str]:
    """Why an ``http(s)://`` tracking server cannot be reached (one TCP connection, no retries),
    or None: reachable, or not a network URI (``sqlite:``, ``file:``, ``databricks``)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return None
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        with socket.create_connection((parts.hostname or "", port), timeout=timeout):
            return None
    except (OSError, ValueError) as exc:
        return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


class MlflowLogger:
    """An Optuna callback ``(study, frozen_trial)`` that logs each finished trial as an MLflow run."""

    def __init__(self, uri: str, experiment: str, run: RunFolder, objectives: tuple[str, ...]) -> None:
        check_available(uri)
        # Imported here, not at the top: mlflow is optional, and importing it costs every search
        # a second or two even when search.mlflow is off.
        tracking = importlib.import_module("mlflow.tracking")
        capture_library_loggers()  # MLflow set up its stderr logging on import: into the run log
        self.entities = importlib.import_module("mlflow.entities")
        self.run = run
        self.objectives = objectives
        self.uri = uri
        self.client: Any = None
        why = unreachable(uri)
        if why is not None:
            log.warning(f"search.mlflow: {uri} cannot be reached ({why}); the search goes on without MLflow logging "
                        "(the study holds every trial)")
            return
        try:
            self.client = tracking.MlflowClient(tracking_uri=uri)
            self.experiment_id = self._experiment(experiment)
        except Exception as exc:  # noqa: BLE001 - MlflowException, connection errors, ...
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"search.mlflow: {uri}: MLflow cannot use this tracking URI ({first[:300]}); "
                              "use e.g. sqlite:///path/mlflow.db or http://host:5000") from None

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return str(found.experiment_id)
        try:
            return str(self.client.create_experiment(name))
        except Exception:  # noqa: BLE001 - another worker created it meanwhile
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return str(found.experiment_id)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if self.client is None:
            return
        try:
            self.log_trial(trial)
        except Exception as exc:  # noqa: BLE001 - logging must never fail a search
            self.client = None
            log.warning(f"search.mlflow: trial {trial.number} was not logged to {self.uri} ({type(exc).__name__}: "
                        f"{str(exc).strip()[:200]}); the search goes on without MLflow logging (the study holds every trial)")

    def log_trial(self, trial: optuna.trial.FrozenTrial) -> str:
        """Log one finished trial; returns the MLflow run id. A failure after its run was created
        deletes that run where the server still answers: a trial is logged whole or not at all."""
        ua = trial.user_attrs
        files = self.run.trial(trial.number)
        tags = {"autoprune.trial": str(trial.number), "autoprune.state": trial.state.name,
                "autoprune.run_dir": str(self.run.root)}
        for key in ("worker", "fail_reason", "skipped_finetune", "duplicate_of", "quantized_model"):
            if key in ua:
                tags[f"autoprune.{key}"] = str(ua[key])[:5000]
        paths = {"model_pt": files.model, "model_onnx": files.onnx, "model_final_pt": files.final_model}
        tags.update({f"autoprune.{k}": str(p.resolve()) for k, p in paths.items() if p.is_file()})
        run = self.client.create_run(self.experiment_id, run_name=f"trial-{trial.number}", tags=tags)
        rid = run.info.run_id
        try:
            self._fill(rid, trial)
        except Exception:
            if unreachable(self.uri) is None:
                try:
                    self.client.delete_run(rid)
                except Exception:  # noqa: BLE001 - best effort; the original error is what matters
                    pass
            raise
        return rid

    def _fill(self, rid: str, trial: optuna.trial.FrozenTrial) -> None:
        ua = trial.user_attrs
        params = {k: str(v)[:6000] for k, v in trial.params.items()}
        if params:
            self.client.log_batch(rid, params=[self.entities.Param(k, v) for k, v in params.items()])
        metrics: dict[str, float] = {}
        if trial.values:
            metrics.update({name: float(v) for name, v in zip(self.objectives, trial.values)})
        lat = ua.get("latency") or {}
        for k in ("median_ms", "p90_ms", "mean_ms"):
            if isinstance(lat.get(k), (int, float)):
                metrics[f"latency_{k}"] = float(lat[k])
        metrics.update({k: float(ua[k]) for k in METRIC_ATTRS if isinstance(ua.get(k), (int, float))})
        if metrics:
            now = int(time.time() * 1000)
            self.client.log_batch(rid, metrics=[self.entities.Metric(k, v, now, 0) for k, v in metrics.items()])
        self.client.set_terminated(rid, status="FINISHED" if trial.state == optuna.trial.TrialState.COMPLETE else "FAILED")

