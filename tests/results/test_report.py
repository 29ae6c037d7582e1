"""The HTML run report (checked in a real headless chromium) and the optuna-dashboard live view."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from autoprune.results.report import write_plots, write_report
from autoprune.runfolder import RunFolder

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not installed: run scripts/ci_browser.sh (apt-get install chromium) to check the report in a browser"
)


@pytest.fixture(scope="module")
def report(run_copy) -> Path:
    # a re-measure on another target shows up as extra table columns
    front = json.loads((run_copy / "pareto.json").read_text())["pareto"]
    rows = [{"trial": r["trial"], "accuracy": r["accuracy"], "latency_ms": 2 * r["latency_ms"],
             "latency": {"median_ms": 2 * r["latency_ms"]}, "non_dominated": i == 0} for i, r in enumerate(front)]
    (run_copy / "remeasure").mkdir()
    (run_copy / "remeasure" / "other-target.json").write_text(json.dumps({"profile_name": "other-target", "rows": rows, "dense": None}))
    return write_report(run_copy)


def test_report_is_self_contained_and_complete(report, tiny_run):
    html = report.read_text()
    assert report.name == "report.html" and report.parent.name == "run"
    # offline: plotly.js is inline, nothing is fetched
    assert not re.search(r"<script[^>]+src=", html)
    start = html.index("<script type='text/javascript'>")
    plotly_js = html[start:html.index("</script>", start)]
    assert len(plotly_js) > 1_000_000 and "Plotly" in plotly_js
    assert "http://" not in html.replace(plotly_js, "") and "https://" not in html.replace(plotly_js, "")
    for div in ("plot-pareto", "plot-trials", "plot-ratios", "plot-hypervolume"):
        assert f'id="{div}"' in html
    assert "dense baseline" in html
    # the table has the dense row and one row per Pareto model, with the re-measured column
    table = html[html.index("<table class='front'>"):]
    front = tiny_run.pareto
    assert table.count("<tr") == 2 + len(front)
    for r in front:
        assert f"<td>{r['trial']}</td><td>{r['accuracy']:.4f}</td><td>{r['latency_ms']:.3f}</td>" in table
        assert f"<td>{2 * r['latency_ms']:.3f}</td>" in table
    assert "latency ms (other-target)" in table and "non-dominated on other-target" in table


def test_write_plots_still_writes_png_and_html(tiny_run, tmp_path):
    write_plots(tiny_run.study, RunFolder(tmp_path), tiny_run.dense)
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "Plotly" in (tmp_path / "pareto.html").read_text()


def test_report_cli_and_errors(run_copy, tmp_path, capsys):
    from autoprune.cli import main

    out = tmp_path / "r.html"
    assert main(["report", str(run_copy), "--out", str(out)]) == 0
    assert out.stat().st_size > 1_000_000
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no study.db" in capsys.readouterr().err


def _chromium(url: str) -> tuple[str, list[str]]:
    """Load ``url`` headless; return the DOM after scripts ran and the page's console messages."""
    with tempfile.TemporaryDirectory() as profile_dir:
        p = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile_dir}", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000",
             "--dump-dom", url],
            capture_output=True, text=True, timeout=120,
        )
    assert p.returncode == 0, p.stderr[-2000:]
    # chromium logs every console.* call and uncaught exception of the page as INFO:CONSOLE
    console = [ln for ln in p.stderr.splitlines() if ":CONSOLE" in ln]
    return p.stdout, console


@needs_chromium
def test_console_detector_catches_page_errors(tmp_path):
    """Control: the console check below would see an error if there was one."""
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>console.error('boom'); notDefined();</script></body></html>")
    _, console = _chromium(bad.as_uri())
    assert any("boom" in c for c in console) and any("notDefined" in c for c in console)


@needs_chromium
def test_report_renders_in_headless_chromium(report, tiny_run):
    dom, console = _chromium(report.as_uri())
    assert console == [], console
    # every figure was drawn by plotly.js (the div gets the js-plotly-plot class and an SVG)
    for div in ("plot-pareto", "plot-trials", "plot-ratios", "plot-hypervolume"):
        m = re.search(rf'<div id="{div}" class="([^"]*)"', dom)
        assert m and "js-plotly-plot" in m.group(1), div
    assert dom.count('class="main-svg"') >= 4
    # the all-trials plot draws one marker per finished trial plus the dense star
    trials = dom[dom.index('id="plot-trials"'):dom.index('id="plot-ratios"')]
    n_complete = len([t for t in tiny_run.study.trials if t.state.name == "COMPLETE"])
    assert trials.count('class="point"') == n_complete + 1
    heat = dom[dom.index('id="plot-ratios"'):dom.index('id="plot-hypervolume"')]
    assert 'class="hm"' in heat  # the heat-map image was rendered


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dashboard_serves_the_study_on_loopback(run_copy, tiny_run):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "autoprune.cli", "dashboard", str(run_copy), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        data, deadline = None, time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as resp:
                    data = json.loads(resp.read())
                    break
            except OSError:
                time.sleep(0.5)
        assert data is not None, proc.stdout.read() if proc.poll() is not None else "dashboard did not answer in 60 s"
        studies = data["study_summaries"]
        assert [s["study_name"] for s in studies] == ["autoprune"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{studies[0]['study_id']}", timeout=30) as resp:
            detail = json.loads(resp.read())
        assert detail["objective_names"] == ["accuracy", "latency_ms"]  # named by autoprune, not "Objective 0"
        assert len(detail["trials"]) == len(tiny_run.study.trials)
        # loopback only by default: the listening socket's address is 127.0.0.1 (Linux /proc view)
        tcp = Path("/proc/net/tcp")
        if tcp.exists():
            listening = [ln.split()[1] for ln in tcp.read_text().splitlines()[1:]
                         if ln.split()[1].endswith(f":{port:04X}") and ln.split()[3] == "0A"]
            assert listening == [f"0100007F:{port:04X}"], listening
    finally:
        proc.terminate()
        proc.wait(timeout=10)
