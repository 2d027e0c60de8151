"""``diffugts segment --dry-run``: the estimated time and peak memory of a run, printed before anything heavy starts;
nothing written, sizes read from a header or --shape, bad input refused in one line, the 2D default and MAISI."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from diffugts_core.backbone.maisi import write_tiny_bundle
from diffugts_core.cli import main
from diffugts_core.experiments import dry_run
from diffugts_core.experiments.dry_run import NetworkCost, estimate_segment_run

FIXED_COSTS = {"encoder": NetworkCost(1e-6, 1e-3), "denoiser": NetworkCost(1e-5, 2e-3),
               "decoder": NetworkCost(2e-6, 3e-3)}


@pytest.fixture
def fixed_costs(monkeypatch):
    """Per-cell costs as if measured, so that only the counting is under test (and no network is timed)."""
    monkeypatch.setattr(dry_run, "network_costs", lambda backbone: FIXED_COSTS)


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    return write_tiny_bundle(tmp_path_factory.mktemp("maisi") / "bundle")


def _nifti(path: Path, shape, spacing=(2.5, 2.5, 4.0)) -> Path:
    nib.save(nib.Nifti1Image(np.zeros(shape, np.int16), np.diag([*spacing, 1.0])), str(path))
    return path


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")}


def test_default_model_prints_time_and_memory_and_writes_nothing(tmp_path, capsys):
    image = _nifti(tmp_path / "case.nii.gz", (96, 96, 40))
    before = _files(tmp_path)
    assert main(["segment", str(image), "--organ", "liver", "-o", str(tmp_path / "out" / "mask.nii.gz"),
                 "--report", str(tmp_path / "r.json"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "40 axial slices of 128x128" in out  # 40 slices of 4 mm stay 40 on the model's grid
    assert "whole slices: about " in out and " s, peak memory about " in out and " MB " in out
    assert _files(tmp_path) == before


def test_estimate_grows_with_the_case(tmp_path, fixed_costs):
    small = estimate_segment_run("default", shape=(128, 128, 16))
    large = estimate_segment_run("default", shape=(128, 128, 96))
    assert large.seconds("whole slices") == pytest.approx(6 * small.seconds("whole slices"))
    assert large.peak_mb("whole slices") > small.peak_mb("whole slices")  # a batch of 32 slices, not 16
    # from a header: slices of 2 mm are resampled to the model's 4 mm, so half as many
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    resampled = estimate_segment_run("default", shape=(256, 256, 32), affine=affine)
    assert resampled.seconds("whole slices") == pytest.approx(small.seconds("whole slices"))


def test_maisi_bundle_without_weights_gives_roi_window_and_whole_volume(tiny_bundle, tmp_path, capsys):
    configs_only = tmp_path / "bundle"
    (configs_only / "configs").mkdir(parents=True)
    for config in (tiny_bundle / "configs").iterdir():
        (configs_only / "configs" / config.name).write_text(config.read_text())
    before = _files(tmp_path)
    assert main(["segment", "--model", str(configs_only), "--shape", "128,128,128", "--dry-run", "--device",
                 "cpu"]) == 0
    out = capsys.readouterr().out
    assert "ROI window: about " in out and "whole volume: about " in out and "5 % of the volume" in out
    assert _files(tmp_path) == before


def test_maisi_roi_window_is_cheaper_and_both_grow_with_the_volume(tiny_bundle, fixed_costs):
    small = estimate_segment_run(tiny_bundle, shape=(128, 128, 128), device="cpu")
    large = estimate_segment_run(tiny_bundle, shape=(256, 256, 128), device="cpu")
    for estimate in (small, large):
        assert estimate.seconds("ROI window") < estimate.seconds("whole volume")
        assert estimate.peak_mb("ROI window") < estimate.peak_mb("whole volume")
    for path in ("ROI window", "whole volume"):
        assert large.seconds(path) > small.seconds(path)
    # the window of inpaint3d for a 5 % lesion: 24^3 latent cells of the 32^3 grid at 128^3, 32^3 of 64x64x32
    assert [c.largest for c in small.plans["ROI window"] if c.network == "denoiser"] == [24 ** 3]
    assert [c.largest for c in large.plans["ROI window"] if c.network == "denoiser"] == [32 ** 3]


def test_maisi_estimate_from_a_header_is_on_the_processing_grid(tiny_bundle, tmp_path, capsys, fixed_costs):
    # 400 x 400 x 100 voxels of 0.8 x 0.8 x 2 mm: 320 x 320 x 200 mm, 128 x 128 x 50 on the 2.5 x 2.5 x 4 mm grid
    image = _nifti(tmp_path / "case.nii.gz", (400, 400, 100), spacing=(0.8, 0.8, 2.0))
    assert main(["segment", str(image), "--model", str(tiny_bundle), "--dry-run", "--device", "cpu"]) == 0
    assert "128x128x50 voxels (the processing grid)" in capsys.readouterr().out


@pytest.mark.parametrize("arguments, words", [
    (["missing.nii.gz", "--dry-run"], "not found"),
    (["not_nifti.nii.gz", "--dry-run"], "not a NIfTI file"),
    (["case.nii.gz", "--shape", "64,64,64", "--dry-run"], "not both"),
    (["--dry-run"], "pass IMAGE"),
    ([".", "--dry-run"], "estimates one case"),
    (["--shape", "64,64,64", "--dry-run", "--seeds", "0"], "--seeds"),
    (["--shape", "64,64,64", "--dry-run", "--lesion-share", "1.5"], "--lesion-share"),
    (["case.nii.gz", "--shape", "64,64,64", "-o", "mask.nii.gz"], "--shape sizes a --dry-run"),
    (["case.nii.gz"], "-o/--out"),
], ids=["missing", "not-nifti", "image-and-shape", "neither", "folder", "seeds", "lesion-share",
        "shape-without-dry-run", "no-out"])
def test_bad_input_is_refused_in_one_line_and_nothing_is_written(arguments, words, tmp_path, capsys, monkeypatch,
                                                                   fixed_costs):
    monkeypatch.chdir(tmp_path)
    _nifti(tmp_path / "case.nii.gz", (32, 32, 16))
    (tmp_path / "not_nifti.nii.gz").write_text("a text file")
    before = _files(tmp_path)
    assert main(["segment", *arguments]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and words in err and "\n" not in err
    assert _files(tmp_path) == before
