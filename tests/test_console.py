"""What a user sees on the console: full numbers in result tables, progress while `pick`
works, autoprune's own lines only (library chatter goes to the run's log file)."""

from __future__ import annotations

import io
import json
import re
import shutil

import pytest
from rich.console import Console

from autoprune.cli import _print_rows, main

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


def test_pick_prints_full_params_when_piped(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run.out, run)
    assert main(["pick", str(run)]) == 0
    out = capsys.readouterr().out
    dense = json.loads((run / "pareto.json").read_text())["dense"]
    meta = json.loads((run / "picked" / "metadata.json").read_text())
    assert f"{dense['params']:,}" in out and "…" not in out
    assert re.search(rf"^\s*{meta['trial']}\s+\d\.\d{{4}}\s", out, re.M), out
