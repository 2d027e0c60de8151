"""What every subcommand shares: argument types, the output checks, signals, warnings and bad-input errors."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

from ..io import InputError
from ..outputs import OutputPolicy

EXIT_BAD_INPUT = 2


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed subcommand: check the outputs its ``args.paths(args)`` names, then call ``args.run(args)``.

    ``args.paths(args)`` gives ``(inputs, outputs)``, each output a ``(kind, path, what)`` of ``OutputPolicy``; bad
    input ends with one ``error: ...`` line on stderr and exit code 2.
    """
    with _one_line_warnings(), _exit_on_termination():
        try:
            inputs, outputs = args.paths(args)
            with OutputPolicy(inputs) as policy:  # every output checked before any model loads
                for kind, path, what in outputs:
                    getattr(policy, kind)(path, what)
                return args.run(args) or 0
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT


@contextmanager
def _one_line_warnings():
    """InputWarnings as ``warning: ...`` lines on stderr, like the ``error: ...`` lines."""
    from ..io import InputWarning

    show = warnings.showwarning

    def one_line(message, category, *args, **kwargs):
        if issubclass(category, InputWarning):
            print(f"warning: {message}", file=sys.stderr)
        else:
            show(message, category, *args, **kwargs)

    warnings.showwarning = one_line
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", InputWarning)
            yield
    finally:
        warnings.showwarning = show


@contextmanager
def _exit_on_termination():
    """SIGTERM and SIGHUP end the run as an exception does, so atomic writes remove their temporary files."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    earlier = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in earlier.items():
            signal.signal(sig, handler)


def volume_shape(text: str) -> tuple[int, int, int]:
    """The ``--shape X,Y,Z`` argument type."""
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must be three integers like 128,128,64, got {text!r}") from None
    if len(shape) != 3 or min(shape) < 16:
        raise argparse.ArgumentTypeError(f"shape must be three integers of at least 16, got {text!r}")
    return shape


def optional_file(path: Path | None, what: str) -> list:
    return [("file", path, what)] if path is not None else []


def optional_folder(path: Path | None, what: str) -> list:
    return [("folder", path, what)] if path is not None else []


def model_inputs(args: argparse.Namespace) -> list[Path]:
    """The heads and foundation model folders a command reads, where given as folders: never an output."""
    return [Path(value) for value in (getattr(args, "heads", None), getattr(args, "model", None))
            if value not in (None, "default") and Path(value).exists()]
