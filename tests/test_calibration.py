"""The benchmark's calibration rows: the supervised specialist (trained, cached, shipped), the oracle organ ROI and the
oracle pseudo-healthy image; kept apart from the zero-shot rows in results.json, the table, the gate and every mean."""

import json
from dataclasses import asdict, replace
from types import SimpleNamespace

import numpy as np
import pytest

from diffugts_core.aova import run_aova
from diffugts_core.backbone.registry import load_registry, sha256_file
from diffugts_core.cli import build_parser
from diffugts_core.data import phantoms
from diffugts_core.data.splits import SEEDS
from diffugts_core.experiments.gate import regression_metrics
from diffugts_core.experiments.zero_shot import (CALIBRATION, METHODS, ZeroShotConfig, add_supervised_upper_bound,
                                                 combine_settings, format_table, head_mask, oracle_roi,
                                                 tumor_coverage)
from diffugts_core.inpaint import ring_fill
from diffugts_core.io import InputError
from diffugts_core.metrics import dice
from diffugts_core.training import recipes
from diffugts_core.training.specialist import (SpecialistConfig, TrainedSpecialist, shipped_specialist,
                                               specialist_network, train_specialist)

SHIPPED = ("lung", "colon", "hepatic_vessel")  # the unseen categories of the quick benchmark CI runs
TINY = SpecialistConfig(category="lung", features=(4, 4, 8, 16, 32, 4), steps=40, crop=32, batch=4, lr=1e-2,
                        min_voxels=3)


def _disk_case(rng, shape=(48, 48, 6)) -> SimpleNamespace:
    """Soft tissue with noise and one bright disk through the middle slices: the tumor."""
    image = rng.normal(40.0, 15.0, shape).astype(np.float32)
    x, y = np.ogrid[:shape[0], :shape[1]]
    cx, cy = rng.integers(8, shape[0] - 8, 2)
    tumor = np.zeros(shape, bool)
    tumor[..., 1:-1] = ((x - cx) ** 2 + (y - cy) ** 2 <= 16)[..., None]
    image[tumor] += 150.0
    return SimpleNamespace(image=image, tumor=tumor.astype(np.uint8), modality="CT")


def test_specialist_trained_briefly_marks_the_tumor_and_saves_what_it_loads(tmp_path):
    rng = np.random.default_rng(0)
    specialist = train_specialist(TINY, cases=[_disk_case(rng) for _ in range(4)],
                                  validation=[_disk_case(rng) for _ in range(2)], device="cpu", progress=False)
    new = _disk_case(rng)
    mask = specialist.segment(new.image, new.modality)
    assert dice(mask, new.tumor) > 0.7  # where the tumor is, and little else
    assert specialist.validation_dsc > 0.7 and "2 validation cases given" in specialist.provenance
    specialist.save(tmp_path)
    loaded = TrainedSpecialist.load(tmp_path, device="cpu")
    assert loaded.config == TINY and loaded.threshold == specialist.threshold
    assert loaded.weights_sha256() == specialist.weights_sha256() == sha256_file(tmp_path / "specialist.safetensors")
    np.testing.assert_array_equal(loaded.segment(new.image, new.modality), mask)


def test_a_specialist_is_trained_once_into_the_cache_and_reused(tmp_path, monkeypatch):
    trained = []

    def train(config, **kwargs):
        trained.append(config.category)
        return TrainedSpecialist(specialist_network(config).eval(), config)  # untrained: only the caching counts

    monkeypatch.setattr(recipes, "train_specialist", train)
    first = recipes.specialist_for("kidney", tmp_path)  # none shipped for kidney: trained, into the cache
    second = recipes.specialist_for("kidney", tmp_path)
    assert trained == ["kidney"] and (tmp_path / "specialist-kidney" / "specialist.safetensors").is_file()
    assert second.weights_sha256() == first.weights_sha256()
    meta = json.loads((tmp_path / "specialist-kidney" / "specialist.json").read_text())
    meta["config"]["steps"] += 1  # a cache of another configuration is trained again
    (tmp_path / "specialist-kidney" / "specialist.json").write_text(json.dumps(meta))
    recipes.specialist_for("kidney", tmp_path)
    assert trained == ["kidney", "kidney"]
    # lung is shipped: used when the cache has none of its own, and nothing is trained or written
    assert recipes.specialist_for("lung", tmp_path).config == SpecialistConfig(category="lung")
    assert trained == ["kidney", "kidney"] and not (tmp_path / "specialist-lung").exists()


