"""Bad input gets a one-line error naming the file and the problem; outputs are atomic; inputs are safe."""

import gzip
import os
import stat

import nibabel as nib
import numpy as np
import pytest

from diffugts_core.cli import main
from diffugts_core.io import InputError, load_image_and_label, load_volume, save_volume


def write(path, data, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))
    return path


@pytest.fixture
def good(tmp_path):
    return write(tmp_path / "good.nii.gz", np.zeros((6, 6, 4), np.float32))


def truncated(tmp_path):
    raw = (write(tmp_path / "full.nii.gz", np.random.default_rng(0).random((16, 16, 16)).astype(np.float32))).read_bytes()
    path = tmp_path / "truncated.nii.gz"
    path.write_bytes(raw[: len(raw) // 2])
    return path


def bad_pixdim(tmp_path, value):
    img = nib.Nifti1Image(np.zeros((6, 6, 4), np.float32), None)
    img.header["pixdim"][1:4] = [1.0, value, 1.0]
    path = tmp_path / f"pixdim_{value}.nii.gz"
    nib.save(img, str(path))
    return path


def nan_volume(tmp_path):
    data = np.zeros((6, 6, 4), np.float32)
    data[1, 2, 3] = np.nan
    data[0, 0, 0] = np.inf
    return write(tmp_path / "nan.nii.gz", data)


BAD_INPUTS = {
    "missing file": (lambda p: p / "nope.nii.gz", "not found"),
    "not a NIfTI (text)": (lambda p: (p / "notes.txt").write_text("hello") and p / "notes.txt", "not a NIfTI"),
    "not a NIfTI (bad gzip)": (lambda p: (p / "fake.nii.gz").write_bytes(b"not gzip at all") and p / "fake.nii.gz",
                               "not a NIfTI"),
    "truncated gzip": (truncated, "truncated or corrupt"),
    "2D volume": (lambda p: write(p / "flat.nii.gz", np.zeros((6, 6), np.float32)), "3D volume is needed"),
    "4D volume": (lambda p: write(p / "series.nii.gz", np.zeros((6, 6, 4, 3), np.float32)), "3D volume is needed"),
    "NaN/inf voxels": (nan_volume, "2 NaN or infinite voxels"),
    "zero spacing": (lambda p: bad_pixdim(p, 0.0), "must be positive"),
    "negative spacing": (lambda p: bad_pixdim(p, -2.0), "must be positive"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_raises_named_error(tmp_path, case):
    make, expected = BAD_INPUTS[case]
    path = make(tmp_path)
    with pytest.raises(InputError) as info:
        load_volume(path)
    message = str(info.value)
    assert expected in message
    assert path.name in message
    assert "\n" not in message


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_cli_bad_input_exit_2_one_line_nothing_written(tmp_path, good, case, capsys):
    make, expected = BAD_INPUTS[case]
    path = make(tmp_path)
    report = tmp_path / "report.json"
    code = main(["evaluate", "--pred", str(path), "--ref", str(good), "--json", str(report)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and expected in err and len(err.splitlines()) == 1
    assert not report.exists()


def test_label_image_shape_mismatch(tmp_path, good, capsys):
    label = write(tmp_path / "label.nii.gz", np.zeros((6, 6, 5), np.uint8))
    with pytest.raises(InputError, match="does not match"):
        load_image_and_label(good, label)
    assert main(["evaluate", "--pred", str(label), "--ref", str(good)]) == 2
    assert "does not match" in capsys.readouterr().err


def test_label_on_other_grid_is_refused(tmp_path, good):
    shifted = np.eye(4)
    shifted[:3, 3] = 5.0
    label = write(tmp_path / "label.nii.gz", np.zeros((6, 6, 4), np.uint8), shifted)
    with pytest.raises(InputError, match="not aligned"):
        load_image_and_label(good, label)


def test_implausible_spacing_in_metres(tmp_path):
    path = write(tmp_path / "metres.nii.gz", np.zeros((6, 6, 4), np.float32), np.diag([1000.0, 1000.0, 1000.0, 1]))
    with pytest.raises(InputError, match="implausible"):
        load_volume(path)


def test_4d_with_single_volume_is_accepted(tmp_path):
    volume = load_volume(write(tmp_path / "one.nii.gz", np.ones((6, 6, 4, 1), np.float32)))
    assert volume.shape == (6, 6, 4)


def test_roundtrip_keeps_affine_and_values(tmp_path):
    affine = np.array([[0, -1.5, 0, 10], [2.0, 0, 0, -20], [0, 0, 3.0, 5], [0, 0, 0, 1]])
    data = np.random.default_rng(1).normal(size=(5, 6, 7)).astype(np.float32)
    save_volume(data, affine, tmp_path / "x.nii.gz")
    back = load_volume(tmp_path / "x.nii.gz")
    np.testing.assert_allclose(back.affine, affine)
    np.testing.assert_array_equal(back.array, data)
    assert back.spacing == pytest.approx((2.0, 1.5, 3.0))


def test_save_is_atomic_and_protects_inputs(tmp_path, good):
    before = good.read_bytes()
    with pytest.raises(InputError, match="inputs are never overwritten"):
        save_volume(np.ones((6, 6, 4)), np.eye(4), good, protect=(good,))
    assert good.read_bytes() == before
    # a failing write leaves neither a partial file nor a temporary file behind
    with pytest.raises(Exception):
        save_volume(np.array([object()] * 8).reshape(2, 2, 2), np.eye(4), tmp_path / "broken.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.nii.gz"]


def test_gzip_output_is_deterministic(tmp_path):
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    a = save_volume(data, np.eye(4), tmp_path / "a.nii.gz").read_bytes()
    b = save_volume(data, np.eye(4), tmp_path / "b.nii.gz").read_bytes()
    assert a == b and gzip.decompress(a)


def test_outputs_get_the_usual_file_mode(tmp_path):
    umask = os.umask(0o022)
    try:
        path = save_volume(np.zeros((2, 2, 2)), np.eye(4), tmp_path / "m.nii.gz")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's private 0600
    finally:
        os.umask(umask)
