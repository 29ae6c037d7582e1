"""What each subcommand does; :mod:`autoprune.cli.parser` maps the subcommands to these.

Heavy modules (torch, Optuna, the runtimes) are imported inside the commands, so ``autoprune
--help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.table import Table

from autoprune.cli.flags import load_config
from autoprune.cli.tables import print_rows
from autoprune.errors import ConfigError


def one_line(text: str) -> str:
    """``text`` on one line: the CLI prints errors as one line that users grep and paste."""
    return " ".join(str(text).split())


def cmd_search(args: argparse.Namespace, console: Console) -> int:
    from autoprune.api import run
    from autoprune.results.front import best_under
    from autoprune.measure.stats import latency_ms

    cfg = load_config(args)  # every flag lands in the run config (and so in the resume check)
    try:
        result = run(cfg, console=Console(stderr=True), workers=args.workers)
    except KeyboardInterrupt:
        return 130
    print_rows(console, result.pareto, result.dense, f"Pareto front ({len(result.pareto)} models) on {result.ctx.profile.name}")
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
    print_rows(console, [row], dense if not args.profile else None, f"picked (latency on {args.profile or dense.get('profile')})")
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
    left unpruned and why. Exactly the groups ``search`` would search with the same flags
    (``--config`` included): both come from :func:`autoprune.study.context.search_groups`."""
    from autoprune.study.context import search_groups

    cfg = load_config(args)
    check = search_groups(cfg)
    groups, unprunable = check.groups, check.not_searched
    shape = list(check.example.shape[1:])
    if not console.is_terminal:  # piped: one tab-separated line per group, nothing cut
        print("group\tkind\tchannels\trange\tmethods\tmembers")
        for g in groups:
            print(f"{g.name}\t{g.kind}\t{g.channels}\t[{g.low:.2f}, {g.high:.2f}]\t{','.join(g.methods)}\t{', '.join(g.members)}")
        for name, why in unprunable.items():
            print(f"{name}\tunprunable\t\t\t\t{why}")
        print(f"{len(groups)} prunable groups of {cfg.model} at {shape}; {len(unprunable)} parts not searched")
        return 0
    t = Table(title=f"prunable groups of {cfg.model} at {shape}")
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


__all__ = ["cmd_bench", "cmd_dashboard", "cmd_export", "cmd_groups", "cmd_pick", "cmd_remeasure", "cmd_report", "cmd_search",
           "cmd_serve_latency", "one_line"]
