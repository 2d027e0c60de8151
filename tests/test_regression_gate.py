"""The zero-shot benchmark's regression gate: its logic on known cases, recording a baseline, the benchmark's settings
and the reuse of stored results. The quick benchmark against the committed baseline: tests/test_quick_benchmark.py."""

import copy
import json
import shutil
from pathlib import Path

import pytest

from dataclasses import asdict, replace

from diffugts_core.data import phantoms
from diffugts_core import vocabulary
from diffugts_core.cli import main
from diffugts_core.experiments.gate import gate_failures, regression_metrics
from diffugts_core.experiments.zero_shot import (METHODS, ZeroShotConfig, add_supervised_upper_bound,
                                                 benchmark_settings, combine_settings, format_table,
                                                 pipeline_thresholds, reusable_results, supervised_setting,
                                                 write_benchmark)
from diffugts_core.data.splits import SEEDS, role_categories
from diffugts_core.residual import ResidualConfig, TrainedResidualHead
from diffugts_core.training import recipes
from diffugts_core.training.recipes import evaluated_modalities, setting_pipeline
from diffugts_core.training.specialist import shipped_specialist

ROOT = Path(__file__).resolve().parents[1]
GATE = ROOT / "notebooks" / "regression"


def _golden():
    baseline = json.loads((GATE / "baseline.json").read_text())
    return baseline, regression_metrics(json.loads((GATE / "results_quick.json").read_text()))


def test_baseline_is_the_metrics_of_the_committed_golden_results():
    baseline, golden = _golden()
    assert baseline["metrics"] == golden
    assert gate_failures(golden, baseline) == []


def test_gate_binds_per_case_per_category_and_on_the_mean():
    baseline, golden = _golden()
    case_drop = copy.deepcopy(golden)
    case_drop["by_case"]["hepatic_vessel_001"]["dsc"] -= 0.06  # one case, beyond its tolerance 0.05
    assert gate_failures(case_drop, baseline) == ["hepatic_vessel_001 DSC of the full method fell from 0.0829 to "
                                                  "0.0229, more than the tolerance 0.05"]
    small = copy.deepcopy(golden)
    small["by_case"]["hepatic_vessel_001"]["dsc"] -= 0.04
    assert gate_failures(small, baseline) == []
    category_drop = copy.deepcopy(golden)
    category_drop["by_category"]["hepatic_vessel"]["nsd"]["full"] -= 0.04
    assert [f for f in gate_failures(category_drop, baseline) if "hepatic_vessel NSD" in f]
    missing = copy.deepcopy(golden)
    del missing["by_case"]["colon_001"]
    assert "colon_001 DSC of the full method: missing (baseline 0.0000)" in gate_failures(missing, baseline)
    assert "not of the same benchmark" in gate_failures({**golden, "test_per_category": 12}, baseline)[0]


def test_gate_wants_the_full_method_above_the_baselines_its_floors_and_detection():
    baseline, golden = _golden()
    for method in ("aova", "reconstruction", "nongenerative_fill"):
        worse = copy.deepcopy(golden)
        worse["mean_unseen"]["dsc"][method] = golden["mean_unseen"]["dsc"]["full"]
        assert gate_failures(worse, baseline) == [f"the full method (0.0833) is not above {method} (0.0833) on mean "
                                                  "unseen DSC"]
    floor = copy.deepcopy(golden)
    floor["by_category"]["hepatic_vessel"]["dsc"]["full"] = 0.19
    assert "hepatic_vessel DSC of the full method (0.1900) is below its floor 0.2" in gate_failures(floor, baseline)
    detection = copy.deepcopy(golden)
    detection["by_category"]["hepatic_vessel"]["auroc"] = 0.45
    detection["by_category"]["colon"]["auroc"] = 0.0  # not listed: detection does not work there today
    assert gate_failures(detection, baseline) == ["hepatic_vessel detection AUROC (0.4500) is below 0.5"]


