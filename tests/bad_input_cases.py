"""The bad-input catalogue: hostile but realistic uses of `diffugts`, each run in a scratch folder.

Each case builds its files, runs the command in-process, and records the exit code, the first ``error:`` or
``warning:`` line, the files written and whether every input kept its sha256. ``tests/test_bad_inputs.py`` checks
each outcome against the case's expectation, and the table in ``docs/bad_inputs.md`` against :func:`render_table`.
Regenerate that table after changing a case or a message::

    python -m tests.bad_input_cases --write-docs


"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

TABLE_DOC = Path(__file__).resolve().parents[1] / "docs" / "bad_inputs.md"  # the table lives between the markers
TABLE_START, TABLE_END = "<!-- bad-input-table: start -->", "<!-- bad-input-table: end -->"
UNWRITABLE = "/sys/kernel"  # sysfs: no new files, even for root


@dataclass(frozen=True)
class Case:
    name: str
    argv: tuple[str, ...]  # relative to the scratch folder
    exit_code: int
    says: str  # a phrase the first error:/warning: line must hold
    writes: tuple[str, ...] = ()  # the files the run must leave (nothing else may appear)
    needs_model: bool = False


_CT = "x.nii.gz"  # a thin PhantomBench liver CT (8 slices), written by make_files
CASES = (
    Case("missing file", ("evaluate", "--pred", "nope.nii.gz", "--ref", "t.nii.gz"), 2, "file not found"),
    Case("not NIfTI (a text file)", ("evaluate", "--pred", "notes.txt", "--ref", "t.nii.gz"), 2, "not a NIfTI file"),
    Case("truncated .nii.gz", ("evaluate", "--pred", "truncated.nii.gz", "--ref", "t.nii.gz"), 2,
         "truncated or corrupt"),
    Case("2D image", ("evaluate", "--pred", "flat.nii.gz", "--ref", "t.nii.gz"), 2, "a 3D volume is needed"),
    Case("4D series", ("evaluate", "--pred", "series.nii.gz", "--ref", "t.nii.gz"), 2, "a 3D volume is needed"),
    Case("NaN voxels", ("segment", "nan.nii.gz", "--organ", "liver", "-o", "m.nii.gz"), 2, "NaN or infinite voxels"),
    Case("zero spacing in the header", ("evaluate", "--pred", "zero_spacing.nii.gz", "--ref", "t.nii.gz"), 2,
         "every spacing must be positive"),
    Case("spacing in metres (absurd)", ("evaluate", "--pred", "metres.nii.gz", "--ref", "t.nii.gz"), 2,
         "is implausible"),
    Case("label on another grid", ("evaluate", "--pred", "flat_label.nii.gz", "--ref", "t.nii.gz"), 2,
         "does not match"),
    Case("unknown tumor category", ("phantoms", "--out", "cohort", "--categories", "liver,stomach"), 2,
         "unknown categories"),
    Case("input named as the report and the QC picture",
         ("segment", _CT, "--organ", "liver", "-o", "m.nii.gz", "--report", _CT, "--png", _CT), 2,
         "is an input of this run"),
    Case("input named as the JSON report", ("evaluate", "--pred", "p.nii.gz", "--ref", "t.nii.gz", "--json", "p.nii.gz"),
         2, "is an input of this run"),
    Case("mask path equal to the input", ("segment", _CT, "--organ", "liver", "-o", _CT), 2, "is an input of this run"),
    Case("mask path a symlink to the input", ("segment", _CT, "--organ", "liver", "-o", "link.nii.gz"), 2,
         "the same file as x.nii.gz"),
    Case("mask path a hard link to the input", ("segment", _CT, "--organ", "liver", "-o", "hard.nii.gz"), 2,
         "the same file as x.nii.gz"),
    Case("two outputs on one path", ("segment", _CT, "--organ", "liver", "-o", "m.nii.gz", "--report", "m.nii.gz"), 2,
         "named for both the mask and the report"),
    Case("output path is a folder", ("evaluate", "--pred", "p.nii.gz", "--ref", "t.nii.gz", "--json", "folder"), 2,
         "is a folder"),
    Case("header claims 10000^3 voxels (.nii)", ("segment", "huge.nii", "--organ", "liver", "-o", "m.nii.gz"), 2,
         "the header claims 10000 x 10000 x 10000 voxels"),
    Case("header claims 10000^3 voxels (.nii.gz)", ("segment", "huge.nii.gz", "--organ", "liver", "-o", "m.nii.gz"), 2,
         "gzip file can hold"),
    Case("unwritable JSON report", ("evaluate", "--pred", "p.nii.gz", "--ref", "t.nii.gz", "--json",
                                    f"{UNWRITABLE}/r.json"), 2, "cannot write here"),
    Case("unwritable cohort folder", ("phantoms", "--out", f"{UNWRITABLE}/pb"), 2, "cannot write here"),
    Case("unwritable mask", ("segment", _CT, "--organ", "liver", "-o", f"{UNWRITABLE}/m.nii.gz"), 2,
         "cannot write here"),
    Case("complex voxels", ("evaluate", "--pred", "complex.nii.gz", "--ref", "t.nii.gz"), 2, "not one intensity per voxel"),
    Case("scale factors overflow float32", ("segment", "overflow.nii.gz", "--organ", "liver", "-o", "m.nii.gz"), 2,
         "exceed the float32 range after scaling"),
    Case("label scaled beyond its integer type", ("evaluate", "--pred", "overflow.nii.gz", "--ref", "t.nii.gz"), 2,
         "beyond int16"),
    Case("blank (all-zero) volume", ("segment", "blank.nii.gz", "--organ", "liver", "-o", "m.nii.gz", "--no-progress"),
         0, "the volume is blank", ("m.nii.gz", "m_report.json", "m_qc.png"), needs_model=True),
    Case("CT with no value below -500 HU", ("segment", "shifted.nii.gz", "--organ", "liver", "-o", "m.nii.gz",
                                            "--no-progress"),
         0, "do not look like Hounsfield units", ("m.nii.gz", "m_report.json", "m_qc.png"), needs_model=True),
    Case("CT passed as MRI, with --organ liver", ("segment", _CT, "--organ", "liver", "--modality", "MRI", "-o",
                                                   "m.nii.gz", "--no-progress"),
         0, "as a CT in Hounsfield units does", ("m.nii.gz", "m_report.json", "m_qc.png"), needs_model=True),
    Case("unknown organ", ("segment", _CT, "--organ", "banana", "-o", "m.nii.gz", "--no-progress"), 0,
         "no prior for 'banana'", ("m.nii.gz", "m_report.json", "m_qc.png"), needs_model=True),
    Case("prompt over the token budget", ("segment", _CT, "--organ", "liver", "-o", "m.nii.gz", "--no-progress",
                                          "--prompt", "a CT scan of a liver with a large heterogeneous hypodense mass "
                                          "with irregular margins and central necrosis beside the portal vein"),
         0, "reads only the first 24", ("m.nii.gz", "m_report.json", "m_qc.png"), needs_model=True),
)


def make_files(folder: Path) -> None:
    """The inputs every case may use, written into ``folder``."""
    import gzip

    from diffugts_core.data import phantoms
    from diffugts_core.io import save_volume

    case = phantoms.generate_case("liver", 0, 3000, (64, 64, 32))
    centre = int(np.argmax(case.tumor.sum((0, 1))))
    thin = slice(max(centre - 4, 0), max(centre - 4, 0) + 8)
    image, tumor = case.image[..., thin], case.tumor[..., thin]
    save_volume(image, case.affine, folder / _CT, dtype=np.float32)
    save_volume(tumor, case.affine, folder / "t.nii.gz", dtype=np.uint8)
    save_volume(np.roll(tumor, 1, 0), case.affine, folder / "p.nii.gz", dtype=np.uint8)
    save_volume(np.zeros_like(image), case.affine, folder / "blank.nii.gz", dtype=np.float32)
    save_volume(image + 1024, case.affine, folder / "shifted.nii.gz", dtype=np.float32)
    save_volume(tumor.astype(np.complex64), case.affine, folder / "complex.nii.gz", dtype=np.complex64)
    overflow = nib.Nifti1Image(tumor.astype(np.int16), case.affine)
    overflow.header.set_slope_inter(3e38, 1e38)  # 1 -> 4e38, beyond float32
    nib.save(overflow, str(folder / "overflow.nii.gz"))
    header = nib.Nifti1Header()
    header.set_data_shape((10000, 10000, 10000))
    header.set_data_dtype(np.int16)
    raw = header.binaryblock + b"\0" * 4 + b"\0" * 1000
    (folder / "huge.nii").write_bytes(raw)
    (folder / "huge.nii.gz").write_bytes(gzip.compress(raw, mtime=0))
    (folder / "notes.txt").write_text("not an image\n")
    (folder / "truncated.nii.gz").write_bytes((folder / _CT).read_bytes()[:2000])
    nib.save(nib.Nifti1Image(image[..., 0], case.affine), str(folder / "flat.nii.gz"))
    nib.save(nib.Nifti1Image(np.stack([image, image], -1), case.affine), str(folder / "series.nii.gz"))
    nan = image.copy()
    nan[0, 0, 0] = np.nan
    save_volume(nan, case.affine, folder / "nan.nii.gz", dtype=np.float32)
    zero = nib.Nifti1Image(tumor.astype(np.uint8), None)
    zero.header["pixdim"][1:4] = [1.0, 0.0, 1.0]
    nib.save(zero, str(folder / "zero_spacing.nii.gz"))
    save_volume(tumor, np.diag([1000.0, 1000.0, 1000.0, 1.0]), folder / "metres.nii.gz", dtype=np.uint8)
    save_volume(tumor[:32], case.affine, folder / "flat_label.nii.gz", dtype=np.uint8)
    (folder / "link.nii.gz").symlink_to(_CT)
    os.link(folder / _CT, folder / "hard.nii.gz")
    (folder / "folder").mkdir()


@dataclass
class Outcome:
    exit_code: int
    first_line: str
    written: tuple[str, ...]
    inputs_unchanged: bool


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def run_case(case: Case, folder: Path) -> Outcome:
    """Run ``case`` in ``folder`` (which holds :func:`make_files`'s inputs and nothing the case wrote before)."""
    from diffugts_core.cli import main

    before = snapshot(folder)
    stdout, stderr = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(list(case.argv))
    finally:
        os.chdir(cwd)
    after = snapshot(folder)
    written = tuple(sorted(name for name in after if before.get(name) != after[name] and name not in before))
    for name in written:  # leave the folder as it was for the next case
        (folder / name).unlink()
    lines = [line for line in stderr.getvalue().splitlines() if line.startswith(("error:", "warning:"))]
    first = lines[0] if lines else (stdout.getvalue().splitlines() or [""])[0]
    return Outcome(code, first.replace(str(folder), "."), written,
                   all(after.get(name) == digest for name, digest in before.items()))


def render_table(outcomes: dict[str, Outcome]) -> str:
    rows = ["| Case | Command | Exit | First line | Written | Inputs |", "|---|---|---|---|---|---|"]
    for case in CASES:
        outcome = outcomes[case.name]
        command = " ".join(f"'{a}'" if " " in a else a for a in case.argv)
        if len(command) > 70:
            command = command[:67] + "..."
        line = outcome.first_line if len(outcome.first_line) <= 110 else outcome.first_line[:107] + "..."
        rows.append(f"| {case.name} | `diffugts {command}` | {outcome.exit_code} | {line.replace('|', '/')} | "
                    f"{', '.join(outcome.written) or 'nothing'} | {'unchanged' if outcome.inputs_unchanged else 'CHANGED'} |")
    return "\n".join(rows)


def run_all(folder: Path, cases=CASES) -> dict[str, Outcome]:
    make_files(folder)
    return {case.name: run_case(case, folder) for case in cases}


def docs_table() -> str:
    """The table as written in docs/bad_inputs.md."""
    text = TABLE_DOC.read_text()
    return text[text.index(TABLE_START) + len(TABLE_START):text.index(TABLE_END)].strip()


def write_docs(table: str) -> None:
    text = TABLE_DOC.read_text()
    start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
    TABLE_DOC.write_text(text[:start] + "\n" + table + "\n" + text[end:])




if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        table = render_table(run_all(Path(scratch)))
    if "--write-docs" in sys.argv:
        write_docs(table)
    print(table)
