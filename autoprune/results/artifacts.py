"""Deployable files of the front: ONNX, OpenVINO IR, PyTorch state and metadata per model.

Every Pareto model is written with a metadata JSON that records the device profile and the
exact config that produced it, so a model can be traced back to (and rebuilt from) its search.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any, Optional

import numpy as np
import optuna
import torch

from autoprune import __version__
from autoprune.measure.onnx import cpu_fp32, export_onnx, export_openvino, file_size, gzip_size
from autoprune.outputs import main_output
from autoprune.results.front import front, front_json, write_tables
from autoprune.results.report import write_plots
from autoprune.files import atomic_dir, atomic_write_text
from autoprune.runfolder import WRITTEN_KEY, RunFolder, folder_entries
from autoprune.train.checkpoint import load_checkpoint, pruned_recipe, save_model
from autoprune.trust import CodePolicy


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import openvino
    import torch_pruning


    return {
        "autoprune": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_pruning": torch_pruning.__version__,
        "optuna": optuna.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "openvino": openvino.__version__,
    }


def export_trial_artifacts(
    model: torch.nn.Module,
    example: torch.Tensor,
    dest: Path,
    row: dict[str, Any],
    meta_extra: dict[str, Any],
    exporter: str = "dynamo",
    recipe: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Write ONNX, OpenVINO IR, PyTorch state and metadata.json for one model into ``dest``.

    ``model.pt`` is weights-only: the state dict plus ``recipe``, what rebuilds the module
    (``train/checkpoint.py``; ``load_model`` reads it)."""
    if recipe is None:
        raise ValueError("export_trial_artifacts needs the model's recipe to write a weights-only model.pt")
    import onnxruntime as ort

    dest.mkdir(parents=True, exist_ok=True)
    model = cpu_fp32(model).eval()  # deployed files hold CPU fp32 weights, whatever trained the model
    example = example.cpu()
    onnx_path = export_onnx(model, example, dest / "model.onnx", exporter)
    export_openvino(onnx_path, dest / "model.xml")
    save_model(model, dest / "model.pt", recipe)
    torch.save(model.state_dict(), dest / "state_dict.pt")
    # Check that the deployable file computes what the PyTorch model computes.
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = main_output(model(example)).numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: example.numpy()})[0]
    meta = {
        **row,
        **meta_extra,
        "input_shape": list(example.shape),
        "files": {
            "onnx": "model.onnx",
            "openvino_xml": "model.xml",
            "openvino_bin": "model.bin",
            "torch_module": "model.pt",
            "torch_state_dict": "state_dict.pt",
        },
        "sizes": {
            "onnx_bytes": file_size(onnx_path),
            "onnx_gzip_bytes": gzip_size(onnx_path),
            "openvino_bin_bytes": file_size(dest / "model.bin"),
        },
        "onnx_max_abs_diff": float(np.abs(got - ref).max()),
        "versions": versions(),
        # Every file written here: an export is replaced later only if it holds nothing else.
        WRITTEN_KEY: sorted(set(folder_entries(dest)) | {"metadata.json"}),
    }
    (dest / "metadata.json").write_text(json.dumps(meta, indent=2, default=str))
    return meta


def export_front(
    study: optuna.Study,
    run: RunFolder,
    example: torch.Tensor,
    meta_extra: dict[str, Any],
    exporter: str = "dynamo",
    dense: Optional[dict[str, Any]] = None,
    recipe: Optional[dict[str, Any]] = None,
    trust_pickle: bool = False,
    code: CodePolicy = CodePolicy(),
) -> list[dict[str, Any]]:
    """(Re)write the run's ``pareto/``: one folder per Pareto trial, plus tables and plots.

    Trial models load weights-only; a full pickle only with ``trust_pickle``, and is then written with the run's dense ``recipe`` and the trial's widths."""

    dense = dense if dense is not None else study.user_attrs.get("dense", {})
    rows = front(study, dense)
    pdir = run.pareto_dir
    final_path = run.final_json
    finals = json.loads(final_path.read_text()) if final_path.is_file() else {}
    # The new front is written into a hidden sibling and swapped in whole (files.atomic_dir),
    # with its rows inside it (run.front_journal), before pareto.json is rewritten: a search killed
    # at any point leaves pareto/ and the rows readers get (results.front.load_front) in step.
    with atomic_dir(pdir) as tmp:
        for r in rows:
            files = run.trial(r["trial"])
            src = files.model
            f = finals.get(str(r["trial"]))
            tuned = bool(f and f.get("steps")) and files.final_model.is_file()
            if f and (tuned or not f.get("steps")):
                # The final stage (a longer fine-tune, or with 0 steps only a score on the whole
                # held-out and test splits): its numbers become the row's accuracy/latency (what a user
                # picks and deploys); the search-time ones stay as search_*. Deploy its model if tuned.
                r.update(final=f, search_accuracy=r["accuracy"], search_latency_ms=r["latency_ms"],
                         accuracy=f["final_accuracy"], latency_ms=f["final_latency_ms"])
                if "test_accuracy" in f:
                    r["test_accuracy"] = f["test_accuracy"]
                if tuned:
                    src = files.final_model
            if not src.is_file():
                r["artifacts"] = None  # trial ran on another worker without a shared run folder
                continue
            model, model_recipe = load_checkpoint(src, trust_pickle=trust_pickle, code=code)
            if model_recipe is None and recipe is not None:
                model_recipe = pruned_recipe(recipe, r.get("widths") or {})
            name = f"trial_{r['trial']:05d}"
            export_trial_artifacts(model, example, tmp / name, r, meta_extra, exporter, model_recipe)
            r["artifacts"] = f"{pdir.name}/{name}"
        rows.sort(key=lambda r: (r["latency_ms"], -r["accuracy"]))  # final-stage numbers may reorder
        atomic_write_text(tmp / run.front_journal.name, front_json(rows, dense))
    write_tables(rows, run, dense)
    run.front_journal.unlink(missing_ok=True)  # pareto.json holds the rows now
    write_plots(study, run, dense)
    return rows
