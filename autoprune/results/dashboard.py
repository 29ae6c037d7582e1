"""Live view of a run's study in optuna-dashboard (history, Pareto front, parameter importance).

It binds to loopback by default: the dashboard can edit study notes and has no authentication,
so exposing it on a network interface must be an explicit choice (``--host 0.0.0.0``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from autoprune.errors import ConfigError
from autoprune.runfolder import RunFolder

OBJECTIVE_NAMES = ["accuracy", "latency_ms"]


def _storage_for(run_dir: str | Path, storage: Optional[str] = None) -> str:
    """The study's storage URL: ``storage`` if given, else the run folder's ``study.db``."""
    if storage:
        return storage
    db = RunFolder(Path(run_dir)).study_db
    if not db.is_file():
        raise ConfigError(f"{run_dir}: no study.db; start a search with 'autoprune search --out {run_dir}', "
                          "or pass --storage with the URL a shared search uses")
    return f"sqlite:///{db.resolve()}"


def _name_objectives(url: str) -> None:
    """Label the two objectives so the dashboard's plots say 'accuracy'/'latency_ms', not 'Objective 0/1'."""
    import optuna

    for s in optuna.get_all_study_summaries(url):
        study = optuna.load_study(study_name=s.study_name, storage=url)
        if len(study.directions) == 2 and not study.metric_names:
            study.set_metric_names(OBJECTIVE_NAMES)


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8080, storage: Optional[str] = None) -> None:
    """Start optuna-dashboard on the run's study and block until interrupted."""
    try:
        from optuna_dashboard import run_server
    except ImportError as exc:
        raise ConfigError(f"optuna-dashboard is not installed ({exc}); pip install optuna-dashboard") from None
    url = _storage_for(run_dir, storage)
    _name_objectives(url)
    run_server(url, host=host, port=port)
