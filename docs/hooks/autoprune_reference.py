"""mkdocs hook: the reference pages' tables are generated from the code at build time.

A page holds a marker such as ``<!-- autoprune:config RunConfig -->`` and the hook replaces it
with a table made from the pydantic model (keys, types, defaults, and the ``#:`` comment above
each field in ``autoprune/config/``), the argparse parser (``autoprune.cli.build_parser``),
``RunFolder``'s paths or the shipped YAML folders. Nothing is copied by hand, so the docs cannot
drift from the code; ``tests/config/test_docs.py`` renders the pages through this hook and fails when
a key or flag has no entry with a description.
"""

from __future__ import annotations

import argparse
import inspect
import re
import textwrap
import typing
from pathlib import Path
from typing import Any, Iterator, Optional

from pydantic import BaseModel

MARKER = re.compile(r"<!--\s*autoprune:(\w[\w-]*)(?:\s+([^>]*?))?\s*-->")


# --------------------------------------------------------------------------- config models
def field_comments(cls: type) -> dict[str, str]:
    """``#:`` comment lines directly above each field of ``cls`` (Sphinx's attribute-comment form)."""
    try:
        lines = textwrap.dedent(inspect.getsource(cls)).splitlines()
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    pending: list[str] = []
    for line in lines[1:]:
        s = line.strip()
        if s.startswith("#:"):
            pending.append(s[2:].strip())
            continue
        m = re.match(r"^    (\w+)\s*:", line)  # a field at class-body level
        if m and pending:
            out[m.group(1)] = " ".join(pending)
        if s and not s.startswith("#"):
            pending = []
    return out


