"""Course material: every notebook has checked exercises; `diffugts notebooks --student` writes valid student copies
that hold no answer, whose checks fail as shipped (shown by running one); the solution notebooks are never overwritten.
The solution versions run in CI with the notebooks themselves (tests/test_notebooks.py)."""

import ast
import hashlib
import re
import shutil
from pathlib import Path

import nbformat
import numpy as np
import pytest

from diffugts_core.cli import main
from diffugts_core.course import BEGIN_SOLUTION, END_SOLUTION, exercises

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _code(source: str) -> str:
    """A cell's source as Python: IPython magics and shell lines left out."""
    return "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))


def _bound(source: str) -> set[str]:
    """Names a piece of code binds (assignments, imports, definitions)."""
    names = set()
    for node in ast.walk(ast.parse(_code(source))):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    return names


def _read(source: str) -> set[str]:
    return {node.id for node in ast.walk(ast.parse(_code(source)))
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}


def _answer(source: str) -> str:
    return source.split(BEGIN_SOLUTION, 1)[1].split(END_SOLUTION, 1)[0]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_notebook_has_two_to_four_checked_exercises(path):
    notebook = nbformat.read(path, as_version=4)
    found = exercises(notebook)
    assert 2 <= len(found) <= 4, f"{path.name}: {len(found)} exercises"
    for exercise in found:
        solution, check = notebook.cells[exercise.solution], notebook.cells[exercise.check]
        assert solution.source.count(BEGIN_SOLUTION) == solution.source.count(END_SOLUTION) == 1
        assert check.metadata["nbgrader"]["points"] > 0 and "assert " in check.source
        # the check reads a name only the answer binds: without the answer it cannot pass
        earlier = set().union(*(_bound(c.source) for c in notebook.cells[:exercise.solution] if c.cell_type == "code"))
        given = _bound(solution.source.replace(_answer(solution.source), ""))
        answered = _bound(_answer(solution.source)) - earlier - given
        assert answered & _read(check.source), f"{path.name} {exercise.grade_id}: the check reads nothing the answer binds"


@pytest.fixture(scope="module")
def student_copies(tmp_path_factory):
    out = tmp_path_factory.mktemp("student")
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in NOTEBOOKS}
    assert main(["notebooks", "--student", str(out), "--from", str(ROOT / "notebooks")]) == 0
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in NOTEBOOKS} == before
    return out


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_student_copy_is_valid_and_holds_no_answer(student_copies, path):
    solution = nbformat.read(path, as_version=4)
    student_file = student_copies / path.name
    student = nbformat.read(student_file, as_version=4)
    nbformat.validate(student)
    text = student_file.read_text()
    assert "BEGIN SOLUTION" not in text and "END SOLUTION" not in text
    assert len(student.cells) == len(solution.cells)
    found = exercises(solution)
    answers = {e.solution for e in found}
    elsewhere = {line.strip() for i, cell in enumerate(solution.cells) if i not in answers
                 for line in cell.source.splitlines()}  # a check may repeat a line of the answer
    student_lines = {line.strip() for cell in student.cells for line in cell.source.splitlines()}
    for exercise in found:
        answer = _answer(solution.cells[exercise.solution].source)
        for line in (line.strip() for line in answer.splitlines()):
            if line and not line.startswith("#") and line not in elsewhere:
                assert line not in student_lines, f"{path.name} {exercise.grade_id}: answer line left in: {line!r}"
        assert "raise NotImplementedError()" in student.cells[exercise.solution].source
        check = student.cells[exercise.check]
        assert check.source == solution.cells[exercise.check].source  # checks stay, locked
        assert check.metadata.get("editable") is False and check.metadata.get("deletable") is False
    assert all(not c.outputs for c in student.cells if c.cell_type == "code")


@pytest.mark.notebook
def test_student_copy_fails_every_check_when_run(student_copies, tmp_path):
    """Notebook 01's student copy, run in smoke mode with errors allowed: every answer cell stops at its stub and every
    check fails; every other cell runs."""
    from nbclient import NotebookClient

    notebook = nbformat.read(student_copies / "01_data_and_phantoms.ipynb", as_version=4)
    parameters = notebook.cells[next(i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", []))]
    parameters.source = re.sub(r"^SMOKE = False", "SMOKE = True", parameters.source, flags=re.M)
    parameters.source = re.sub(r"^OUTPUT_DIR = .*$", f"OUTPUT_DIR = {str(tmp_path)!r}", parameters.source, flags=re.M)
    NotebookClient(notebook, kernel_name="python3", allow_errors=True, timeout=600,
                   resources={"metadata": {"path": str(ROOT)}}).execute()
    found = exercises(notebook)
    graded = {index for e in found for index in (e.solution, e.check)}
    errors = {i: next((o["ename"] for o in cell.outputs if o["output_type"] == "error"), None)
              for i, cell in enumerate(notebook.cells) if cell.cell_type == "code"}
    assert all(errors[e.solution] == "NotImplementedError" for e in found), errors
    assert all(errors[e.check] in ("NameError", "AssertionError") for e in found), errors
    assert not {i: e for i, e in errors.items() if e and i not in graded}


def test_student_copies_never_overwrite_the_notebooks(tmp_path, capsys):
    source = tmp_path / "notebooks"
    shutil.copytree(ROOT / "notebooks", source, ignore=shutil.ignore_patterns("regression"))
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    assert main(["notebooks", "--student", str(source), "--from", str(source)]) == 2
    assert "is an input of this run" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before
    assert main(["notebooks", "--student", str(tmp_path / "out"), "--from", str(tmp_path / "nowhere")]) == 2
    assert "no numbered notebooks" in capsys.readouterr().err


def test_html_copies_keep_each_widgets_picture(tmp_path):
    """`diffugts notebooks --html OUT --executed DIR`: an executed notebook whose widget output carries a picture
    becomes a page that shows the picture; the widget view and the saved widget state (drawn only with a kernel or a
    CDN) are gone, and the executed notebook is left as it was."""
    import base64

    from diffugts_core import viz

    executed = tmp_path / "executed"
    executed.mkdir()
    png = viz.figure_png(viz.orthogonal_figure(np.zeros((8, 8, 8))))
    widget = nbformat.v4.new_output("display_data", data={
        "application/vnd.jupyter.widget-view+json": {"model_id": "abc", "version_major": 2, "version_minor": 0},
        "image/png": base64.b64encode(png).decode(), "text/plain": "[slice viewer: an interactive widget]"})
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("viewer.widget()", outputs=[widget])])
    notebook.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {"abc": {}}}}
    path = executed / "00_quickstart.ipynb"
    nbformat.write(notebook, path)
    before = path.read_bytes()
    assert main(["notebooks", "--html", str(tmp_path / "html"), "--executed", str(executed)]) == 0
    page = (tmp_path / "html" / "00_quickstart.html").read_text()
    assert f'src="data:image/png;base64,{base64.b64encode(png).decode()}' in page
    assert "widget-view+json" not in page and "widget-state+json" not in page
    assert not re.search(r'<(script|link|img)[^>]+(src|href)="(https?:)?//', page)  # nothing from the network
    assert path.read_bytes() == before
