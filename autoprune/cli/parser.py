"""The argument parser: subcommands, their flags and help (``docs/reference/cli.md`` is generated
from it). Flags that set run-config keys come from one table (:mod:`autoprune.cli.flags`)."""

from __future__ import annotations

import argparse

from autoprune.cli.commands import (
    cmd_bench,
    cmd_dashboard,
    cmd_export,
    cmd_groups,
    cmd_pick,
    cmd_remeasure,
    cmd_report,
    cmd_search,
    cmd_serve_latency,
)
from autoprune.cli.flags import GROUPS_FLAGS, add_config_flags


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
    add_config_flags(s)
    s.add_argument("--workers", type=int, default=1, metavar="N",
                   help="run N worker processes on this machine, each on its own GPU (training on CUDA) or its own "
                        "share of the CPU cores; the dense model is prepared once first (default 1)")
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

    g = sub.add_parser("groups", help="list a model's prunable groups (channels, attention heads) and what is left unpruned",
                       description="List the groups a search with the same flags would search (the same config, data, "
                                   "model, device profile input and search space), and the parts it leaves unpruned.")
    add_config_flags(g, only=GROUPS_FLAGS)
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


__all__ = ["build_parser"]
