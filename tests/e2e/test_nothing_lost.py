"""Nothing a user has is lost (issue 12): ``pick``/``export --dest`` never replace the run, its own
files or a user's folder; a lost study never starts a new one over old results; the corrupt-study
message says only what is true; multi-file outputs (bundle, ``pareto/``, an export, report,
ONNX files) are swapped in whole, so a failure or a kill never leaves a mix.

Process kills of real searches are in tests/e2e/test_fault_injection.py; these tests inject
failures in-process at the exact points a kill could hit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from conftest import tiny_run_config, write_yaml

from autoprune import files, runfolder
from autoprune.api import run
from autoprune.config import load_run_config
from autoprune.deploy import bundle as bundle_mod
from autoprune.deploy.pick import pick
from autoprune.deploy.replay import rebuild_trial
from autoprune.errors import ConfigError
from autoprune.measure.onnx import export_onnx
from autoprune.results import artifacts
from autoprune.results.front import load_front
from autoprune.results.remeasure import remeasure
from autoprune.results.report import write_report
from autoprune.files import atomic_dir, recover_dir
from autoprune.runfolder import RunFolder
from autoprune.study.storage import OPTUNA_TABLES, WITHOUT_STUDY, check_sqlite_file


# --------------------------------------------------------------------------- helpers
def snapshot(root: Path, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every entry under ``root`` (relative path → content hash, or "dir"), except ``skip`` paths."""
    out: dict[str, Any] = {}
    for dirpath, dirs, files in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        if any(str(rel / d) in skip for d in dirs):
            dirs[:] = [d for d in dirs if str(rel / d) not in skip]
        for d in dirs:
            out[str(rel / d)] = "dir"
        for f in files:
            if str(rel / f) not in skip:
                out[str(rel / f)] = hashlib.sha256((Path(dirpath) / f).read_bytes()).hexdigest()
    return out


def hidden_leftovers(folder: Path) -> list[str]:
    """Temporary or backup siblings written by autoprune (``.NAME.*.tmp`` / ``.old``)."""
    return sorted(n for n in os.listdir(folder) if n.startswith(".") and n.endswith((".tmp", ".old")))


def assert_front_consistent(run_dir: Path) -> list[dict[str, Any]]:
    """Every row a reader gets names an existing folder that holds that trial's own files."""
    rows = load_front(run_dir)["pareto"]
    assert rows
    for r in rows:
        folder = run_dir / r["artifacts"]
        meta = json.loads((folder / "metadata.json").read_text())
        assert meta["trial"] == r["trial"] and meta["accuracy"] == r["accuracy"], (r["trial"], folder)
        assert (folder / "model.onnx").is_file()
    assert not hidden_leftovers(run_dir)
    return rows


@pytest.fixture(scope="module")
def full_run(tiny_run, tmp_path_factory) -> Path:
    """A private copy of the shared tiny run, trials included (re-exports read them)."""
    dest = tmp_path_factory.mktemp("full") / "run"
    shutil.copytree(tiny_run.out, dest, ignore=shutil.ignore_patterns("*.lock", "picked", "export"))
    return dest


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("*.lock", "picked", "export"))
    return dest


