"""``autoprune export RUN --trial N``: deploy files for any trial, not only the Pareto front.

A trial's model is ``trials/NNNNN/model.pt`` when the worker that ran it shared the run folder.
Otherwise (or with ``rebuild=True``) it is re-created from what the study stores: the trial's
parameters are replayed through the search's own build and fine-tune steps (same pruning, same
fine-tune seed ``search.seed + N``) on the run's dense model, and the result must reproduce the
stored accuracy within ``tolerance`` — a model that does not is refused rather than silently
exported.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import optuna
import torch
import yaml

from autoprune.config import RunConfig, validate
from autoprune.errors import ConfigError
from autoprune.results.artifacts import export_trial_artifacts
from autoprune.results.front import trial_row
from autoprune.files import atomic_dir, file_lock
from autoprune.runfolder import WRITTEN_KEY, RunFolder, read_record, replaceable_dir, writable_dir
from autoprune.study.context import SearchContext, prepare
from autoprune.study.final import final_finetune, final_seed
from autoprune.study.space import aim_at_target, suggest_plan
from autoprune.study.storage import load_run_study
from autoprune.study.trial import (
    OVER_BUDGET_EVAL_BATCHES,
    build_candidate,
    finetune_candidate,
    trial_seed,
)
from autoprune.train.checkpoint import load_checkpoint, pruned_recipe, weights_hash
from autoprune.trust import CodePolicy, data_code, model_code
from autoprune.train.device import resolve_device
from autoprune.train.models import evaluate

#: Default |rebuilt - stored| accuracy allowed. Replays are exact on the same machine and build;
#: other CPUs / library versions may change the last bits of a fine-tune.
TOLERANCE = 0.02


def _run_config(study: optuna.Study, run_dir: Path, tmp: Path, storage: Optional[str], study_name: Optional[str],
                trust_pickle: bool = False) -> RunConfig:
    """The run's exact config from the study, with the stored search space and device profile
    written out (the original YAML paths may not exist on this machine). ``trust_pickle`` is the
    caller's: a stored config never grants it."""
    ua = study.user_attrs
    if "config" not in ua:
        raise ConfigError(f"{run_dir}: the study has no stored config (not made by autoprune search?)")
    data = dict(ua["config"])
    for key, attr in (("search_space", "search_space"), ("device_profile", "device_profile")):
        if attr in ua:
            p = tmp / f"{attr}.yaml"
            p.write_text(yaml.safe_dump(ua[attr]))
            data[key] = str(p)
    data["out"] = str(run_dir)
    data.setdefault("search", {})
    # Studies made before data_seed existed split their data with search.seed.
    data.setdefault("data_seed", data["search"].get("seed", 0))
    # Studies made before the config held one pretrain budget stored both; the steps were used.
    if data.get("pretrain_steps") is not None:
        data.pop("pretrain_seconds", None)
    data["search"] = {**data["search"], "storage": storage, "study_name": study_name, "mlflow": None}
    data["train"] = _local_train(data.get("train") or {})
    data["trust_pickle"] = trust_pickle
    return validate(RunConfig, data, f"{run_dir} (config stored in the study)")


def _local_train(stored: dict[str, Any]) -> dict[str, Any]:
    """The search's ``train:`` section for a replay on *this* machine: same precision and memory
    format, but the device and threads this machine has (the search may have trained on a GPU
    that is not here; fp16 then falls back to fp32, CPU autocast has no fp16 training)."""
    out = {**stored, "device": "auto", "threads": None}
    if out.get("precision") == "fp16" and resolve_device("auto").type != "cuda":
        out["precision"] = "fp32"
    return out


def replay_model(ctx: SearchContext, frozen: optuna.trial.FrozenTrial) -> torch.nn.Module:
    """Re-create a trial's model from its stored parameters with the search's own steps: the
    same plan (Optuna's FixedTrial answers the suggest calls), the same build, and the same
    fine-tune and seed, taking the multi-fidelity branch the trial recorded. Latency is not
    measured again: the study already holds it."""
    try:
        fixed = optuna.trial.FixedTrial(frozen.params, number=frozen.number)
        plan = aim_at_target(fixed, ctx, suggest_plan(fixed, ctx), stored=frozen.user_attrs)
    except ValueError as exc:
        raise ConfigError(f"trial {frozen.number}: its stored parameters do not fit this run's search space ({exc})") from None
    cand = build_candidate(ctx, plan, frozen.number)
    if not frozen.user_attrs.get("skipped_finetune"):
        stopped = bool(frozen.user_attrs.get("stopped_at_rung0"))
        finetune_candidate(ctx, cand.model, frozen.number, lambda _acc0: stopped)
    return cand.model


