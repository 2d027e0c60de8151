"""The whole pipeline and `diffugts segment`: the mask lands on the tumor in the input's own grid, batch mode goes on
past a bad case, reports say what produced a mask, and the same seed gives the same mask."""

import csv
import json
from dataclasses import replace

import numpy as np
import pytest

from diffugts_core.data import phantoms
from diffugts_core.cli import main
from diffugts_core.io import load_volume, save_volume
from diffugts_core.metrics import dice
from diffugts_core.pipeline import DiffuGTSPipeline
from diffugts_core.reports import segment_cases
from diffugts_core.residual import TrainedResidualHead

from .test_cli import _write_reoriented
from .test_io import BAD_INPUTS


@pytest.fixture(scope="module")
def pipeline():
    return DiffuGTSPipeline.from_pretrained(device="cpu")


@pytest.fixture(scope="module")
def liver_case():
    return phantoms.generate_case("liver", 1, 3000)  # test seed; the liver is seen by the shipped heads


def test_shipped_pipeline_segments_a_liver_tumor(pipeline, liver_case):
    result = pipeline.segment_grid(liver_case.image, liver_case.spacing, "liver")
    tumor = liver_case.tumor > 0
    assert dice(result.refined, tumor) > 0.4, dice(result.refined, tumor)
    assert result.refined.sum() and (result.refined & tumor).sum() / result.refined.sum() > 0.5  # mostly on the tumor
    healthy, organ = result.residuals.healthy, liver_case.organ_mask("liver") & ~tumor
    covered = tumor & result.residuals.roi
    before = abs(liver_case.image[covered].mean() - liver_case.image[organ].mean())
    after = abs(healthy[covered].mean() - liver_case.image[organ].mean())
    assert after < before, (before, after)  # the pseudo-healthy tumor looks more like the liver around it
    assert np.array_equal(healthy[~result.residuals.roi], liver_case.image[~result.residuals.roi])
    assert set(result.timings) == {"aova", "detection", "inpainting", "residuals", "residual_head", "postprocess"}


def test_same_seed_same_mask_and_several_seeds_give_an_uncertainty_map(pipeline, liver_case):
    # determinism and the spread do not depend on the step count
    few_steps = replace(pipeline.residual_head("CT").config.inpaint, steps=4)
    first = pipeline.segment_grid(liver_case.image, liver_case.spacing, "liver", seed=3, inpaint=few_steps)
    again = pipeline.segment_grid(liver_case.image, liver_case.spacing, "liver", seed=3, inpaint=few_steps)
    assert np.array_equal(first.refined, again.refined)
    assert np.array_equal(first.residuals.healthy, again.residuals.healthy)
    two = pipeline.segment_grid(liver_case.image, liver_case.spacing, "liver", seeds=2, seed=3, inpaint=few_steps)
    spread = two.intermediates["uncertainty"]
    roi = two.residuals.roi
    assert spread[roi].mean() > 0 and np.all(spread[~roi] == 0)
    assert "uncertainty" not in first.intermediates


