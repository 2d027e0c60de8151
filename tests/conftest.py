"""Shared fixtures. Nothing in the test suite may reach a model hub."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402

from diffugts_core.data import phantoms  # noqa: E402
from diffugts_core import vocabulary  # noqa: E402

SMALL_SHAPE = (64, 64, 32)


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory):
    """One small case per category plus two healthy ones, written to disk once per session."""
    out = tmp_path_factory.mktemp("phantoms")
    records = phantoms.generate_cohort(out, vocabulary.CATEGORIES, per_category=1, healthy=2, seed=0,
                                       shape=SMALL_SHAPE, progress=False)
    return out, records


@pytest.fixture(scope="session")
def quick_benchmark(tmp_path_factory):
    """The regression notebook executed once per session: its output folder (results.json, metrics.json, table.md).
    The gate, notebook 07 and the determinism test all read this one run of the quick benchmark."""
    from pathlib import Path

    papermill = pytest.importorskip("papermill")
    root = Path(__file__).resolve().parents[1]
    out = tmp_path_factory.mktemp("quick_benchmark")
    executed = root / "artifacts" / "notebooks" / "regression"
    executed.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(str(root / "notebooks" / "regression" / "zero_shot_regression.ipynb"),
                               str(executed / "zero_shot_regression.ipynb"), parameters={"OUTPUT_DIR": str(out)},
                               kernel_name="python3", cwd=str(root), progress_bar=False)
    return out
