"""Shared fixtures. Nothing in the test suite may reach a model hub."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402

from diffugts_core import phantoms  # noqa: E402

SMALL_SHAPE = (64, 64, 32)


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory):
    """One small case per category plus two healthy ones, written to disk once per session."""
    out = tmp_path_factory.mktemp("phantoms")
    records = phantoms.generate_cohort(out, phantoms.CATEGORIES, per_category=1, healthy=2, seed=0,
                                       shape=SMALL_SHAPE, progress=False)
    return out, records
