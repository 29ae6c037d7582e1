"""The result table of ``search``, ``pick``: every number in full, whatever the terminal width."""

from __future__ import annotations

from typing import Optional

from rich.console import Console
from rich.table import Table

#: Result-table columns a narrow terminal drops first (least read first); trial, the metric,
#: latency, speed-up and params always stay, in full.
_DROPPABLE = ("ONNX KB", "p90 ms", "MFLOPs")


def _row_cells(rows: list[dict], dense: Optional[dict]) -> tuple[list[str], list[list[str]]]:
    metric = (dense or {}).get("metric_name", "accuracy")  # the task's metric (miou, ...)
    header = ["trial", metric, "latency ms (median)", "p90 ms", "speed-up", "MFLOPs", "params", "ONNX KB"]
    body = []
    if dense:
        body.append(["dense", f"{dense['accuracy']:.4f}", f"{dense['latency']['median_ms']:.3f}", f"{dense['latency']['p90_ms']:.3f}",
                     "1.00x", f"{dense['flops'] / 1e6:.2f}", f"{dense['params']:,}", f"{dense['onnx_bytes'] / 1024:.0f}"])
    for r in rows:
        body.append([str(r["trial"]), f"{r['accuracy']:.4f}", f"{r['latency_ms']:.3f}", f"{(r['latency_p90_ms'] or 0):.3f}",
                     f"{(r['speedup'] or 0):.2f}x", f"{(r['flops'] or 0) / 1e6:.2f}", f"{r['params']:,}", f"{(r['onnx_bytes'] or 0) / 1024:.0f}"])
    return header, body


def print_rows(console: Console, rows: list[dict], dense: Optional[dict], title: str) -> None:
    """The result table (Pareto front, picked model), every number in full.

    Not a terminal (logs, CI, a pipe): plain space-aligned text with no width limit, so no cell
    is ever cut. A terminal: a rich table whose cells never shrink below their content; when
    the window is too narrow, whole columns are dropped (:data:`_DROPPABLE`) and named below
    the table instead of showing numbers cut short ("1,527,…"), and a window too narrow even
    for the rest gets the plain layout (its lines wrap, its numbers stay whole).
    """
    header, body = _row_cells(rows, dense)
    # A column is as wide as its longest cell or its header's longest word (headers wrap at spaces).
    need = [max([len(w) for w in h.split()] + [len(r[i]) for r in body]) for i, h in enumerate(header)]

    def width(cols: list[int]) -> int:  # rich's default box: a rule per column plus one, padding 1 each side
        return sum(need[i] for i in cols) + 3 * len(cols) + 1

    keep, dropped = list(range(len(header))), []
    for name in _DROPPABLE:
        if width(keep) <= console.width:
            break
        keep.remove(header.index(name))
        dropped.append(name)
    if not console.is_terminal or width(keep) > console.width:
        widths = [max(len(c) for c in col) for col in zip(header, *body)]
        console.print(title, markup=False, highlight=False, soft_wrap=True)
        for line in [header, *body]:
            console.print("  ".join(c.rjust(w) for c, w in zip(line, widths)).rstrip(), markup=False, highlight=False,
                          soft_wrap=True)
        return
    # Fixed widths that fit, so rich never shrinks a column itself: headers on one line when
    # there is room, else wrapped at their spaces.
    natural = [max(need[i], len(header[i])) for i in range(len(header))]
    fixed = natural if sum(natural[i] for i in keep) + 3 * len(keep) + 1 <= console.width else need
    t = Table(title=title)
    for i in keep:
        t.add_column(header[i], justify="right", overflow="fold", width=fixed[i])
    for n, r in enumerate(body):
        t.add_row(*(r[i] for i in keep), style="yellow" if dense and n == 0 else None)
    console.print(t)
    if dropped:
        console.print(f"(window too narrow: {', '.join(dropped)} not shown; widen it or pipe the output for every column)",
                      highlight=False)



__all__ = ["print_rows"]
