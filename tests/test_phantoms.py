"""PhantomBench: deterministic, anatomically labelled, tumors inside their organs with their own look."""

import csv
import hashlib

import numpy as np
import pytest
from scipy import ndimage

from diffugts_core.data import phantoms
from diffugts_core.io import load_volume
from diffugts_core.data.phantoms import generate_case, generate_cohort
from diffugts_core.vocabulary import CATEGORIES, ORGAN_LABELS, category_organ_labels

from .conftest import SMALL_SHAPE


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_same_seed_same_bytes_other_seed_differs(tmp_path, small_cohort):
    folder, _ = small_cohort
    again = tmp_path / "again"
    generate_cohort(again, CATEGORIES, per_category=1, healthy=2, seed=0, shape=SMALL_SHAPE, progress=False)
    assert digest(again) == digest(folder)
    other = tmp_path / "other"
    generate_cohort(other, ["liver"], per_category=1, seed=1, shape=SMALL_SHAPE, progress=False)
    assert digest(other)["liver_000_image.nii.gz"] != digest(folder)["liver_000_image.nii.gz"]


def test_a_case_does_not_depend_on_its_cohort():
    alone = generate_case("colon", 0, seed=3, shape=SMALL_SHAPE)
    generate_case("liver", 0, seed=3, shape=SMALL_SHAPE)  # consuming other randomness must not matter
    again = generate_case("colon", 0, seed=3, shape=SMALL_SHAPE)
    np.testing.assert_array_equal(alone.image, again.image)


def test_cohort_files_and_cases_csv(small_cohort):
    folder, records = small_cohort
    rows = list(csv.DictReader((folder / "cases.csv").open()))
    assert [r["id"] for r in rows] == [r.case_id for r in records]
    assert set(rows[0]) == {"id", "modality", "region", "category", "tumor_voxels", "spacing"}
    assert {r["category"] for r in rows} == set(CATEGORIES) | {"healthy"}
    for row in rows:
        for kind in ("image", "organs", "tumor"):
            assert (folder / f"{row['id']}_{kind}.nii.gz").exists()
        tumor = load_volume(folder / f"{row['id']}_tumor.nii.gz", dtype=np.uint8)
        assert int(tumor.array.sum()) == int(row["tumor_voxels"])
        assert (int(row["tumor_voxels"]) == 0) == (row["category"] == "healthy")
        assert row["modality"] == ("MRI" if row["region"] == "brain" else "CT")


@pytest.mark.parametrize("category", CATEGORIES)
def test_tumor_lies_in_its_organ_and_differs_from_it(category):
    for seed in range(2):
        case = generate_case(category, 0, seed, SMALL_SHAPE)
        tumor = case.tumor.astype(bool)
        organ = case.organ_mask()
        assert tumor.sum() > 10
        # kidney cancers grow out of the kidney and pancreatic cancers infiltrate the fat around it
        inside_needed = 0.4 if category in ("kidney", "pancreas") else 0.95
        assert (tumor & organ).sum() / tumor.sum() >= inside_needed
        # the tumor changed the image, and only in and around the tumor
        changed = np.abs(case.image - case.healthy) > 1.0
        assert changed[tumor].mean() > 0.5
        near = ndimage.binary_dilation(tumor, iterations=3)
        if category != "pancreas":  # (a pancreatic tumor also dilates the duct upstream)
            assert not changed[~near].any()
        assert np.abs(case.image[tumor] - case.healthy[tumor]).mean() > 15


def test_tumor_appearance_models_are_distinct():
    """Inside its organ of origin, tumor-minus-healthy intensity per category has the modelled sign."""
    expected_sign = {"liver": -1, "hepatic_vessel": -1, "pancreas": -1, "lung": +1, "colon": +1}
    for category, sign in expected_sign.items():
        case = generate_case(category, 1, 0)
        organ = np.isin(case.organs, [ORGAN_LABELS[name] for name in category_organ_labels(category)])
        tumor = case.tumor.astype(bool) & organ
        assert tumor.sum() > 20, category
        assert np.sign(case.image[tumor].mean() - case.healthy[tumor].mean()) == sign, category


