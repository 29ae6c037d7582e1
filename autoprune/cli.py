"""Command line: ``autoprune search | pick | bench | groups``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from rich.console import Console
from rich.table import Table

from .config import ConfigError


def _fmt_row_table(rows: list[dict], dense: Optional[dict], title: str) -> Table:
    t = Table(title=title)
    for c in ("trial", "accuracy", "latency ms (median)", "p90 ms", "speed-up", "MFLOPs", "params", "ONNX KB"):
        t.add_column(c, justify="right")
    if dense:
        t.add_row("dense", f"{dense['accuracy']:.4f}", f"{dense['latency']['median_ms']:.3f}", f"{dense['latency']['p90_ms']:.3f}", "1.00x",
                  f"{dense['flops'] / 1e6:.2f}", f"{dense['params']:,}", f"{dense['onnx_bytes'] / 1024:.0f}", style="yellow")
    for r in rows:
        t.add_row(str(r["trial"]), f"{r['accuracy']:.4f}", f"{r['latency_ms']:.3f}", f"{(r['latency_p90_ms'] or 0):.3f}",
                  f"{(r['speedup'] or 0):.2f}x", f"{(r['flops'] or 0) / 1e6:.2f}", f"{r['params']:,}", f"{(r['onnx_bytes'] or 0) / 1024:.0f}")
    return t


def cmd_search(args: argparse.Namespace, console: Console) -> int:
    from .api import run
    from .config import load_run_config

    overrides = {
        "model": args.model, "data": args.data, "search_space": args.search_space, "device_profile": args.device_profile,
        "out": args.out, "search.trials": args.trials, "search.storage": args.storage, "search.study_name": args.study_name,
        "search.seed": args.seed, "search.sampler": args.sampler, "finetune.steps": args.finetune_steps,
        "pretrain_seconds": args.pretrain_seconds, "search.timeout_s": args.timeout,
    }
    cfg = load_run_config(args.config, **overrides)
    try:
        result = run(cfg, console=console)
    except KeyboardInterrupt:
        return 130
    console.print(_fmt_row_table(result.pareto, result.dense, f"Pareto front ({len(result.pareto)} models) on {result.ctx.profile.name}"))
    console.print(f"wrote {result.out}/pareto.json, pareto.csv, pareto.png, pareto.html and {result.out}/pareto/ (wall {result.wall_s:.0f}s)")
    return 0


def cmd_pick(args: argparse.Namespace, console: Console) -> int:
    from .deploy import load_front, pick

    row, dest = pick(args.run, args.dest, max_latency_ms=args.max_latency_ms, max_params=args.max_params,
                     min_accuracy=args.min_accuracy, max_flops=args.max_flops, trial=args.trial)
    dense = load_front(args.run).get("dense")
    console.print(_fmt_row_table([row], dense, "picked"))
    console.print(f"deploy files in {dest}: " + ", ".join(sorted(p.name for p in dest.iterdir())))
    return 0


def cmd_bench(args: argparse.Namespace, console: Console) -> int:
    from .api import bench

    res = bench(args.onnx, args.device_profile, args.batch_size)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        console.print(f"{res['onnx']} on {res['profile']} ({res['backend']}, {res['threads']} threads, input {res['input_shape']}): "
                      f"median {res['median_ms']:.3f} ms, p90 {res['p90_ms']:.3f} ms, CV {res['cv']:.3f}, n={res['n']}, "
                      f"throughput {res['throughput']:.1f}/s")
    return 0


def cmd_groups(args: argparse.Namespace, console: Console) -> int:
    """Show the prunable groups of a model: the names search-space patterns match."""
    import torch

    from .config import load_search_space
    from .data import load_data
    from .models import build_model
    from .structure import apply_rules, find_groups

    data = load_data(args.data)
    model = build_model(args.model, data.num_classes, data.input_shape[0])
    space = load_search_space(args.search_space)
    groups = apply_rules(find_groups(model, torch.zeros(1, *data.input_shape), data.num_classes), space.low, space.high, space.methods, space.layers, args.search_space)
    t = Table(title=f"prunable groups of {args.model}")
    for c in ("group", "channels", "range", "methods", "members"):
        t.add_column(c)
    for g in groups:
        t.add_row(g.name, str(g.channels), f"[{g.low:.2f}, {g.high:.2f}]", ",".join(g.methods), ", ".join(g.members))
    console.print(t)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="autoprune", description="Hardware-aware automated pruning search.")
    sub = p.add_subparsers(dest="cmd")
    s = sub.add_parser("search", help="run or resume a search (default: the embedded digits demo)")
    s.add_argument("--config", help="run config YAML (e.g. examples/digits.yaml)")
    s.add_argument("--model", help="demo | torchvision name | module:function | checkpoint .pt")
    s.add_argument("--data", help="digits | ImageFolder dir | module:function")
    s.add_argument("--search-space", help="YAML file or shipped name (search_spaces/)")
    s.add_argument("--device-profile", help="YAML file or shipped name (device_profiles/)")
    s.add_argument("--trials", type=int)
    s.add_argument("--out", help="run folder (holds the study and artifacts; re-run to resume)")
    s.add_argument("--storage", help="Optuna storage URL (e.g. postgresql://...) for several workers")
    s.add_argument("--study-name")
    s.add_argument("--seed", type=int)
    s.add_argument("--sampler", choices=["nsga2", "tpe", "random", "gp"])
    s.add_argument("--finetune-steps", type=int)
    s.add_argument("--pretrain-seconds", type=float)
    s.add_argument("--timeout", type=float, help="stop starting new trials after this many seconds")
    s.set_defaults(fn=cmd_search)

    k = sub.add_parser("pick", help="choose a Pareto model for a budget and write its deploy files")
    k.add_argument("run", help="run folder of a finished search")
    k.add_argument("--max-latency-ms", type=float)
    k.add_argument("--max-params", type=int)
    k.add_argument("--max-flops", type=float)
    k.add_argument("--min-accuracy", type=float)
    k.add_argument("--trial", type=int)
    k.add_argument("--dest", help="where to write the bundle (default: <run>/picked)")
    k.set_defaults(fn=cmd_pick)

    b = sub.add_parser("bench", help="measure an ONNX file's latency on a device profile")
    b.add_argument("onnx")
    b.add_argument("--device-profile", default="onnxruntime-cpu")
    b.add_argument("--batch-size", type=int)
    b.add_argument("--json", action="store_true")
    b.set_defaults(fn=cmd_bench)

    g = sub.add_parser("groups", help="list a model's prunable channel groups")
    g.add_argument("--model", default="demo")
    g.add_argument("--data", default="digits")
    g.add_argument("--search-space", default="default")
    g.set_defaults(fn=cmd_groups)
    return p


def _quiet_library_warnings() -> None:
    """torch/optuna deprecation and experimental notices are for us, not for users of the CLI."""
    import warnings

    import optuna

    for cat in (FutureWarning, DeprecationWarning, UserWarning, optuna.exceptions.ExperimentalWarning):
        warnings.filterwarnings("ignore", category=cat)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["search"]
    args = build_parser().parse_args(argv)
    _quiet_library_warnings()
    console = Console(stderr=True)
    from .backends import BackendUnavailable

    try:
        return args.fn(args, console)
    except (ConfigError, BackendUnavailable) as exc:
        console.print(f"[red]error:[/red] {exc}", markup=True, highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
