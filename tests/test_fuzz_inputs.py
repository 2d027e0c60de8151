"""Property-based fuzzing of the input path (Hypothesis): random headers, voxel types, scale factors, affines and
truncations through the loader, to the processing grid and back.

Whatever the file, the kit either refuses it with a one-line ``InputError`` naming it, or returns a mask in the
input's own grid (same shape, same affine); and no input ever changes (sha256 before and after). CI runs the "ci"
profile (a bounded number of examples); ``HYPOTHESIS_PROFILE=long pytest tests/test_fuzz_inputs.py`` runs the long one.
"""

import gzip
import hashlib
import io
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from diffugts_core.cli import main
from diffugts_core.io import InputError, load_volume, save_volume
from diffugts_core.preprocess import model_grid_plan

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DTYPES = ("uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64",
          "complex64", "RGB")
ORIENTATIONS = ("RAS", "LPS", "LAS", "SLA", "IPL", "ARS")  # LAS, IPL: left-handed


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@st.composite
def affines(draw):
    """Voxel sizes 0.001-150 mm, an axis order and flips (left-handed ones too), an oblique rotation, a translation;
    sometimes a degenerate axis."""
    spacing = [draw(st.sampled_from([0.3, 0.8, 1.0, 1.5, 2.5, 5.0] * 3 + [0.001, 150.0])) for _ in range(3)]
    codes = draw(st.sampled_from(ORIENTATIONS))
    ornt = nib.orientations.axcodes2ornt(codes)
    linear = np.zeros((3, 3))
    for axis, (world, flip) in enumerate(ornt):
        linear[int(world), axis] = flip * spacing[axis]
    angle = np.deg2rad(draw(st.sampled_from([0.0, 0.0, 12.0, 45.0])))
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ linear
    affine[:3, 3] = draw(st.lists(st.floats(-300, 300), min_size=3, max_size=3))
    if draw(st.integers(0, 19)) == 0:
        affine[:3, draw(st.integers(0, 2))] = 0.0
    return affine


@st.composite
def nifti_files(draw):
    """(bytes of a NIfTI file, its suffix)."""
    shape = tuple(draw(st.lists(st.integers(1, 20), min_size=3, max_size=3)))
    extra = draw(st.sampled_from([()] * 6 + [(1,), (2,), "2D"]))
    shape = shape[:2] if extra == "2D" else shape + tuple(extra)
    dtype = draw(st.sampled_from(DTYPES[:-2] * 4 + DTYPES[-2:]))  # complex and RGB: rarer
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if dtype == "RGB":
        data = rng.integers(0, 255, (*shape, 3), dtype=np.uint8).view([("R", "u1"), ("G", "u1"), ("B", "u1")])
        data = data.reshape(shape)
    elif dtype.startswith(("float", "complex")):
        data = (rng.normal(-200, 400, shape) * draw(st.sampled_from([1.0, 1e30]))).astype(dtype)
        if draw(st.integers(0, 15)) == 0:
            data.flat[0] = draw(st.sampled_from([np.nan, np.inf]))
    else:
        info = np.iinfo(dtype)
        data = rng.integers(max(info.min, -2000), min(info.max, 3000), shape, endpoint=True).astype(dtype)
    image = nib.Nifti1Image(data, np.eye(4), dtype=data.dtype)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "case.nii"
        nib.save(image, str(path))
        raw = bytearray(path.read_bytes())
    # the affine goes into the header as written, so that degenerate ones (nibabel will not write) can be drawn
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(raw[:348])), check=False)
    affine = draw(affines())
    header["qform_code"], header["sform_code"] = 0, 1
    header["srow_x"], header["srow_y"], header["srow_z"] = affine[:3]
    header["pixdim"][1:4] = np.maximum(np.linalg.norm(affine[:3, :3], axis=0), 1e-6)
    header["scl_slope"] = draw(st.sampled_from([np.nan, 1.0, 0.5, -1.0, 0.0] * 3 + [1e35, np.inf]))  # nan, 0: unscaled
    header["scl_inter"] = draw(st.sampled_from([0.0, -1024.0] * 4 + [1e38]))
    raw[:348] = header.binaryblock
    suffix = draw(st.sampled_from([".nii", ".nii.gz"]))
    raw = gzip.compress(bytes(raw), mtime=0) if suffix == ".nii.gz" else bytes(raw)
    cut = draw(st.sampled_from([None] * 12 + [0.1, 0.6, 0.95, 0.999]))
    if cut is not None:
        raw = raw[: max(1, int(len(raw) * cut))]
    return raw, suffix


@given(nifti_files())
def test_a_file_is_refused_cleanly_or_its_mask_comes_back_in_its_grid(file):
    raw, suffix = file
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"input{suffix}"
        path.write_bytes(raw)
        before = sha256(path)
        try:
            volume = load_volume(path)
        except InputError as error:
            message = str(error)
            assert "\n" not in message and path.name in message, message
            event(f"refused: {message.split(';')[0].split(': ', 1)[1][:40]}")
        else:
            assert volume.shape == tuple(nib.load(str(path)).shape[:3])
            assert np.isfinite(volume.array).all()
            try:
                plan = model_grid_plan(volume, "CT", (32, 32))
            except InputError as error:
                assert "\n" not in str(error)
            else:
                event("mask in the input's grid")
                processed = plan.apply(volume.array, order=1, fill=-1000.0)
                mask = processed > np.median(processed)
                back = plan.invert(mask.astype(np.uint8), kind="mask")
                assert back.shape == volume.shape
                out = Path(folder) / "mask.nii.gz"
                save_volume(back, volume.affine, out, protect=[path])
                written = nib.load(str(out))
                assert written.shape == volume.shape and np.allclose(written.affine, volume.affine, atol=1e-4)
        assert sha256(path) == before


@settings(max_examples=12)
@given(nifti_files(), st.sampled_from(["pred", "ref", "json-is-input"]))
def test_the_evaluate_command_on_any_file_exits_cleanly_and_changes_no_input(file, role):
    raw, suffix = file
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        fuzzed, good = folder / f"fuzzed{suffix}", folder / "good.nii.gz"
        fuzzed.write_bytes(raw)
        save_volume(np.zeros((4, 4, 4), np.uint8), np.eye(4), good)
        hashes = {p: sha256(p) for p in (fuzzed, good)}
        pred, ref = (fuzzed, good) if role != "ref" else (good, fuzzed)
        report = fuzzed if role == "json-is-input" else folder / "report.json"
        code = main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--json", str(report)])
        assert code in (0, 2)
        if role == "json-is-input":
            assert code == 2
        assert {p: sha256(p) for p in hashes} == hashes
        assert not any(p.name.startswith(".") for p in folder.iterdir())  # no temporary left behind
