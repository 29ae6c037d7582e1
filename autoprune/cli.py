"""Command line: ``autoprune search | pick | bench | groups``."""

from __future__ import annotations

import argparse
import errno
import json
import sys
from typing import Optional, Sequence

from rich.console import Console
from rich.table import Table

from autoprune.errors import AutopruneError, ConfigError
from autoprune.measure.stats import latency_ms


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


def _print_rows(console: Console, rows: list[dict], dense: Optional[dict], title: str) -> None:
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


def cmd_search(args: argparse.Namespace, console: Console) -> int:
    from autoprune.api import run
    from autoprune.config import load_run_config, parse_assignments
    from autoprune.results.front import best_under

    # Every flag lands in the run config (and so in the resume check); none is dropped.
    overrides = {
        "model": args.model, "data": args.data, "search_space": args.search_space, "device_profile": args.device_profile,
        "out": args.out, "search.trials": args.trials, "search.storage": args.storage, "search.study_name": args.study_name,
        "search.seed": args.seed, "search.sampler": args.sampler, "finetune.steps": args.finetune_steps,
        "pretrain_steps": args.pretrain_steps, "pretrain_seconds": args.pretrain_seconds, "image_size": args.image_size,
        "search.timeout_s": args.timeout, "trust_pickle": True if args.trust_pickle else None,
        "efficiency.sensitivity_scan": args.sensitivity_scan,
    }
    cfg = load_run_config(args.config, parse_assignments(args.set), **overrides)
    try:
        result = run(cfg, console=Console(stderr=True), workers=args.workers)
    except KeyboardInterrupt:
        return 130
    _print_rows(console, result.pareto, result.dense, f"Pareto front ({len(result.pareto)} models) on {result.ctx.profile.name}")
    dense_ms = latency_ms(result.dense["latency"])
    for target in result.ctx.targets_ms:  # budget mode: the answer to "the best model under my budget"
        best = best_under(result.pareto, target)
        console.print(f"target {target:.3g} ms ({dense_ms / target:.2f}x): " + (
            f"trial {best['trial']}, accuracy {best['accuracy']:.4f}, {best['latency_ms']:.3g} ms" if best else "no model under it yet"))
    console.print(f"wrote {result.out}/pareto.json, pareto.csv, pareto.png, pareto.html and {result.out}/pareto/ (wall {result.wall_s:.0f}s)")
    return 0


def cmd_pick(args: argparse.Namespace, console: Console) -> int:
    import os
    import time
    from pathlib import Path

    from autoprune.deploy.pick import pick
    from autoprune.results.front import load_front
    from autoprune.runfolder import RunFolder
    from autoprune.runlog import library_log

    # Writing a bundle takes from seconds to a minute (exports, format checks): progress lines on
    # stderr with a spinner, as search shows its own; exporter chatter to the run's log file.
    progress = Console(stderr=True)
    t0 = time.perf_counter()
    log = RunFolder(Path(args.run)).log if os.access(args.run, os.W_OK) else None
    with library_log(log), progress.status("writing the bundle", spinner="dots") as status:
        def say(line: str) -> None:
            progress.log(line)
            status.update(f"{line.split(';')[0][:70]} ({time.perf_counter() - t0:.0f}s)")

        row, dest = pick(args.run, args.dest, profile=args.profile, max_latency_ms=args.max_latency_ms, max_params=args.max_params,
                         min_accuracy=args.min_accuracy, max_flops=args.max_flops, max_size_mb=args.max_size_mb, trial=args.trial,
                         trust_pickle=args.trust_pickle, model=args.model, trust_code=args.trust_code, say=say)
    progress.log(f"bundle written in {time.perf_counter() - t0:.0f}s")
    dense = load_front(args.run).get("dense")
    _print_rows(console, [row], dense if not args.profile else None, f"picked (latency on {args.profile or dense.get('profile')})")
    console.print(f"deploy files in {dest}: " + ", ".join(sorted(p.name for p in dest.iterdir())))
    return 0


