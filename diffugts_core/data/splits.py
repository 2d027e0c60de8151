"""The zero-shot settings, the PhantomBench seed of each split, and the cases of a split.

A setting decides which tumor categories may be seen (DESIGN section 5, ``manifests.category_role``):
``loo-<category>`` (leave one CT category out), ``seen-unseen`` ({liver, kidney, pancreas} seen,
{lung, colon, hepatic_vessel} unseen), ``ct-mri`` (all CT categories seen, MRI brain unseen). Cases of
a category held out in the setting are never generated for its training or validation data. Thresholds come from a
validation split of the seen categories (another PhantomBench seed), never from test cases.
"""

from __future__ import annotations

from ..io import InputError
from ..vocabulary import CATEGORIES, CT_CATEGORIES, category_region
from . import phantoms
from .manifests import category_role


SETTINGS = tuple(f"loo-{c}" for c in CT_CATEGORIES) + ("seen-unseen", "ct-mri")

# PhantomBench seeds of the splits. "refine" trains the residual head: seen categories like "train", but cases the AOVA
# heads never fitted, so the head learns how S behaves on new cases, not on the heads' own training cases.
SEEDS = {"train": 2000, "validation": 2001, "refine": 2002, "test": 3000}


def setting_categories(setting: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(seen, unseen) tumor categories of a setting."""
    if setting not in SETTINGS:
        raise InputError(f"unknown setting {setting!r}; choose from {', '.join(SETTINGS)}")
    name, held_out = (("loo", setting[4:]) if setting.startswith("loo-") else
                      ("seen_unseen" if setting == "seen-unseen" else "mri", None))
    roles = {c: category_role(c, name, held_out) for c in CATEGORIES}
    return (tuple(c for c, r in roles.items() if r == "train"), tuple(c for c, r in roles.items() if r == "test"))


def role_categories(setting: str, role: str) -> tuple[str, ...]:
    """The categories a setting's heads see in training (``"seen"``) or meet only at test time (``"unseen"``)."""
    if role not in ("seen", "unseen"):
        raise ValueError(f"role must be 'seen' or 'unseen', not {role!r}")
    return setting_categories(setting)[role == "unseen"]


def split_cases(setting: str, split: str, config, shape=phantoms.DEFAULT_SHAPE, *, test_role: str = "unseen"):
    """PhantomBench cases of a split, sized by ``config`` (a ``heads.HeadsConfig``). Train, refine and validation hold seen categories + healthy only. The test split holds
    the unseen categories, or with ``test_role="seen"`` test cases of the seen ones (for a supervised upper bound)."""
    seed = SEEDS[split]
    if split == "test":
        categories = role_categories(setting, test_role)
        per_category = healthy = config.test_per_category
    else:
        categories = role_categories(setting, "seen")
        training = split in ("train", "refine")
        per_category = config.train_per_category if training else config.validation_per_category
        healthy = config.healthy_per_region if training else 1
    regions = sorted({category_region(c) for c in categories})
    for category in categories:
        for index in range(per_category):
            yield phantoms.generate_case(category, index, seed, shape)
    for region in regions if split == "test" else ("abdomen", "thorax", "brain"):
        for index in range(healthy):
            yield phantoms.generate_case("healthy", index, seed, shape, region=region)
