"""The kit's shared vocabulary: tumor categories, the organ each is looked for in, body regions, modalities, and the
organ label ids of PhantomBench label maps. Data, stages, training and experiments read these tables from here."""

from __future__ import annotations

import numpy as np

ORGAN_LABELS: dict[str, int] = {
    "background": 0,
    "fat": 1,
    "muscle": 2,  # body wall, skin, paraspinal and psoas muscles
    "bone": 3,  # vertebrae (with canal) and ribs
    "liver": 4,
    "spleen": 5,
    "kidney_right": 6,
    "kidney_left": 7,
    "pancreas": 8,
    "aorta": 9,
    "hepatic_vessels": 10,
    "colon": 11,
    "lung_right": 12,
    "lung_left": 13,
    "heart": 14,
    "inferior_vena_cava": 15,
    "csf": 20,
    "gray_matter": 21,
    "white_matter": 22,
}
CT_CATEGORIES = ("liver", "kidney", "pancreas", "lung", "colon", "hepatic_vessel")
CATEGORIES = CT_CATEGORIES + ("brain",)
# the organs the prompts name, per modality -> the organ labels that make up each (order: the lesion ids of a slice bank)
ORGAN_KEYS: dict[str, dict[str, tuple[str, ...]]] = {
    "CT": {"liver": ("liver", "hepatic_vessels"), "spleen": ("spleen",), "kidney": ("kidney_right", "kidney_left"),
           "pancreas": ("pancreas",), "lung": ("lung_right", "lung_left"), "colon": ("colon",)},
    "MRI": {"brain": ("csf", "gray_matter", "white_matter")},
}
# the organ a category's tumors grow in: where the method looks, and the organ word of its prompts
CATEGORY_ORGAN = {"liver": "liver", "hepatic_vessel": "liver", "kidney": "kidney", "pancreas": "pancreas",
                  "lung": "lung", "colon": "colon", "brain": "brain"}
CATEGORY_REGION = {"lung": "thorax", "brain": "brain"}  # every other category: abdomen
REGION_MODALITY = {"abdomen": "CT", "thorax": "CT", "brain": "MRI"}
REGION_ORGAN = {"abdomen": "liver", "thorax": "lung", "brain": "brain"}  # the organ a healthy case of a region is read for
# the organs the kit localises by name, in this order: the channels of the organ map an organ-aware denoiser sees
CONDITIONING_ORGANS = tuple(organ for organs in ORGAN_KEYS.values() for organ in organs)


def category_region(category: str) -> str:
    """The body region a tumor category's cases show."""
    return CATEGORY_REGION.get(category, "abdomen")


def organ_body_region(organ: str) -> str:
    """The body region an organ lies in (the organs outside the abdomen are named like their categories)."""
    return CATEGORY_REGION.get(organ, "abdomen")


def organ_modality(organ: str) -> str:
    """The modality an organ is imaged with here: MRI for the MRI organs, CT for every other (named ones too)."""
    return "MRI" if organ in ORGAN_KEYS["MRI"] else "CT"


def category_modality(category: str) -> str:
    """The modality a tumor category's cases are imaged with (CT, or MRI for brain)."""
    return REGION_MODALITY[category_region(category)]


def category_organ_labels(category: str) -> tuple[str, ...]:
    """The organ labels a category's tumors live in (the "organ region" of the method)."""
    return ORGAN_KEYS[category_modality(category)][CATEGORY_ORGAN[category]]


def conditioning_organ_index(labels: np.ndarray) -> np.ndarray:
    """An organ label map as the index of each voxel's conditioning organ (0: none of them, i + 1: the i-th of
    ``CONDITIONING_ORGANS``); the organ's sub-labels (hepatic vessels in the liver, both kidneys) count as the organ."""
    lookup = np.zeros(256, np.uint8)
    for channel, organ in enumerate(CONDITIONING_ORGANS):
        modality = "MRI" if organ in ORGAN_KEYS["MRI"] else "CT"
        for name in ORGAN_KEYS[modality][organ]:
            lookup[ORGAN_LABELS[name]] = channel + 1
    return lookup[np.asarray(labels, np.uint8)]