def cmd_bench(args: argparse.Namespace, console: Console) -> int:
    from autoprune.api import bench

    res = bench(args.onnx, args.device_profile, args.batch_size)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        console.print(f"{res['onnx']} on {res['profile']} ({res['backend']}, {res['threads']} threads, input {res['input_shape']}): "
                      f"median {res['median_ms']:.3f} ms, p90 {res['p90_ms']:.3f} ms, CV {res['cv']:.3f}, n={res['n']}, "
                      f"throughput {res['throughput']:.1f}/s")
    return 0


def cmd_groups(args: argparse.Namespace, console: Console) -> int:
    """Show the prunable groups of a model: the names search-space patterns match, the parts
    left unpruned and why. Same model, data, image size and search space as ``search`` would
    use with the same flags (``--config`` included)."""
    import torch

    from autoprune.config import load_run_config, load_search_space
    from autoprune.prune.plan import check_prunable
    from autoprune.prune.structure import analyse, apply_rules, probe_structure, to_prunable
    from autoprune.train.data import load_data
    from autoprune.train.models import build_model

    cfg = load_run_config(args.config, {}, model=args.model, data=args.data, search_space=args.search_space,
                          image_size=args.image_size, trust_pickle=True if args.trust_pickle else None)
    data = load_data(cfg.data, cfg.image_size, cfg.val_fraction, cfg.data_seed)
    num_classes = cfg.num_classes or data.num_classes
    model = build_model(cfg.model, num_classes, data.input_shape[0], trust_pickle=cfg.trust_pickle).eval()
    space = load_search_space(cfg.search_space)
    example = torch.zeros(1, *data.input_shape)
    try:
        with torch.no_grad():
            model(example)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"model {cfg.model} does not accept input of shape {list(example.shape)} (--image-size {cfg.image_size}): "
                          f"{_one_line(str(exc))}") from None
    probe_structure(model, example, num_classes)
    structure = analyse(model, example, num_classes)
    every = [to_prunable(g) for g in structure.groups]
    skipped = {g.name: "transformer embedding width: searched only with 'embedding: true' in the search space"
               for g in every if g.kind == "embedding" and not space.embedding}
    groups = apply_rules([g for g in every if g.name not in skipped], space.low, space.high, space.methods, space.layers, cfg.search_space)
    broken = check_prunable(model, example, [g for g in groups if g.high > 0], num_classes, space.round_unit, structure=structure)
    unprunable = {**structure.unprunable, **skipped, **{n: f"pruning it breaks the model: {why}" for n, why in broken.items()}}
    groups = [g for g in groups if g.name not in broken]
    if not console.is_terminal:  # piped: one tab-separated line per group, nothing cut
        print("group\tkind\tchannels\trange\tmethods\tmembers")
        for g in groups:
            print(f"{g.name}\t{g.kind}\t{g.channels}\t[{g.low:.2f}, {g.high:.2f}]\t{','.join(g.methods)}\t{', '.join(g.members)}")
        for name, why in unprunable.items():
            print(f"{name}\tunprunable\t\t\t\t{why}")
        print(f"{len(groups)} prunable groups of {cfg.model} at {list(data.input_shape)}; {len(unprunable)} parts not searched")
        return 0
    t = Table(title=f"prunable groups of {cfg.model} at {list(data.input_shape)}")
    for c in ("group", "kind", "channels", "range", "methods", "members"):
        t.add_column(c, overflow="fold")
    for g in groups:
        t.add_row(g.name, g.kind, str(g.channels), f"[{g.low:.2f}, {g.high:.2f}]", ",".join(g.methods), ", ".join(g.members))
    console.print(t)
    if unprunable:
        u = Table(title="not searched")
        u.add_column("part", overflow="fold")
        u.add_column("why", overflow="fold")
        for name, why in unprunable.items():
            u.add_row(name, why)
        console.print(u)
    console.print(f"{len(groups)} prunable groups; {len(unprunable)} parts not searched")
    return 0


