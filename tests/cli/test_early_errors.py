"""Clear errors, early (issue 12, items 12-14): a user's mistake is one line naming the file and
the fix (exit 2, no traceback), and whatever can be checked is checked before the dense model
trains."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from autoprune.cli import main

#: Keeps a search that gets past the checks under test short (those tests expect it to stop early).
QUICK = ["--image-size", "16", "--trials", "1", "--finetune-steps", "2", "--pretrain-steps", "5",
         "--set", "exporter=torchscript", "--set", "efficiency.sensitivity_scan=false"]


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI; it must exit 2 with one ``error:`` line, the last on stderr, and no traceback
    (progress lines before it are allowed: some errors are found while the search runs)."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], err
    return lines[-1]


def image_folder(root: Path, classes: dict[str, int], size: int = 20) -> Path:
    """``root/<class>/<i>.png`` with ``classes[name]`` small images each."""
    rng = np.random.default_rng(0)
    for ci, (name, n) in enumerate(classes.items()):
        (root / name).mkdir(parents=True)
        for i in range(n):
            arr = np.full((size, size, 3), 40 + 50 * ci, dtype=np.uint8) + rng.integers(0, 20, (size, size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / name / f"{i}.png")
    return root


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


# --------------------------------------------------------------------------- 12a: broken images
def test_truncated_image_is_named_before_training(tmp_path, fast_profile, capsys):
    data = image_folder(tmp_path / "imgs", {"cat": 8, "dog": 8})
    bad = truncate(data / "dog" / "3.png")
    out = tmp_path / "run"
    line = one_line_error(capsys, ["search", "--data", str(data), "--out", str(out), "--device-profile", str(fast_profile), *QUICK])
    assert re.search(rf"{re.escape(str(bad))}: cannot read this image \(.*truncated.*\); replace or delete the file", line), line
    assert not (out / "base_model.pt").exists()  # the up-front check, not the pre-training, found it


def test_broken_image_in_a_large_folder_is_named_when_read(tmp_path, fast_profile, capsys, monkeypatch):
    """Folders above the up-front check's size are read as usual; the loader names the file."""
    import autoprune.train.data.image_folder

    monkeypatch.setattr(autoprune.train.data.image_folder, "CHECK_ALL_IMAGES_UP_TO", 0)
    data = image_folder(tmp_path / "imgs", {"cat": 8, "dog": 8})
    (data / "cat" / "5.png").write_bytes(b"not an image")
    line = one_line_error(capsys, ["search", "--data", str(data), "--out", str(tmp_path / "run"),
                                   "--device-profile", str(fast_profile), *QUICK])
    assert re.search(r"cat/5\.png: cannot read this image \(cannot identify image file.*\); replace or delete", line), line


def break_idat(path: Path, fix_crc: bool) -> Path:
    """Keep the PNG signature, IHDR and chunk layout, garble the compressed pixels of its IDAT
    chunk (with a correct CRC, only decoding the pixels finds it)."""
    import struct
    import zlib

    data = bytearray(path.read_bytes())
    pos = 8
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            body = pos + 8
            for i in range(2, n):  # past the zlib header: the deflate stream itself
                data[body + i] ^= 0x5A
            if fix_crc:
                data[body + n:body + n + 4] = struct.pack(">I", zlib.crc32(bytes(data[pos + 4:body + n])))
            break
        pos += 12 + n
    path.write_bytes(bytes(data))
    with Image.open(path) as img:  # the header still reads: only decoding fails
        assert img.size == (20, 20)
    return path


@pytest.mark.parametrize("fix_crc,up_front", [(True, True), (False, True), (True, False)],
                         ids=["crc-ok", "crc-bad", "crc-ok-large-folder"])
def test_png_with_a_valid_header_and_a_broken_idat_is_named(tmp_path, fast_profile, capsys, monkeypatch, fix_crc, up_front):
    """Issue 23: a PNG whose header is fine but whose pixel data is not; in a folder checked up
    front, and in one too large for that (named when the loader reads it)."""
    import autoprune.train.data.image_folder

    if not up_front:
        monkeypatch.setattr(autoprune.train.data.image_folder, "CHECK_ALL_IMAGES_UP_TO", 0)
    data = image_folder(tmp_path / "imgs", {"cat": 8, "dog": 8})
    bad = break_idat(data / "cat" / "2.png", fix_crc)
    out = tmp_path / "run"
    line = one_line_error(capsys, ["search", "--data", str(data), "--out", str(out), "--device-profile", str(fast_profile), *QUICK])
    assert line.startswith(f"error: {bad}: cannot read this image (") and "replace or delete the file" in line, line
    if up_front:
        assert not (out / "base_model.pt").exists()


