"""``diffugts notebooks``: course material from the notebooks (student copies without the exercise answers, HTML
copies to read without a kernel)."""

from __future__ import annotations

from pathlib import Path


def add_notebooks(subparsers) -> None:
    parser = subparsers.add_parser(
        "notebooks", help="write student copies of the notebooks, or HTML copies of them executed",
        description="--student: a student copy of every numbered notebook, each exercise's answer replaced by "
        "'raise NotImplementedError()' (nbgrader's ClearSolutions), the check cells locked, no outputs. --html: run "
        "every notebook with papermill and write an HTML page of it in which each widget leaves its static picture. "
        "The notebooks themselves are the solution versions and are never overwritten.")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--student", type=Path, metavar="OUT", help="folder for the student copies")
    what.add_argument("--html", type=Path, metavar="OUT", help="folder for the HTML copies (NN_name.html)")
    parser.add_argument("--from", dest="source", type=Path, default=Path("notebooks"),
                        help="the kit's notebooks folder (default: ./notebooks)")
    parser.add_argument("--smoke", action="store_true", help="--html: run with SMOKE = True (quick, not the results)")
    parser.add_argument("--executed", type=Path, metavar="DIR",
                        help="--html: convert the executed notebooks in DIR instead of running them")
    parser.add_argument("--timeout", type=int, default=None, help="--html: seconds a cell may run (default: no limit)")
    parser.set_defaults(run=_run_notebooks, paths=lambda args: (
        [args.source] + ([args.executed] if args.executed else []),
        [("folder", args.student or args.html, "student copies folder" if args.student else "HTML folder")]))


def _run_notebooks(args) -> int:
    from ..course import write_html_copies, write_student_copies

    if args.student:
        written = write_student_copies(args.source, args.student)
        print(f"wrote {len(written)} student notebooks to {args.student}")
    else:
        written = write_html_copies(args.source, args.html, smoke=args.smoke, executed=args.executed,
                                    timeout=args.timeout)
        print(f"wrote {len(written)} HTML pages to {args.html}")
    return 0
