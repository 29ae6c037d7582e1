import re
from pathlib import Path

import pytest

from autoprune.config import (
    load_device_profile,
    load_run_config,
    load_search_space,
    resolve_named,
    shipped_dir,
)
from autoprune.errors import ConfigError
from conftest import ROOT


def test_shipped_yaml_all_validate():
    for p in shipped_dir("search_spaces").glob("*.yaml"):
        assert load_search_space(str(p)).round_unit >= 1
    names = {load_device_profile(str(p)).name for p in shipped_dir("device_profiles").glob("*.yaml")}
    assert {"onnxruntime-cpu", "openvino-cpu", "onnxruntime-cuda", "torch-cuda"} <= names
    assert load_run_config(str(shipped_dir("run_configs") / "digits.yaml")).search.trials == 20


def test_shipped_names_resolve():
    assert load_device_profile("openvino-cpu").backend == "openvino"
    assert load_search_space("default").name == "default"


def test_unknown_name_lists_shipped():
    with pytest.raises(ConfigError, match="shipped: .*onnxruntime-cpu"):
        load_device_profile("no-such-profile")


def test_bad_yaml_names_file(tmp_path: Path):
    p = tmp_path / "broken.yaml"
    p.write_text("low: [0.1\nhigh: 0.5\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        load_search_space(str(p))


def test_unknown_key_lists_allowed(tmp_path: Path):
    p = tmp_path / "space.yaml"
    p.write_text("lwo: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_search_space(str(p))
    msg = str(e.value)
    assert "space.yaml" in msg and "'lwo'" in msg and "allowed keys" in msg and "round_to" in msg


def test_nested_unknown_key_lists_nested_allowed(tmp_path: Path):
    p = tmp_path / "run.yaml"
    p.write_text("finetune:\n  stesp: 3\n")
    with pytest.raises(ConfigError, match=r"finetune\.stesp.*allowed keys: .*steps"):
        load_run_config(str(p))


@pytest.mark.parametrize("text", ["high: 1.0\n", "low: -0.1\n", "layers:\n  - pattern: 'x*'\n    high: 1.5\n", "low: 0.6\nhigh: 0.2\n"])
def test_ratio_outside_unit_interval(tmp_path: Path, text: str):
    p = tmp_path / "space.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match="space.yaml"):
        load_search_space(str(p))


def test_bad_backend_names_allowed_values(tmp_path: Path):
    p = tmp_path / "prof.yaml"
    p.write_text("name: x\nbackend: tensorflow\n")
    with pytest.raises(ConfigError) as e:
        load_device_profile(str(p))
    assert "backend" in str(e.value) and "onnxruntime" in str(e.value) and "tensorflow" in str(e.value)


def test_cli_overrides_apply_over_file(tmp_path: Path):
    p = tmp_path / "run.yaml"
    p.write_text("search:\n  trials: 7\n  seed: 3\n")
    cfg = load_run_config(str(p), **{"search.trials": 2, "out": "x"})
    assert (cfg.search.trials, cfg.search.seed, cfg.out) == (2, 3, "x")


# --------------------------------------------------------------------------- pretrain budget
def test_pretrain_seconds_alone_trains_by_wall_time():
    cfg = load_run_config(None, pretrain_seconds=3)
    assert (cfg.pretrain_steps, cfg.pretrain_seconds) == (None, 3.0)
    # over a file that sets pretrain_steps, the command line's budget replaces the file's
    cfg = load_run_config(str(shipped_dir("run_configs") / "digits.yaml"), pretrain_seconds=3)
    assert (cfg.pretrain_steps, cfg.pretrain_seconds) == (None, 3.0)
    assert (load_run_config(None).pretrain_steps, load_run_config(None).pretrain_seconds) == (150, None)
    nulled = load_run_config(None, {"pretrain_steps": None})
    assert (nulled.pretrain_steps, nulled.pretrain_seconds) == (None, 10.0)


def test_pretrain_steps_over_a_file_with_seconds(tmp_path: Path):
    p = tmp_path / "run.yaml"
    p.write_text("pretrain_seconds: 5\n")
    assert load_run_config(str(p)).pretrain_steps is None
    cfg = load_run_config(str(p), pretrain_steps=20)
    assert (cfg.pretrain_steps, cfg.pretrain_seconds) == (20, None)


def test_both_pretrain_budgets_are_refused(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"pretrain_steps \(3\) and pretrain_seconds \(2\) are both set"):
        load_run_config(None, pretrain_steps=3, pretrain_seconds=2)
    p = tmp_path / "run.yaml"
    p.write_text("pretrain_steps: 60\npretrain_seconds: 2\n")
    with pytest.raises(ConfigError, match=r"run\.yaml.*both set.*pretrain_steps: null"):
        load_run_config(str(p))
    p.write_text("pretrain_steps: null\npretrain_seconds: 2\n")
    assert load_run_config(str(p)).pretrain_seconds == 2.0


def test_dumped_config_validates_unchanged():
    from autoprune.config import RunConfig

    for cfg in (load_run_config(None), load_run_config(None, pretrain_seconds=4)):
        assert RunConfig.model_validate(cfg.model_dump(mode="json")) == cfg


def test_config_stored_by_older_studies_still_loads(tmp_path: Path):
    """Studies made before one pretrain budget stored both keys; export --trial reads that config."""
    from types import SimpleNamespace

    from autoprune.deploy.replay import _run_config

    stored = load_run_config(None).model_dump(mode="json")
    stored["pretrain_seconds"] = 10.0
    cfg = _run_config(SimpleNamespace(user_attrs={"config": stored}), tmp_path, tmp_path, None, None)  # type: ignore[arg-type]
    assert (cfg.pretrain_steps, cfg.pretrain_seconds) == (150, None)


# --------------------------------------------------------------------------- --set
def test_set_assigns_dotted_keys_with_yaml_values():
    from autoprune.config import parse_assignments

    sets = parse_assignments(["finetune.steps=7", "efficiency.sensitivity_scan=false", "search.max_accuracy_drop=0.05",
                              "image_size=12", "search.population_size=null", "data=digits-cluttered"])
    cfg = load_run_config(None, sets)
    assert (cfg.finetune.steps, cfg.efficiency.sensitivity_scan, cfg.search.max_accuracy_drop) == (7, False, 0.05)
    assert (cfg.image_size, cfg.search.population_size, cfg.data) == (12, None, "digits-cluttered")


@pytest.mark.parametrize("item, message", [
    ("finetune.steps", "expected KEY=VALUE"),
    ("=3", "expected KEY=VALUE"),
    ("search..trials=3", "expected KEY=VALUE"),
    ("search.trials=", "write search.trials=null"),
    ("out=[1", "not valid YAML"),
])
def test_set_malformed_items(item: str, message: str):
    from autoprune.config import parse_assignments

    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_assignments([item])


def test_set_unknown_or_invalid_key_names_it_and_the_allowed_keys():
    from autoprune.config import parse_assignments

    with pytest.raises(ConfigError) as e:
        load_run_config(None, parse_assignments(["search.trails=3"]))
    assert "'search.trails'" in str(e.value) and "allowed keys: " in str(e.value) and "trials" in str(e.value)
    with pytest.raises(ConfigError, match=r"key 'finetune\.steps'.*greater than or equal to 0"):
        load_run_config(None, parse_assignments(["finetune.steps=-1"]))
    with pytest.raises(ConfigError, match=r"'search\.trials\.x'.*'search\.trials' is a value"):
        load_run_config(None, parse_assignments(["search.trials=3", "search.trials.x=1"]))
    assert "\n" not in str(e.value)  # one line: the CLI prints it after "error: "


def test_set_and_option_for_the_same_key_must_agree():
    from autoprune.config import parse_assignments

    with pytest.raises(ConfigError, match=r"search\.trials is given twice"):
        load_run_config(None, parse_assignments(["search.trials=6"]), **{"search.trials": 5})
    with pytest.raises(ConfigError, match=r"--set search\.trials is given twice \(5 and 6\)"):
        parse_assignments(["search.trials=5", "search.trials=6"])
    assert load_run_config(None, parse_assignments(["search.trials=5"]), **{"search.trials": 5}).search.trials == 5


def test_users_own_folder_wins_over_the_shipped_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """./device_profiles/NAME.yaml (and ./search_spaces/, ./run_configs/) in the working directory is
    the user's: it is taken over the shipped file of that name; other names still resolve."""
    (tmp_path / "device_profiles").mkdir()
    (tmp_path / "device_profiles" / "onnxruntime-cpu.yaml").write_text("name: mine\nbackend: onnxruntime\nthreads: 2\n")
    (tmp_path / "run_configs").mkdir()
    (tmp_path / "run_configs" / "digits.yaml").write_text("model: demo\nsearch: {trials: 3}\n")
    monkeypatch.chdir(tmp_path)
    assert load_device_profile("onnxruntime-cpu").name == "mine"
    assert load_run_config("digits").search.trials == 3
    assert load_device_profile("openvino-cpu").backend == "openvino"  # not overridden: shipped
    assert resolve_named("openvino-cpu", "device_profiles").is_relative_to(shipped_dir("device_profiles"))


def test_run_config_names_are_not_looked_up_in_examples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``examples/`` holds example code (the repository's own ``examples/`` at its root): a YAML
    there is not a run config name, so ``--config digits`` from the repository root (or any folder
    with an ``examples/``) is the shipped run config, never an unrelated file of that name."""
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "digits.yaml").write_text("model: resnet18\nsearch: {trials: 3}\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_run_config("digits")
    assert (cfg.model, cfg.search.trials) == ("demo", 20)


def test_shipped_yaml_lives_in_the_repository_root_folders():
    """The design's layout: ``device_profiles/``, ``search_spaces/`` and ``run_configs/`` beside
    ``autoprune/`` (what a source checkout reads; the wheel carries copies, tests/e2e/test_wheel.py)."""
    repo = ROOT
    for folder in ("device_profiles", "search_spaces", "run_configs"):
        assert shipped_dir(folder).resolve() == (repo / folder).resolve()
        assert list((repo / folder).glob("*.yaml")), folder
    assert not (repo / "autoprune" / "shipped").exists()
    assert {p.stem for p in shipped_dir("device_profiles").glob("*.yaml")} >= {"onnxruntime-cpu", "openvino-cpu", "torch-cpu"}


# --------------------------------------------------------------------------- import cost
def test_importing_the_config_imports_neither_torch_nor_optuna():
    """Reading and validating configs (``autoprune --help``, docs, tools) must not pay for torch."""
    import subprocess
    import sys

    code = ("import sys, autoprune.config as c; c.load_device_profile('onnxruntime-cpu'); c.load_search_space('default'); "
            "c.load_run_config(None); print(sorted(m for m in ('torch', 'optuna') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_shipped_plugin_names_are_what_the_plugin_modules_register():
    """The registries answer names without importing plug-in code; those names must be the real ones."""
    from autoprune.measure import backends
    from autoprune.prune import methods
    from autoprune.registry import BACKENDS, METHODS

    assert set(BACKENDS.shipped) <= set(backends.available()) and set(METHODS.shipped) <= set(methods.available())
    registered_by_shipped_code = {f for f, fac in METHODS._factories.items() if fac.__module__.startswith("autoprune.")}
    assert registered_by_shipped_code == set(METHODS.shipped)
    assert {n for n, fac in BACKENDS._factories.items() if fac.__module__.startswith("autoprune.")} == set(BACKENDS.shipped)


# --------------------------------------------------------------------------- backends from the registry
def test_a_registered_backend_is_accepted_and_a_typo_names_file_key_and_backends(tmp_path: Path):
    from autoprune.measure import backends
    from autoprune.measure.backends.onnxruntime_backend import OnnxRuntimeBackend

    p = tmp_path / "mine.yaml"
    p.write_text("name: mine\nbackend: test-registered-backend\n")
    with pytest.raises(ConfigError, match="unknown backend 'test-registered-backend'"):
        load_device_profile(str(p))
    backends.register("test-registered-backend", OnnxRuntimeBackend)
    assert load_device_profile(str(p)).backend == "test-registered-backend"

    p.write_text("name: typo\nbackend: onnxruntim\n")
    with pytest.raises(ConfigError) as e:
        load_device_profile(str(p))
    msg = str(e.value)
    assert msg.startswith(f"{p}: ") and "key 'backend': unknown backend 'onnxruntim'" in msg
    assert "known backends: " in msg and all(n in msg for n in ("onnxruntime", "openvino", "remote", "torch", "test-registered-backend"))
    assert "Value error" not in msg


# --------------------------------------------------------------------------- resume marks on the fields
#: Every run-config key a study resumes across, with another valid value: the test fails when a
#: field gains or loses its mark without this list (and the docs) being updated on purpose.
FREE_KEYS = {
    "out": "elsewhere", "search.trials": 3, "search.sampler": "tpe", "search.population_size": 4,
    "search.storage": "sqlite:///other.db", "search.study_name": "other", "search.timeout_s": 5.0,
    "search.heartbeat_interval": 11, "search.grace_period": 31, "search.max_retries": 3,
    "efficiency.final_finetune_steps": 2,
}
RUNTIME_SETS = {"train.device": "cpu", "train.precision": "bf16", "train.threads": 3, "search.mlflow": "file:///x",
                "efficiency.onnx_slicing": False, "search.screen": {"candidates": 10}}
#: Unmarked (scoring) keys, with another valid value: changing one refuses a resume.
SCORING_KEYS = {"finetune.steps": 7, "search.seed": 1, "data": "digits-cluttered", "pretrain_steps": 10, "exporter": "torchscript",
                "efficiency.sensitivity_ratio": 0.3, "task": "segmentation", "efficiency.staircases": True}


def _hash(sets: dict, profile: dict | None = None) -> str:
    from types import SimpleNamespace

    from autoprune.config import DeviceProfile
    from autoprune.study.study import search_hash

    groups = [SimpleNamespace(name="g", low=0.0, high=0.5, methods=["l1"])]
    prof = DeviceProfile.model_validate({"name": "p", "backend": "remote", "url": "http://t:1", **(profile or {})})
    return search_hash(SimpleNamespace(cfg=load_run_config(None, sets), space=load_search_space("default"), profile=prof, groups=groups))


def test_resume_marks_on_fields_decide_which_changes_refuse_a_resume():
    from autoprune.config import DeviceProfile, RunConfig, resume_keys

    assert set(resume_keys(RunConfig, "free")) == set(FREE_KEYS)
    assert set(resume_keys(RunConfig, "runtime")) == {"train", "search.mlflow", "search.screen", "efficiency.onnx_slicing"}
    assert set(resume_keys(DeviceProfile, "free")) == {"token_env", "request_timeout_s"}
    base = _hash({})
    for key, value in {**FREE_KEYS, **RUNTIME_SETS}.items():
        assert _hash({key: value}) == base, f"changing {key} must not refuse a resume"
    for key, value in SCORING_KEYS.items():
        assert _hash({key: value}) != base, f"changing {key} must refuse a resume"
    assert _hash({}, {"token_env": "OTHER", "request_timeout_s": 9.0}) == base
    assert _hash({}, {"threads": 2}) != base


def test_a_new_marked_field_changes_the_derived_lists():
    """The study's lists come from the schema: marking a field is all it takes."""
    from pydantic import Field

    from autoprune.config import RunConfig, SearchSettings, added, added_defaults, resume, resume_keys

    class Settings(SearchSettings):
        progress_every: int = Field(5, json_schema_extra=resume("free"))
        new_scoring_knob: int = Field(0, json_schema_extra=added(0))

    class Run(RunConfig):
        search: Settings = Field(default_factory=Settings)

    assert "search.progress_every" in resume_keys(Run, "free") and "search.progress_every" not in resume_keys(RunConfig, "free")
    assert added_defaults(Run)["search.new_scoring_knob"] == 0
    with pytest.raises(ValueError, match="unknown resume mark"):
        resume("sometimes")  # type: ignore[arg-type]
