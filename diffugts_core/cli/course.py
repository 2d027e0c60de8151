"""``diffugts notebooks``: course material from the notebooks (student copies without the exercise answers)."""

from __future__ import annotations

from pathlib import Path


def add_notebooks(subparsers) -> None:
    parser = subparsers.add_parser(
        "notebooks", help="write student copies of the notebooks (exercise answers taken out)",
        description="Write a student copy of every numbered notebook: each exercise's answer replaced by "
        "'raise NotImplementedError()' (nbgrader's ClearSolutions), the check cells locked, no outputs. "
        "The notebooks themselves are the solution versions and are never overwritten.")
    parser.add_argument("--student", type=Path, required=True, metavar="OUT", help="folder for the student copies")
    parser.add_argument("--from", dest="source", type=Path, default=Path("notebooks"),
                        help="the kit's notebooks folder (default: ./notebooks)")
    parser.set_defaults(run=_run_notebooks, paths=lambda args: (
        [args.source], [("folder", args.student, "student copies folder")]))


def _run_notebooks(args) -> int:
    from ..course import write_student_copies

    written = write_student_copies(args.source, args.student)
    print(f"wrote {len(written)} student notebooks to {args.student}")
    return 0