@pytest.mark.parametrize("category", SHIPPED)
def test_shipped_specialists_are_registered_small_and_of_the_default_configuration(category):
    entry = load_registry()[f"specialist-{category}"]
    assert entry["licence"] == "Apache-2.0" and entry["size_mb"] < 5
    assert entry["command"].startswith(f"diffugts train-specialist --category {category} ")
    assert set(entry["files"]) == {"specialist.json", "specialist.safetensors"}
    specialist = shipped_specialist(category, device="cpu")  # every file's sha256 checked
    assert specialist.config == SpecialistConfig(category=category)
    assert specialist.validation_dsc is not None and "validation cases of" in specialist.provenance


def test_train_specialist_defaults_are_the_configuration_defaults():
    args = build_parser().parse_args(["train-specialist", "--category", "lung", "--out", "x"])
    defaults = SpecialistConfig()
    assert (args.steps, args.train_cases, args.seed) == (defaults.steps, defaults.train_cases, defaults.seed)


@pytest.mark.parametrize("category", ["liver", "pancreas", "lung", "colon", "hepatic_vessel"])  # kidney tumors may
def test_the_oracle_roi_holds_the_whole_tumor_and_little_else(category):  # grow out of the kidney: below 1 there
    case = phantoms.generate_case(category, 0, SEEDS["test"], (64, 64, 32))
    roi = oracle_roi(case, 5.0)
    assert tumor_coverage(roi, case.tumor) == 1.0
    assert roi[case.organ_mask()].all() and roi.mean() < 0.4  # the organ and its margin, not the body
    assert tumor_coverage(np.zeros_like(roi), case.tumor) == 0.0


@pytest.fixture(scope="module")
def shipped_pipeline():
    from diffugts_core.pipeline import DiffuGTSPipeline

    return DiffuGTSPipeline.from_pretrained(device="cpu")


def test_the_true_healthy_image_lets_the_head_find_the_tumor_a_ring_fill_hides(shipped_pipeline):
    liver = phantoms.generate_case("liver", 0, SEEDS["test"])
    tumor_slices = np.flatnonzero(liver.tumor.any((0, 1)))
    slab = slice(tumor_slices[0] - 2, tumor_slices[-1] + 3)  # the tumor's slices and two more each side: seconds
    case = SimpleNamespace(image=liver.image[..., slab], healthy=liver.healthy[..., slab],
                           tumor=liver.tumor[..., slab], modality=liver.modality, spacing=liver.spacing)
    roi = oracle_roi(liver, 5.0)[..., slab]  # the whole liver: a ring fill is far from it, the true healthy image not
    anomaly = run_aova(shipped_pipeline.heads, shipped_pipeline.backbone, shipped_pipeline.text_encoder, case.image,
                       case.modality, "liver").anomaly
    oracle = dice(head_mask(shipped_pipeline, case, roi, case.healthy, anomaly), case.tumor)
    filled = dice(head_mask(shipped_pipeline, case, roi, ring_fill(case.image, roi), anomaly), case.tumor)
    assert oracle > max(filled + 0.1, 0.5)


def test_the_oracle_roi_row_inpaints_and_refines_the_region_it_is_handed(shipped_pipeline):
    """The oracle-ROI row end to end (the CI-size benchmark leaves it out): the pipeline's refinement works in the true
    organ region instead of its own, and finds the tumor there."""
    liver = phantoms.generate_case("liver", 0, SEEDS["test"])
    tumor_slices = np.flatnonzero(liver.tumor.any((0, 1)))
    slab = slice(tumor_slices[0] - 2, tumor_slices[-1] + 3)
    roi = oracle_roi(liver, 5.0)[..., slab]
    result = shipped_pipeline.segment_grid(liver.image[..., slab], liver.spacing, "liver", roi=roi)
    assert (result.residuals.roi == roi).all() and not result.refined[~roi].any()
    assert dice(result.refined, liver.tumor[..., slab]) > 0.2  # 0.37 here: the whole liver holds false positives too