def _export_files(folder: Path) -> Optional[set[str]]:
    """The files autoprune wrote into the export ``folder`` (what its ``metadata.json`` lists),
    or None when ``folder`` holds no ``metadata.json`` autoprune wrote. Exports made before the
    list existed: the files their metadata names, plus ``metadata.json``."""
    meta = read_record(Path(folder), "metadata.json", lambda m: isinstance(m.get("files"), dict) and "trial" in m)
    if meta is None:
        return None
    written = meta.get(WRITTEN_KEY)
    if isinstance(written, list):
        return {str(w) for w in written} | {"metadata.json"}
    return {str(v) for v in meta["files"].values()} | {"metadata.json"}


def _final_entry(run: RunFolder, trial: int) -> Optional[dict[str, Any]]:
    path = run.final_json
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get(str(trial))


def rebuild_trial(
    run_dir: str | Path,
    trial: int,
    *,
    storage: Optional[str] = None,
    study_name: Optional[str] = None,
    dest: Optional[str | Path] = None,
    rebuild: bool = False,
    tolerance: float = TOLERANCE,
    console: Optional[Callable[[str], None]] = None,
    trust_pickle: bool = False,
    model: Optional[str] = None,
    trust_code: bool = False,
) -> dict[str, Any]:
    """Write ONNX / OpenVINO IR / PyTorch / metadata of trial ``trial`` to ``dest``; returns the metadata.

    ``rebuild``: re-create the model from the stored parameters even if ``trials/N/model.pt`` exists.
    ``trust_pickle``: also load full-pickle model files (unpickling runs the code they name).
    ``model``: the ``module:function`` of your model's code when it is not demo or torchvision;
    ``trust_code``: run whatever code the stored config and model files name (:mod:`autoprune.trust`).
    """

    say = console or (lambda s: None)
    run_dir = Path(run_dir)
    run = RunFolder(run_dir)
    study = load_run_study(run_dir, storage, study_name)
    frozen = next((t for t in study.get_trials(deepcopy=False) if t.number == trial), None)
    if frozen is None:
        raise ConfigError(f"{run_dir}: the study has no trial {trial} (it has {len(study.trials)} trials, numbered from 0)")
    if frozen.state != optuna.trial.TrialState.COMPLETE:
        reason = frozen.user_attrs.get("fail_reason", "")
        raise ConfigError(f"trial {trial} is {frozen.state.name}{' (' + reason + ')' if reason else ''}; only complete trials can be exported")

    # Checked before the (possibly long) rebuild, not when the files are written. The export
    # replaces ``out`` as a whole: never the run itself, its own files or a user's folder.
    given = Path(dest) if dest else run.export(trial)

    def check_dest() -> Path:
        return replaceable_dir(given, run, "metadata.json", "export", "--dest", _export_files)

    out = check_dest()
    writable_dir(out.parent, "--dest's parent folder")
    with tempfile.TemporaryDirectory(prefix="autoprune-rebuild-") as tmpd:
        tmp = Path(tmpd)
        cfg = _run_config(study, run_dir, tmp, storage, study_name, trust_pickle)
        # The config comes from the run folder: the code it names (model, data, task, output) runs
        # only if the user named it here or trusts the folder; checked before anything is imported.
        code = CodePolicy.of(model, trust=trust_code)
        code.check_all([("model", model_code(cfg.model)), ("data", data_code(cfg.data)),
                        ("task", cfg.task if cfg.task and ":" in cfg.task else None), ("output", cfg.output)],
                       f"{run_dir} (config stored in the study)")
        if not run.base_model.is_file() and not Path(cfg.model).is_file():
            raise ConfigError(
                f"{run_dir}: no base_model.pt; copy it from a worker's run folder (the dense model every trial was pruned from)"
            )
        with file_lock(run.prepare_lock):
            ctx = prepare(cfg, console=say)
        stored_hash = study.user_attrs.get("base_model_sha256")
        if stored_hash and weights_hash(ctx.base) != stored_hash:
            raise ConfigError(
                f"{run.base_model}: not the dense model the study was run with (hash {weights_hash(ctx.base)} != {stored_hash}); "
                "copy base_model.pt from the run folder of the workers"
            )
        stored_pt = run.trial(trial).model
        files_code = CodePolicy(trust=trust_code, given=ctx.code.given | code.given)
        seed = trial_seed(ctx, trial)
        if stored_pt.is_file() and not rebuild:
            say(f"trial {trial}: using {stored_pt}")
            model = load_checkpoint(stored_pt, trust_pickle=trust_pickle, code=files_code)[0]
            source = str(stored_pt)
        else:
            say(f"trial {trial}: rebuilding from its parameters (fine-tune seed {seed})")
            model = replay_model(ctx, frozen)
            source = "rebuilt from stored parameters"
        model.eval()
        # Over-budget trials were scored on a few batches without a fine-tune; int8 trials on the
        # quantized file (their fp32 accuracy is kept beside it): check like with like.
        acc = evaluate(model, ctx.data, max_batches=OVER_BUDGET_EVAL_BATCHES if frozen.user_attrs.get("accuracy_estimated") else None,
                       setup=ctx.train, split="search", task=ctx.task)
        stored_acc = frozen.user_attrs.get("accuracy_fp32", frozen.values[0])
        if abs(acc - stored_acc) > tolerance:
            raise ConfigError(
                f"trial {trial}: the {'rebuilt' if source.startswith('rebuilt') else 'stored'} model has accuracy {acc:.4f} but the "
                f"study recorded {stored_acc:.4f} (tolerance {tolerance}); the run folder, code or library versions differ "
                "from the search's. Nothing was exported."
            )
        row = trial_row(frozen, ctx.dense)
        check = {"accuracy": acc, "stored_accuracy": stored_acc, "tolerance": tolerance, "finetune_seed": seed}
        final = _final_entry(run, trial)
        if final is not None:
            # The final stage's longer fine-tune is what export_front deploys for this trial: export
            # the same model (stored, or re-created with the final stage's seed) and check it too.
            final_pt = run.trial(trial).final_model
            if not final["steps"]:
                source += " (final stage: scored only)"
            elif final_pt.is_file() and not rebuild:
                model, source = load_checkpoint(final_pt, trust_pickle=trust_pickle, code=files_code)[0], str(final_pt)
            else:
                say(f"trial {trial}: repeating its final fine-tune ({final['steps']} steps)")
                final_finetune(model, ctx.data, cfg, ctx.base, trial, final["steps"], ctx.train, task=ctx.task)
                source += " + final fine-tune"
            model.eval()
            facc = evaluate(model, ctx.data, setup=ctx.train, split="val", task=ctx.task)
            if abs(facc - final["final_accuracy"]) > tolerance:
                raise ConfigError(
                    f"trial {trial}: the final-stage model has accuracy {facc:.4f} but final.json recorded "
                    f"{final['final_accuracy']:.4f} (tolerance {tolerance}); nothing was exported."
                )
            row.update(final=final, search_accuracy=row["accuracy"], search_latency_ms=row["latency_ms"],
                       accuracy=final["final_accuracy"], latency_ms=final["final_latency_ms"])
            if "test_accuracy" in final:
                row["test_accuracy"] = final["test_accuracy"]
            check["final"] = {"accuracy": facc, "stored_accuracy": final["final_accuracy"], "finetune_seed": final_seed(cfg, trial)}
        meta_extra = {
            "device_profile": ctx.profile.model_dump(mode="json"),
            "config": study.user_attrs.get("config"),
            "search_space": study.user_attrs.get("search_space"),
            "dense": ctx.dense,
            "source": source,
            "check": check,
        }
        recipe = pruned_recipe(ctx.recipe, frozen.user_attrs.get("widths") or {})
        # Into a hidden sibling, swapped in whole: an interrupted export never leaves one trial's
        # files beside another's metadata.json.
        with atomic_dir(out, check_dest) as staging:
            meta = export_trial_artifacts(model, ctx.example, staging, row, meta_extra, cfg.exporter, recipe)
    meta["dest"] = str(out)
    return meta