def test_recording_a_baseline_writes_both_files_and_names_what_moved(tmp_path, capsys):
    gate = tmp_path / "gate"
    gate.mkdir()
    for name in ("baseline.json", "results_quick.json"):
        (gate / name).write_bytes((GATE / name).read_bytes())
    results = json.loads((GATE / "results_quick.json").read_text())
    better = next(c for c in results["per_case"] if c["case"] == "colon_000")
    better["dsc_full"] = 0.3
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert main(["regression-gate", "--results", str(tmp_path / "results.json"),
                 "--baseline", str(gate / "baseline.json")]) == 0  # a rise passes
    assert "gate: pass" in capsys.readouterr().out
    assert main(["regression-gate", "--results", str(tmp_path / "results.json"),
                 "--baseline", str(gate / "baseline.json"), "--record"]) == 0
    assert "colon_000 dsc full: 0.0000 -> 0.3000" in capsys.readouterr().out.splitlines()
    recorded = json.loads((gate / "baseline.json").read_text())
    assert recorded["metrics"] == regression_metrics(results)
    assert recorded["tolerance"] == json.loads((GATE / "baseline.json").read_text())["tolerance"]
    assert json.loads((gate / "results_quick.json").read_text()) == results
    better["dsc_full"] = 0.0  # now the same figure falling back fails against the new baseline
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert main(["regression-gate", "--results", str(tmp_path / "results.json"),
                 "--baseline", str(gate / "baseline.json")]) == 1
    assert "gate: colon_000 DSC of the full method fell from 0.3000 to 0.0000" in capsys.readouterr().out


def test_benchmark_setting_groups():
    assert benchmark_settings("loo") == ("loo-liver", "loo-kidney", "loo-pancreas", "loo-lung", "loo-colon",
                                         "loo-hepatic_vessel")
    assert benchmark_settings("mri") == ("ct-mri",) and benchmark_settings("all")[-2:] == ("seen-unseen", "ct-mri")
    assert benchmark_settings("loo-colon") == ("loo-colon",)
    with pytest.raises(ValueError, match="unknown setting"):
        benchmark_settings("everything")


def test_benchmark_cli_refuses_an_unknown_setting_and_a_missing_out(tmp_path, capsys):
    assert main(["benchmark", "--setting", "everything", "--out", str(tmp_path / "b")]) == 2
    assert "unknown setting 'everything'" in capsys.readouterr().err
    assert main(["benchmark", "--setting", "seen-unseen"]) == 2
    assert "--out" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_every_ct_category_has_upper_bound_heads_that_saw_it_and_brain_has_none():
    for category in vocabulary.CT_CATEGORIES:
        setting = supervised_setting(category)
        assert category in role_categories(setting, "seen") and setting != f"loo-{category}"
    assert len({supervised_setting(c) for c in vocabulary.CT_CATEGORIES}) == len(vocabulary.CT_CATEGORIES)
    assert supervised_setting("brain") is None


@pytest.fixture(scope="module")
def shipped_pipeline():
    from diffugts_core.pipeline import DiffuGTSPipeline

    return DiffuGTSPipeline.from_pretrained(device="cpu")


def test_results_are_reused_only_for_the_same_configuration_weights_and_specialists(tmp_path, shipped_pipeline):
    config = ZeroShotConfig(test_per_category=1)
    specialists = {"lung": shipped_specialist("lung", device="cpu")}
    assert reusable_results(tmp_path, config, shipped_pipeline, specialists) is None  # nothing there yet
    results = {"setting": config.setting, "config": asdict(config), "per_case": [], "timing": {"wall_s": 1.0},
               "thresholds": {**pipeline_thresholds(shipped_pipeline), "fitted_here": {}},
               "weights_sha256": shipped_pipeline.weights_sha256(),
               "specialists": {"lung": specialists["lung"].summary()}}
    (tmp_path / "results.json").write_text(json.dumps({k: v for k, v in results.items() if k != "timing"}))
    (tmp_path / "timing.json").write_text(json.dumps(results["timing"]))
    assert reusable_results(tmp_path, config, shipped_pipeline, specialists) == json.loads(json.dumps(results))
    assert reusable_results(tmp_path, replace(config, seed=1), shipped_pipeline, specialists) is None
    retrained = json.loads(json.dumps(results))
    retrained["thresholds"]["detection"]["anomaly"] += 0.1  # other heads bring other thresholds
    (tmp_path / "results.json").write_text(json.dumps(retrained))
    assert reusable_results(tmp_path, config, shipped_pipeline, specialists) is None
    # heads retrained to the same thresholds: the weights tell them apart
    retrained = {**json.loads(json.dumps(results)), "weights_sha256": {"heads/residual.safetensors": "0" * 64}}
    (tmp_path / "results.json").write_text(json.dumps(retrained))
    assert reusable_results(tmp_path, config, shipped_pipeline, specialists) is None
    # so do a calibration row's specialist, and results written before the calibration rows existed
    retrained = json.loads(json.dumps(results))
    retrained["specialists"]["lung"]["weights_sha256"] = "0" * 64
    for stale in (retrained, {k: v for k, v in results.items() if k not in ("timing", "specialists")}):
        (tmp_path / "results.json").write_text(json.dumps(stale))
        assert reusable_results(tmp_path, config, shipped_pipeline, specialists) is None