def test_unknown_calibration_rows_are_refused():
    with pytest.raises(ValueError, match="unknown calibration rows"):
        ZeroShotConfig(calibration=("specialist", "oracle_organ"))


def test_a_region_of_interest_on_another_grid_is_refused(shipped_pipeline):
    case = phantoms.generate_case("liver", 0, SEEDS["test"], (64, 64, 32))
    with pytest.raises(InputError, match="region of interest has shape"):
        shipped_pipeline.segment_grid(case.image, case.spacing, "liver", roi=np.ones((8, 8, 8), bool))


def _results(category: str, full: float, specialist: float) -> dict:
    """A benchmark's results.json for one unseen category, every row at ``full`` but the specialist's."""
    rows = {**{m: full for m in METHODS}, **{m: full + 0.1 for m in CALIBRATION}, "specialist": specialist}
    scores = {f"{metric}_{method}": value for method, value in rows.items() for metric in ("dsc", "nsd")}
    return {"setting": f"loo-{category}", "seen": [], "unseen": [category], "config": asdict(ZeroShotConfig()),
            "seeds": {"test": 3000}, "methods": dict(METHODS), "calibration": dict(CALIBRATION),
            "categories": [{"category": category, "cases": 1, "auroc": 0.5, "roi_tumor_coverage": 0.25,
                            "oracle_roi_tumor_coverage": 1.0, **scores}],
            "mean_unseen": scores, "per_case": [{"case": f"{category}_000", "category": category, **scores}],
            "specialists": {category: {"threshold": 0.6, "validation_dsc": 0.7}}, "timing": {}}


def test_calibration_rows_stay_apart_in_the_table_the_gate_and_the_leave_one_out_mean():
    table = format_table(_results("brain", 0.2, 0.9))
    methods, calibration = table.split("**Calibration rows**")
    assert "DiffuGTS (residual head)" in methods and not any(label in methods for label in CALIBRATION.values())
    assert all(label in calibration for label in CALIBRATION.values())
    assert f"| {CALIBRATION['specialist']} | 90.0 | 90.0 | 90.0 | 90.0 |" in table
    assert "ROI tumor coverage" in table and "brain 25.0 (true organ region 100.0)" in table
    assert "brain 0.6 (validation DSC 70.0)" in table  # the specialist's threshold and its provenance
    metrics = regression_metrics(_results("brain", 0.2, 0.9))
    assert set(metrics["mean_unseen"]["dsc"]) == set(METHODS)  # the gate reads no calibration row
    combined = combine_settings([_results("liver", 0.4, 0.8), _results("kidney", 0.2, 0.6)])
    assert combined["calibration"] == CALIBRATION and combined["methods"] == METHODS
    assert combined["mean_unseen"]["dsc_full"] == pytest.approx(0.3)
    assert combined["mean_unseen"]["dsc_specialist"] == pytest.approx(0.7)
    assert set(combined["specialists"]) == {"liver", "kidney"}
    assert [c["roi_tumor_coverage"] for c in combined["categories"]] == [0.25, 0.25]


def test_the_supervised_upper_bound_carries_the_calibration_rows():
    results = _results("brain", 0.2, 0.9)  # no setting trains on brain tumors: nothing is loaded
    bounded = add_supervised_upper_bound(results, replace(ZeroShotConfig(), setting="ct-mri"),
                                         lambda setting: pytest.fail("no heads to load"))
    assert bounded["calibration"] == CALIBRATION and bounded["specialists"] == results["specialists"]
    for key in ("dsc_specialist", "nsd_oracle_roi", "dsc_oracle_healthy"):
        assert bounded["mean_unseen"][key] == results["mean_unseen"][key]
        assert bounded["categories"][0][key] == results["categories"][0][key]
        assert bounded["per_case"][0][key] == results["per_case"][0][key]
    assert bounded["categories"][0]["roi_tumor_coverage"] == 0.25 and "**Calibration rows**" in format_table(bounded)