# --------------------------------------------------------------------------- item 1: pick --dest
def test_pick_never_replaces_the_run_its_parents_or_its_own_files(full_run: Path, capsys) -> None:
    from autoprune.cli import main

    trial = load_front(full_run)["pareto"][0]["trial"]
    before = snapshot(full_run.parent)
    for dest in (full_run, full_run.parent, full_run / "pareto", full_run / "trials",
                 full_run / "pareto" / f"trial_{trial:05d}", full_run / "trials" / "00000", full_run / "dense"):
        with pytest.raises(ConfigError, match="--dest"):
            pick(full_run, dest, trial=trial)
    # the command line of the report: `pick w/run --trial 1 --dest w`
    assert main(["pick", str(full_run), "--trial", str(trial), "--dest", str(full_run.parent)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "holds it" in err and err.count("\n") == 1
    assert snapshot(full_run.parent) == before


def test_pick_refuses_a_users_folder_and_replaces_only_a_previous_bundle(full_run: Path, tmp_path: Path) -> None:
    rows = load_front(full_run)["pareto"]
    notes = tmp_path / "mine"
    notes.mkdir()
    (notes / "notes.txt").write_text("my notes")
    with pytest.raises(ConfigError, match="non-empty folder that is not a previous bundle"):
        pick(full_run, notes, trial=rows[0]["trial"])
    assert snapshot(notes) == {"notes.txt": hashlib.sha256(b"my notes").hexdigest()}

    empty = tmp_path / "empty"
    empty.mkdir()
    pick(full_run, empty, trial=rows[0]["trial"])  # an empty folder is fine
    assert json.loads((empty / "model_card.json").read_text())["trial"] == rows[0]["trial"]
    pick(full_run, empty, trial=rows[-1]["trial"])  # a previous bundle is replaced whole
    assert json.loads((empty / "model_card.json").read_text())["trial"] == rows[-1]["trial"]
    assert json.loads((empty / "metadata.json").read_text())["trial"] == rows[-1]["trial"]
    assert hidden_leftovers(tmp_path) == []


def test_pick_never_deletes_a_file_the_user_added_to_a_bundle(full_run: Path, tmp_path: Path, capsys) -> None:
    """Issue 23 (a): a pick into an earlier bundle replaced it whole, and the user's notes.txt in it was gone."""
    from autoprune.cli import main

    rows = load_front(full_run)["pareto"]
    dest = tmp_path / "bundle"
    pick(full_run, dest, trial=rows[0]["trial"])
    card = json.loads((dest / "model_card.json").read_text())
    assert set(card["written_files"]) == set(runfolder.folder_entries(dest))  # the card lists every file it wrote
    (dest / "notes.txt").write_text("my notes")
    (dest / "extra").mkdir()
    (dest / "extra" / "eval.py").write_text("print(1)")
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match=r"also holds files autoprune did not write \(extra/eval.py, notes.txt\)"):
        pick(full_run, dest, trial=rows[-1]["trial"])
    assert main(["pick", str(full_run), "--trial", str(rows[-1]["trial"]), "--dest", str(dest)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "notes.txt" in err and err.count("\n") == 1
    assert snapshot(tmp_path) == before
    (dest / "notes.txt").unlink()
    shutil.rmtree(dest / "extra")
    pick(full_run, dest, trial=rows[-1]["trial"])  # only autoprune's files: replaced
    assert json.loads((dest / "model_card.json").read_text())["trial"] == rows[-1]["trial"]


def test_a_model_card_json_alone_does_not_make_a_folder_a_bundle(full_run: Path, tmp_path: Path) -> None:
    """Issue 23 (b): a project folder holding a model_card.json was taken for an earlier bundle and replaced whole."""
    trial = load_front(full_run)["pareto"][0]["trial"]
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "model_card.json").write_text(json.dumps({"name": "my model", "license": "mit"}))
    (project / "src" / "code.py").write_text("x = 1")
    (project / "notes.txt").write_text("notes")
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match="not a previous bundle"):
        pick(full_run, project, trial=trial)
    # ... nor a card that claims autoprune's schema: whatever it lists, src/ and notes.txt stay
    card = json.loads((full_run / "pareto" / f"trial_{trial:05d}" / "metadata.json").read_text())
    fake = {"schema": "autoprune.model_card/1", "files": card["files"]}
    (project / "model_card.json").write_text(json.dumps(fake))
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match=r"\(notes.txt, src/code.py\)"):
        pick(full_run, project, trial=trial)
    assert snapshot(tmp_path) == before
    assert (project / "notes.txt").read_text() == "notes" and (project / "src" / "code.py").read_text() == "x = 1"


