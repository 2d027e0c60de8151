"""The README tells the truth and stays a front door: at most 250 lines; its two commands exist and CI runs the test
command; its quickstart runs on the public API; its notebooks table, CLI summary and results table match the notebooks,
the parser and docs/results; every relative link in it and in docs/ resolves."""

import ast
import json
import re
from pathlib import Path

import pytest

import diffugts_core
from diffugts_core.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = sorted((ROOT / "docs").rglob("*.md"))
NOTEBOOKS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "notebooks").rglob("*.ipynb")
                   if ".ipynb_checkpoints" not in p.parts)
MAX_LINES = 250


def _section(text: str, heading: str) -> str:
    """The body of the level-2 section ``## heading``, up to the next level-2 heading."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"no '## {heading}' section"
    return match.group(1)


def _without_code(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def _slug(heading: str) -> str:  # GitHub's anchor for a heading
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", _without_code(path.read_text()), re.M)}


def _subcommands() -> dict:
    parser = build_parser()
    return next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices


def _parameters(notebook: str) -> str:
    cells = json.loads((ROOT / notebook).read_text())["cells"]
    return next("".join(c["source"]) for c in cells
                if c["cell_type"] == "code" and "parameters" in c.get("metadata", {}).get("tags", []))


def _tables(text: str) -> list[list[dict[str, str]]]:
    """Every markdown table of ``text`` as a list of rows, each a dict from column header to cell."""
    tables, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
        elif block:
            header, rows = block[0], [r for r in block[2:] if len(r) == len(block[0])]
            tables.append([dict(zip(header, r)) for r in rows])
            block = []
    return tables


def _quickstart() -> str:
    match = re.search(r"<!-- quickstart[^>]*-->\s*```python\n(.*?)^```", README, re.M | re.S)
    assert match, "the quickstart block (```python after the <!-- quickstart --> marker) is missing"
    return match.group(1)


def test_readme_is_a_front_door_of_at_most_250_lines():
    assert len(README.splitlines()) <= MAX_LINES, "move details to docs/ (results/, findings/, method.md, cli.md)"


def test_two_commands_are_make_targets_and_ci_runs_the_test_command():
    assert "make demo" in README and "make test" in README
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "diffugts demo" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_organ_label_table_matches_the_generator():
    cells = re.findall(r"\| (\d+) \| ([a-z_]+) ", (ROOT / "docs" / "phantombench.md").read_text())
    assert {name: int(i) for i, name in cells} == diffugts_core.ORGAN_LABELS


def test_layout_names_every_module_of_the_package_and_no_other():
    block = re.search(r"^```\ndiffugts_core/\n(.*?)^\S", _section(README, "Layout"), re.M | re.S).group(1)
    listed = re.findall(r"^  (\S+)", block, re.M)
    package = ROOT / "diffugts_core"
    actual = [p.name for p in package.glob("*.py")] + [f"{p.name}/" for p in package.iterdir()
                                                        if (p / "__init__.py").is_file()]
    assert sorted(listed) == sorted(actual), "update the README's Layout: one line per module or subpackage"


# --- notebooks -------------------------------------------------------------------------------------------------------

def test_notebooks_table_lists_every_notebook_once_with_measured_time_and_memory():
    rows = [row for table in _tables(_section(README, "Notebooks")) for row in table if "Notebook" in row]
    linked = [re.fullmatch(r"\[[^\]]+\]\(([^)]+)\)", row["Notebook"]).group(1) for row in rows]
    assert sorted(linked) == NOTEBOOKS, "one row per notebook in notebooks/, and no other"
    for row in rows:
        assert re.search(r"\d+(\.\d+)? ?(s|min)\b", row["Time"]), f"{row['Notebook']}: time {row['Time']!r}"
        assert re.search(r"\d+(\.\d+)? ?(MiB|GiB|MB|GB)\b", row["Peak memory"]), f"{row['Notebook']}: {row['Peak memory']!r}"


def test_each_notebook_states_its_measured_time_and_memory_at_the_top_as_the_readme_does():
    rows = [row for table in _tables(_section(README, "Notebooks")) for row in table if "Notebook" in row]
    for row in rows:
        path = re.fullmatch(r"\[[^\]]+\]\(([^)]+)\)", row["Notebook"]).group(1)
        if "regression" in path:
            continue
        first = json.loads((ROOT / path).read_text())["cells"][0]
        line = next((line for line in "".join(first["source"]).splitlines() if line.startswith("**Time and memory**")),
                    None)
        assert line, f"{path}: the first cell needs a '**Time and memory**' line (README's notebooks table)"
        assert row["Time"] in line and row["Peak memory"] in line, f"{path}: {line!r} vs README {row}"


def test_notebook_parameters_the_readme_names_are_in_the_notebooks():
    sentence = re.search(r"`parameters` cell holding (.*?), plus the case or setting it explores \(e\.g\. (.*?)\)",
                         " ".join(README.split()))
    assert sentence, "the sentence that names the notebooks' parameters is missing"
    every, some = (re.findall(r"`([A-Z_]+)`", part) for part in sentence.groups())
    cells = {notebook: _parameters(notebook) for notebook in NOTEBOOKS}
    for name in every:
        missing = [nb for nb, cell in cells.items() if not re.search(rf"^{name} =", cell, re.M)]
        assert not missing, f"{name} is not a parameter of {missing}"
    for name in some:
        assert any(re.search(rf"^{name} =", cell, re.M) for cell in cells.values()), name


def test_notebooks_link_to_readme_headings_that_exist():
    anchors = _anchors(ROOT / "README.md")
    for notebook in NOTEBOOKS:
        for anchor in re.findall(r"README\.md#([\w-]+)", (ROOT / notebook).read_text()):
            assert anchor in anchors, f"{notebook} links to README.md#{anchor}"


# --- the command line ------------------------------------------------------------------------------------------------

def test_cli_summary_has_one_line_per_subcommand():
    listed = re.findall(r"^- `diffugts ([a-z][a-z-]*)`", _section(README, "Command line"), re.M)
    assert len(listed) == len(set(listed)), "a subcommand is listed twice"
    assert sorted(listed) == sorted(_subcommands()), "the CLI summary and the parser disagree"


def _commands(text: str) -> list[str]:
    """Every `diffugts ...` the text shows: inline code spans and command lines in code blocks (comments dropped)."""
    inline = re.findall(r"`(diffugts [^`]+)`", _without_code(text))
    blocks = [line.split(" #")[0] for block in re.findall(r"^```.*?^```", text, re.M | re.S)
              for line in block.splitlines() if line.startswith("diffugts ")]
    return [c.replace("\\|", "|") for c in inline + blocks]


@pytest.mark.parametrize("path", [ROOT / "README.md", *DOCS], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_command_shown_exists_with_its_options(path):
    subcommands = _subcommands()
    # findings describe past experiments, some with options since removed: there only the subcommand must exist
    check_options = "findings" not in path.parts
    for command in _commands(path.read_text()):
        if command.endswith("..."):  # shortened in a table (docs/bad_inputs.md): its last word is cut
            command = command.rsplit(" ", 1)[0]
        name = command.split()[1]
        if name.startswith("-"):
            continue
        assert name in subcommands, f"{path.name}: `{command}` names no subcommand"
        if check_options:
            known = set(subcommands[name]._option_string_actions)
            unknown = [o for o in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", command) if o not in known]
            assert not unknown, f"{path.name}: `{command}`: {name} has no {unknown}"


# --- results ---------------------------------------------------------------------------------------------------------

_RESULT_SOURCES = {  # README setting -> (file in docs/results, its section holding the tables)
    "leave one category out": ("zero_shot_ct.md", "Leave one category out"),
    "seen {liver, kidney, pancreas} -> unseen": ("zero_shot_ct.md", "Seen -> unseen"),
    "CT -> MRI": ("zero_shot_mri.md", None),
}
_METHODS = {"DiffuGTS DSC": ("DiffuGTS", "DSC"), "DiffuGTS NSD": ("DiffuGTS", "NSD"),
            "AOVA only DSC": ("AOVA only", "DSC"), "Reconstruction baseline DSC": ("Reconstruction baseline", "DSC"),
            "Supervised upper bound DSC": ("Supervised upper bound", "DSC")}


def _docs_figure(text: str, method: str, category: str, metric: str) -> str | None:
    """The cell of ``method`` for ``category``/``metric`` in a results table of ``text`` (mean: the table of every
    category, where one exists)."""
    found = None
    for table in _tables(text):
        for row in table:
            if not row.get("Method", "").startswith(method):
                continue
            for column in (f"{category} {metric}", category if metric == "DSC" else None):
                if column in row:
                    found = row[column]  # the last table wins: for the leave-one-out mean, the six-column one
    return found


def test_readme_results_table_matches_docs_results():
    rows = [row for table in _tables(_section(README, "Results")) for row in table]
    assert rows, "the README has no results table"
    setting = None
    for row in rows:
        setting = row["Setting"] or setting
        doc, heading = _RESULT_SOURCES[setting]
        text = (ROOT / "docs" / "results" / doc).read_text()
        text = _section(text, heading) if heading else text
        category = row["Unseen category"].strip("*").replace("hepatic vessel", "hepatic_vessel")
        for column, (method, metric) in _METHODS.items():
            readme = row[column].strip("*")
            docs = _docs_figure(text, method, category, metric)
            if readme == "none":
                assert docs in (None, "n/a"), (setting, category, column)
            else:
                assert docs == readme, f"{setting}, {category}, {column}: README {readme}, docs/results/{doc} {docs}"
    assert "(docs/results/README.md)" in README


# --- links -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [ROOT / "README.md", *DOCS], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(path):
    text = re.sub(r"`[^`\n]*`", "", _without_code(path.read_text()))
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        assert resolved.exists(), f"{path.relative_to(ROOT)}: link to {target}, which does not exist"
        if anchor and resolved.suffix == ".md":
            assert anchor in _anchors(resolved), f"{path.relative_to(ROOT)}: no heading for #{anchor} in {file or path.name}"


# --- the quickstart --------------------------------------------------------------------------------------------------

def test_quickstart_is_ten_lines_of_public_api():
    code = _quickstart()
    assert len([line for line in code.splitlines() if line.strip()]) <= 10
    tree = ast.parse(code)
    imports = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert [(alias.name, alias.asname) for node in imports for alias in node.names] == [("diffugts_core", "dg")]
    used = {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "dg"}
    assert used and used <= set(diffugts_core.__all__), f"not public: {used - set(diffugts_core.__all__)}"


def test_quickstart_reads_only_attributes_its_objects_have():
    """The quickstart's call is the demo's (same case, same pipeline call: `diffugts demo` and notebook 00 run it in CI,
    each held to the gated DSC of that case); here, without the minutes a run takes, every attribute it reads off the
    case and the result must exist."""
    from dataclasses import fields

    from diffugts_core.data.phantoms import PhantomCase
    from diffugts_core.pipeline import SegmentationResult

    tree = ast.parse(_quickstart())
    read = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ("case", "result"):
            read.setdefault(node.value.id, set()).add(node.attr)
    has = {"case": {f.name for f in fields(PhantomCase)} | set(dir(PhantomCase)),
           "result": {f.name for f in fields(SegmentationResult)} | set(dir(SegmentationResult))}
    assert read and all(read[name] <= has[name] for name in read), {n: read[n] - has[n] for n in read}