# --------------------------------------------------------------------------- 12b: wrong state_dict
def test_state_dict_of_another_architecture_is_summarised(tmp_path, capsys):
    import torchvision

    ckpt = tmp_path / "wrong.pt"
    torch.save({"arch": "resnet18", "state_dict": torchvision.models.mobilenet_v2(num_classes=10).state_dict()}, ckpt)
    line = one_line_error(capsys, ["search", "--model", str(ckpt), "--out", str(tmp_path / "run")])
    assert len(line) < 600, line  # torch's message is 12.9 KB of key names
    assert re.search(r"wrong\.pt: its state_dict does not fit arch 'resnet18': 122 of the model's 122 keys missing "
                     r"\(conv1\.weight, bn1\.weight, \.\.\.\); 314 unexpected \(features\.0\.0\.weight, .*set 'arch'", line), line


def test_state_dict_with_another_class_count_or_a_wrapper_prefix_says_so(tmp_path, capsys):
    from autoprune.train.models import DemoResNet

    sd = DemoResNet(num_classes=5).state_dict()
    torch.save({"arch": "demo", "state_dict": sd, "num_classes": 10}, tmp_path / "classes.pt")
    line = one_line_error(capsys, ["search", "--model", str(tmp_path / "classes.pt"), "--out", str(tmp_path / "run")])
    assert re.search(r"2 with another shape \(e\.g\. fc\.weight: checkpoint \[5, 128\] vs model \[10, 128\]\); "
                     r"same layers, other widths: .*'num_classes' .*\(now 10\)", line), line
    torch.save({"arch": "demo", "state_dict": {f"module.{k}": v for k, v in sd.items()}, "num_classes": 5}, tmp_path / "ddp.pt")
    line = one_line_error(capsys, ["search", "--model", str(tmp_path / "ddp.pt"), "--out", str(tmp_path / "run")])
    assert "every key starts with 'module.' (a wrapper such as DataParallel): save the inner model's state_dict" in line


# --------------------------------------------------------------------------- 13: classes
def test_image_folder_with_one_class_is_refused(tmp_path, fast_profile, capsys):
    data = image_folder(tmp_path / "imgs", {"cat": 10})
    line = one_line_error(capsys, ["search", "--data", str(data), "--out", str(tmp_path / "run"), "--device-profile", str(fast_profile), *QUICK])
    assert re.search(rf"{re.escape(str(data))}: an ImageFolder needs at least two class folders .*found one class folder \('cat'\)", line), line
    assert not (tmp_path / "run" / "base_model.pt").exists()


def test_validation_split_without_a_class_is_warned_about(tmp_path, caplog):
    from autoprune.train.data import load_data

    data = image_folder(tmp_path / "imgs", {"a": 12, "b": 12, "rare": 1})
    with caplog.at_level(logging.WARNING, logger="autoprune"):
        bundle = load_data(str(data), 16, 0.25, 1)  # data seed 1 puts the one 'rare' image in the training split
    assert bundle.num_classes == 3 and 2 not in {int(y) for _, y in bundle.val}
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(re.search(r"validation split has no image of 1 class\(es\) the training split has \('rare'; 1 training images\).*"
                         r"raise val_fraction", m) for m in warned), warned
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="autoprune"):
        load_data(str(image_folder(tmp_path / "even", {"a": 12, "b": 12})), 16, 0.25, 0)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


# --------------------------------------------------------------------------- 12d: remeasure, files gone
def _fake_run(root: Path, rows: int = 2) -> Path:
    """A run folder whose pareto.json lists ``rows`` models, each with metadata and a small ONNX."""
    import json
    import warnings

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 14 * 14, 10)).eval()
    pareto = []
    for n in range(rows):
        folder = root / "pareto" / f"trial_{n:05d}"
        folder.mkdir(parents=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (torch.zeros(1, 1, 16, 16),), str(folder / "model.onnx"), dynamo=False)
        torch.save(model, folder / "model.pt")
        (folder / "metadata.json").write_text(json.dumps({"input_shape": [1, 1, 16, 16], "config": {"exporter": "torchscript"}}))
        pareto.append({"trial": n, "accuracy": 0.9 - n / 10, "latency_ms": 1.0 / (n + 1), "artifacts": f"pareto/trial_{n:05d}"})
    (root / "pareto.json").write_text(json.dumps({"dense": {"profile": "ort-fast"}, "pareto": pareto}))
    return root


def test_remeasure_names_a_missing_artifacts_folder_or_model_file(tmp_path, fast_profile, capsys):
    import shutil

    run = _fake_run(tmp_path / "run")
    shutil.rmtree(run / "pareto" / "trial_00001")
    line = one_line_error(capsys, ["remeasure", str(run), "--device-profile", str(fast_profile)])
    assert re.search(r"run/pareto/trial_00001: missing, but .*pareto\.json lists the model; restore it, or re-run the same "
                     r"'autoprune search --out .*run' command", line), line
    (run / "pareto" / "trial_00000" / "model.onnx").unlink()
    line = one_line_error(capsys, ["remeasure", str(run), "--device-profile", str(fast_profile)])
    assert re.search(r"trial_00000/model\.onnx: missing \(and 1 more missing file\(s\)\)", line), line
    assert not (run / "remeasure").exists()  # nothing measured or written before the check


