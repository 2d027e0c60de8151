"""NIfTI input/output: validated loading, atomic writing, and the case record every data source yields.

Every volume keeps its affine. Loading checks the things that otherwise fail deep inside numpy or
torch (missing file, not NIfTI, truncated gzip, wrong dimensionality, NaN/inf voxels, zero or
negative spacing) and raises :class:`InputError` with one line naming the file, the problem and
the fix. Writing goes to a temporary file in the target folder and is renamed into place, so a
crash never leaves half a file, and :func:`save_volume` refuses to overwrite a file that was read
as an input.
"""

from __future__ import annotations

import atexit
import math
import os
import re
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

NIFTI_SUFFIXES = (".nii", ".nii.gz")
MAX_SPACING_MM = 100.0  # no clinical or phantom scan has voxels larger than 10 cm
MAX_GZIP_RATIO = 1032  # deflate cannot compress better than about 1032:1 (RFC 1951 block limits)


class InputError(ValueError):
    """Bad user input: the message names the file, the problem and how to fix it."""


class InputWarning(UserWarning):
    """Input the kit runs on but probably should not (a blank volume, intensities implausible for the modality, an
    organ it has no prior for, a truncated prompt): the message names what was assumed."""


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


def nifti_files(folder: str | os.PathLike) -> list[Path]:
    """The NIfTI files of a folder, sorted; hidden files (an interrupted write's temporaries) are not cases."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and is_nifti_path(p) and not p.name.startswith("."))


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
    except (nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError, EOFError, zlib.error, OSError,
            ValueError) as exc:
        raise InputError(
            f"{path}: not a NIfTI file, or its header is damaged ({one_line(exc)}); convert it first, e.g. DICOM with dcm2niix, "
            "other formats with nibabel or SimpleITK."
        ) from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(f"{path}: is a {type(img).__name__}, not NIfTI; save it as .nii.gz with nibabel.")
    _check_header_spacing(path, img)
    _check_header_size(path, img, role)
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
            f"{path}: could not read the voxel data ({one_line(exc)}); the file is truncated or corrupt. "
            "Copy or export it again."
        ) from None
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():  # before any integer cast
        bad = int(np.size(array) - np.isfinite(array).sum())
        raise InputError(
            f"{path}: {role} has {bad} NaN or infinite voxels; replace them (e.g. numpy.nan_to_num) "
            "or fix the export that produced them."
        )
    target = np.dtype(dtype)
    if np.issubdtype(target, np.integer) and array.size and (array.min() < np.iinfo(target).min
                                                             or array.max() > np.iinfo(target).max):
        raise InputError(
            f"{path}: {role} values span {float(array.min()):g} to {float(array.max()):g}, beyond {target.name} "
            f"(scl_slope {img.dataobj.slope}, scl_inter {img.dataobj.inter}); a {role} holds small integer labels: "
            "fix the header's scale factors or pass the right file."
        )
    with np.errstate(over="ignore", invalid="ignore"):
        array = np.asarray(array, dtype=dtype)
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise InputError(
            f"{path}: {role} values exceed the {target.name} range after scaling (scl_slope "
            f"{img.dataobj.slope}, scl_inter {img.dataobj.inter}); fix the header's scale factors."
        )
    affine = img.affine.astype(np.float64)
    _check_affine_spacing(path, affine)
    return Volume(array=array, affine=affine, path=path)


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


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


def _check_header_size(path: Path, img, role: str) -> None:
    """Before any voxel is read: the header's shape and type must fit the file and the memory at hand."""
    dtype = img.header.get_data_dtype()
    if dtype.fields is not None or not np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.complexfloating):
        raise InputError(
            f"{path}: {role} voxels are of type {dtype} (RGB or complex), not one intensity per voxel; "
            "save a single-channel magnitude image."
        )
    shape = img.header.get_data_shape()
    if not shape or min(shape) < 1:
        raise InputError(f"{path}: the header's shape {shape} has an empty axis; the file holds no volume.")
    voxels = math.prod(int(s) for s in shape)
    stored = voxels * dtype.itemsize
    size = path.stat().st_size
    compressed = str(path).lower().endswith(".gz")
    if compressed and size * MAX_GZIP_RATIO < stored:
        raise InputError(
            f"{path}: the header claims {_shape_text(shape)} voxels ({_gigabytes(stored)}), more than a "
            f"{_gigabytes(size)} gzip file can hold; the header is wrong or the file is truncated."
        )
    if not compressed and size < int(img.header.get_data_offset()) + stored:
        raise InputError(
            f"{path}: the header claims {_shape_text(shape)} voxels ({_gigabytes(stored)}) but the file holds "
            f"{_gigabytes(size)}; the header is wrong or the file is truncated. Copy or export it again."
        )
    scaled = img.dataobj.slope != 1 or img.dataobj.inter != 0
    needed = voxels * (dtype.itemsize + (8 if scaled else 0) + 4)  # as stored, scaled to float64, and as float32
    available = available_memory()
    if available is not None and needed > 0.8 * available:
        raise InputError(
            f"{path}: loading this {role} ({_shape_text(shape)} voxels) needs about {_gigabytes(needed)} of memory "
            f"and {_gigabytes(available)} is available; crop or downsample it first (e.g. 3D Slicer's Crop Volume)."
        )


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _shape_text(shape) -> str:
    return " x ".join(str(int(s)) for s in shape)