def cmd_serve_latency(args: argparse.Namespace, console: Console) -> int:
    """Run the latency server on this (target) machine until interrupted."""
    import os
    import signal
    from pathlib import Path

    from autoprune.measure import server

    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{args.token_file}: --token-file cannot be read ({getattr(exc, 'strerror', None) or exc}); "
                              "pass a file that holds the token") from None
    else:
        token = os.environ.get(args.token_env, "")
    if not token:
        raise ConfigError(f"serve-latency needs a token: set {args.token_env} (e.g. export {args.token_env}=$(python -c "
                          "'import secrets; print(secrets.token_urlsafe(32))')) or pass --token-file")
    server.check_token(token)
    warning = server.exposure_warning(args.host, args.port)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    limits = server.ServerLimits(max_upload_mb=args.max_upload_mb, max_measure_s=args.max_measure_s,
                                 max_memory_mb=args.max_memory_mb, max_tensor_mb=args.max_tensor_mb,
                                 max_connections=args.max_connections)
    console.print("starting the measuring process (loads the runtimes) ...")
    srv = server.make_server(args.host, args.port, token, limits=limits)
    console.print(f"autoprune serve-latency on {srv.url} (POST /v1/measure, GET /v1/info; uploads up to {limits.max_upload_mb:g} MB, "
                  f"{limits.max_measure_s:g} s and {limits.max_memory_mb:g} MB per measurement, {limits.max_connections} connections)")
    # SIGTERM (systemd, docker stop) ends it like Ctrl-C: the measuring process and its files go too.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
        signal.signal(signal.SIGTERM, previous)
    return 0


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    """Self-contained HTML report of a run (plots + Pareto table); opens offline."""
    from autoprune.results.report import write_report

    dest = write_report(args.run, args.out, args.storage, args.study_name)
    console.print(f"wrote {dest} ({dest.stat().st_size / 1e6:.1f} MB, self-contained; open it in a browser)")
    return 0


def cmd_dashboard(args: argparse.Namespace, console: Console) -> int:
    """optuna-dashboard on the run's study (live while a search runs)."""
    from autoprune.results.dashboard import serve

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning:[/yellow] serving on {args.host}: optuna-dashboard has no authentication")
    console.print(f"optuna-dashboard on http://{args.host}:{args.port}/ (Ctrl-C to stop)")
    try:
        serve(args.run, args.host, args.port, args.storage)
    except KeyboardInterrupt:
        pass
    return 0


def cmd_remeasure(args: argparse.Namespace, console: Console) -> int:
    """Latency of the Pareto models on another device profile; which stay non-dominated there."""
    from autoprune.results.remeasure import remeasure

    progress = Console(stderr=True)  # progress on stderr, the table (result) on the given console
    res = remeasure(args.run, args.device_profile, say=lambda s: progress.log(s), trust_pickle=args.trust_pickle,
                    model=args.model, trust_code=args.trust_code)
    t = Table(title=f"Pareto models on {res['profile_name']} (searched on {res['search_profile']})")
    for c in ("trial", "accuracy", f"ms on {res['search_profile']}", f"ms on {res['profile_name']}", "p90 ms", "speed-up", "non-dominated"):
        t.add_column(c, justify="right")
    if res["dense"]:
        d = res["dense"]
        t.add_row("dense", f"{d['accuracy']:.4f}", "", f"{d['latency']['median_ms']:.3f}", f"{d['latency']['p90_ms']:.3f}", "1.00x", "", style="yellow")
    for r in res["rows"]:
        t.add_row(str(r["trial"]), f"{r['accuracy']:.4f}", f"{r['search_latency_ms']:.3f}", f"{r['latency_ms']:.3f}",
                  f"{r['latency']['p90_ms']:.3f}", f"{r['speedup']:.2f}x" if r.get("speedup") else "",
                  "yes" if r["non_dominated"] else "[red]no[/red]")
    console.print(t)
    console.print(f"wrote {res['path']}; pick on this target with: autoprune pick {args.run} --profile {args.device_profile} --max-latency-ms ...")
    return 0


