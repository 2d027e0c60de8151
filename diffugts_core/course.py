"""Course material from the notebooks: student copies without the exercise answers.

Each checked exercise in a notebook is a solution cell (nbgrader metadata ``solution: true``, its answer between
``### BEGIN SOLUTION`` and ``### END SOLUTION``) followed by a check cell (``grade: true``: asserts, an autograded
test in nbgrader's sense). A student copy is what nbgrader's ``generate_assignment`` makes of it: nbgrader's own
``ClearSolutions`` replaces each answer with ``raise NotImplementedError()``, ``LockCells`` locks the checks, and the
outputs are cleared.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nbformat

from .io import InputError, write_text_atomic

NOTEBOOK_PATTERN = "[0-9][0-9]_*.ipynb"  # the numbered notebooks; notebooks/regression is CI's, not a lesson
BEGIN_SOLUTION, END_SOLUTION = "### BEGIN SOLUTION", "### END SOLUTION"


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


def write_student_copies(source: str | Path, out: str | Path) -> list[Path]:
    """A student copy of every numbered notebook in ``source``, written atomically to ``out`` under the same names."""
    source, out = Path(source), Path(out)
    notebooks = sorted(source.glob(NOTEBOOK_PATTERN))
    if not notebooks:
        raise InputError(f"{source}: no numbered notebooks (NN_name.ipynb) in it; run from the repository root or "
                         "pass --from with the kit's notebooks folder.")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in notebooks:
        student = student_version(nbformat.read(path, as_version=4))
        written.append(write_text_atomic(out / path.name, nbformat.writes(student)))
    return written
