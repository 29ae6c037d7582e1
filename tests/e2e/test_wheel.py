"""The wheel that ``pip install .`` builds, installed without ``-e`` and run from an empty folder.

The editable install the other tests use imports autoprune from the source tree, where every
file exists whether or not it is packaged; these tests see only what the wheel carries
(device profiles, search spaces, example configs, the deploy template).

Installing the whole dependency stack into a fresh venv would cost gigabytes and minutes, so the
fresh venv gets the wheel alone and sees this environment's site-packages through a ``.pth``
file with plain path lines: plain lines do not execute that site's own ``.pth`` files, so the
editable autoprune of this environment stays invisible (asserted through ``autoprune.__file__``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

REPO = ROOT
#: Left behind by earlier builds and editable installs; never part of what we build from.
_NOT_SOURCE = ("build", "dist", "*.egg-info", ".venv", "runs", "__pycache__", ".pytest_cache", ".git")


def _source_copy(dest: Path) -> Path:
    """Copy the project as a fresh checkout would have it (working-tree contents of the files git
    tracks or would track), so stale build/ and *.egg-info folders cannot leak into the wheel."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                cwd=REPO, capture_output=True, text=True).stdout
    except FileNotFoundError:  # no git
        listed = ""
    if listed:
        for rel in filter(None, listed.split("\0")):
            src = REPO / rel
            if src.is_file():  # deleted in the working tree but still in the index: skip
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / rel)
    else:  # not a git checkout (an unpacked sdist, say)
        shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(*_NOT_SOURCE), dirs_exist_ok=True)
    return dest


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without anything that would put the source tree on sys.path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", PYTHONNOUSERSITE="1", **extra)
    return env


def _run(cmd: list, cwd: Path, timeout: float, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_clean_env(**env), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def _build_wheel(src: Path, dist: Path) -> Path:
    # Build tooling is part of the test extras (and CI has it): missing means a broken set-up, not a skip.
    assert importlib.util.find_spec("setuptools") is not None, "setuptools is missing: pip install -e '.[test]'"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, src],
         cwd=dist.parent, timeout=300)
    (whl,) = dist.glob("autoprune-*.whl")
    return whl


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    return _build_wheel(_source_copy(root / "src"), root / "dist")


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A fresh venv holding the installed wheel; this environment's dependencies on its path."""
    root = tmp_path_factory.mktemp("venv") / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", root], cwd=root.parent, timeout=120)
    py = root / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root, timeout=60).stdout.strip())
    # pip of this environment installs into the fresh interpreter (no pip needed there).
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", "-q", wheel],
         cwd=root.parent, timeout=300)
    # Dependencies: this environment's site-packages as plain path lines, after the venv's own.
    deps = [p for p in dict.fromkeys(sys.path) if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]
    (site / "_autoprune_test_deps.pth").write_text("".join(f"{p}\n" for p in deps))
    scripts = py.parent
    exe = scripts / ("autoprune.exe" if os.name == "nt" else "autoprune")
    assert exe.is_file(), f"the wheel installed no autoprune console script in {scripts}"
    return {"python": py, "site": site, "autoprune": exe}


def test_wheel_contents(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n for n in names if n.startswith("autoprune/shipped/") and n.endswith(".yaml")}
    # The repository's top-level YAML folders ship inside the package (setup.py's package-dir mapping).
    for kind in ("device_profiles", "search_spaces", "run_configs"):
        expected = {f"autoprune/shipped/{kind}/{p.name}" for p in (REPO / kind).glob("*.yaml")}
        assert expected, kind
        assert expected <= shipped, f"missing from the wheel: {sorted(expected - shipped)}"
    for name in ("autoprune/shipped/device_profiles/onnxruntime-cpu.yaml", "autoprune/shipped/search_spaces/resnet.yaml",
                 "autoprune/shipped/run_configs/digits.yaml", "autoprune/deploy/templates/infer_example.py"):
        assert name in names
    # Every module of the source tree is packaged (a missing __init__ or find rule would drop one) ...
    sources = {p.relative_to(REPO).as_posix() for p in (REPO / "autoprune").rglob("*.py") if "__pycache__" not in p.parts}
    assert sources <= set(names), f"missing from the wheel: {sorted(sources - set(names))}"
    # ... and nothing outside the package ships: no tests, benchmarks, scripts, caches.
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"autoprune", "autoprune-0.1.0.dist-info"}, tops
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".pyo"))]
    entry_points = zipfile.ZipFile(wheel).read("autoprune-0.1.0.dist-info/entry_points.txt").decode()
    assert "autoprune = autoprune.cli:main" in entry_points


