"""The ``diffugts`` command: one entry point, one subcommand per job, ``--help`` on each.

Each module here holds a family of subcommands, each subcommand's ``add_<name>(subparsers)`` beside its handler;
``common`` holds what they share. Bad input (a missing or corrupt file, a wrong shape, an unknown category) ends
with a one-line ``error: ...`` on stderr naming the file, the problem and the fix, exit code 2, and nothing written.
"""

from __future__ import annotations

import argparse

from .. import __version__
from . import benchmark, course, data, demo, foundation, heads, segment, specialist
from .common import run_command


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffugts",
        description="DiffuGTS teaching kit: zero-shot tumor segmentation with a frozen foundation diffusion model.",
    )
    parser.add_argument("--version", action="version", version=f"diffugts-core {__version__}")
    parser.set_defaults(paths=lambda args: ([], []))  # (inputs, outputs) of a command that writes nothing
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_subcommand in (  # in the order `diffugts --help` lists them
            demo.add_demo, data.add_phantoms, data.add_evaluate, data.add_manifests,
            foundation.add_train_foundation, foundation.add_check_foundation,
            heads.add_train_heads, heads.add_detect, heads.add_evaluate_aova,
            segment.add_segment, segment.add_evaluate_refinement,
            specialist.add_train_specialist, benchmark.add_benchmark, benchmark.add_regression_gate,
            course.add_notebooks):
        add_subcommand(subparsers)
    return parser