def _gigabytes(size: float) -> str:
    if size >= 1e8:
        return f"{size / 1e9:,.1f} GB"
    return f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size:,.0f} bytes"


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

    ``protect`` lists the inputs of the current run (the inputs registered with :func:`protect_inputs` are refused
    as well), so an output path that is an input, through a symlink or a hard link too, is refused instead of
    destroying the input.
    """
    path = Path(path)
    if not is_nifti_path(path):
        raise InputError(f"{path}: output must end in .nii or .nii.gz.")
    refuse_input(path, protect)
    array = np.asarray(array if dtype is None else array.astype(dtype))
    if array.dtype == bool:
        array = array.astype(np.uint8)
    img = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    suffix = ".nii.gz" if str(path).lower().endswith(".gz") else ".nii"
    with atomic_path(path, suffix=suffix) as tmp:
        nib.save(img, str(tmp))
    return path


# ---- inputs are never outputs ----------------------------------------------------------------------

_PROTECTED: dict[tuple[int, int], Path] = {}  # (device, inode) of every input registered by a running command


def file_identity(path: str | os.PathLike) -> tuple[int, int] | None:
    """(device, inode) of an existing file, following symlinks: two names of one file (a symlink, a hard link)
    share it. None when there is no such file."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


class protect_inputs:
    """Register the inputs of a run: while inside, every atomic write (:class:`atomic_path`) refuses them."""

    def __init__(self, paths):
        self.identities = {identity: Path(p) for p in paths if p is not None and (identity := file_identity(p))}

    def __enter__(self) -> "protect_inputs":
        self.added = {key: path for key, path in self.identities.items() if key not in _PROTECTED}
        _PROTECTED.update(self.added)
        return self

    def __exit__(self, *exc) -> None:
        for key in self.added:
            _PROTECTED.pop(key, None)


def refuse_input(path: str | os.PathLike, extra=()) -> None:
    """Raise InputError when ``path`` names an input of this run (registered, or among ``extra``)."""
    identity = file_identity(path)
    if identity is None:
        return
    inputs = dict(_PROTECTED)
    inputs.update({key: Path(p) for p in extra if (key := file_identity(p))})
    if identity in inputs:
        same = inputs[identity]
        how = "" if Path(os.path.abspath(path)) == Path(os.path.abspath(same)) else f" (the same file as {same})"
        raise InputError(f"{path}: is an input of this run{how}; choose another output path "
                         "(inputs are never overwritten).")


# ---- atomic writes ---------------------------------------------------------------------------------

_LIVE_TEMPS: set[Path] = set()  # this process's temporary files, removed at exit if a rename never came
_SWEPT: set[Path] = set()  # folders this process has already cleared of stale temporaries (once each, not per write)
# ".<name>.<pid>.<8 random characters from mkstemp>.tmp<suffix>": what atomic_path and the write check create
_TEMPORARY = re.compile(r"^\..+\.(?P<pid>\d+)\.[a-z0-9_]{8}\.tmp")


def temporary_name(name: str) -> tuple[str, str]:
    """(prefix, suffix) for ``tempfile.mkstemp``: a temporary file of this process, recognised by
    :func:`remove_stale_temporaries` once the process is gone."""
    return f".{name}.{os.getpid()}.", ".tmp"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files a killed run left in ``folder`` (their process is gone); returns them."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for sibling in entries:
        match = _TEMPORARY.match(sibling.name)
        if match and sibling.is_file() and sibling not in _LIVE_TEMPS and not _pid_alive(int(match["pid"])):
            try:
                sibling.unlink()
                removed.append(sibling)
            except OSError:
                pass
    return removed


@atexit.register
def _remove_live_temporaries() -> None:
    for tmp in list(_LIVE_TEMPS):
        tmp.unlink(missing_ok=True)


class atomic_path:
    """Context manager yielding a temporary path next to ``path``; renamed onto it on success.

    The temporary name carries the process id, so a later write of the same path removes what a killed process
    left; an error, SIGINT, or SIGTERM/SIGHUP under the CLI removes it at once. An input of the run is refused.
    """

    def __init__(self, path: str | os.PathLike, suffix: str = ""):
        self.path = Path(path)
        self.suffix = suffix or "".join(self.path.suffixes)

    def __enter__(self) -> Path:
        refuse_input(self.path)
        if self.path.is_dir():
            raise InputError(f"{self.path}: is a folder; give a file name for this output.")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.parent not in _SWEPT:
                remove_stale_temporaries(self.path.parent)
                _SWEPT.add(self.path.parent)
            prefix, mark = temporary_name(self.path.name)
            fd, name = tempfile.mkstemp(prefix=prefix, suffix=mark + self.suffix, dir=self.path.parent)
        except OSError as exc:
            raise InputError(unwritable_message(self.path.parent, exc)) from None
        os.close(fd)
        self.tmp = Path(name)
        _LIVE_TEMPS.add(self.tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                os.chmod(self.tmp, _new_file_mode())  # mkstemp makes 0600; outputs get the usual umask mode
                os.replace(self.tmp, self.path)
        finally:
            self.tmp.unlink(missing_ok=True)
            _LIVE_TEMPS.discard(self.tmp)


def unwritable_message(folder: Path, exc: OSError) -> str:
    return (f"{folder}: cannot write here ({exc.strerror or exc}); choose an output folder you can write to.")


def _new_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path
