"""Start-up time of ``autoprune --help``: two source trees, runs interleaved, medians and ratio.

    python benchmarks/startup.py                       # 69a79ea (before the lazy package root) vs this tree
    python benchmarks/startup.py --base HEAD~3 --runs 20
    python benchmarks/startup.py --base-path /src/old --new-path /src/new

Each tree is imported through PYTHONPATH by the same interpreter (this one), from an empty
working directory: ``python -m autoprune.cli --help``. ``--base`` takes a git revision and
extracts it with ``git archive`` into a temporary folder. One untimed warm-up run per tree
writes the bytecode caches; the timed runs then alternate base/new, swapping which goes first
every round, so drift in machine load hits both alike.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, imported_from, source_tree, tree_env

#: The last commit before the package reorganisation (eager ``autoprune/__init__``).
DEFAULT_BASE = "69a79ea"


def _once(path: Path, cwd: Path, args: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "autoprune.cli", *args], cwd=cwd, env=tree_env(path),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t


def measure(base: Path, new: Path, runs: int, args: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="autoprune-startup-") as empty:
        cwd = Path(empty)
        for p in (base, new):
            imported_from(p, cwd)  # the tree really is what gets imported (not an installed autoprune)
            _once(p, cwd, args)  # warm-up: bytecode caches, page cache
        times: dict[str, list[float]] = {"base": [], "new": []}
        for i in range(runs):
            order = (("base", base), ("new", new)) if i % 2 == 0 else (("new", new), ("base", base))
            for name, p in order:
                times[name].append(_once(p, cwd, args))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "command": f"python -m autoprune.cli {' '.join(args)}",
        "python": sys.version.split()[0],
        "runs_each": runs,
        "base": str(base),
        "new": str(new),
        "median_s": med,
        "min_s": {k: min(v) for k, v in times.items()},
        "ratio_base_over_new": med["base"] / med["new"],
        "times_s": times,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=DEFAULT_BASE, help=f"git revision of the base tree (default {DEFAULT_BASE})")
    ap.add_argument("--base-path", type=Path, help="source tree to use as the base instead of --base")
    ap.add_argument("--new-path", type=Path, default=REPO, help="source tree to compare (default: this one)")
    ap.add_argument("--runs", type=int, default=10, help="timed runs per tree (default 10)")
    ap.add_argument("--args", default="--help", help="CLI arguments (default --help)")
    ap.add_argument("--json", type=Path, help="also write the results (all times) here")
    a = ap.parse_args(argv)
    with contextlib.ExitStack() as stack:
        base = a.base_path or stack.enter_context(source_tree(a.base))
        res = measure(base, a.new_path, a.runs, a.args.split())
    if a.base_path is None:
        res["base"] = f"git {a.base}"
    print(f"{res['command']}  (Python {res['python']}, {a.runs} runs each, interleaved)")
    for k in ("base", "new"):
        print(f"  {k:4s} {res[k]}: median {res['median_s'][k] * 1000:.0f} ms, min {res['min_s'][k] * 1000:.0f} ms")
    print(f"  ratio base/new (medians): {res['ratio_base_over_new']:.1f}x")
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
