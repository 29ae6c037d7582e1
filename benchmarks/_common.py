"""What the benchmark scripts share, so that each one states only what it measures.

* :func:`prune`: a pruned copy of a model through autoprune's own plan machinery
  (``find_groups`` → ``PruningPlan`` → ``apply_plan``), one ratio for every group or a rule per
  group: the way a search's candidate is built, so the benchmarks time what a search would.
* :func:`timer` and :func:`interleaved`: timing on a shared machine. Every compared variant is
  timed in the same rounds, round-robin (or A B, B A with ``alternate``), so drift in machine load
  hits all of them alike; only ratios or medians of such rounds are worth quoting.
* :func:`source_tree`, :func:`tree_env` and :func:`imported_from`: another revision of this
  repository, extracted with ``git archive``, run in a subprocess that imports autoprune from
  that tree alone (for before/after comparisons such as ``startup.py`` and
  ``serve_concurrency.py``).

Only the standard library is imported here at module level: ``startup.py`` times a process start
and must not pay for torch in its own.
"""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, TypeVar, Union

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

    from autoprune.prune.structure import PrunableGroup

#: The repository this file belongs to.
REPO = Path(__file__).resolve().parents[1]
K = TypeVar("K", bound=Hashable)


# --------------------------------------------------------------------------- pruning
def prune(model: "nn.Module", x: "torch.Tensor", num_classes: Optional[int],
          ratio: Union[float, Callable[["PrunableGroup"], float]], *, groups: Optional[Sequence["PrunableGroup"]] = None,
          round_to: int = 8, method: str = "l1", granularity: str = "structured", weight_ratio: float = 0.0,
          calib: Optional[list[Any]] = None) -> tuple["nn.Module", dict[str, tuple[int, int]]]:
    """A pruned copy of ``model`` (in eval mode) and its widths ``{group: (before, after)}``.

    ``ratio`` is one ratio for every group, or a function of the group (its ``name``, ``kind``,
    ``channels``) called once per group in ``find_groups`` order, so a seeded random rule draws
    the same plan every run. ``groups``: the groups of ``model`` when the caller already has them
    (analysing the dense model once, as a search does); ``method``, ``granularity`` and
    ``weight_ratio`` apply to every group. ``model`` itself is not changed.
    """
    from autoprune.prune.plan import PruningPlan, apply_plan
    from autoprune.prune.structure import find_groups

    if groups is None:
        groups = find_groups(model, x, num_classes)
    rule = ratio if callable(ratio) else (lambda _g: float(ratio))  # type: ignore[arg-type]
    plan = PruningPlan({g.name: float(rule(g)) for g in groups}, round_to=round_to, default_method=method,
                       default_granularity=granularity, weight_ratios={g.name: weight_ratio for g in groups})
    pruned = copy.deepcopy(model)
    widths = apply_plan(pruned, x, plan, num_classes, calib)
    return pruned.eval(), widths


# --------------------------------------------------------------------------- timing
def timer(fn: Callable[..., Any], *args: Any, clock: str = "wall") -> Callable[[], float]:
    """A zero-argument callable: one call of ``fn(*args)``, returning its seconds.

    ``clock="wall"``: ``time.perf_counter``. ``clock="cpu"``: the process's CPU time (user +
    system, all threads), which does not count the time slices other jobs take from a 1-thread
    inference on a shared CPU, only the work of this process.
    """
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    tick = time.process_time if clock == "cpu" else time.perf_counter

    def one() -> float:
        t0 = tick()
        fn(*args)
        return tick() - t0

    return one


def interleaved(timers: Mapping[K, Callable[[], float]], rounds: int, per_round: int = 1, warmup: int = 0,
                alternate: bool = False) -> dict[K, list[list[float]]]:
    """Seconds of every timed call, ``{key: [round 0's samples, round 1's, ...]}``.

    First ``warmup`` untimed calls of each timer (round-robin too), then ``rounds`` rounds; in
    each, every timer in turn runs ``per_round`` times in a row. With ``alternate``, every other
    round runs the timers in reverse order (A B, B A, ...), so that for two variants neither
    always runs right after the other.
    """
    keys = list(timers)
    for _ in range(warmup):
        for k in keys:
            timers[k]()
    out: dict[K, list[list[float]]] = {k: [] for k in keys}
    for r in range(rounds):
        for k in (keys[::-1] if alternate and r % 2 else keys):
            one = timers[k]
            out[k].append([one() for _ in range(per_round)])
    return out


def flat(rounds: list[list[float]]) -> list[float]:
    """All samples of :func:`interleaved`'s rounds for one key, in order."""
    return [s for r in rounds for s in r]


# --------------------------------------------------------------------------- another source tree
@contextlib.contextmanager
def source_tree(rev: str, *paths: str) -> Iterator[Path]:
    """Revision ``rev`` of this repository (only ``paths`` when given, e.g. ``"autoprune"``),
    extracted with ``git archive`` into a temporary folder that is removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="autoprune-tree-") as tmp:
        archive = subprocess.run(["git", "archive", rev, *paths], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        yield Path(tmp)


def tree_env(tree: Path, **extra: str) -> dict[str, str]:
    """This process's environment for a subprocess that imports autoprune from ``tree`` alone:
    PYTHONPATH is ``tree`` (PYTHONHOME and PYTHONSTARTUP dropped), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PYTHONPATH"] = str(Path(tree).resolve())  # the subprocess may run in another folder
    env.update(extra)
    return env


def imported_from(tree: Path, cwd: Path) -> str:
    """The ``autoprune/__init__.py`` a subprocess with :func:`tree_env` imports; SystemExit when
    it is not inside ``tree`` (an installed or editable autoprune would win otherwise unnoticed)."""
    out = subprocess.run([sys.executable, "-c", "import autoprune; print(autoprune.__file__)"], cwd=cwd,
                         env=tree_env(tree), capture_output=True, text=True, check=True).stdout.strip()
    if not Path(out).resolve().is_relative_to(Path(tree).resolve()):
        raise SystemExit(f"PYTHONPATH={tree} imports autoprune from {out}")
    return out