def test_abdomen_anatomy_labels_and_hu():
    case = generate_case("healthy", 0, 0, region="abdomen")
    present = set(np.unique(case.organs))
    for name in ("fat", "muscle", "bone", "liver", "spleen", "kidney_right", "kidney_left", "pancreas", "aorta",
                 "hepatic_vessels", "colon", "inferior_vena_cava"):
        assert ORGAN_LABELS[name] in present, name
    hu = case.image

    def median(name):
        return float(np.median(hu[case.organs == ORGAN_LABELS[name]]))

    assert -130 < median("fat") < -60
    assert 80 < median("liver") < 130
    assert median("bone") > 150
    assert median("hepatic_vessels") > median("liver") + 20
    # internal structure: a mean-fill is not already a good pseudo-healthy liver or kidney
    liver = hu[case.organs == ORGAN_LABELS["liver"]]
    kidney = hu[case.organs == ORGAN_LABELS["kidney_right"]]
    assert liver.std() > 12 and kidney.std() > 25
    colon = hu[case.organs == ORGAN_LABELS["colon"]]
    assert (colon < -500).mean() > 0.05  # gas


def test_thorax_has_lungs_and_heart():
    case = generate_case("healthy", 0, 0, region="thorax")
    lungs = np.isin(case.organs, [ORGAN_LABELS["lung_right"], ORGAN_LABELS["lung_left"]])
    assert lungs.mean() > 0.1
    assert -900 < np.median(case.image[lungs]) < -700
    assert (case.organs == ORGAN_LABELS["heart"]).any()


def test_brain_is_the_mni152_template_with_tissue_labels():
    case = generate_case("brain", 0, 0, SMALL_SHAPE)
    assert case.modality == "MRI"
    white = case.organs == ORGAN_LABELS["white_matter"]
    grey = case.organs == ORGAN_LABELS["gray_matter"]
    assert white.sum() > 1000 and grey.sum() > 1000
    assert np.median(case.healthy[white]) > np.median(case.healthy[grey])  # T1 contrast
    assert np.median(case.image[case.tumor.astype(bool)]) < np.median(case.healthy[white])  # hypointense lesion


def test_unknown_category_and_bad_shape():
    with pytest.raises(ValueError, match="unknown category"):
        generate_case("stomach")
    with pytest.raises(ValueError, match="shape"):
        generate_case("liver", shape=(8, 8, 8))


def test_read_case_matches_generated(small_cohort):
    folder, records = small_cohort
    record = next(r for r in records if r.category == "lung")
    case = phantoms.read_case(record)
    fresh = generate_case("lung", 0, 0, SMALL_SHAPE)
    np.testing.assert_allclose(case.image, fresh.image, atol=1e-4)
    np.testing.assert_array_equal(case.tumor, fresh.tumor)


def test_slab_keeps_the_tumor_and_places_it_in_the_same_millimetres():
    case = generate_case("kidney", 0, 0, SMALL_SHAPE)
    slab = case.slab(8)
    assert slab.image.shape == (*SMALL_SHAPE[:2], 8) and slab.spacing == case.spacing
    start = int(round((np.linalg.inv(case.affine) @ slab.affine[:, 3])[2]))  # the slab's first slice in the case
    np.testing.assert_array_equal(slab.image, case.image[:, :, start:start + 8])
    np.testing.assert_array_equal(slab.healthy, case.healthy[:, :, start:start + 8])
    busiest = int(case.tumor.sum(axis=(0, 1)).argmax())
    assert start <= busiest < start + 8 and slab.tumor.sum() > 0
    # a voxel of the slab lies at the same millimetres as the voxel it was cut from
    np.testing.assert_allclose(slab.affine @ [3, 4, 2, 1], case.affine @ [3, 4, start + 2, 1])
    with pytest.raises(ValueError, match="1 to 32 slices"):
        case.slab(33)