def test_remeasure_on_torch_needs_the_module_file(tmp_path, capsys):
    run = _fake_run(tmp_path / "run", rows=1)
    (run / "pareto" / "trial_00000" / "model.pt").unlink()
    line = one_line_error(capsys, ["remeasure", str(run), "--device-profile", "torch-cpu"])
    assert re.search(r"trial_00000/model\.pt: missing, but", line), line


# --------------------------------------------------------------------------- 12c: --out not writable
@pytest.fixture
def read_only():
    """``read_only(path)`` makes ``path`` unwritable for this process: chmod for a normal user,
    ``chattr +i`` for root (whom modes do not stop); undone after the test. Skips where neither works."""
    import os
    import subprocess

    done: list[Path] = []

    def make(path: Path) -> Path:
        if os.geteuid() != 0:
            path.chmod(0o555 if path.is_dir() else 0o444)
        elif subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            pytest.skip("running as root where chattr +i is not supported: cannot make a path read-only")
        done.append(path)
        if os.access(path, os.W_OK):
            pytest.skip(f"{path} stays writable for this user")
        return path

    yield make
    for path in done:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(path)], capture_output=True)
        else:
            path.chmod(0o755 if path.is_dir() else 0o644)


@pytest.mark.parametrize("inside, expected", [
    ("", r"run: --out \(run folder\) is not writable; pass a folder you can write to"),  # what main already did
    ("study.db", r"run/study\.db: read-only, but a search in this run folder writes to it; make it writable "
                 r"\(chmod u\+w; chattr -i if immutable\), or copy the run folder and pass the copy as --out"),
    ("trials", r"run/trials: read-only, but a search in this run folder writes to it"),
])
def test_read_only_run_folder_or_study_is_refused_before_training(inside, expected, tmp_path, fast_profile, read_only, capsys):
    import optuna

    out = tmp_path / "run"
    (out / "trials").mkdir(parents=True)
    optuna.create_study(study_name="autoprune", storage=f"sqlite:///{out / 'study.db'}", directions=["maximize", "minimize"])
    read_only(out / inside)
    line = one_line_error(capsys, ["search", "--out", str(out), "--device-profile", str(fast_profile), *QUICK])
    assert re.search(expected, line), line
    assert not (out / "base_model.pt").exists()