@pytest.mark.parametrize("codes,degrees", [("LPS", 0.0), ("SLA", 15.0)], ids=["LPS", "oblique-permuted"])
def test_segment_writes_the_mask_over_the_tumor_in_the_input_grid(tmp_path, codes, degrees, liver_case):
    tumor, _, affine = _write_reoriented(liver_case, codes, tmp_path / "case.nii.gz", degrees)
    before = (tmp_path / "case.nii.gz").read_bytes()
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "case.nii.gz"), "--organ", "liver", "-o", str(out / "mask.nii.gz"),
                 "--save-intermediates", str(out / "maps"), "--no-progress"]) == 0
    mask = load_volume(out / "mask.nii.gz", dtype=np.uint8)
    assert mask.shape == tumor.shape and np.allclose(mask.affine, affine)
    assert dice(mask.array > 0, tumor) > 0.35  # on the tumor, in the file's own voxel order
    report = json.loads((out / "mask_report.json").read_text())
    assert report["setting"] == "seen-unseen" and report["seed"] == 0 and report["peak_memory_mb"] > 0
    assert {"model/unet", "model/vae", "heads/heads.safetensors", "heads/residual.safetensors"} <= set(
        report["weights_sha256"])
    assert "validation split" in report["thresholds"]["refinement"]["provenance"]
    assert report["total_s"] > 0 and "inpainting" in report["timings_s"]
    assert (out / "mask_qc.png").read_bytes()[:4] == b"\x89PNG"
    for name in ("anomaly", "roi", "pseudo_healthy", "pixel_residual", "feature_residual", "refined_probability"):
        assert load_volume(out / "maps" / f"mask_{name}.nii.gz").shape == tumor.shape
    assert (tmp_path / "case.nii.gz").read_bytes() == before  # the input is untouched


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_segment_bad_input_is_one_clean_line_and_nothing_written(tmp_path, case, capsys):
    make, expected = BAD_INPUTS[case]
    path = make(tmp_path)
    out = tmp_path / "out"
    assert main(["segment", str(path), "--organ", "liver", "-o", str(out / "mask.nii.gz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expected in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_segment_refuses_an_empty_prompt_a_missing_organ_and_a_bad_csv(tmp_path, capsys):
    image = tmp_path / "case.nii.gz"
    case = phantoms.generate_case("liver", 0, 3000, (32, 32, 16))
    save_volume(case.image, case.affine, image)
    assert main(["segment", str(image), "--organ", "liver", "--prompt", " ", "-o", str(tmp_path / "m.nii.gz")]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    assert main(["segment", str(image), "-o", str(tmp_path / "m.nii.gz")]) == 2
    assert "--organ" in capsys.readouterr().err
    (tmp_path / "cases.csv").write_text("path,organ\ncase.nii.gz,liver\n")
    assert main(["segment", str(tmp_path / "cases.csv"), "-o", str(tmp_path / "out")]) == 2
    assert "'image' column" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_segment_batch_skips_a_bad_case_and_goes_on(tmp_path, capsys):
    case = phantoms.generate_case("liver", 0, 3000)
    save_volume(case.image, case.affine, tmp_path / "good.nii.gz")
    (tmp_path / "broken.nii.gz").write_bytes(b"not gzip at all")
    with (tmp_path / "cases.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerows([["image", "organ", "case_id"], ["broken.nii.gz", "liver", "broken"],
                          ["good.nii.gz", "liver", "good"]])
    jobs = segment_cases(tmp_path / "cases.csv", organ=None, out=tmp_path / "out")
    assert [j.case_id for j in jobs] == ["broken", "good"] and jobs[1].mask == tmp_path / "out" / "good_mask.nii.gz"
    assert main(["segment", str(tmp_path / "cases.csv"), "-o", str(tmp_path / "out"), "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert "broken" in captured.err and "skipped" in captured.err and "1 of 2 cases segmented" in captured.out
    mask = load_volume(tmp_path / "out" / "good_mask.nii.gz", dtype=np.uint8).array > 0
    assert dice(mask, case.tumor > 0) > 0.3
    assert not (tmp_path / "out" / "broken_mask.nii.gz").exists()


def test_shipped_residual_head_is_of_the_shipped_setting_and_validated():
    from diffugts_core.heads import heads_folder

    trained = TrainedResidualHead.load(heads_folder("default"))
    assert trained.setting == "seen-unseen"
    assert trained.thresholds.provenance.startswith("validation split of seen categories")


def test_mri_cases_get_the_mri_head_and_a_folder_without_one_serves_them_with_its_one_head(tmp_path):
    import shutil
    from dataclasses import replace

    from diffugts_core.experiments.zero_shot import pipeline_thresholds
    from diffugts_core.heads import TrainedHeads, heads_folder
    from diffugts_core.io import InputError
    from diffugts_core.residual import load_modality_heads

    shipped = heads_folder("default")
    heads, residual, modality_heads = (TrainedHeads.load(shipped), TrainedResidualHead.load(shipped),
                                       load_modality_heads(shipped))
    pipeline = DiffuGTSPipeline(None, None, heads, residual, modality_heads=modality_heads)
    assert pipeline.residual_head("mri") is modality_heads["MRI"] and pipeline.residual_head("CT") is residual
    assert modality_heads["MRI"].thresholds.provenance.startswith("synthetic anomalies in healthy MRI validation")
    reported = pipeline_thresholds(pipeline)  # what results.json says about them
    assert set(reported) == {"detection", "refinement", "refinement_mri"}
    assert reported["refinement_mri"]["head"] == modality_heads["MRI"].thresholds.head
    assert reported["refinement_mri"]["used_by"][0] == "full, on MRI cases"
    old = tmp_path / "old"
    shutil.copytree(shipped, old, ignore=shutil.ignore_patterns("residual_*"))
    assert load_modality_heads(old) == {}
    single = DiffuGTSPipeline(None, None, TrainedHeads.load(old), TrainedResidualHead.load(old),
                              modality_heads=load_modality_heads(old))
    assert single.residual_head("MRI") is single.residual
    with pytest.raises(InputError, match="trained for loo-liver"):
        DiffuGTSPipeline(None, None, heads, residual,
                         modality_heads={"MRI": replace(modality_heads["MRI"], setting="loo-liver")})


# The fixed set: brain test cases 0 and 1 (seed 3000; no setting sees brain tumors). Floors are today's figures less
# 0.03 (measured 0.140 and 0.129): a regression fails, an improvement ratchets them up. Case 2 (0.043, a floor of 0.01)
# said little for its minute of CI; the MRI benchmark (docs/results/zero_shot_mri.md) holds the full set.
MRI_CASE_FLOORS = {0: 0.11, 1: 0.10}


def test_shipped_pipeline_segments_mri_brain_tumors_with_the_mri_head(pipeline):
    scores = {}
    for index, floor in MRI_CASE_FLOORS.items():
        case = phantoms.generate_case("brain", index, 3000)
        result = pipeline.segment_grid(case.image, case.spacing, "brain", modality="MRI")
        assert result.thresholds["residual_head"] == "residual_mri"
        assert result.thresholds["refinement"] == vars(pipeline.modality_heads["MRI"].thresholds)
        scores[index] = dice(result.refined, case.tumor > 0)
    assert all(scores[index] >= floor for index, floor in MRI_CASE_FLOORS.items()), scores


def test_evaluate_refinement_reports_every_unseen_category_and_the_pseudo_healthy_hu(tmp_path, capsys):
    assert main(["evaluate-refinement", "--test-per-category", "1", "--inpaint-steps", "5", "--json",
                 str(tmp_path / "r.json"), "--no-progress"]) == 0
    assert "mean dsc_full" in capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    rows = {r["category"]: r for r in report["categories"]}
    assert set(rows) == {"lung", "colon", "hepatic_vessel"} and len(report["cases"]) == 3
    vessel = rows["hepatic_vessel"]
    assert abs(vessel["hu_healthy_in_tumor"] - vessel["hu_organ"]) < abs(vessel["hu_input_in_tumor"] - vessel["hu_organ"])
    assert all({"dsc_aova", "dsc_fusion", "dsc_full", "nsd_full"} <= set(r) for r in rows.values())
    # hepatic_vessel_000: measured 0.417 DSC at the head's 25 steps; 5 here (notebook 00 measured 0.439 at 5)
    assert vessel["dsc_full"] > 0.3 and vessel["nsd_full"] > 0.15, vessel
    assert "validation split" in vessel["thresholds"]["refinement"]


def test_window_study_compares_paths_on_validation_cases_only(pipeline):
    from diffugts_core.experiments.speed import format_window_study, window_study
    from diffugts_core.data.splits import role_categories

    report = window_study(pipeline, per_category=1, variants=((2, 4),), steps=2)
    seen = role_categories(pipeline.heads.setting, "seen")
    assert report["cases"] == [f"{c}_000" for c in seen]  # one validation case per seen category, no unseen one
    whole, windows = report["paths"]
    assert whole["path"] == "whole slices" and whole["speedup"] == pytest.approx(1.0)
    assert windows["path"] == "windows: context 2, sides x4" and windows["seconds"] > 0
    assert len(report["per_case"]) == 2 * len(seen)
    assert all(0 < r["mae_roi_hu"] < 1000 for r in report["per_case"])
    assert "windows: context 2, sides x4" in format_window_study(report)


def test_speed_report_bounds_the_window_speed_up_by_what_both_paths_pay():
    from diffugts_core.experiments.speed import codec_seconds, format_speed_report

    from .test_backbone import tiny_backbone

    backbone = tiny_backbone()
    image = np.zeros((32, 32, 6), np.float32)
    roi = np.zeros(image.shape, bool)
    assert codec_seconds(backbone, image, "CT", roi, 4) < 0.05  # no ROI slice: nothing to encode
    roi[10:14, 10:14, 2:4] = True
    assert codec_seconds(backbone, image, "CT", roi, 4) > 0
    path = {"timings_s": {"inpainting": 10.0}, "total_s": 12.0, "dsc": 0.5, "mae_hu": 50.0, "roi_voxels": 32,
            "roi_slices": 2}
    report = {"cases": [{"case": "liver_000", "roi": path, "full_slice": path}], "shape": [32, 32, 6], "device": "cpu",
              "load_s": 0.1, "default_path": "full_slice", "stages_mean_s": {"inpainting": 10.0},
              "total_mean_s": {"roi": 12.0, "full_slice": 12.0}, "inpainting_mean_s": {"roi": 5.0, "full_slice": 10.0},
              "inpainting_speedup": 2.0, "dsc_mean": {"roi": 0.5, "full_slice": 0.5},
              "mae_hu_mean": {"roi": 50.0, "full_slice": 50.0}, "codec_mean_s": 2.5, "peak_memory_mb": 100.0}
    text = format_speed_report(report)
    assert "2.00x as fast as whole-slice" in text and "at most 4.00x as fast" in text  # 10 s / 2.5 s


def test_inpaint_steps_must_be_positive(pipeline, tmp_path):
    from diffugts_core.io import InputError

    case = phantoms.generate_case("liver", 0, 3000, (32, 32, 16))
    volume = load_volume(save_volume(case.image, case.affine, tmp_path / "x.nii.gz"))
    with pytest.raises(InputError, match="inpaint_steps must be at least 1, got 0"):
        pipeline(volume, "liver", inpaint_steps=0)
