"""The README tells the truth: its two commands exist, CI runs its test command, its tables match the code."""

import re
from pathlib import Path

from diffugts_core.phantoms import ORGAN_LABELS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_two_commands_are_make_targets_and_ci_runs_the_test_command():
    assert "make demo" in README and "make test" in README
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "diffugts demo" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_organ_label_table_matches_the_generator():
    cells = re.findall(r"\| (\d+) \| ([a-z_]+) ", README)
    assert {name: int(i) for i, name in cells} == ORGAN_LABELS


def test_every_notebook_is_in_the_table_and_the_picture_exists():
    for notebook in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"):
        assert f"(notebooks/{notebook.name})" in README, notebook.name
    for picture in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README):
        assert (ROOT / picture).is_file(), picture