def _nested_model(annotation: Any) -> tuple[Optional[type[BaseModel]], bool]:
    """The BaseModel inside ``annotation`` (``X``, ``Optional[X]``, ``list[X]``) and whether it is a list."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    origin = typing.get_origin(annotation)
    for arg in typing.get_args(annotation):
        model, _ = _nested_model(arg)
        if model is not None:
            return model, origin is list
    return None, False


def _type_text(annotation: Any) -> str:
    text = repr(annotation) if not isinstance(annotation, type) else annotation.__name__
    text = re.sub(r"typing\.|autoprune\.config\.(\w+\.)?", "", text)
    text = text.replace("NoneType", "null")
    return text


def _yaml(value: Any) -> str:
    """A default as it is written in YAML (``true``, ``null``, ``[0.25, 0.5]``)."""
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def _default_text(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        return "(section)" if isinstance(value, BaseModel) else f"`{_yaml(value)}`"
    if field.is_required():
        return "required"
    return f"`{_yaml(field.default)}`"


def _limits(field: Any) -> str:
    """Bounds from ``Field(ge=..., gt=...)`` and a pattern, as text."""
    parts = []
    for meta in field.metadata:
        for attr, sym in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            v = getattr(meta, attr, None)
            if v is not None:
                parts.append(f"{sym} {v}")
        pattern = getattr(meta, "pattern", None)
        if pattern:
            parts.append(f"matches `{pattern}`")
    return ", ".join(parts)


#: What a key's resume mark (``autoprune.config.resume``) means, added to its description.
RESUME_NOTES = {"free": "Changing it does not stop a run from resuming.",
                "runtime": "Not part of the resume check: it may differ between the workers and sessions of one study."}


def config_rows(cls: type[BaseModel], prefix: str = "") -> Iterator[dict[str, str]]:
    """One row per key of ``cls``, dotted for sections (``search.trials``), ``[]`` for lists of sections."""
    comments = field_comments(cls)
    for name, field in cls.model_fields.items():
        if field.exclude and name != "trust_pickle":
            continue
        key = f"{prefix}{name}"
        nested, is_list = _nested_model(field.annotation)
        desc = field.description or comments.get(name, "")
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        note = RESUME_NOTES.get(str(extra.get("resume")), "")
        if nested is not None and not desc:  # the section's own docstring, not BaseModel's
            desc = inspect.cleandoc(nested.__dict__.get("__doc__") or "").split("\n\n")[0].replace("\n", " ")
        desc = f"{desc} {note}".strip()
        if nested is not None:
            yield {"key": key + ("[]" if is_list else ""), "type": "list of sections" if is_list else "section",
                   "default": _default_text(field) if is_list else "", "description": desc}
            yield from config_rows(nested, key + ("[]." if is_list else "."))
            continue
        limits = _limits(field)
        yield {"key": key, "type": _type_text(field.annotation) + (f" ({limits})" if limits else ""),
               "default": _default_text(field), "description": desc}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def config_table(class_name: str) -> str:
    from autoprune import config

    cls = getattr(config, class_name)
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for r in config_rows(cls):
        rows.append(f"| `{r['key']}` | {_cell(r['type'])} | {_cell(r['default'])} | {_cell(r['description'])} |")
    return "\n".join(rows)


# --------------------------------------------------------------------------- CLI
# argparse has no public way to list a parser's subcommands and arguments; ``_actions``,
# ``_SubParsersAction``, ``_choices_actions`` and ``_HelpAction`` have been stable since Python 3.2,
# and tests/config/test_docs.py fails (rather than rendering an empty page) if they change.
def _subparsers(parser: argparse.ArgumentParser) -> dict[str, tuple[argparse.ArgumentParser, str]]:
    for action in parser._actions:  # argparse has no public accessor for its subcommands
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return {name: (p, helps.get(name, "")) for name, p in action.choices.items()}
    return {}


def cli_rows(sub: argparse.ArgumentParser) -> Iterator[dict[str, str]]:
    for a in sub._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        names = ", ".join(a.option_strings) if a.option_strings else a.dest.upper()
        if a.nargs == 0:
            value = ""
        else:
            value = a.metavar or (a.type.__name__.upper() if isinstance(a.type, type) else a.dest.upper())
            if a.choices:
                value = "{" + ",".join(map(str, a.choices)) + "}"
        default = "" if a.default in (None, False, [], argparse.SUPPRESS) else f"`{a.default}`"
        if a.required:
            default = "required"
        yield {"flag": names, "value": str(value), "default": default, "help": a.help or "", "dest": a.dest,
               "options": a.option_strings}


def cli_reference() -> str:
    from autoprune.cli import build_parser

    out = []
    for name, (sub, help_text) in _subparsers(build_parser()).items():
        out += [f"## `autoprune {name}`", "", help_text[:1].upper() + help_text[1:] + ".", "",
                "```text", sub.format_usage().replace("usage: ", "").strip(), "```", "",
                "| argument | value | default | what it does |", "|---|---|---|---|"]
        for r in cli_rows(sub):
            out.append(f"| `{r['flag']}` | {_cell(r['value'])} | {_cell(r['default'])} | {_cell(r['help'])} |")
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------- run folder, shipped files
#: What a run-folder path holds, for ``RunFolder`` members whose docstring does not say it.
RUN_FOLDER_NOTES = {
    "study_db": "The Optuna study (SQLite) when no --storage is given; running the same command again resumes it.",
    "base_model": "The dense model (weights-only): every trial's starting point and distillation teacher; reused only for the model it was built from.",
    "dense_json": "The dense model's accuracy (held-out, trials' subset, test), FLOPs, params and latency on the profile.",
    "dense_onnx": "The dense model exported to ONNX, as its latency was measured.",
    "sensitivity": "Per-group accuracy drop of the sensitivity scan (efficiency.sensitivity_scan).",
    "flops_savings": "FLOPs fraction each group saves, for the sensitivity-allocated seeds.",
    "latency_cache": "Latencies of architectures already measured on a profile (device profile cache: true).",
    "trial": "One trial's files: model.pt (weights-only) and model.onnx; model_final.pt after a final fine-tune.",
    "final_json": "Final-stage results of the Pareto models (longer fine-tune, whole held-out and test splits).",
    "pareto_dir": "One folder per Pareto model: model.onnx, model.xml/.bin, model.pt, state_dict.pt, metadata.json.",
    "pareto_json": "The front: every Pareto row with its metrics and files (what pick reads).",
    "pareto_csv": "The front's numbers, one row per model.",
    "pareto_png": "Plot of the front.",
    "pareto_html": "Interactive plot of the front.",
    "report_html": "autoprune report: one self-contained HTML page (plots, Pareto table, failed trials).",
    "remeasure_dir": "autoprune remeasure: the front's latencies on other device profiles.",
    "remeasure": "The front's latencies on one other profile (pick --profile reads it).",
    "picked": "autoprune pick: the deploy bundle (default --dest).",
    "export": "autoprune export --trial N: deploy files of any complete trial (default --dest).",
}


def run_folder_table() -> str:
    from autoprune.runfolder import RunFolder

    root = Path("RUN")
    run = RunFolder(root)
    rows = ["| path | what it holds |", "|---|---|"]
    examples = {"trial": (0,), "predictor": ("<profile>-<hash>",), "staircases": ("<fingerprint>",),
                "remeasure": ("<profile>",), "export": (17,), "budget_model": ("<label>",)}
    for name, member in inspect.getmembers(RunFolder):
        if name.startswith("_") or name in ("own_entries", "written_in_place", "root"):
            continue
        doc = inspect.getdoc(member) or ""
        if isinstance(member, property):
            path = getattr(run, name)
        elif callable(member) and name in examples:
            path = getattr(run, name)(*examples[name])
            if name == "trial":
                path = path.root
        else:
            continue
        rel = Path(path).relative_to(root).as_posix() if isinstance(path, Path) else str(path)
        rows.append(f"| `{rel}{'/' if name in ('pareto_dir', 'remeasure_dir', 'picked', 'trial', 'export') else ''}` | "
                    f"{_cell(doc.split(chr(10) + chr(10))[0].replace(chr(10), ' ')) or RUN_FOLDER_NOTES.get(name, '')} |")
    return "\n".join(rows[:2] + sorted(rows[2:], key=lambda r: r.lower()))


def shipped_table(folder: str) -> str:
    """The shipped YAML files of one folder: name and the comment at the top of the file."""
    import yaml

    from autoprune.config import shipped_dir

    rows = ["| name | key settings | notes |", "|---|---|---|"]
    keys = {"device_profiles": ("backend", "device", "threads", "precision", "mode", "batch_size"),
            "search_spaces": ("low", "high", "step", "round_to", "methods"),
            "run_configs": ("model", "data", "pretrain_steps", "device_profile", "search_space")}[folder]
    for p in sorted(shipped_dir(folder).glob("*.yaml")):
        text = p.read_text()
        data = yaml.safe_load(text) or {}
        note = " ".join(l.lstrip("# ").strip() for l in text.splitlines() if l.startswith("#"))
        settings = ", ".join(f"{k}: {data[k]}" for k in keys if k in data)
        rows.append(f"| `{p.stem}` | {_cell(settings)} | {_cell(note)} |")
    return "\n".join(rows)


GENERATORS = {
    "config": config_table,
    "cli": lambda _arg=None: cli_reference(),
    "run-folder": lambda _arg=None: run_folder_table(),
    "shipped": shipped_table,
}


def render(markdown: str) -> str:
    """``markdown`` with every ``<!-- autoprune:... -->`` marker replaced by its generated text."""
    def one(m: re.Match[str]) -> str:
        kind, arg = m.group(1), (m.group(2) or "").strip() or None
        if kind not in GENERATORS:
            raise ValueError(f"unknown docs marker autoprune:{kind}; known: {', '.join(GENERATORS)}")
        return GENERATORS[kind](arg) if arg is not None else GENERATORS[kind]()

    return MARKER.sub(one, markdown)


def on_page_markdown(markdown: str, page: Any = None, config: Any = None, files: Any = None, **_: Any) -> str:
    """mkdocs event: runs on every page's Markdown before it is converted."""
    return render(markdown)


