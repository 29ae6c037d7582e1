"""The docs cannot drift from the code: every run-config, search-space and device-profile key and
every CLI flag has an entry, with a description, in the rendered reference pages (the tables are
generated at build time by docs/hooks/autoprune_reference.py; `mkdocs build --strict` in .ci/run
checks links). README stays a short front page that starts with the two fresh-machine commands."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from autoprune import config
from autoprune.cli import build_parser

from conftest import ROOT

REPO = ROOT
DOCS = REPO / "docs"


def _hook():
    spec = importlib.util.spec_from_file_location("autoprune_reference", DOCS / "hooks" / "autoprune_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rendered(page: str) -> str:
    return _hook().render((DOCS / page).read_text())


def _keys(cls: type[BaseModel], prefix: str = "") -> list[str]:
    """Every key a user can write, dotted (``search.trials``), ``[]`` for lists of sections."""
    out = []
    for name, field in cls.model_fields.items():
        hook = _hook()
        nested, is_list = hook._nested_model(field.annotation)
        key = prefix + name
        if nested is not None:
            out += _keys(nested, key + ("[]." if is_list else "."))
        else:
            out.append(key)
    return out


def _table_rows(markdown: str) -> dict[str, str]:
    """First cell (a code span) -> last cell of every table row."""
    rows = {}
    for line in markdown.splitlines():
        m = re.match(r"^\| `([^`]+)` \|(.*)\|\s*$", line)
        if m:
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", m.group(2))]
            rows[m.group(1)] = cells[-1]
    return rows


@pytest.mark.parametrize("page, cls", [("reference/run-config.md", config.RunConfig),
                                       ("reference/search-space.md", config.SearchSpace),
                                       ("reference/device-profile.md", config.DeviceProfile)])
def test_every_config_key_has_a_described_entry(page: str, cls: type[BaseModel]) -> None:
    rows = _table_rows(_rendered(page))
    keys = _keys(cls)
    assert len(keys) > 10
    missing = [k for k in keys if k not in rows]
    assert not missing, f"{page}: no entry for {missing}"
    undescribed = [k for k in keys if not rows[k]]
    assert not undescribed, f"{page}: add a '#:' comment above these fields in autoprune/config/: {undescribed}"


def test_every_cli_flag_has_a_described_entry() -> None:
    text = _rendered("reference/cli.md")
    hook = _hook()
    subs = hook._subparsers(build_parser())
    assert {"search", "pick", "bench", "export", "remeasure", "report", "dashboard", "groups", "serve-latency"} <= set(subs)
    for name, (sub, help_text) in subs.items():
        section = text.split(f"## `autoprune {name}`", 1)
        assert len(section) == 2, f"no section for autoprune {name}"
        rows = _table_rows(section[1].split("\n## ", 1)[0])
        assert help_text, f"autoprune {name} has no help"
        for action in sub._actions:
            if not action.option_strings and action.dest == "help":
                continue
            for flag in action.option_strings or [action.dest.upper()]:
                if flag in ("-h", "--help"):
                    continue
                row = next((v for k, v in rows.items() if flag in k.split(", ")), None)
                assert row is not None, f"autoprune {name}: no entry for {flag}"
                assert row, f"autoprune {name} {flag}: no help text (give it help= in autoprune/cli.py)"


def test_generated_tables_follow_the_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """A key added to the model appears in the page without editing the page."""
    class Extra(config.FinetuneConfig):
        #: A key that exists only in this test.
        warmup_steps: int = 0

    monkeypatch.setattr(config.RunConfig.model_fields["finetune"], "annotation", Extra)
    rows = _table_rows(_rendered("reference/run-config.md"))
    assert rows.get("finetune.warmup_steps") == "A key that exists only in this test."


def test_resume_marks_are_documented_from_the_schema() -> None:
    rows = _table_rows(_rendered("reference/run-config.md"))
    hook = _hook()
    assert rows["search.trials"].endswith(hook.RESUME_NOTES["free"]) and rows["train"].endswith(hook.RESUME_NOTES["runtime"])
    assert hook.RESUME_NOTES["free"] not in rows["finetune.steps"]
    assert _table_rows(_rendered("reference/device-profile.md"))["token_env"].endswith(hook.RESUME_NOTES["free"])


def test_run_folder_and_shipped_files_are_listed() -> None:
    rows = _table_rows(_rendered("reference/run-folder.md"))
    assert {"study.db", "base_model.pt", "pareto.json", "pareto/", "dense.json"} <= set(rows)
    assert not [k for k, v in rows.items() if not v], "run-folder paths without a description"
    for page, folder in (("reference/device-profile.md", "device_profiles"), ("reference/search-space.md", "search_spaces"),
                         ("reference/run-config.md", "run_configs")):
        rows = _table_rows(_rendered(page))
        assert {p.stem for p in (REPO / folder).glob("*.yaml")} <= set(rows), page


def test_every_page_is_in_the_nav() -> None:
    import yaml

    nav = yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]

    def pages(node) -> list[str]:
        if isinstance(node, str):
            return [node]
        if isinstance(node, dict):
            return [p for v in node.values() for p in pages(v)]
        return [p for v in node for p in pages(v)]

    listed = set(pages(nav))
    on_disk = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert on_disk == listed


def test_readme_is_short_and_starts_with_the_two_commands() -> None:
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    assert blocks[0].strip() == ("python3 -m venv .venv && . .venv/bin/activate && pip install -c constraints.txt -e '.[cpu]' "
                                 "&& autoprune search")
    assert blocks[1].strip() == "python3 -m venv .venv && . .venv/bin/activate && bash scripts/test.sh"
    # .ci/run runs the README's test command
    assert "bash scripts/test.sh" in (REPO / ".ci" / "run").read_text()