# --------------------------------------------------------------------------- 12e: ONNX external data
@pytest.fixture
def external_onnx(tmp_path) -> Path:
    """A small ONNX whose weights live in ``weights/m.data`` beside it (how models over 2 GB are saved)."""
    import warnings

    import onnx

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 14 * 14, 10)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 1, 16, 16),), str(tmp_path / "single.onnx"), dynamo=False)
    (tmp_path / "ext" / "weights").mkdir(parents=True)
    onnx.save_model(onnx.load(str(tmp_path / "single.onnx")), str(tmp_path / "ext" / "m.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights/m.data", size_threshold=0)
    assert (tmp_path / "ext" / "weights" / "m.data").is_file()
    return tmp_path / "ext" / "m.onnx"


def test_bench_onnx_with_external_data_present_is_measured(external_onnx, fast_profile, capsys):
    import json

    assert main(["bench", str(external_onnx), "--device-profile", str(fast_profile), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["median_ms"] > 0


def test_bench_onnx_with_external_data_missing_names_the_file(external_onnx, fast_profile, capsys):
    (external_onnx.parent / "weights" / "m.data").unlink()
    for profile in (str(fast_profile), "openvino-cpu"):
        line = one_line_error(capsys, ["bench", str(external_onnx), "--device-profile", profile])
        assert re.search(r"ext/m\.onnx: its weights are stored in .*ext/weights/m\.data, which is missing; copy the file\(s\) "
                         r"saved with the model \(weights/m\.data, relative to the \.onnx file\) there, or re-save", line), line


def test_bench_onnx_with_external_data_on_a_remote_profile_is_refused(external_onnx, capsys):
    line = one_line_error(capsys, ["bench", str(external_onnx), "--device-profile", "remote-example"])
    assert "backend remote sends the .onnx file alone, and its weights are in weights/m.data" in line, line


# --------------------------------------------------------------------------- 14: checked before training
#: A pre-training long enough to notice: what these searches must never reach.
SLOW_PRETRAIN = ["--pretrain-steps", "400", "--trials", "1", "--finetune-steps", "2",
                 "--set", "exporter=torchscript", "--set", "efficiency.sensitivity_scan=false"]


def test_search_space_pattern_matching_nothing_fails_before_training(tmp_path, fast_profile, capsys):
    import time

    space = tmp_path / "typo.yaml"
    space.write_text("layers:\n  - {pattern: 'layer.*', high: 0.5}\n")  # the demo's modules are 'layers.N...'
    out = tmp_path / "run"
    t0 = time.perf_counter()
    line = one_line_error(capsys, ["search", "--search-space", str(space), "--out", str(out), "--device-profile", str(fast_profile),
                                   *SLOW_PRETRAIN])
    assert re.search(r"search space .*typo\.yaml: key 'layers\.pattern': \['layer\.\*'\] match no prunable group; groups are: .*stem\.0, "
                     r"layers\.0\.conv1", line), line
    assert not (out / "base_model.pt").exists()
    assert time.perf_counter() - t0 < 20  # seconds, on a loaded 2-core machine; 400 pre-training steps take longer


@pytest.mark.parametrize("profile, expected", [
    ({"backend": "onnxruntime", "device": "cpu", "providers": ["NoSuchExecutionProvider"]},
     r"device profile nowhere: onnxruntime provider NoSuchExecutionProvider is not available"),
    ({"backend": "onnxruntime", "device": "cpu", "precision": "fp16"}, r"precision fp16 on onnxruntime needs device: tensorrt"),
    ({"backend": "remote", "url": "http://127.0.0.1:9", "token_env": "AUTOPRUNE_TEST_NO_SUCH_TOKEN"},
     r"backend remote needs the server's token in the environment variable AUTOPRUNE_TEST_NO_SUCH_TOKEN"),
])
def test_a_backend_this_machine_lacks_fails_before_training(profile, expected, tmp_path, capsys, monkeypatch):
    import yaml

    monkeypatch.delenv("AUTOPRUNE_TEST_NO_SUCH_TOKEN", raising=False)
    path = tmp_path / "nowhere.yaml"
    path.write_text(yaml.safe_dump({"name": "nowhere", "threads": 1, "batch_size": 1, **profile}))
    out = tmp_path / "run"
    line = one_line_error(capsys, ["search", "--device-profile", str(path), "--out", str(out), *SLOW_PRETRAIN])
    assert re.search(expected, line), line
    assert not (out / "base_model.pt").exists()


@pytest.fixture
def hold_locks():
    """``hold_locks(path, ...)``: take exclusive flocks like a running search would; released after the test."""
    import fcntl

    handles = []

    def hold(*paths: Path) -> None:
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(path, "a")
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            handles.append(fh)

    yield hold
    for fh in handles:
        fh.close()


def test_second_search_in_a_busy_folder_fails_at_once(tmp_path, fast_profile, hold_locks):
    """A first search training its dense model holds the run-folder lock and the prepare lock; a
    second one must say so at once, not wait on the prepare lock for minutes (a subprocess: the
    old behaviour waits until the timeout)."""
    import os
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    hold_locks(out / ".lock", out / ".prepare.lock")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "autoprune.cli", "search", "--out", str(out), "--device-profile", str(fast_profile),
                        *SLOW_PRETRAIN], capture_output=True, text=True, timeout=90, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    assert re.fullmatch(r"error: .*run: another autoprune search is running in this folder \(lock .*run/\.lock\)\n", p.stderr), p.stderr
    assert not (out / "base_model.pt").exists()
    assert time.perf_counter() - t0 < 60  # process start and imports; no waiting


@pytest.mark.parametrize("storage", [None, "sqlite:///{tmp}/shared.db"])
def test_lock_order_single_machine_vs_workers_sharing_a_folder(storage, tmp_path, fast_profile, monkeypatch):
    """Single machine (SQLite in the run folder): the run-folder lock is held before the prepare
    lock. Workers sharing the folder through --storage take no run-folder lock and still wait on
    the prepare lock for the first worker's dense model."""
    import fcntl

    import autoprune.api
    from autoprune.config import load_run_config

    def held(path: Path) -> bool:
        with open(path, "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(fh, fcntl.LOCK_UN)
            return False

    seen: dict[str, bool] = {}

    class Stop(Exception):
        pass

    def fake_prepare(cfg, console=None):
        seen.update(run=held(out / ".lock") if (out / ".lock").exists() else False, prepare=held(out / ".prepare.lock"))
        raise Stop

    out = tmp_path / "run"
    monkeypatch.setattr(autoprune.api, "prepare", fake_prepare)
    cfg = load_run_config(None, out=str(out), device_profile=str(fast_profile),
                          **{"search.storage": storage.format(tmp=tmp_path) if storage else None})
    with pytest.raises(Stop):
        autoprune.api.run(cfg)
    assert seen == {"run": storage is None, "prepare": True}