@pytest.mark.slow
def test_supervised_upper_bound_marks_the_tumor_of_a_seen_category(tmp_path, shipped_pipeline):
    # liver is seen by the shipped heads, as by loo-kidney's, which the row would load for liver
    liver = phantoms.generate_case("liver", 0, SEEDS["test"], phantoms.DEFAULT_SHAPE)
    results = {"setting": "loo-liver", "seen": [], "unseen": ["liver", "brain"], "config": {"tolerance_mm": 2.0},
               "seeds": {"test": SEEDS["test"]}, "methods": dict(METHODS),
               "categories": [{"category": "liver", "cases": 1, "auroc": None}, {"category": "brain", "cases": 0,
                                                                                   "auroc": None}],
               "per_case": [{"case": liver.case_id, "category": "liver"}], "mean_unseen": {}, "timing": {}}
    for entry in results["categories"]:
        entry.update({f"{m}_{method}": 0.0 for method in METHODS for m in ("dsc", "nsd")})
    results["mean_unseen"] = {f"{m}_{method}": 0.0 for method in METHODS for m in ("dsc", "nsd")}
    loaded = []
    config = ZeroShotConfig(setting="loo-liver", test_per_category=1, inpaint_steps=5)
    bounded = add_supervised_upper_bound(results, config, lambda s: loaded.append(s) or shipped_pipeline)
    assert loaded == ["loo-kidney"]  # brain has no heads that saw it, so nothing is loaded for it
    liver_row = bounded["categories"][0]
    assert liver_row["dsc_supervised"] == bounded["per_case"][0]["dsc_supervised"] > 0.2  # a mask elsewhere gives 0
    assert bounded["categories"][1]["dsc_supervised"] is None and bounded["mean_unseen"]["dsc_supervised"] is None
    assert bounded["supervised_heads"]["brain"].startswith("none")
    table = format_table(bounded)
    assert "Supervised upper bound" in table and "n/a" in table and "liver loo-kidney" in table
    write_benchmark(bounded, tmp_path)
    assert "dsc_supervised" in (tmp_path / "per_case.csv").read_text().splitlines()[0]


def test_seen_unseen_keeps_the_shipped_heads_when_the_cache_has_none_of_its_own(tmp_path, shipped_pipeline):
    pipeline = setting_pipeline("seen-unseen", tmp_path / "heads")
    assert pipeline.heads.seen == shipped_pipeline.heads.seen and not (tmp_path / "heads").exists()  # nothing trained


def test_seen_unseen_on_another_model_needs_heads_trained_on_it(tmp_path):
    with pytest.raises(ValueError, match="needs heads trained on models/other: pass --heads-cache"):
        setting_pipeline("seen-unseen", None, model="models/other")


def test_a_cached_residual_head_of_another_configuration_is_trained_again(tmp_path, monkeypatch):
    shipped = ROOT / "models" / "aova_heads" / "seen_unseen"
    folder = tmp_path / "heads" / "seen-unseen"
    shutil.copytree(shipped, folder, ignore=shutil.ignore_patterns("residual_mri.*"))
    trained = []

    def train_residual_head(heads, *args, **kwargs):
        trained.append(heads.setting)
        return TrainedResidualHead.load(shipped)

    monkeypatch.setattr(recipes, "train_heads", lambda *a, **k: pytest.fail("the cached AOVA heads match"))
    monkeypatch.setattr(recipes, "train_residual_head", train_residual_head)
    monkeypatch.setattr(recipes, "train_modality_heads", lambda *a, **k: pytest.fail("no MRI test cases here"))
    setting_pipeline("seen-unseen", tmp_path / "heads")
    assert trained == []  # trained with the defaults: reused (and no MRI head for a CT-only benchmark)
    meta = json.loads((folder / "residual.json").read_text())
    meta["config"]["organ_reach"] = True  # the heads' own choice (train-heads --organ-reach): kept
    (folder / "residual.json").write_text(json.dumps(meta))
    assert setting_pipeline("seen-unseen", tmp_path / "heads").residual.config.organ_reach and trained == []
    meta["config"]["steps"] += 1
    (folder / "residual.json").write_text(json.dumps(meta))
    pipeline = setting_pipeline("seen-unseen", tmp_path / "heads")
    assert trained == ["seen-unseen"] and pipeline.residual.config == ResidualConfig()