def test_a_file_added_while_the_bundle_is_written_is_kept(full_run: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    rows = load_front(full_run)["pareto"]
    dest = tmp_path / "bundle"
    pick(full_run, dest, trial=rows[0]["trial"])
    real = bundle_mod._format_agreement

    def user_writes_meanwhile(*a: Any, **k: Any) -> Any:
        (dest / "notes.txt").write_text("written during the pick")
        return real(*a, **k)

    monkeypatch.setattr(bundle_mod, "_format_agreement", user_writes_meanwhile)
    with pytest.raises(ConfigError, match="notes.txt"):
        pick(full_run, dest, trial=rows[-1]["trial"])
    assert (dest / "notes.txt").read_text() == "written during the pick"
    assert json.loads((dest / "model_card.json").read_text())["trial"] == rows[0]["trial"]
    assert hidden_leftovers(tmp_path) == []


def test_failed_pick_keeps_the_previous_bundle_and_leaves_no_temporary_folder(full_run: Path, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    rows = load_front(full_run)["pareto"]
    dest = tmp_path / "bundle"
    pick(full_run, dest, trial=rows[0]["trial"])
    before = snapshot(tmp_path)

    def boom(*a: Any, **k: Any) -> Any:
        raise RuntimeError("injected failure mid-bundle")

    monkeypatch.setattr(bundle_mod, "_format_agreement", boom)  # after the files are copied and converted
    with pytest.raises(RuntimeError, match="injected"):
        pick(full_run, dest, trial=rows[-1]["trial"])
    assert snapshot(tmp_path) == before  # the old bundle, whole; no picked.tmp/ or other temporary folder


# --------------------------------------------------------------------------- item 2: lost study
@pytest.mark.parametrize("study_db", ["empty", "missing", "unfinished"])
def test_results_without_their_study_stop_the_search_before_anything_is_written(
        full_run: Path, tmp_path: Path, fast_profile: Path, study_db: str) -> None:
    out = _copy(full_run, tmp_path / "run")
    (out / "study.db").unlink()
    if study_db == "empty":
        (out / "study.db").write_bytes(b"")
    elif study_db == "unfinished":
        _unfinished_study_db(out / "study.db", keep=("studies", "trials", "version_info"))
    cfg = load_run_config(str(write_yaml(tmp_path / "run.yaml", tiny_run_config(out, fast_profile))))
    before = snapshot(tmp_path)
    state = {"empty": "is empty", "missing": "is missing", "unfinished": "holds no study"}[study_db]
    with pytest.raises(ConfigError, match=state + r".*trials/.*another --out"):
        run(cfg, export=False)
    assert snapshot(tmp_path) == before


def _unfinished_study_db(path: Path, keep: tuple[str, ...] = ("studies",)) -> None:
    """What a search killed while Optuna created its tables leaves: some of them, no rows."""
    import sqlite3

    optuna.storages.RDBStorage(f"sqlite:///{path}")
    con = sqlite3.connect(path)
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables <= OPTUNA_TABLES  # the list autoprune checks against is Optuna's
    for t in tables - set(keep):
        con.execute(f"DROP TABLE {t}")
    con.execute("DROP INDEX IF EXISTS ix_studies_study_name")  # indexes come after their table
    if "version_info" in keep:
        con.execute("DELETE FROM version_info")  # its row comes after the last table
    con.commit()
    con.close()


@pytest.mark.parametrize("study_db", ["empty", "unfinished"])
def test_a_run_that_died_before_its_first_trial_still_resumes(full_run: Path, tmp_path: Path, fast_profile: Path,
                                                              study_db: str) -> None:
    """"unfinished" was found by the fault-injection test: killed right after study.db got its
    first table, the rerun refused it as another program's database; accepted as it was, the
    resume after that created a second study named 'autoprune' (no unique index) and the next
    one failed to open it."""
    out = tmp_path / "run"
    out.mkdir()
    for name in ("base_model.pt", "dense.json", "sensitivity.json", "flops_savings.json", "dense"):
        src = full_run / name
        if src.is_dir():
            shutil.copytree(src, out / name)
        elif src.is_file():
            shutil.copy2(src, out / name)
    if study_db == "empty":
        (out / "study.db").write_bytes(b"")  # what a kill while SQLite created the file can leave
    else:
        _unfinished_study_db(out / "study.db")
        with pytest.raises(ConfigError, match="stopped while creating"):
            check_sqlite_file(out / "study.db")  # not discarded where another process may be creating it
    data = tiny_run_config(out, fast_profile, trials=1, efficiency={"sensitivity_scan": True})
    cfg = load_run_config(str(write_yaml(tmp_path / "resume.yaml", data)))
    res = run(cfg, export=False)
    assert len([t for t in res.study.trials if t.state == optuna.trial.TrialState.COMPLETE]) == 1
    assert (out / "base_model.pt").read_bytes() == (full_run / "base_model.pt").read_bytes()
    run(cfg.model_copy(update={"search": cfg.search.model_copy(update={"trials": 2})}), export=False)  # resumes again
    assert optuna.get_all_study_names(f"sqlite:///{out / 'study.db'}") == ["autoprune"]


# --------------------------------------------------------------------------- item 4: corrupt study
def test_corrupt_study_message_says_what_still_works_and_it_does(full_run: Path, tmp_path: Path, fast_profile: Path) -> None:
    out = _copy(full_run, tmp_path / "run")
    (out / "study.db").write_bytes(b"this is not a database" * 100)
    cfg = load_run_config(str(write_yaml(tmp_path / "c.yaml", tiny_run_config(out, fast_profile))))
    with pytest.raises(ConfigError) as err:
        run(cfg, export=False)
    msg = str(err.value)
    assert "not a readable SQLite database" in msg and WITHOUT_STUDY in msg and "\n" not in msg
    assert "'autoprune pick' and 'autoprune remeasure' still work" in msg
    # ... they do:
    rows = load_front(out)["pareto"]
    row, dest = pick(out, tmp_path / "bundle", trial=rows[0]["trial"])
    assert json.loads((dest / "model_card.json").read_text())["trial"] == rows[0]["trial"]
    assert remeasure(out, str(fast_profile), include_dense=False)["rows"]
    # ... each pareto folder holds complete deploy files:
    for r in rows:
        assert {"model.onnx", "model.xml", "model.bin", "metadata.json"} <= set(os.listdir(out / r["artifacts"]))
    # ... and what needs the study says so, with the same message:
    for needs_study in (lambda: rebuild_trial(out, rows[0]["trial"]), lambda: write_report(out)):
        with pytest.raises(ConfigError, match="not a readable SQLite database") as e:
            needs_study()
        assert WITHOUT_STUDY in str(e.value)
    assert "resuming the search, 'autoprune export --trial' and 'autoprune report' need the study" in msg
    # moving it away does not start a new study over the old results either (item 2)
    (out / "study.db").rename(tmp_path / "study.db.bad")
    with pytest.raises(ConfigError, match="is missing"):
        run(cfg, export=False)


# --------------------------------------------------------------------------- item 5: whole folders
def test_atomic_dir_swaps_whole_folders_and_cleans_up_after_failures(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    with atomic_dir(dest) as d:
        (d / "a").write_text("1")
        assert not dest.exists()  # nothing under the final name while it is written
    with pytest.raises(RuntimeError):
        with atomic_dir(dest) as d:
            (d / "a").write_text("2")
            raise RuntimeError
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(dest) as d:
            raise KeyboardInterrupt
    assert (dest / "a").read_text() == "1" and os.listdir(tmp_path) == ["out"]


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _as_pid(path: Path, pid: int) -> Path:
    return path.with_name(path.name.replace(f"-{os.getpid()}-", f"-{pid}-"))


def test_leftovers_of_a_killed_writer_are_recovered_the_same_way_every_time(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    with atomic_dir(dest) as d:
        (d / "a").write_text("old")
    dead = _dead_pid()
    # killed between its two renames: the previous folder is its backup, the new one is complete
    backup = _as_pid(files._dir_sibling(dest, "old"), dead)
    dest.rename(backup)
    new = _as_pid(files._dir_sibling(dest, "tmp"), dead)
    new.mkdir()
    (new / "a").write_text("new")
    assert files.swap_interrupted(dest)
    # a live writer's (this process's parent stands in for it) and another machine's stay
    live = files._dir_sibling(dest, "tmp").with_name(f".out.1-{files._HOST}-{os.getppid()}-{'0' * 12}.tmp")
    foreign = tmp_path / f".out.1-otherhost-{dead}-{'0' * 12}.tmp"
    live.mkdir()
    foreign.mkdir()
    recover_dir(dest)
    assert (dest / "a").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == sorted(["out", live.name, foreign.name])
    recover_dir(dest)  # idempotent
    assert (dest / "a").read_text() == "old"


def test_concurrent_writers_of_one_folder_each_swap_in_a_whole_copy(tmp_path: Path) -> None:
    dest, errors, start = tmp_path / "out", [], threading.Barrier(4)

    def write(t: int) -> None:
        start.wait()
        try:
            for i in range(40):
                with atomic_dir(dest) as d:
                    for name in "abc":
                        (d / name).write_text(f"{t}:{i}")
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert len({(dest / n).read_text() for n in "abc"}) == 1  # one writer's copy, whole
    assert os.listdir(tmp_path) == ["out"]


def _export_front(run_dir: Path) -> list[dict[str, Any]]:
    study = optuna.load_study(study_name="autoprune", storage=f"sqlite:///{run_dir / 'study.db'}")
    example = torch.zeros(1, 1, 16, 16)  # the tiny run's input (digits at 16x16, batch 1)
    return artifacts.export_front(study, RunFolder(run_dir), example, {}, "torchscript")


def _every_complete_trial(study: optuna.Study, dense: dict[str, Any]) -> list[dict[str, Any]]:
    """A front of every complete trial: which of the tiny run's trials are non-dominated depends on
    measured latencies, and these tests need a front of several models whatever the timings."""
    from autoprune.results.front import trial_row

    rows = [trial_row(t, dense) for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))]
    return sorted(rows, key=lambda r: (r["latency_ms"], -r["accuracy"]))


def test_front_killed_between_pareto_and_pareto_json_stays_consistent(full_run: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    out = _copy(full_run, tmp_path / "run")
    monkeypatch.setattr(artifacts, "front", _every_complete_trial)
    _export_front(out)
    old = assert_front_consistent(out)
    assert len(old) >= 2
    dropped = old[0]["trial"]
    # The front changes (here: loses a trial) and the export dies right after pareto/ is swapped
    # in, before pareto.json is rewritten.
    monkeypatch.setattr(artifacts, "front", lambda study, dense: [r for r in _every_complete_trial(study, dense)
                                                                 if r["trial"] != dropped])

    def killed(*a: Any, **k: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(artifacts, "write_tables", killed)
    with pytest.raises(KeyboardInterrupt):
        _export_front(out)
    rows = assert_front_consistent(out)  # readers get the rows of the folders that are there
    assert {r["trial"] for r in rows} == {r["trial"] for r in old} - {dropped}
    assert not (out / "pareto" / f"trial_{dropped:05d}").exists()
    monkeypatch.undo()
    monkeypatch.setattr(artifacts, "front", _every_complete_trial)
    _export_front(out)  # the next export finishes the job
    assert assert_front_consistent(out) and not RunFolder(out).front_journal.exists()
    assert {r["trial"] for r in load_front(out)["pareto"]} == {r["trial"] for r in old}


def test_front_killed_between_its_two_renames_is_restored_by_the_next_export(full_run: Path, tmp_path: Path) -> None:
    out = _copy(full_run, tmp_path / "run")
    assert_front_consistent(out)
    pdir = out / "pareto"
    pdir.rename(_as_pid(files._dir_sibling(pdir, "old"), _dead_pid()))
    with pytest.raises(ConfigError, match="interrupted.*autoprune search --out"):
        load_front(out)
    _export_front(out)
    assert_front_consistent(out)


def test_failed_export_of_a_trial_leaves_the_previous_export_whole(full_run: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # Any two complete trials (export --trial N takes any, not only front ones).
    study = optuna.load_study(study_name="autoprune", storage=f"sqlite:///{full_run / 'study.db'}")
    first, second = [t.number for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))][:2]
    dest = tmp_path / "export"
    rebuild_trial(full_run, first, dest=dest)
    before = snapshot(tmp_path)

    def boom(*a: Any, **k: Any) -> None:
        raise KeyboardInterrupt  # a kill after model.onnx, before the IR and metadata.json

    monkeypatch.setattr(artifacts, "export_openvino", boom)
    with pytest.raises(KeyboardInterrupt):
        rebuild_trial(full_run, second, dest=dest)
    assert snapshot(tmp_path) == before  # trial `first`'s files, whole; no temporary folder
    assert json.loads((dest / "metadata.json").read_text())["trial"] == first

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(ConfigError, match="not a previous export"):
        rebuild_trial(full_run, first, dest=mine)
    with pytest.raises(ConfigError, match="holds it"):
        rebuild_trial(full_run, first, dest=full_run)
    assert os.listdir(mine) == ["notes.txt"]
    # a previous export the user added a file to is not replaced either (issue 23)
    monkeypatch.undo()
    (dest / "notes.txt").write_text("keep")
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match=r"did not write \(notes.txt\)"):
        rebuild_trial(full_run, second, dest=dest)
    assert snapshot(tmp_path) == before


def test_report_and_onnx_files_use_unique_temporary_names(full_run: Path, tmp_path: Path) -> None:
    # A fixed `<name>.tmp` is shared by every writer (and a stale one blocks them all).
    out = _copy(full_run, tmp_path / "run")
    (out / "report.html.tmp").mkdir()
    assert write_report(out).stat().st_size > 0
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    (tmp_path / "model.onnx.tmp").mkdir()
    export_onnx(model, torch.zeros(1, 4), tmp_path / "model.onnx", "torchscript")
    assert (tmp_path / "model.onnx").stat().st_size > 0
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]
    assert not [n for n in os.listdir(out) if n.startswith(".report")]


def test_interrupted_plot_keeps_the_previous_one(full_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.figure import Figure

    from autoprune.results.report import write_png

    study = optuna.load_study(study_name="autoprune", storage=f"sqlite:///{full_run / 'study.db'}")
    png = tmp_path / "pareto.png"
    png.write_bytes(b"previous plot")

    def half(self: Any, fname: Any, *a: Any, **k: Any) -> None:
        Path(fname).write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", half)
    with pytest.raises(KeyboardInterrupt):
        write_png(study, png, {})
    assert png.read_bytes() == b"previous plot" and os.listdir(tmp_path) == ["pareto.png"]


def test_temporary_files_of_killed_processes_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    dead, live = _dead_pid(), os.getppid()
    (tmp_path / "trials" / "00001").mkdir(parents=True)
    stale = [tmp_path / f".dense.json.{dead}-{'a' * 12}.tmp", tmp_path / "trials" / "00001" / f".model.pt.{dead}-{'b' * 12}.tmp"]
    kept = [tmp_path / f".pareto.json.{live}-{'c' * 12}.tmp", tmp_path / "trials" / "00001" / "model.pt",
            tmp_path / "notes.tmp"]
    for p in stale + kept:
        p.write_text("x")
    assert files.remove_dead_temp_files(tmp_path) == 2
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


def test_study_of_a_search_killed_mid_transaction_is_rolled_back_not_called_corrupt(tmp_path: Path) -> None:
    """Found by the fault-injection test: a kill while SQLite was writing left a hot journal, and
    the read-only check called the study corrupt ('attempt to write a readonly database')."""
    import sqlite3
    import sys

    db = tmp_path / "study.db"
    study = optuna.create_study(storage=f"sqlite:///{db}", study_name="autoprune", directions=["maximize", "minimize"])
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), 1.0), n_trials=3)
    code = (f"import os, signal, sqlite3; con = sqlite3.connect({str(db)!r}, isolation_level=None); "
            "con.execute('PRAGMA cache_size=1'); con.execute('BEGIN'); con.execute('DELETE FROM trial_values'); "
            "con.execute('UPDATE trials SET state = 1'); con.execute('CREATE TABLE spill (x)'); "
            "os.kill(os.getpid(), signal.SIGKILL)")
    subprocess.run([sys.executable, "-c", code], check=False)
    assert (tmp_path / "study.db-journal").stat().st_size > 0  # a hot journal
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        sqlite3.connect(f"file:{db}?mode=ro", uri=True).execute("SELECT name FROM sqlite_master").fetchall()
    check_sqlite_file(db)
    trials = optuna.load_study(study_name="autoprune", storage=f"sqlite:///{db}").trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3 and all(t.values for t in trials)