# --------------------------------------------------------------------------- benchmark plots
REPO = Path(__file__).resolve().parents[2]
#: Plots drawn from the committed benchmark results at build time: image path -> drawing function.
BUDGET_RESULTS = ("search_vs_baselines_fmnist_resnet18.json", "search_vs_baselines_fmnist_mobilenet_v2.json")


def budget_benchmark_png() -> bytes:
    """Test accuracy of each method's chosen model per speed-up target (mean ± sd over seeds),
    one panel per model, from ``benchmarks/results/search_vs_baselines_fmnist_*.json``."""
    import io
    import json
    import statistics

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for name in BUDGET_RESULTS:
        data = json.loads((REPO / "benchmarks" / "results" / name).read_text())
        for model, entry in data.items():
            if isinstance(entry, dict) and "seeds" in entry:
                panels.append((model, entry))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for ax, (model, entry) in zip(axes[0], panels):
        seeds = [r for r in entry["seeds"].values() if r.get("done")]
        keys = sorted({k for r in seeds for k in r["chosen"]})
        methods = list(dict.fromkeys(k.split("/")[0] for k in keys))
        targets = sorted({k.split("/")[1] for k in keys}, key=lambda t: float(t.rstrip("x")))
        for i, meth in enumerate(methods):
            xs, ys, es = [], [], []
            for t in targets:
                vals = [100 * r["chosen"][f"{meth}/{t}"]["test_accuracy"] for r in seeds if r["chosen"].get(f"{meth}/{t}")]
                if vals:
                    xs.append(float(t.rstrip("x")) + (i - len(methods) / 2) * 0.04)
                    ys.append(statistics.mean(vals))
                    es.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=meth, lw=2.2 if meth == "autoprune" else 1.2)
        ax.axhline(100 * entry["dense"]["test_accuracy"], color="grey", ls="--", lw=1, label="dense")
        ax.set_title(f"{model}, Fashion-MNIST ({len(seeds)} seeds)")
        ax.set_xlabel("speed-up target (onnxruntime-cpu, measured)")
        ax.set_ylabel("test accuracy of the chosen model (%)")
        ax.set_xticks([float(t.rstrip("x")) for t in targets], targets)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


PLOTS = {"img/budget_benchmark.png": budget_benchmark_png}


def on_files(files: Any, config: Any, **_: Any) -> Any:
    """mkdocs event: add the benchmark plots, drawn now from the committed results."""
    from mkdocs.structure.files import File

    for path, draw in PLOTS.items():
        files.append(File.generated(config, path, content=draw()))
    return files