def test_sdist_runs_tests_and_builds_the_same_wheel(wheel: Path, tmp_path: Path) -> None:
    """The sdist carries what README's test command needs (MANIFEST.in), and a wheel built from
    it (as `pip install autoprune-0.1.0.tar.gz` or `python -m build` would) equals the direct one."""
    src = _source_copy(tmp_path / "src")
    code = "import sys; from setuptools import build_meta as b; print(b.build_sdist(sys.argv[1]))"
    _run([sys.executable, "-c", code, tmp_path / "sdist"], cwd=src, timeout=300)
    (sdist,) = (tmp_path / "sdist").glob("autoprune-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # 3.10.12+/3.11.4+
        tar.extractall(tmp_path / "unpacked", **safe)
    for need in ("pyproject.toml", "README.md", "constraints.txt", "scripts/test.sh", "tests/conftest.py",
                 "tests/e2e/test_wheel.py", "setup.py", "device_profiles/onnxruntime-cpu.yaml", "run_configs/digits.yaml",
                 "autoprune/deploy/templates/infer_example.py"):
        assert need in names, f"{need} missing from the sdist"
    again = _build_wheel(tmp_path / "unpacked" / sdist.name.removesuffix(".tar.gz"), tmp_path / "dist")
    assert sorted(zipfile.ZipFile(again).namelist()) == sorted(zipfile.ZipFile(wheel).namelist())


def test_installed_wheel_loads_shipped_yaml(venv: dict, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    code = (
        "import json, autoprune\n"
        "from autoprune.config import load_device_profile, load_search_space, load_run_config, resolve_named\n"
        "from autoprune.deploy.bundle import _copy_example\n"
        "import sys, pathlib\n"
        "p = load_device_profile('onnxruntime-cpu'); s = load_search_space('resnet'); c = load_run_config('digits')\n"
        "_copy_example(pathlib.Path(sys.argv[1]))  # what every deploy bundle gets\n"
        "print(json.dumps({'file': autoprune.__file__, 'profile': p.name, 'backend': p.backend, 'space': s.name,\n"
        "  'model': c.model, 'data': c.data, 'trials': c.search.trials,\n"
        "  'profile_path': str(resolve_named('onnxruntime-cpu', 'device_profiles'))}))\n"
    )
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    out = json.loads(_run([venv["python"], "-c", code, bundle], cwd=empty, timeout=120).stdout.strip().splitlines()[-1])
    site = venv["site"].resolve()
    # the installed wheel, not the source tree or this environment's editable install
    assert Path(out["file"]).resolve().is_relative_to(site), out["file"]
    assert Path(out["profile_path"]).resolve().is_relative_to(site), out["profile_path"]
    assert (out["profile"], out["backend"]) == ("onnxruntime-cpu", "onnxruntime")
    assert out["space"] == "resnet"
    assert (out["model"], out["data"], out["trials"]) == ("demo", "digits", 20)
    template = REPO / "autoprune/deploy/templates/infer_example.py"
    assert (bundle / "infer_example.py").read_text() == template.read_text()
    assert not list(empty.iterdir())


def test_installed_wheel_searches_from_empty_dir(venv: dict, tmp_path: Path) -> None:
    """``autoprune search`` of the installed wheel from an empty folder: shipped search space and
    device profile by name, a run folder with pareto.json."""
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = tmp_path / "cfg" / "tiny.yaml"
    cfg.parent.mkdir()
    cfg.write_text(yaml.safe_dump({
        "model": "demo",
        "data": "digits",
        "pretrain_steps": 20,
        "search_space": "default",          # shipped names: resolved inside the installed wheel
        "device_profile": "onnxruntime-cpu",
        "exporter": "torchscript",
        "finetune": {"batch_size": 32},
        "efficiency": {"sensitivity_scan": False},
    }))
    proc = _run([venv["autoprune"], "search", "--config", cfg, "--trials", "1", "--finetune-steps", "2",
                 "--seed", "0", "--out", "run"], cwd=empty, timeout=600, OMP_NUM_THREADS="1")
    run = empty / "run"
    front = json.loads((run / "pareto.json").read_text())
    assert front["pareto"], proc.stdout
    assert (run / front["pareto"][0]["artifacts"] / "model.onnx").is_file()
    assert [p.name for p in empty.iterdir()] == ["run"]  # nothing else lands in the working directory
    assert "run/pareto.json" in proc.stdout.replace("\\", "/")
