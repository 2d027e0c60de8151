"""Course material from the notebooks: student copies without the exercise answers, and HTML copies to read without
a kernel.

Each checked exercise in a notebook is a solution cell (nbgrader metadata ``solution: true``, its answer between
``### BEGIN SOLUTION`` and ``### END SOLUTION``) followed by a check cell (``grade: true``: asserts, an autograded
test in nbgrader's sense). A student copy is what nbgrader's ``generate_assignment`` makes of it: nbgrader's own
``ClearSolutions`` replaces each answer with ``raise NotImplementedError()``, ``LockCells`` locks the checks, and the
outputs are cleared.

An HTML copy is an executed notebook as a reader with no kernel sees it. The kit's widgets carry a static picture in
their display data (``viz``); the copy keeps that picture, or the widget's one-line text, and drops the widget views
and their saved state, which only a live kernel or a CDN could draw.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import nbformat

from .io import InputError, write_text_atomic

NOTEBOOK_PATTERN = "[0-9][0-9]_*.ipynb"  # the numbered notebooks; notebooks/regression is CI's, not a lesson
BEGIN_SOLUTION, END_SOLUTION = "### BEGIN SOLUTION", "### END SOLUTION"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


@dataclass
class Exercise:
    """One checked exercise: the answer cell and the check cell under it (indices into the notebook's cells)."""
    grade_id: str
    solution: int
    check: int


def exercises(notebook: nbformat.NotebookNode) -> list[Exercise]:
    """The notebook's checked exercises, in order. A solution cell must be followed by its check cell."""
    found = []
    for index, cell in enumerate(notebook.cells):
        grading = cell.metadata.get("nbgrader", {})
        if not grading.get("solution"):
            continue
        following = notebook.cells[index + 1].metadata.get("nbgrader", {}) if index + 1 < len(notebook.cells) else {}
        if not following.get("grade") or following.get("solution"):
            raise ValueError(f"exercise {grading.get('grade_id')!r} (cell {index}) has no check cell under it")
        found.append(Exercise(grading["grade_id"], index, index + 1))
    return found


def student_version(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A copy of ``notebook`` with every answer replaced by a stub, the check cells locked and no outputs."""
    from nbconvert.preprocessors import ClearOutputPreprocessor
    from nbgrader.preprocessors import ClearSolutions, LockCells

    student = nbformat.from_dict(notebook)  # a deep copy: the solution notebook stays as it is
    resources: dict = {}
    for preprocessor in (ClearSolutions(), LockCells(), ClearOutputPreprocessor()):
        student, resources = preprocessor.preprocess(student, resources)
    nbformat.validate(student)
    return student


def _numbered_notebooks(folder: Path) -> list[Path]:
    notebooks = sorted(folder.glob(NOTEBOOK_PATTERN))
    if not notebooks:
        raise InputError(f"{folder}: no numbered notebooks (NN_name.ipynb) in it; run from the repository root or "
                         "pass --from with the kit's notebooks folder.")
    return notebooks


def write_student_copies(source: str | Path, out: str | Path) -> list[Path]:
    """A student copy of every numbered notebook in ``source``, written atomically to ``out`` under the same names."""
    source, out = Path(source), Path(out)
    notebooks = _numbered_notebooks(source)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in notebooks:
        student = student_version(nbformat.read(path, as_version=4))
        written.append(write_text_atomic(out / path.name, nbformat.writes(student)))
    return written


def static_copy(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A copy of an executed notebook without widgets: each widget output keeps its static picture (``image/png``)
    when it carries one, else its plain-text line; the notebook's saved widget state goes."""
    static = nbformat.from_dict(notebook)
    static.metadata.pop("widgets", None)
    for cell in static.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if WIDGET_VIEW in data:
                del data[WIDGET_VIEW]
    return static


# JupyterLab's page without the scripts it fetches from a CDN (require.js for widgets, MathJax, Mermaid): the copies
# hold no widgets, formulas or diagrams, and a page that loads nothing reads the same offline
OFFLINE_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""


def html_copy(notebook: nbformat.NotebookNode) -> str:
    """An executed notebook as one self-contained HTML page (pictures inline, nothing fetched from the network), with
    its widgets as pictures."""
    import jinja2
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(extra_loaders=[jinja2.DictLoader({"offline.html.j2": OFFLINE_TEMPLATE})],
                            template_file="offline.html.j2", embed_images=True)
    body, _ = exporter.from_notebook_node(static_copy(notebook))
    return body


def write_html_copies(source: str | Path, out: str | Path, *, smoke: bool = False, executed: str | Path | None = None,
                      timeout: int | None = None) -> list[Path]:
    """Run every numbered notebook in ``source`` with papermill (``smoke``: ``SMOKE = True``) and write its HTML copy
    to ``out`` (``NN_name.html``, atomically). With ``executed``, convert the executed copies in that folder instead
    of running anything."""
    source, out = Path(source), Path(out)
    notebooks = _numbered_notebooks(Path(executed) if executed else source)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in notebooks:
        if executed:
            notebook = nbformat.read(path, as_version=4)
        else:
            notebook = _execute(path, smoke=smoke, timeout=timeout)
        written.append(write_text_atomic(out / f"{path.stem}.html", html_copy(notebook)))
    return written


def _execute(path: Path, *, smoke: bool, timeout: int | None) -> nbformat.NotebookNode:
    import papermill

    with tempfile.TemporaryDirectory(prefix=f"diffugts-{path.stem}-") as scratch:
        executed = Path(scratch) / path.name
        # the repository root as working folder, as the notebooks are written to be run from there
        papermill.execute_notebook(str(path), str(executed), parameters={"SMOKE": smoke, "OUTPUT_DIR": scratch},
                                   kernel_name="python3", cwd=str(path.resolve().parents[1]), progress_bar=False,
                                   execution_timeout=timeout)
        return nbformat.read(executed, as_version=4)
