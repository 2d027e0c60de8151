"""NIfTI input/output: validated loading, atomic writing, and the case record every data source yields.

Every volume keeps its affine. Loading checks the things that otherwise fail deep inside numpy or
torch (missing file, not NIfTI, truncated gzip, wrong dimensionality, NaN/inf voxels, zero or
negative spacing) and raises :class:`InputError` with one line naming the file, the problem and
the fix. Writing goes to a temporary file in the target folder and is renamed into place, so a
crash never leaves half a file, and :func:`save_volume` refuses to overwrite a file that was read
as an input.
"""

from __future__ import annotations

import os
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

NIFTI_SUFFIXES = (".nii", ".nii.gz")
MAX_SPACING_MM = 100.0  # no clinical or phantom scan has voxels larger than 10 cm


class InputError(ValueError):
    """Bad user input: the message names the file, the problem and how to fix it."""


@dataclass
class Volume:
    """A 3D array with the affine that places it in world (RAS+ mm) space."""

    array: np.ndarray
    affine: np.ndarray
    path: Path | None = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in nib.affines.voxel_sizes(self.affine))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)

    @property
    def axcodes(self) -> tuple[str, str, str]:
        return nib.orientations.aff2axcodes(self.affine)


@dataclass
class CaseRecord:
    """One case on disk, whatever its source (PhantomBench, MSD, KiTS23).

    ``organs`` and ``tumor`` may be absent (unlabelled data); ``category`` is the tumor category
    (``liver``, ``kidney``, ..., ``brain``) or ``healthy``.
    """

    case_id: str
    image: Path
    modality: str
    region: str
    category: str
    organs: Path | None = None
    tumor: Path | None = None
    dataset: str = "phantombench"
    tumor_voxels: int | None = None
    spacing: tuple[float, float, float] | None = None
    extra: dict = field(default_factory=dict)


def is_nifti_path(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def load_volume(path: str | os.PathLike, *, role: str = "image", dtype=np.float32) -> Volume:
    """Load a 3D NIfTI volume, validated.

    ``role`` ("image", "label", ...) only words the error messages. A 4D file whose fourth axis
    has length one is accepted as 3D (many converters write those).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: {role} file not found; check the path (it is resolved from {Path.cwd()}).")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, expected a NIfTI {role} file (.nii or .nii.gz).")
    try:
        img = nib.load(str(path))
    except nib.filebasedimages.ImageFileError as exc:
        raise InputError(
            f"{path}: not a NIfTI file ({exc}); convert it first, e.g. DICOM with dcm2niix, "
            "other formats with nibabel or SimpleITK."
        ) from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(f"{path}: is a {type(img).__name__}, not NIfTI; save it as .nii.gz with nibabel.")
    _check_header_spacing(path, img)
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InputError(
            f"{path}: {role} has shape {img.shape} ({len(img.shape)}D); a 3D volume is needed. "
            "Split 4D series into 3D volumes (e.g. nibabel.funcs.four_to_three) and pass one."
        )
    try:
        array = np.asanyarray(img.dataobj).reshape(shape)
    except (EOFError, zlib.error, OSError, ValueError) as exc:
        raise InputError(
            f"{path}: could not read the voxel data ({exc}); the file is truncated or corrupt. "
            "Copy or export it again."
        ) from None
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():  # before any integer cast
        bad = int(np.size(array) - np.isfinite(array).sum())
        raise InputError(
            f"{path}: {role} has {bad} NaN or infinite voxels; replace them (e.g. numpy.nan_to_num) "
            "or fix the export that produced them."
        )
    array = np.asarray(array, dtype=dtype)
    affine = img.affine.astype(np.float64)
    _check_affine_spacing(path, affine)
    return Volume(array=array, affine=affine, path=path)


def _check_header_spacing(path: Path, img) -> None:
    # nibabel silently "fixes" zero/negative pixdim on load; read the header as written.
    with nib.openers.ImageOpener(str(path)) as handle:
        raw = type(img.header).from_fileobj(handle, check=False)
    pixdim = np.asarray(raw["pixdim"][1:4], dtype=np.float64)
    if not np.all(np.isfinite(pixdim)) or np.any(pixdim <= 0):
        raise InputError(
            f"{path}: voxel spacing (pixdim) is {pixdim.tolist()}; every spacing must be positive. "
            "Fix the header (nibabel: img.header.set_zooms) with the scanner's true spacing."
        )


def _check_affine_spacing(path: Path, affine: np.ndarray) -> None:
    spacing = nib.affines.voxel_sizes(affine)
    if not np.all(np.isfinite(affine)) or np.any(spacing <= 1e-6) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(
            f"{path}: the affine has zero-length or degenerate axes (spacing {spacing.tolist()} mm); "
            "fix the header's sform/qform with the true voxel spacing."
        )
    if np.any(spacing > MAX_SPACING_MM):
        raise InputError(
            f"{path}: voxel spacing {spacing.tolist()} mm is implausible (> {MAX_SPACING_MM:g} mm); "
            "the header's units are probably wrong (metres or microns instead of mm)."
        )


def load_image_and_label(image_path, label_path, *, label_role: str = "label") -> tuple[Volume, Volume]:
    """Load an image and a label map that must share its grid."""
    image = load_volume(image_path, role="image")
    label = load_volume(label_path, role=label_role, dtype=np.int16)
    check_same_grid(image, label)
    return image, label


def check_same_grid(reference: Volume, other: Volume) -> None:
    """Raise InputError unless ``other`` lies on ``reference``'s voxel grid."""
    if reference.shape != other.shape:
        raise InputError(
            f"{other.path}: shape {other.shape} does not match {reference.path} {reference.shape}; "
            "the label must be on the image's voxel grid (resample it with nearest neighbour first)."
        )
    if not np.allclose(reference.affine, other.affine, atol=1e-3):
        raise InputError(
            f"{other.path}: affine differs from {reference.path}'s; the two files are not aligned. "
            "Resample the label onto the image grid (nearest neighbour) first."
        )


def save_volume(
    array: np.ndarray,
    affine: np.ndarray,
    path: str | os.PathLike,
    *,
    dtype=None,
    protect: tuple[str | os.PathLike, ...] = (),
) -> Path:
    """Write a NIfTI atomically (temporary file + rename); never overwrite a path in ``protect``.

    ``protect`` lists the inputs of the current run, so an output path that collides with an
    input is refused instead of destroying the input.
    """
    path = Path(path)
    if not is_nifti_path(path):
        raise InputError(f"{path}: output must end in .nii or .nii.gz.")
    for guarded in protect:
        if Path(guarded).exists() and path.exists() and path.resolve() == Path(guarded).resolve():
            raise InputError(f"{path}: is an input of this run; choose another output path (inputs are never overwritten).")
    array = np.asarray(array if dtype is None else array.astype(dtype))
    if array.dtype == bool:
        array = array.astype(np.uint8)
    img = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if str(path).lower().endswith(".gz") else ".nii"
    with atomic_path(path, suffix=suffix) as tmp:
        nib.save(img, str(tmp))
    return path


class atomic_path:
    """Context manager yielding a temporary path next to ``path``; renamed onto it on success."""

    def __init__(self, path: str | os.PathLike, suffix: str = ""):
        self.path = Path(path)
        self.suffix = suffix or "".join(self.path.suffixes)

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp" + self.suffix, dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(name)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            os.chmod(self.tmp, _new_file_mode())  # mkstemp makes 0600; outputs get the usual umask mode
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def _new_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path
