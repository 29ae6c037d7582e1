"""A deploy bundle: everything a deployment needs without the search.

ONNX, OpenVINO IR, the PyTorch model (``model.pt``: weights-only, a state dict plus the recipe
that rebuilds the module; ``state_dict.pt``; and ``torch.export`` / TorchScript files where the
model allows), a ``model_card.json`` that records where the model came from and how it
measured, and ``infer_example.py`` that runs it with onnxruntime and with OpenVINO (no
autoprune import).
"""

from __future__ import annotations

import datetime as _dt
import importlib.resources
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

from autoprune.errors import ConfigError
from autoprune.measure.onnx import file_size
from autoprune.measure.ov_core import shared_core
from autoprune.outputs import main_output
from autoprune.prune.plan import PruningPlan, apply_plan
from autoprune.results.artifacts import versions
from autoprune.results.front import search_profile_name
from autoprune.files import atomic_dir
from autoprune.runfolder import WRITTEN_KEY, RunFolder, folder_entries, read_record
from autoprune.study.storage import open_run_study
from autoprune.train.checkpoint import load_checkpoint
from autoprune.train.models import build_model
from autoprune.trust import CodePolicy, model_code

CARD = "model_card.json"
EXAMPLE = "infer_example.py"
CARD_SCHEMA = "autoprune.model_card/"


def bundle_files(folder: Path) -> Optional[set[str]]:
    """The files autoprune wrote into the bundle ``folder`` (what its model card lists), or None
    when ``folder`` holds no model card autoprune wrote. Cards of bundles made before the list
    existed: the files they name, plus ``metadata.json`` and the card."""
    card = read_record(Path(folder), CARD, lambda c: str(c.get("schema", "")).startswith(CARD_SCHEMA)
                       and isinstance(c.get("files"), dict))
    if card is None:
        return None
    written = card.get(WRITTEN_KEY)
    if isinstance(written, list):
        return {str(w) for w in written} | {CARD}
    return {str(v) for v in card["files"].values()} | {CARD, "metadata.json"}


def _trial_latency(run_dir: Path, trial: int) -> Optional[dict[str, Any]]:
    """Full latency statistics of a trial from its study (pareto.json keeps only median/p90/CV)."""
    try:
        study = open_run_study(run_dir)
        return dict(study.trials[trial].user_attrs.get("latency") or {}) or None
    except Exception:  # noqa: BLE001 - no readable study: the card falls back to pareto.json
        return None


