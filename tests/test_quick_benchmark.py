"""The tests that read the quick zero-shot benchmark: the regression notebook runs it once for this module (its
longest piece; one file, so `pytest -n N --dist loadfile` keeps the run and its readers on one worker), then the gate
checks it against the committed baseline, a case run again in another process gives its line to the last digit, and
notebook 07 draws it."""

import json

import pytest

from diffugts_core.data import phantoms
from diffugts_core.data.splits import SEEDS
from diffugts_core.experiments.gate import gate_failures, regression_metrics
from diffugts_core.experiments.zero_shot import ZeroShotConfig, case_masks, case_row, write_benchmark
from diffugts_core.training.specialist import shipped_specialist

from .test_notebooks import ROOT, _execute
from .test_regression_gate import GATE


@pytest.fixture(scope="module")
def quick_benchmark(tmp_path_factory):
    """The regression notebook executed once: its output folder (results.json, metrics.json, table.md).
    Every test here reads this one run of the quick benchmark."""
    papermill = pytest.importorskip("papermill")
    out = tmp_path_factory.mktemp("quick_benchmark")
    executed = ROOT / "artifacts" / "notebooks" / "regression"
    executed.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(str(GATE / "zero_shot_regression.ipynb"),
                               str(executed / "zero_shot_regression.ipynb"), parameters={"OUTPUT_DIR": str(out)},
                               kernel_name="python3", cwd=str(ROOT), progress_bar=False)
    return out


@pytest.mark.notebook
def test_07_zero_shot_benchmark(tmp_path, quick_benchmark):
    """Notebook 07 on the quick benchmark's results (the regression notebook's run, so CI runs the benchmark once);
    the cases it shows are run again in the notebook and must give the table's DSC."""
    from diffugts_core.experiments.zero_shot import METHODS

    _execute(ROOT / "notebooks" / "07_zero_shot_benchmark.ipynb", tmp_path, RESULTS=str(quick_benchmark))
    summary = json.loads((tmp_path / "summary.json").read_text())
    results = json.loads((quick_benchmark / "results.json").read_text())
    assert summary["setting"] == "seen-unseen" and summary["cases"] == len(results["per_case"]) == 6
    assert summary["methods"] == list(METHODS) and summary["mean_unseen"] == results["mean_unseen"]
    ranked = sorted(results["per_case"], key=lambda row: row["dsc_full"])
    assert summary["shown"] == {"worst": ranked[0]["case"], "best": ranked[-1]["case"]}
    assert summary["shown_dsc_recomputed"] == {"worst": ranked[0]["dsc_full"], "best": ranked[-1]["dsc_full"]}
    assert ranked[-1]["dsc_full"] > 0  # the best case shown has a mask on its tumor


@pytest.mark.notebook
def test_regression_notebook_meets_the_committed_baseline(quick_benchmark):
    metrics = json.loads((quick_benchmark / "metrics.json").read_text())
    results = json.loads((quick_benchmark / "results.json").read_text())
    baseline = json.loads((GATE / "baseline.json").read_text())
    assert metrics == regression_metrics(results)
    assert gate_failures(metrics, baseline) == []  # per case, per category and on the mean, within tolerances
    assert [c["category"] for c in results["categories"]] == ["lung", "colon", "hepatic_vessel"]
    assert set(results["thresholds"]["fitted_here"]["provenance"]) == {"reconstruction", "pixel_residual"}
    assert all("validation split" in p for p in results["thresholds"]["fitted_here"]["provenance"].values())
    table = (quick_benchmark / "table.md").read_text()
    assert "DiffuGTS (residual head)" in table and "Non-generative fill" in table
    assert (quick_benchmark / "per_case.csv").read_text().count("\n") == 1 + len(results["per_case"])


@pytest.mark.notebook
def test_same_seed_gives_the_same_case_results_in_another_process(quick_benchmark):
    """Exact determinism on one machine: a test case run again here, in another process than the notebook's kernel,
    gives its results.json line to the last digit (across machines the gate's tolerances apply instead), and the
    results write to the same bytes."""
    from diffugts_core.pipeline import DiffuGTSPipeline

    results = json.loads((quick_benchmark / "results.json").read_text())
    config = ZeroShotConfig(**results["config"])
    pipeline = DiffuGTSPipeline.from_pretrained(device="cpu")
    stored = next(row for row in results["per_case"] if row["case"] == "hepatic_vessel_001")  # nonzero DSC
    case = phantoms.generate_case("hepatic_vessel", 1, SEEDS["test"])
    specialist = shipped_specialist("hepatic_vessel", device="cpu")  # the calibration rows too
    assert results["specialists"]["hepatic_vessel"] == json.loads(json.dumps(specialist.summary()))
    masks, _, facts = case_masks(pipeline, case, config, results["thresholds"]["fitted_here"]["values"],
                                 specialist=specialist)
    assert case_row(case, masks, facts, config.tolerance_mm) == stored
    results["timing"] = json.loads((quick_benchmark / "timing.json").read_text())
    again = write_benchmark(results, quick_benchmark.parent / "written_again")
    assert [p.read_bytes() for p in again] == [(quick_benchmark / p.name).read_bytes() for p in again]
