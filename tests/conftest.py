"""Shared fixtures. Nothing in the test suite may reach a model hub."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
if "PYTEST_XDIST_WORKER" in os.environ:  # `make test` runs a worker per core: one thread each, kernels included
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from diffugts_core.data import phantoms  # noqa: E402
from diffugts_core import vocabulary  # noqa: E402

SMALL_SHAPE = (64, 64, 32)


# The longest test files, longest first (junit times of a `make test` run): under `make test` (`pytest -n auto --dist
# loadfile --no-loadscope-reorder`, files in collection order) the workers start on them, and the short files fill in
# at the end instead of one long file running alone.
LONGEST_FIRST = ("test_quick_benchmark.py", "test_pipeline.py", "test_notebooks.py", "test_heads.py", "test_browser.py",
                 "test_cli.py", "test_maisi_pipeline.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.nodeid.split("::")[0].rsplit("/", 1)[-1]
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory):
    """One small case per category plus two healthy ones, written to disk once per session."""
    out = tmp_path_factory.mktemp("phantoms")
    records = phantoms.generate_cohort(out, vocabulary.CATEGORIES, per_category=1, healthy=2, seed=0,
                                       shape=SMALL_SHAPE, progress=False)
    return out, records
