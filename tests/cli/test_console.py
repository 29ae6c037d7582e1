"""What a user sees on the console: full numbers in result tables, progress while `pick`
works, autoprune's own lines only (library chatter goes to the run's log file)."""

from __future__ import annotations

import io
import json
import re
import shutil

import pytest
from rich.console import Console

from autoprune.cli import main, print_rows as _print_rows
from conftest import ROOT

DENSE = {"metric_name": "accuracy", "accuracy": 0.91234, "latency": {"median_ms": 1.234, "p90_ms": 1.5}, "flops": 123456789,
         "params": 1527936, "onnx_bytes": 6123456}
ROWS = [{"trial": 12, "accuracy": 0.9, "latency_ms": 0.5, "latency_p90_ms": 0.6, "speedup": 2.46, "flops": 5e7, "params": 1234567,
         "onnx_bytes": 4e6}]
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _table(width: int, terminal: bool) -> str:
    buf = io.StringIO()
    _print_rows(Console(file=buf, width=width, force_terminal=terminal), ROWS, DENSE, "Pareto front (1 models) on x")
    return ANSI.sub("", buf.getvalue())


@pytest.mark.parametrize("width", [40, 60, 80])
def test_narrow_non_terminal_output_is_plain_and_keeps_every_number(width):
    text = _table(width, terminal=False)
    assert "┃" not in text and "│" not in text and "…" not in text  # plain layout, nothing cut
    for n in ("1,527,936", "1,234,567", "123.46", "5980", "0.500", "2.46x"):
        assert n in text
    assert re.search(r"^\s+12\s+0\.9000\s+0\.500\s+0\.600\s+2\.46x\s+50\.00\s+1,234,567\s+3906$", text, re.M), text


@pytest.mark.parametrize("width", [40, 60, 80, 120])
def test_narrow_terminal_drops_columns_rather_than_cutting_numbers(width):
    text = _table(width, terminal=True)
    assert "…" not in text
    assert "1,527,936" in text and "1,234,567" in text and "2.46x" in text
    if "┃" in text:  # a table: it fits, nothing cropped at the edge
        assert max(len(line) for line in text.splitlines()) <= width
    else:  # too narrow for any table: the plain layout, whose lines the terminal wraps whole
        assert width < 60
    if width < 80:
        assert "not shown" in text or "┃" not in text


def test_pick_prints_full_params_when_piped_and_shows_progress(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run.out, run)
    assert main(["pick", str(run)]) == 0
    captured = capsys.readouterr()
    out, err = captured.out, " ".join(captured.err.split())
    # progress while the bundle is written (it was silent for up to a minute), in order
    stages = ["picked trial", "copying its ONNX", "exporting torch.export", "checking every format", "writing the model card",
              "bundle written in"]
    at = [err.find(s) for s in stages]
    assert -1 not in at and at == sorted(at), err
    dense = json.loads((run / "pareto.json").read_text())["dense"]
    meta = json.loads((run / "picked" / "metadata.json").read_text())
    assert f"{dense['params']:,}" in out and "…" not in out
    assert re.search(rf"^\s*{meta['trial']}\s+\d\.\d{{4}}\s", out, re.M), out


# --------------------------------------------------------------------------- library chatter
def test_library_chatter_goes_to_the_run_log_not_the_console(tmp_path, capfd):
    """Exporter warnings (a logger with no handler: Python's last resort prints it), Python
    warnings and MLflow's own stderr handler all land in the log file while the block runs;
    the program's logging is as before afterwards."""
    import logging
    import warnings

    from autoprune.runlog import library_log

    log = tmp_path / "run" / "autoprune.log"
    mlflow_like = logging.getLogger("mlflow.store.db.utils")
    own = logging.StreamHandler()  # what MLflow installs on its loggers at import
    logging.getLogger("mlflow").addHandler(own)
    root_handlers = list(logging.getLogger().handlers)
    try:
        with library_log(log):
            for _ in range(3):
                logging.getLogger("onnxscript.optimizer._constant_folding").warning(
                    "Skipping constant folding for op Split with multiple outputs.")
            logging.getLogger("mlflow").setLevel(logging.INFO)
            mlflow_like.info("Creating initial MLflow database tables...")
            with warnings.catch_warnings():
                warnings.simplefilter("always")  # past pytest's own filters
                warnings.warn("`torch.jit.script` is deprecated", FutureWarning)
        err = capfd.readouterr().err
        assert "Skipping constant folding" not in err and "MLflow database" not in err and "deprecated" not in err, err
        text = log.read_text()
        assert text.count("Skipping constant folding for op Split") == 3
        assert "mlflow.store.db.utils: Creating initial MLflow database tables" in text and "FutureWarning" in text
        assert logging.getLogger().handlers == root_handlers and logging.getLogger("mlflow").handlers == [own]
    finally:
        logging.getLogger("mlflow").removeHandler(own)
        logging.getLogger("mlflow").setLevel(logging.NOTSET)


def test_mlflow_tracking_lines_go_to_the_run_log(tmp_path, capfd):
    """The real MLflow client (it configures its loggers when imported, inside the search)."""
    pytest.importorskip("mlflow")
    from autoprune.runfolder import RunFolder
    from autoprune.runlog import library_log
    from autoprune.study.tracking import MlflowLogger

    run = RunFolder(tmp_path / "run")
    with library_log(run.log):
        MlflowLogger(f"sqlite:///{tmp_path / 'mlflow.db'}", "autoprune/test", run, ("accuracy", "latency_ms"))
    err = capfd.readouterr().err
    assert "INFO mlflow" not in err and "Creating initial MLflow database tables" not in err, err
    assert "Creating initial MLflow database tables" in run.log.read_text()


WORKER_EXIT = """
import multiprocessing as mp
import tqdm
from autoprune.study.pool import WorkerSlot, _worker_main

def target(conn):
    tqdm.tqdm(total=1, disable=False).close()  # tqdm's multiprocessing lock, as torch.onnx's export makes it
    _worker_main({"no": "config"}, False, WorkerSlot(0), conn, 30)  # fails at once: exit code 1

if __name__ == "__main__":
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=target, args=(send,))
    p.start()
    send.close()
    p.join()
    print("exit", p.exitcode, "reported", "ValidationError" in recv.recv())
"""


def test_a_worker_process_leaks_no_semaphore(tmp_path):
    """``--workers N`` ended with "resource_tracker: There appear to be N leaked semaphore
    objects": workers left with os._exit, skipping the finalizers that remove them."""
    import os
    import subprocess
    import sys

    script = tmp_path / "worker_exit.py"
    script.write_text(WORKER_EXIT)
    repo = str(ROOT)
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert "exit 1 reported True" in p.stdout, p.stdout + p.stderr[-2000:]
    assert "leaked semaphore" not in p.stderr, p.stderr[-2000:]


def test_a_finished_run_folder_has_no_lock_files_and_no_waiting_trials(tiny_run):
    """Nothing hidden is left behind (#27): lock files are removed by their holders (but the
    study's slot lock), and no queued seed waits in the finished study."""
    import optuna

    out = tiny_run.out
    # study.db.<hash>.lock stays by design (README, "The run folder"): workers hold it for life
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*.lock"))
    assert len(left) == 1 and left[0].startswith("study.db.") and left[0].endswith(".lock"), left
    study = optuna.load_study(study_name="autoprune", storage=f"sqlite:///{out / 'study.db'}")
    assert not study.get_trials(states=(optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING))
