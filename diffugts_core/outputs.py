"""One output-path policy for every command and every file it writes.

Before any model loads, a command names its inputs and its outputs. Each output file must not be an input of the
run (by name, through a symlink or a hard link), must not be an existing folder, and must not be named twice; each
output folder must not be an existing file; and every folder written to must accept a new file. Writability is
probed by creating and removing a file, because permission bits say little for root and nothing for read-only
mounts. Any failure is one :class:`~diffugts_core.io.InputError` naming the path and the fix, before anything is
written. While the run goes on, the inputs stay registered (:class:`~diffugts_core.io.protect_inputs`), so a file
whose name is only known later is refused at write time too.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .io import InputError, protect_inputs, refuse_input, temporary_name, unwritable_message


class OutputPolicy(protect_inputs):
    """The inputs and outputs of one run. Use as a context manager around the run::

        with OutputPolicy([image, organ_mask]) as policy:
            policy.file(mask_path, "mask")
            policy.folder(intermediates, "intermediates folder")
            ...  # load models, run, write

    A folder among the inputs protects every file inside it.
    """

    def __init__(self, inputs=()):
        files = []
        for path in (Path(p) for p in inputs if p is not None):
            files.extend(q for q in path.rglob("*") if q.is_file()) if path.is_dir() else files.append(path)
        super().__init__(files)
        self.claimed: dict[str, tuple[Path, str]] = {}

    def file(self, path: str | os.PathLike, what: str = "output") -> Path:
        """Check one output file; returns it as a Path."""
        path = Path(path)
        if path.is_dir():
            raise InputError(f"{path}: is a folder; give a file name for the {what}.")
        refuse_input(path, self.identities.values())
        key = os.path.realpath(path)
        if key in self.claimed:
            role = self.claimed[key][1]
            raise InputError(f"{path}: named for both the {role} and the {what}; give each output its own path.")
        self.claimed[key] = (path, what)
        writable_folder(path.parent)
        return path

    def folder(self, path: str | os.PathLike, what: str = "output folder") -> Path:
        """Check one output folder (it may not exist yet); returns it as a Path."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise InputError(f"{path}: is a file; the {what} must be a folder (a new or an existing one).")
        writable_folder(path)
        return path


def writable_folder(folder: str | os.PathLike) -> None:
    """Raise InputError unless ``folder`` exists and takes a new file, or can be created where it is named."""
    folder = Path(os.path.abspath(folder))
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{folder}: cannot be created, {existing} is a file; choose another output folder.")
    try:
        prefix, mark = temporary_name("diffugts-write-check")
        handle, probe = tempfile.mkstemp(prefix=prefix, suffix=mark, dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(unwritable_message(folder, exc)) from None
