from pathlib import Path

import pytest

from autoprune.config import (
    load_device_profile,
    load_run_config,
    load_search_space,
    shipped_dir,
)
from autoprune.errors import ConfigError


def test_shipped_yaml_all_validate():
    for p in shipped_dir("search_spaces").glob("*.yaml"):
        assert load_search_space(str(p)).round_to >= 1
    names = {load_device_profile(str(p)).name for p in shipped_dir("device_profiles").glob("*.yaml")}
    assert {"onnxruntime-cpu", "openvino-cpu", "onnxruntime-cuda", "torch-cuda"} <= names
    assert load_run_config(str(shipped_dir("examples") / "digits.yaml")).search.trials == 20


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