def cmd_export(args: argparse.Namespace, console: Console) -> int:
    """Deploy files of any trial: its stored model, or rebuilt from its parameters and seed."""
    from autoprune.deploy.replay import rebuild_trial

    meta = rebuild_trial(args.run, args.trial, storage=args.storage, study_name=args.study_name, dest=args.dest,
                         rebuild=args.rebuild, tolerance=args.tolerance, console=lambda s: console.log(s),
                         trust_pickle=args.trust_pickle, model=args.model, trust_code=args.trust_code)
    chk = meta["check"]
    console.print(f"trial {args.trial} ({meta['source']}): accuracy {chk['accuracy']:.4f} (study: {chk['stored_accuracy']:.4f}); "
                  f"wrote {meta['dest']}: " + ", ".join(sorted(meta["files"].values())) + ", metadata.json")
    return 0


def _trust_flag(parser: argparse.ArgumentParser, what: str) -> None:
    """``--trust-pickle``: the one way to load a full pickle, given by whoever runs the command."""
    parser.add_argument("--trust-pickle", action="store_true",
                        help=f"also load full pickles ({what}); unpickling runs any code in the file, so only for files you trust")


def _code_flags(parser: argparse.ArgumentParser) -> None:
    """``--model`` / ``--trust-code``: a run folder never chooses which code runs (autoprune.trust);
    whoever runs the command names their model's code, or trusts the folder."""
    parser.add_argument("--model", metavar="MODULE:FUNCTION",
                        help="your model's code when the run used a package.module:function model; must equal the "
                             "one the run folder records (demo and torchvision models need nothing)")
    parser.add_argument("--trust-code", action="store_true",
                        help="import and run whatever package.module:function the run folder's files and stored "
                             "config name; only for run folders you trust")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="autoprune", description="Hardware-aware automated pruning search.")
    sub = p.add_subparsers(dest="cmd")
    s = sub.add_parser(
        "search", help="run or resume a search (default: the embedded digits demo)",
        description="Run or resume a pruning search (default: the embedded digits demo).",
        epilog="Before the first trial, the sensitivity scan (run-config key efficiency.sensitivity_scan, on by default) "
               "prunes each prunable group alone and evaluates it once, to narrow the ranges of the groups that lose "
               "the most accuracy. It costs one BN recalibration and evaluation of the model per group, whatever "
               "--trials is: seconds for the demo, often minutes for a larger model on a CPU, so it can take longer "
               "than a short search (its ETA is printed before the groups start; the result is kept in the run folder "
               "and not paid again on resume). Turn it off with --no-sensitivity-scan "
               "(= --set efficiency.sensitivity_scan=false).")
    s.add_argument("--config", help="run config: a YAML file or a shipped name (e.g. digits)")
    s.add_argument("--model", help="demo | torchvision name | module:function | checkpoint .pt")
    s.add_argument("--data", help="digits | digits-cluttered | fashion-mnist[:DIR] | cifar10:DIR | cifar100:DIR | ImageFolder dir | module:function")
    s.add_argument("--search-space", help="YAML file or shipped name (search_spaces/)")
    s.add_argument("--device-profile", help="YAML file or shipped name (device_profiles/)")
    s.add_argument("--trials", type=int, help="complete trials the study ends with (search.trials; default 20)")
    s.add_argument("--out", help="run folder (holds the study and artifacts; re-run to resume)")
    s.add_argument("--storage", help="Optuna storage URL (e.g. postgresql://...) for several workers")
    s.add_argument("--study-name", help="study name in the storage (search.study_name)")
    s.add_argument("--seed", type=int, help="sampler and fine-tune seed (search.seed; default 0)")
    s.add_argument("--sampler", choices=["nsga2", "tpe", "random", "gp"], help="Optuna sampler (search.sampler; default nsga2)")
    s.add_argument("--finetune-steps", type=int, help="distilled fine-tune steps per trial (finetune.steps; default 40)")
    s.add_argument("--pretrain-steps", type=int, help="train a model without weights for exactly this many steps (default 150)")
    s.add_argument("--pretrain-seconds", type=float,
                   help="train a model without weights for this much wall time instead of --pretrain-steps (not reproducible)")
    s.add_argument("--image-size", type=int, help="input height and width the data is resized to (digits: 16, ImageFolder: 224)")
    s.add_argument("--timeout", type=float, help="stop starting new trials after this many seconds")
    s.add_argument("--no-sensitivity-scan", dest="sensitivity_scan", action="store_const", const=False, default=None,
                   help="skip the per-group sensitivity scan before the trials (one evaluation per group, minutes on "
                        "large models; see below)")
    s.add_argument("--workers", type=int, default=1, metavar="N",
                   help="run N worker processes on this machine, each on its own GPU (training on CUDA) or its own "
                        "share of the CPU cores; the dense model is prepared once first (default 1)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="set any run-config key, dotted for sections, value in YAML (repeatable): "
                        "--set efficiency.final_finetune_steps=200 --set search.max_accuracy_drop=0.05")
    _trust_flag(s, "a --model saved with torch.save(model), or this run folder's files if an older autoprune wrote them")
    s.set_defaults(fn=cmd_search)

    k = sub.add_parser("pick", help="choose a Pareto model for a budget and write its deploy files")
    k.add_argument("run", help="run folder of a finished search")
    k.add_argument("--max-latency-ms", type=float, help="latency budget in ms (on --profile when given)")
    k.add_argument("--max-params", type=int, help="parameter budget")
    k.add_argument("--max-flops", type=float, help="FLOPs budget (one inference)")
    k.add_argument("--min-accuracy", type=float, help="lowest accepted accuracy (the task's metric)")
    k.add_argument("--max-size-mb", type=float, help="ONNX file size budget in MB (10^6 bytes)")
    k.add_argument("--trial", type=int, help="pick this Pareto trial instead of choosing by budget")
    k.add_argument("--profile", help="device profile --max-latency-ms refers to (default: the search's; others need 'autoprune remeasure')")
    k.add_argument("--dest", help="where to write the bundle (default: <run>/picked)")
    _trust_flag(k, "model files of a run folder an older autoprune wrote")
    _code_flags(k)
    k.set_defaults(fn=cmd_pick)

    rp = sub.add_parser("report", help="write a self-contained HTML report of a run")
    rp.add_argument("run", help="run folder")
    rp.add_argument("--out", help="HTML file to write (default: <run>/report.html)")
    rp.add_argument("--storage", help="Optuna storage URL when the study is not <run>/study.db")
    rp.add_argument("--study-name", help="study name in --storage")
    rp.set_defaults(fn=cmd_report)

    db = sub.add_parser("dashboard", help="start optuna-dashboard on a run's study (loopback by default)")
    db.add_argument("run", help="run folder")
    db.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; the dashboard has no login)")
    db.add_argument("--port", type=int, default=8080, help="port to listen on")
    db.add_argument("--storage", help="Optuna storage URL when the study is not <run>/study.db")
    db.set_defaults(fn=cmd_dashboard)

    rm = sub.add_parser("remeasure", help="measure a run's Pareto models on another device profile")
    rm.add_argument("run", help="run folder")
    rm.add_argument("--device-profile", required=True, help="YAML file or shipped name (device_profiles/)")
    _trust_flag(rm, "model files of a run folder an older autoprune wrote")
    _code_flags(rm)
    rm.set_defaults(fn=cmd_remeasure)

    b = sub.add_parser("bench", help="measure an ONNX file's latency on a device profile")
    b.add_argument("onnx", help="ONNX file to time")
    b.add_argument("--device-profile", default="onnxruntime-cpu", help="YAML file or shipped name (device_profiles/)")
    b.add_argument("--batch-size", type=int, help="batch size of the timed input (default: the model's, else the profile's)")
    b.add_argument("--json", action="store_true", help="print the measurement as JSON")
    b.set_defaults(fn=cmd_bench)

    ex = sub.add_parser("export", help="write deploy files of any trial (rebuilt from its parameters if its model.pt is not here)")
    ex.add_argument("run", help="run folder of the search")
    ex.add_argument("--trial", type=int, required=True, help="number of a complete trial")
    ex.add_argument("--storage", help="the study's storage URL when it is not <run>/study.db (e.g. postgresql://...)")
    ex.add_argument("--study-name", help="study name in --storage")
    ex.add_argument("--dest", help="where to write (default: <run>/export/trial_NNNNN)")
    ex.add_argument("--rebuild", action="store_true", help="re-create the model from the stored parameters even if trials/N/model.pt exists")
    ex.add_argument("--tolerance", type=float, default=0.02, help="allowed |accuracy - stored accuracy| of the model (default 0.02)")
    _trust_flag(ex, "model files of a run folder an older autoprune wrote")
    _code_flags(ex)
    ex.set_defaults(fn=cmd_export)

    g = sub.add_parser("groups", help="list a model's prunable groups (channels, attention heads) and what is left unpruned")
    g.add_argument("--config", help="run config: the model, data, image size and search space a search would use")
    g.add_argument("--model", help="demo | torchvision name | module:function | checkpoint .pt (default: the config's)")
    g.add_argument("--data", help="digits | ImageFolder dir | module:function (default: the config's)")
    g.add_argument("--search-space", help="YAML file or shipped name (default: the config's)")
    g.add_argument("--image-size", type=int, help="input height and width, as for search (digits: 16, ImageFolder: 224)")
    _trust_flag(g, "a --model saved with torch.save(model)")
    g.set_defaults(fn=cmd_groups)

    sl = sub.add_parser("serve-latency", help="on a target device: measure ONNX files sent by `backend: remote` profiles")
    sl.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 to accept other machines)")
    sl.add_argument("--port", type=int, default=8765, help="port to listen on")
    sl.add_argument("--token-env", default="AUTOPRUNE_LATENCY_TOKEN", help="environment variable holding the token")
    sl.add_argument("--token-file", help="read the token from this file instead")
    sl.add_argument("--max-upload-mb", type=float, default=256.0, help="largest request body (model + reference + input)")
    sl.add_argument("--max-measure-s", type=float, default=120.0,
                    help="seconds one request may use the device (loading, warm-up and timing together)")
    sl.add_argument("--max-memory-mb", type=float, default=4096.0,
                    help="memory the measuring process may add per model (0: no limit; needed for CUDA/TensorRT)")
    sl.add_argument("--max-tensor-mb", type=float, default=1024.0, help="largest tensor a model may declare or imply")
    sl.add_argument("--max-connections", type=int, default=32, help="open connections at once (more get 503)")
    sl.set_defaults(fn=cmd_serve_latency)
    return p