def test_cached_heads_of_another_encoder_are_refused_before_residual_training(tmp_path, monkeypatch):
    from diffugts_core.backbone import load_backbone
    from diffugts_core.backbone.registry import foundation_sha256
    from diffugts_core.io import InputError

    folder = tmp_path / "heads" / "seen-unseen"
    shutil.copytree(ROOT / "models" / "aova_heads" / "seen_unseen", folder)
    (folder / "residual.json").unlink()  # missing: the residual head would be trained next
    meta = json.loads((folder / "heads.json").read_text())
    meta["foundation_sha256"] = {**foundation_sha256(load_backbone("default")), "vae": "0" * 64}
    (folder / "heads.json").write_text(json.dumps(meta))
    monkeypatch.setattr(recipes, "train_heads", lambda *a, **k: pytest.fail("the cached AOVA heads match the config"))
    monkeypatch.setattr(recipes, "train_residual_head", lambda *a, **k: pytest.fail("trained on refused heads"))
    with pytest.raises(InputError, match="trained on another foundation model"):
        setting_pipeline("seen-unseen", tmp_path / "heads")


def test_only_a_setting_with_mri_test_cases_needs_the_mri_head():
    assert evaluated_modalities("ct-mri") == {"MRI"}
    assert evaluated_modalities("seen-unseen") == evaluated_modalities("loo-liver") == {"CT"}


def _run(category: str, full: float, supervised: float | None = None) -> dict:
    methods = {"aova": "AOVA only", "full": "DiffuGTS", **({"supervised": "Upper bound"} if supervised else {})}
    scores = {f"{m}_{method}": value for method, value in (("aova", 0.1), ("full", full), ("supervised", supervised))
              if method in methods for m in ("dsc", "nsd")}
    return {"setting": f"loo-{category}", "seen": [], "config": {"tolerance_mm": 2.0}, "seeds": {"test": 3000},
            "methods": methods, "categories": [{"category": category, "cases": 12, "auroc": 0.5, **scores}],
            **({"supervised_heads": {category: "loo-x"}} if supervised else {})}


def test_the_leave_one_out_table_has_a_column_per_held_out_category_and_their_mean():
    combined = combine_settings([_run("liver", 0.4, supervised=0.6), _run("kidney", 0.2, supervised=0.5)])
    assert combined["unseen"] == ["liver", "kidney"] and combined["setting"] == "loo-liver + loo-kidney"
    assert combined["mean_unseen"]["dsc_full"] == pytest.approx(0.3)
    assert combined["mean_unseen"]["dsc_supervised"] == pytest.approx(0.55)
    partial = combine_settings([_run("liver", 0.4, supervised=0.6), _run("kidney", 0.2)])
    assert partial["mean_unseen"]["dsc_supervised"] is None  # a row one column lacks has no mean
    table = format_table(partial)
    assert "| Upper bound | 60.0 | 60.0 | n/a | n/a | n/a | n/a |" in table
    assert "| DiffuGTS | 40.0 | 40.0 | 20.0 | 20.0 | 30.0 | 30.0 |" in table


def test_benchmark_cli_runs_a_setting_on_another_model_without_the_upper_bound(tmp_path, monkeypatch, capsys):
    from diffugts_core.experiments import zero_shot

    loaded = []
    monkeypatch.setattr(recipes, "setting_pipeline",
                        lambda setting, cache, *, model, progress: loaded.append((setting, cache, model)) or "pipeline")
    monkeypatch.setattr(recipes, "specialist_for", lambda category, cache, progress: f"specialist {category}")
    monkeypatch.setattr(zero_shot, "reusable_results", lambda *args: None)
    monkeypatch.setattr(zero_shot, "zero_shot_benchmark",
                        lambda config, pipeline, specialists, progress: {"setting": config.setting,
                                                                         "specialists": specialists})
    monkeypatch.setattr(zero_shot, "write_benchmark", lambda results, folder: folder.mkdir(parents=True))
    monkeypatch.setattr(zero_shot, "format_table", lambda results: f"table of {results['setting']}")
    monkeypatch.setattr(zero_shot, "add_supervised_upper_bound",
                        lambda *args, **kwargs: pytest.fail("--no-upper-bound trains no other setting's heads"))
    assert main(["benchmark", "--setting", "loo-kidney", "--model", str(tmp_path), "--heads-cache",
                 str(tmp_path / "heads"), "--out", str(tmp_path / "b"), "--no-upper-bound"]) == 0
    assert loaded == [("loo-kidney", tmp_path / "heads", str(tmp_path))]
    assert (tmp_path / "b" / "loo-kidney").is_dir() and "table of loo-kidney" in (tmp_path / "b" / "table.md").read_text()