# --------------------------------------------------------------------------- rebuild
def rebuild_model(bundle: str | Path, model: Optional[str] = None, trust_code: bool = False) -> Any:
    """Rebuild the pruned PyTorch model from code + ``state_dict.pt`` (no pickled module needed).

    Builds the dense architecture named in the card's config, slices every group to its recorded
    kept width (which channels does not matter: the state dict overwrites every weight, zeros of
    unstructured sparsity included; only the shapes must match) and loads the fine-tuned weights.
    A model whose code is a ``module:function`` is built only when ``model`` names it or
    ``trust_code``: the card alone never chooses which code runs (:mod:`autoprune.trust`).
    """
    import torch


    bundle = Path(bundle)
    card = json.loads((bundle / CARD).read_text())
    rb = card["rebuild"]
    ref = model_code(str(rb["model"]))  # a checkpoint path: the arch it names (read weights-only)
    if ref:
        CodePolicy.of(model, trust=trust_code).check(ref, bundle / CARD, key="rebuild model")
    model = build_model(rb["model"], rb["num_classes"], rb["in_channels"])
    example = torch.zeros(1, *card["input"]["shape"][1:])
    # ratio = 1 - after/before with round_to=1 keeps exactly ``after`` channels (kept_channels).
    ratios = {g: 1.0 - v["channels_after"] / v["channels_before"] for g, v in card["layers"].items()
              if v.get("channels_before") and v.get("channels_after") and v["channels_after"] < v["channels_before"]}
    apply_plan(model, example, PruningPlan(ratios, {g: "l1" for g in ratios}, round_to=1), rb["num_classes"])
    state = torch.load(bundle / "state_dict.pt", map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(f"{bundle}: the rebuilt {rb['class']} does not match state_dict.pt ({str(exc)[:300]}); "
                          "load model.pt instead (autoprune.train.checkpoint.load_model)") from None
    return model.eval()


# --------------------------------------------------------------------------- bundle
def _export_torch_formats(model: Any, example: Any, dest: Path) -> tuple[dict[str, str], dict[str, str]]:
    """torch.export (.pt2) and TorchScript files where the model allows; errors are recorded, not
    raised, because ONNX/IR are the deploy formats and these are conveniences."""
    import torch

    files, errors = {}, {}
    try:
        ep = torch.export.export(model, (example,))
        torch.export.save(ep, str(dest / "model.pt2"))
        files["torch_export"] = "model.pt2"
    except Exception as exc:  # noqa: BLE001
        errors["torch_export"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ts = torch.jit.trace(model, example)
        torch.jit.save(ts, str(dest / "model.torchscript.pt"))
        files["torchscript"] = "model.torchscript.pt"
    except Exception as exc:  # noqa: BLE001
        errors["torchscript"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return files, errors


def precision_name(value: Any) -> str:
    """OpenVINO's precision hint as its short name (``bf16``, ``f32``): the property is an
    ``openvino.Type``, whose ``str()`` is ``<Type: 'bfloat16'>``, not something to put in a card."""
    name = getattr(value, "get_type_name", None)
    return str(name() if callable(name) else value).lower()


def _format_agreement(model: Any, example: Any, dest: Path, files: dict[str, str]) -> tuple[dict[str, float], str]:
    """Max |logit difference| of every written format against the PyTorch model on one input,
    so a user can see that each file computes the same function; and the inference precision
    OpenVINO's CPU plugin uses by default on this machine (what ``openvino_default`` ran in)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    x = example.numpy()
    with torch.no_grad():
        ref = main_output(model(example)).numpy()
    out: dict[str, float] = {}
    sess = ort.InferenceSession(str(dest / "model.onnx"), providers=["CPUExecutionProvider"])
    out["onnxruntime"] = float(np.abs(sess.run(None, {sess.get_inputs()[0].name: x})[0] - ref).max())
    core = shared_core()
    # OpenVINO's CPU plugin computes in bf16 by default where the CPU supports it; record both the
    # fp32 result (what the card's accuracy means) and the default-precision one users get.
    compiled = core.compile_model(str(dest / "model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    out["openvino_f32"] = float(np.abs(compiled(x)[compiled.output(0)] - ref).max())
    default = precision_name(core.get_property("CPU", "INFERENCE_PRECISION_HINT"))
    compiled = core.compile_model(str(dest / "model.xml"), "CPU")
    out["openvino_default"] = float(np.abs(compiled(x)[compiled.output(0)] - ref).max())
    with torch.no_grad():
        if "torch_export" in files:
            ep = torch.export.load(str(dest / files["torch_export"]))
            out["torch_export"] = float(np.abs(main_output(ep.module()(example)).numpy() - ref).max())
        if "torchscript" in files:
            ts = torch.jit.load(str(dest / files["torchscript"]))
            out["torchscript"] = float(np.abs(main_output(ts(example)).numpy() - ref).max())
    return out, default


def evaluation(cfg: dict[str, Any], metric_name: str = "accuracy") -> dict[str, Any]:
    """How the card's accuracy was measured, with what rebuilds the held-out split: the split
    follows ``data_seed``, not ``search.seed`` (rebuilding it with the sampler seed would mix
    training images into the evaluation). Studies made before ``data_seed`` existed split
    with ``search.seed``, as ``autoprune export`` assumes too."""
    data_seed = cfg.get("data_seed")
    if data_seed is None:
        data_seed = (cfg.get("search") or {}).get("seed", 0)
    return {
        "metric": ("top-1 accuracy" if metric_name == "accuracy" else f"{metric_name} (task {cfg.get('task')})")
                  + " on the held-out split, PyTorch eager, after the trial's fine-tune",
        "data": cfg.get("data"), "image_size": cfg.get("image_size"), "val_fraction": cfg.get("val_fraction"),
        "data_seed": data_seed,
        # Trials scored on this many held-out images; the card's accuracy is on all of them (the
        # final stage re-scores the front), test_accuracy on the official test split, if any.
        "val_samples": cfg.get("val_samples"),
        "test_split": "the data's official test split (Fashion-MNIST t10k, CIFAR test batch, an ImageFolder's test/); "
                      "never seen by the search",
        "how": "from autoprune.train.data import load_data; "
               "load_data(data, image_size, val_fraction, seed=data_seed).val",
    }


def _model_card(run_dir: Path, row: dict[str, Any], meta: dict[str, Any], model: Any, dest: Path,
                budget: dict[str, Any], profile: str, extra_files: dict[str, str], export_errors: dict[str, str],
                agreement: dict[str, float], openvino_default: str) -> dict[str, Any]:

    cfg = meta.get("config", {})
    searched = search_profile_name(run_dir)
    prof = meta.get("device_profile", {})
    lat_search = _trial_latency(run_dir, row["trial"]) or {
        "median_ms": row["latency_ms"], "p90_ms": row.get("latency_p90_ms"), "cv": row.get("latency_cv")}
    latency = {searched: {"backend": prof.get("backend"), "device": prof.get("device"), "threads": prof.get("threads"),
                          "source": "search", **lat_search}}
    for p in sorted(RunFolder(run_dir).remeasure_dir.glob("*.json")):
        rem = json.loads(p.read_text())
        hit = [r for r in rem["rows"] if r["trial"] == row["trial"]]
        if hit and rem["profile_name"] != searched:
            rp = rem.get("profile", {})
            latency[rem["profile_name"]] = {"backend": rp.get("backend"), "device": rp.get("device"),
                                            "threads": rp.get("threads"), "source": "remeasure",
                                            "non_dominated": hit[0].get("non_dominated"), **hit[0]["latency"]}
    dense = meta.get("dense", {})
    files = {**meta.get("files", {}), **extra_files, "model_card": CARD, "inference_example": EXAMPLE}
    sizes = {k: file_size(dest / v) for k, v in files.items() if (dest / v).is_file() and k != "model_card"}
    widths = row.get("widths", {})
    layers = {
        g: {"ratio": r, "method": row.get("methods", {}).get(g),
            "channels_before": (widths.get(g) or [None, None])[0], "channels_after": (widths.get(g) or [None, None])[1]}
        for g, r in row.get("ratios", {}).items()
    }
    shape = meta.get("input_shape") or [1]
    cls = f"{type(model).__module__}.{type(model).__qualname__}"
    return {
        "schema": "autoprune.model_card/1",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "run": str(run_dir.resolve()),
        "trial": row["trial"],
        "selection": {"budget": {k: v for k, v in budget.items() if v is not None}, "latency_profile": profile},
        "accuracy": row["accuracy"],
        "test_accuracy": row.get("test_accuracy"),
        "metric_name": row.get("metric_name", "accuracy"),
        "evaluation": evaluation(cfg, row.get("metric_name", "accuracy")),
        "dense": {"accuracy": dense.get("accuracy"), "val_accuracy": dense.get("val_accuracy"),
                  "test_accuracy": dense.get("test_accuracy"), "params": dense.get("params"), "flops": dense.get("flops"),
                  "latency_ms": (dense.get("latency") or {}).get("median_ms"), "onnx_bytes": dense.get("onnx_bytes"),
                  "profile": dense.get("profile")},
        "speedup_vs_dense": row.get("speedup"),
        "latency": latency,
        "flops": row.get("flops"),
        "params": row.get("params"),
        "sizes": {**sizes, "onnx_gzip": row.get("onnx_gzip_bytes")},
        "layers": layers,
        "input": {"name": "input", "shape": shape, "dtype": "float32",
                  "note": "the batch axis is static (the profile's batch size); pad or split batches"},
        "output": {"name": "logits", "shape": [shape[0], _num_classes(model)]},
        "files": files,
        # Every file autoprune wrote here: a later pick replaces the bundle only if it holds nothing else.
        WRITTEN_KEY: sorted(set(folder_entries(dest)) | {CARD}),
        "export_errors": export_errors,
        "max_abs_diff_vs_pytorch": agreement,
        # OpenVINO's default CPU precision here ("openvino_default" above ran in it): bf16 on CPUs
        # with bf16 units, so its logits differ from fp32 by ~1e-2; infer_example.py asks for f32.
        "openvino_default_inference_precision": openvino_default,
        "rebuild": {
            "class": cls,
            "model": cfg.get("model"),
            "num_classes": _num_classes(model),
            "in_channels": int(shape[1]) if len(shape) > 1 else None,
            "round_to": (meta.get("search_space") or {}).get("round_to", 8),
            "python": "from autoprune.deploy.bundle import rebuild_model; model = rebuild_model('<bundle folder>')",
            "steps": "autoprune.train.models.build_model(model, num_classes, in_channels) -> autoprune.prune.plan.apply_plan("
                     "slice each group in 'layers' to channels_after) -> load_state_dict(state_dict.pt)",
            "pytorch": "from autoprune.train.checkpoint import load_model; model = load_model('<bundle folder>/model.pt') "
                       "(weights-only: state dict + this recipe, no pickled code; needs autoprune)",
            "recipe": "torch.load('model.pt', weights_only=True)['recipe']",
        },
        "config": cfg,
        "search_space": meta.get("search_space"),
        "device_profile": prof,
        "versions": {"search": meta.get("versions"), "bundle": versions()},
    }


def _num_classes(model: Any) -> Optional[int]:
    import torch.nn as nn

    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return int(last[-1].out_features) if last else None


def _copy_example(dest: Path) -> None:
    src = importlib.resources.files("autoprune.deploy") / "templates" / EXAMPLE
    (dest / EXAMPLE).write_text(src.read_text())


def write_bundle(run_dir: Path, row: dict[str, Any], dest: Path, budget: Optional[dict[str, Any]] = None,
                 profile: Optional[str] = None, trust_pickle: bool = False,
                 guard: Optional[Any] = None, code: CodePolicy = CodePolicy(),
                 say: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Copy a Pareto trial's files into ``dest`` and add torch.export/TorchScript files, the
    model card and the inference example. Returns the card. ``model.pt`` loads weights-only;
    a full pickle only with ``trust_pickle``. ``guard`` checks ``dest``
    again right before the new bundle replaces it (:func:`autoprune.files.atomic_dir`). ``say`` gets a line as each
    stage starts: the exports and the format checks take from seconds to minutes, and a command
    that is silent that long looks hung."""
    import torch

    say = say or (lambda s: None)

    run_dir = Path(run_dir)
    if not row.get("artifacts"):
        raise ConfigError(f"trial {row['trial']} has no exported files in {run_dir} (run 'autoprune search' there to re-export)")
    src = run_dir / row["artifacts"]
    if not (src / "metadata.json").is_file():
        raise ConfigError(f"{src}: incomplete export (no metadata.json); run 'autoprune search --out {run_dir}' to re-export")
    # Written into a hidden sibling and swapped in whole: a failed or killed pick leaves the
    # previous bundle (or nothing) under ``dest``, and no temporary folder after the next pick.
    with atomic_dir(dest, guard) as tmp:
        say(f"trial {row['trial']}: copying its ONNX, OpenVINO IR and PyTorch files from {src}")
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        meta = json.loads((tmp / "metadata.json").read_text())
        if meta.get("trial") != row["trial"]:
            raise ConfigError(f"{src}: holds trial {meta.get('trial')}, not trial {row['trial']}; "
                              f"run 'autoprune search --out {run_dir}' to re-export")
        model = load_checkpoint(src / "model.pt", trust_pickle=trust_pickle, code=code)[0]  # src: an error names the run folder's file
        shape = meta.get("input_shape") or [1]
        example = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        say("exporting torch.export (model.pt2) and TorchScript (model.torchscript.pt) files")
        extra, errors = _export_torch_formats(model, example, tmp)
        say("checking every format against PyTorch on one input (onnxruntime, OpenVINO f32 and default precision"
            + ("" if not extra else ", " + ", ".join(extra)) + ")")
        agreement, ov_default = _format_agreement(model, example, tmp, extra)
        say("writing the model card and infer_example.py")
        _copy_example(tmp)  # before the card: the card lists every file written here
        card = _model_card(run_dir, row, meta, model, tmp, budget or {}, profile or search_profile_name(run_dir),
                           extra, errors, agreement, ov_default)
        (tmp / CARD).write_text(json.dumps(card, indent=2, default=str))
    return card
