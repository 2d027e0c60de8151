"""The zero-shot benchmark's regression gate: the quick benchmark against the committed baseline, the gate's own
logic on known cases, and the same seed giving the same results.json."""

import json
from pathlib import Path

import pytest

from diffugts_core.benchmark import (ZeroShotConfig, benchmark_settings, gate_failures, regression_metrics,
                                     write_benchmark, zero_shot_benchmark)
from diffugts_core.cli import main

ROOT = Path(__file__).resolve().parents[1]
GATE = ROOT / "notebooks" / "regression"


def _metrics(full: float, aova: float, setting="seen-unseen", cases=2) -> dict:
    return {"setting": setting, "test_per_category": cases, "mean_unseen_dsc": {"full": full, "aova": aova}}


def test_gate_fails_on_a_drop_beyond_the_tolerance_or_below_aova_only():
    baseline = {**_metrics(0.20, 0.10), "tolerance_dsc": 0.02}
    assert gate_failures(_metrics(0.19, 0.10), baseline) == []  # within the tolerance
    assert gate_failures(_metrics(0.25, 0.10), baseline) == []  # better is fine
    [drop] = gate_failures(_metrics(0.17, 0.10), baseline)
    assert "fell from 0.2000 to 0.1700" in drop
    [below] = gate_failures(_metrics(0.19, 0.195), baseline)
    assert "below AOVA-only" in below
    assert len(gate_failures(_metrics(0.10, 0.15), baseline)) == 2
    assert "not of the same benchmark" in gate_failures(_metrics(0.2, 0.1, cases=12), baseline)[0]


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


@pytest.mark.slow
def test_same_seed_gives_an_identical_results_json(tmp_path):
    from diffugts_core.pipeline import DiffuGTSPipeline

    pipeline = DiffuGTSPipeline.from_pretrained(device="cpu")
    config = ZeroShotConfig(test_per_category=1, validation_per_category=1, inpaint_steps=3)
    for run in ("a", "b"):
        write_benchmark(zero_shot_benchmark(config, pipeline=pipeline), tmp_path / run)
    first, second = ((tmp_path / run / "results.json").read_bytes() for run in ("a", "b"))
    assert first == second
    results = json.loads(first)
    assert [c["category"] for c in results["categories"]] == ["lung", "colon", "hepatic_vessel"]
    assert set(results["thresholds"]["fitted_here"]["provenance"]) == {"reconstruction", "pixel_residual"}
    assert all("validation split" in p for p in results["thresholds"]["fitted_here"]["provenance"].values())
    table = (tmp_path / "a" / "table.md").read_text()
    assert "DiffuGTS (residual head)" in table and "Non-generative fill" in table
    assert (tmp_path / "a" / "per_case.csv").read_text().count("\n") == 4  # header + 3 test cases


@pytest.mark.notebook
def test_regression_notebook_meets_the_committed_baseline(tmp_path):
    papermill = pytest.importorskip("papermill")
    executed = ROOT / "artifacts" / "notebooks" / "regression"
    executed.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(str(GATE / "zero_shot_regression.ipynb"), str(executed / "zero_shot_regression.ipynb"),
                               parameters={"OUTPUT_DIR": str(tmp_path)}, kernel_name="python3", cwd=str(ROOT),
                               progress_bar=False)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    baseline = json.loads((GATE / "baseline.json").read_text())
    assert metrics == regression_metrics(json.loads((tmp_path / "results.json").read_text()))
    assert gate_failures(metrics, baseline) == []
    # the same seed gives the same results.json at the quick size, byte for byte, as the run that made the baseline
    assert (tmp_path / "results.json").read_bytes() == (GATE / "results_quick.json").read_bytes()