def _quiet_library_warnings() -> None:
    """torch/optuna deprecation and experimental notices are for us, not for users of the CLI.

    Optuna's INFO log (``[I ...] A new study created in RDB with name: ...``, one line per
    trial) duplicates autoprune's own progress, so the CLI keeps Optuna at WARNING. Only the
    CLI does this, and for its own process: ``autoprune.search()`` leaves Optuna's logging to
    the program that embeds it (it may rely on those lines).
    """
    import warnings

    import optuna

    for cat in (FutureWarning, DeprecationWarning, UserWarning, optuna.exceptions.ExperimentalWarning):
        warnings.filterwarnings("ignore", category=cat)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


#: OSErrors that describe the machine, never a bug in autoprune: shown as one line like an
#: AutopruneError. Others (a missing file autoprune itself should have written, ...) keep their
#: traceback.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["search"]
    args = build_parser().parse_args(argv)
    _quiet_library_warnings()
    console = Console()  # results on stdout; progress and logs go to stderr
    try:
        return args.fn(args, console)
    except AutopruneError as exc:
        print(f"error: {_one_line(str(exc))}", file=sys.stderr)  # unwrapped: users grep and paste these
        return 2
    except OSError as exc:
        if exc.errno not in _ENVIRONMENT_ERRNOS:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}; free space or choose a location you can write to", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
