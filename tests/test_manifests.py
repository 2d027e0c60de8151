"""Dataset manifests: shipped YAMLs, folder loaders on tiny fake trees, and protocol roles."""

import csv
import json
from importlib.resources import files
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from diffugts_core.io import CaseRecord, InputError
from diffugts_core.data.manifests import (
    find_scan,
    CT_CATEGORIES,
    MANIFEST_PACKAGE,
    REQUIRED_KEYS,
    SEEN_CATEGORIES,
    UNSEEN_CATEGORIES,
    Manifest,
    category_role,
    list_manifests,
    load_dataset,
    load_manifest,
    load_organ_mask,
    load_tumor_mask,
    parse_spacing,
    setting_role,
)
from diffugts_core.vocabulary import ORGAN_LABELS

EXPECTED_MANIFESTS = {
    "msd_task01_brain_tumour": "brain",
    "msd_task03_liver": "liver",
    "msd_task06_lung": "lung",
    "msd_task07_pancreas": "pancreas",
    "msd_task08_hepatic_vessel": "hepatic_vessel",
    "msd_task10_colon": "colon",
    "kits23": "kidney",
    "phantombench": "mixed",
}
REAL = [name for name in EXPECTED_MANIFESTS if name != "phantombench"]
CT_REAL = [name for name in REAL if EXPECTED_MANIFESTS[name] != "brain"]
AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])


def write_nifti(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, AFFINE), str(path))
    return path


def label_volume(tumor_voxels: int, organ_voxels: int, extra_values=()) -> np.ndarray:
    """A 4x4x3 label map: ``organ_voxels`` of value 1, then ``tumor_voxels`` of value 2, then extra values."""
    flat = np.zeros(48, dtype=np.int16)
    values = [1] * organ_voxels + [2] * tumor_voxels + list(extra_values)
    flat[: len(values)] = values
    return flat.reshape(4, 4, 3)


# --- shipped manifests -------------------------------------------------------------------------


def test_every_expected_manifest_ships():
    assert set(list_manifests()) == set(EXPECTED_MANIFESTS)


@pytest.mark.parametrize("name", sorted(EXPECTED_MANIFESTS))
def test_manifest_yaml_is_complete_and_consistent(name):
    raw = yaml.safe_load((files(MANIFEST_PACKAGE) / f"{name}.yaml").read_text())
    assert set(REQUIRED_KEYS) <= raw.keys()
    manifest = load_manifest(name)
    assert manifest.name == name
    assert manifest.category == EXPECTED_MANIFESTS[name]
    assert set(manifest.tumor_labels) <= manifest.labels.keys()
    assert 0 not in manifest.tumor_labels
    if manifest.organ_labels:  # organ labels include the tumour inside the organ
        assert set(manifest.tumor_labels) <= set(manifest.organ_labels) <= manifest.labels.keys()
    assert manifest.source["homepage"] and manifest.source["download"]
    assert manifest.licence and manifest.citation and manifest.spacing_notes and manifest.layout_tree
    assert set(manifest.roles) == {"loo", "seen_unseen", "mri"}


@pytest.mark.parametrize("name", REAL)
def test_real_manifests_name_their_source_and_licence(name):
    manifest = load_manifest(name)
    assert manifest.kind == "real"
    if manifest.layout == "msd":
        assert "medicaldecathlon.com" in manifest.source["homepage"]
        assert manifest.licence == "CC BY-SA 4.0"
    else:
        assert manifest.source["homepage"] == "https://github.com/neheller/kits23"
        assert "kits23_download_data" in manifest.source["download"]
        assert "CC BY-NC-SA 4.0" in manifest.licence


def test_label_conventions_per_dataset():
    brain = load_manifest("msd_task01_brain_tumour")
    assert brain.tumor_labels == [1, 2, 3] and brain.image_channel == 1 and brain.modality == "MRI"
    assert load_manifest("kits23").tumor_labels == [2]
    assert load_manifest("msd_task03_liver").organ_labels == [1, 2]
    assert load_manifest("msd_task06_lung").organ_labels == []
    assert all(load_manifest(name).image_channel is None for name in CT_REAL)


def test_phantombench_manifest_describes_the_generator():
    manifest = load_manifest("phantombench")
    assert manifest.kind == "synthetic" and manifest.layout == "phantombench"
    assert manifest.generator == {"module": "diffugts_core.data.phantoms", "version": 1}
    assert set(CT_CATEGORIES) | {"brain"} <= set(manifest.categories)
    assert "diffugts phantoms --out" in manifest.source["download"]
    assert "Apache-2.0" in manifest.licence


def test_load_manifest_by_path_keeps_unknown_keys(tmp_path):
    raw = yaml.safe_load((files(MANIFEST_PACKAGE) / "msd_task06_lung.yaml").read_text())
    raw["notes_for_teachers"] = "small dataset"
    path = tmp_path / "lung_copy.yaml"
    path.write_text(yaml.safe_dump(raw))
    manifest = load_manifest(path)
    assert isinstance(manifest, Manifest)
    assert manifest.extra == {"notes_for_teachers": "small dataset"}


def test_unknown_manifest_name_lists_the_available_ones():
    with pytest.raises(InputError, match="msd_task03_liver"):
        load_manifest("msd_task99_spleen")


def test_invalid_manifest_is_rejected(tmp_path):
    raw = yaml.safe_load((files(MANIFEST_PACKAGE) / "msd_task03_liver.yaml").read_text())
    raw["tumor_labels"] = [7]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(InputError, match="tumor_labels"):
        load_manifest(path)
    del raw["roles"]
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(InputError, match="missing keys.*roles"):
        load_manifest(path)


# --- protocol roles ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", CT_REAL)
def test_seen_unseen_and_mri_roles(name):
    manifest = load_manifest(name)
    expected = "train" if manifest.category in SEEN_CATEGORIES else "test"
    assert manifest.category in SEEN_CATEGORIES + UNSEEN_CATEGORIES
    assert setting_role(manifest, "seen_unseen") == expected
    assert setting_role(manifest, "mri") == "train"


@pytest.mark.parametrize("held_out", CT_CATEGORIES)
def test_leave_one_out_tests_only_the_held_out_category(held_out):
    roles = {load_manifest(name).category: setting_role(load_manifest(name), "loo", held_out) for name in REAL}
    assert roles.pop(held_out) == "test"
    assert roles.pop("brain") == "excluded"
    assert set(roles.values()) == {"train"}


def test_brain_is_test_only_in_mri():
    brain = load_manifest("msd_task01_brain_tumour")
    assert setting_role(brain, "mri") == "test"
    assert setting_role(brain, "seen_unseen") == "excluded"


@pytest.mark.parametrize("name", REAL)
@pytest.mark.parametrize("setting", ["seen_unseen", "mri"])
def test_declared_roles_match_the_protocol(name, setting):
    manifest = load_manifest(name)
    assert setting_role(manifest, setting) == category_role(manifest.category, setting)


def test_phantombench_roles_follow_the_case_category():
    phantoms = load_manifest("phantombench")
    assert setting_role(phantoms, "seen_unseen", category="lung") == "test"
    assert setting_role(phantoms, "mri", category="brain") == "test"
    assert setting_role(phantoms, "loo", "colon", category="colon") == "test"
    assert setting_role(phantoms, "loo", "colon", category="liver") == "train"
    with pytest.raises(ValueError, match="category="):
        setting_role(phantoms, "mri")


def test_bad_settings_raise_value_error():
    liver = load_manifest("msd_task03_liver")
    with pytest.raises(ValueError, match="loo, seen_unseen, mri"):
        setting_role(liver, "few_shot")
    with pytest.raises(ValueError, match="held_out"):
        setting_role(liver, "loo")


# --- MSD layout --------------------------------------------------------------------------------


def make_msd_tree(root: Path, tumor_counts=(5, 3)) -> Path:
    training = []
    for index, tumor_voxels in enumerate(tumor_counts):
        write_nifti(root / "imagesTr" / f"liver_{index}.nii.gz", np.full((4, 4, 3), -100.0, dtype=np.float32))
        write_nifti(root / "labelsTr" / f"liver_{index}.nii.gz", label_volume(tumor_voxels, organ_voxels=10))
        training.append({"image": f"./imagesTr/liver_{index}.nii.gz", "label": f"./labelsTr/liver_{index}.nii.gz"})
    index_json = {
        "name": "LiTS",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "liver", "2": "cancer"},
        "numTraining": len(training),
        "training": training,
        "test": ["./imagesTs/liver_132.nii.gz"],
    }
    (root / "dataset.json").write_text(json.dumps(index_json))
    return root


def test_msd_records_and_masks(tmp_path):
    root = make_msd_tree(tmp_path / "Task03_Liver")
    records = load_dataset("msd_task03_liver", root)
    assert [record.case_id for record in records] == ["liver_0", "liver_1"]
    first = records[0]
    assert first.image == root / "imagesTr" / "liver_0.nii.gz" and first.image.is_file()
    assert first.tumor == first.organs == root / "labelsTr" / "liver_0.nii.gz"
    assert (first.modality, first.region, first.category) == ("CT", "abdomen", "liver")
    assert first.dataset == "msd_task03_liver"
    assert first.extra == {"tumor_labels": [2], "organ_labels": [1, 2], "image_channel": None}

    tumor = load_tumor_mask(records[1])
    assert tumor.array.dtype == np.uint8 and tumor.shape == (4, 4, 3)
    assert int(tumor.array.sum()) == 3  # exactly the voxels labelled 2
    assert np.allclose(tumor.affine, AFFINE)
    organ = load_organ_mask(records[1])
    assert int(organ.array.sum()) == 13  # liver (1) plus tumour (2)


def test_msd_without_organ_label_has_no_organ_mask(tmp_path):
    root = tmp_path / "Task06_Lung"
    write_nifti(root / "imagesTr" / "lung_001.nii.gz", np.zeros((4, 4, 3), dtype=np.float32))
    write_nifti(root / "labelsTr" / "lung_001.nii.gz", label_volume(0, organ_voxels=4))
    index_json = {
        "labels": {"0": "background", "1": "cancer"},
        "training": [{"image": "./imagesTr/lung_001.nii.gz", "label": "./labelsTr/lung_001.nii.gz"}],
    }
    (root / "dataset.json").write_text(json.dumps(index_json))
    (record,) = load_dataset("msd_task06_lung", root)
    assert record.organs is None and load_organ_mask(record) is None
    assert int(load_tumor_mask(record).array.sum()) == 4


def test_msd_missing_root_says_where_to_download(tmp_path):
    with pytest.raises(InputError) as error:
        load_dataset("msd_task03_liver", tmp_path / "nowhere")
    message = str(error.value)
    assert "nowhere" in message and "medicaldecathlon.com" in message
    assert "MSD Task03 Liver" in message and "CC BY-SA 4.0" in message and "dataset.json" in message


def test_msd_missing_dataset_json(tmp_path):
    with pytest.raises(InputError, match="dataset.json.*not found"):
        load_dataset("msd_task03_liver", tmp_path)


def test_msd_missing_image_names_the_file(tmp_path):
    root = make_msd_tree(tmp_path / "Task03_Liver")
    (root / "imagesTr" / "liver_1.nii.gz").unlink()
    with pytest.raises(InputError, match="liver_1.nii.gz"):
        load_dataset("msd_task03_liver", root)


def test_msd_folder_of_another_task_is_refused(tmp_path):
    root = make_msd_tree(tmp_path / "Task03_Liver")
    with pytest.raises(InputError, match="another dataset"):
        load_dataset("msd_task06_lung", root)


# --- KiTS23 layout -----------------------------------------------------------------------------


def make_kits_tree(root: Path) -> Path:
    for case_id, tumor_voxels in (("case_00000", 4), ("case_00001", 6)):
        write_nifti(root / case_id / "imaging.nii.gz", np.zeros((4, 4, 3), dtype=np.float32))
        write_nifti(root / case_id / "segmentation.nii.gz", label_volume(tumor_voxels, 8, extra_values=[3, 3]))
    return root


@pytest.mark.parametrize("repository_root", [False, True])
def test_kits23_records_and_tumor_mask_excludes_cysts(tmp_path, repository_root):
    dataset = make_kits_tree(tmp_path / "kits23" / "dataset")
    records = load_dataset("kits23", dataset.parent if repository_root else dataset)
    assert [record.case_id for record in records] == ["case_00000", "case_00001"]
    assert records[1].tumor == dataset / "case_00001" / "segmentation.nii.gz"
    assert (records[1].category, records[1].modality) == ("kidney", "CT")
    assert int(load_tumor_mask(records[1]).array.sum()) == 6  # label 2 only: kidney 1 and cyst 3 excluded
    assert int(load_organ_mask(records[1]).array.sum()) == 16  # kidney + tumour + cysts


def test_kits23_missing_imaging_points_to_the_download_script(tmp_path):
    dataset = make_kits_tree(tmp_path / "dataset")
    (dataset / "case_00001" / "imaging.nii.gz").unlink()
    with pytest.raises(InputError, match="case_00001.*kits23_download_data"):
        load_dataset("kits23", dataset)


def test_kits23_missing_root_names_the_source(tmp_path):
    with pytest.raises(InputError, match="kits23") as error:
        load_dataset("kits23", tmp_path / "absent")
    assert "github.com/neheller/kits23" in str(error.value) and "CC BY-NC-SA 4.0" in str(error.value)
    with pytest.raises(InputError, match="case folders"):
        load_dataset("kits23", tmp_path)


# --- PhantomBench layout -----------------------------------------------------------------------


def make_phantom_anatomy() -> np.ndarray:
    """An organ map in the generator's ids: fat 5, liver 7, hepatic vessels 2, kidney 3, gray matter 4 voxels."""
    counts = {"fat": 5, "liver": 7, "hepatic_vessels": 2, "kidney_right": 3, "gray_matter": 4}
    values = [ORGAN_LABELS[organ] for organ, count in counts.items() for _ in range(count)]
    return label_volume(0, organ_voxels=0, extra_values=values)


def test_phantombench_records_and_masks(tmp_path):
    rows = [
        ("liver_000", "CT", "abdomen", "liver", 5, "0.8x0.8x2.5"),
        ("brain_000", "MRI", "brain", "brain", 2, "1,1,1"),  # csv quotes the commas
        ("healthy_abdomen_000", "CT", "abdomen", "healthy", 0, "0.8x0.8x2.5"),
    ]
    with (tmp_path / "cases.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([("id", "modality", "region", "category", "tumor_voxels", "spacing"), *rows])
    for case_id, *_, tumor_voxels, _ in rows:
        write_nifti(tmp_path / f"{case_id}_image.nii.gz", np.zeros((4, 4, 3), dtype=np.float32))
        write_nifti(tmp_path / f"{case_id}_organs.nii.gz", make_phantom_anatomy())
        tumor = (np.arange(48) < tumor_voxels).reshape(4, 4, 3).astype(np.uint8)
        write_nifti(tmp_path / f"{case_id}_tumor.nii.gz", tumor)

    liver, brain, healthy = load_dataset("phantombench", tmp_path)
    assert (liver.case_id, liver.category, liver.modality, liver.region) == ("liver_000", "liver", "CT", "abdomen")
    assert (brain.modality, brain.category, brain.spacing, brain.tumor_voxels) == ("MRI", "brain", (1.0, 1.0, 1.0), 2)
    assert liver.spacing == (0.8, 0.8, 2.5) and liver.dataset == "phantombench"
    assert liver.image == tmp_path / "liver_000_image.nii.gz" and liver.organs == tmp_path / "liver_000_organs.nii.gz"
    assert int(load_tumor_mask(liver).array.sum()) == 5
    assert int(load_organ_mask(liver).array.sum()) == 9  # liver + hepatic vessels, not fat or kidney
    assert int(load_organ_mask(brain).array.sum()) == 4
    assert int(load_tumor_mask(healthy).array.sum()) == 0 and load_organ_mask(healthy) is None


def test_find_scan_takes_a_file_or_a_case_of_a_dataset_folder(tmp_path):
    from diffugts_core.data import phantoms

    records = phantoms.generate_cohort(tmp_path / "cohort", ["liver", "lung"], per_category=1, healthy=0, seed=0,
                                       shape=(16, 16, 16), progress=False)
    assert find_scan(records[1].image) == (records[1].image, None)  # a NIfTI file is itself
    first, record = find_scan(tmp_path / "cohort", "phantombench")
    assert first == records[0].image and record.case_id == records[0].case_id and record.tumor is not None
    assert find_scan(tmp_path / "cohort", "phantombench", "lung_000")[0] == records[1].image
    for args, says in (((tmp_path / "cohort",), "name its dataset manifest"),
                       ((tmp_path / "cohort", "phantombench", "colon_000"), "no case 'colon_000'"),
                       ((records[0].image, "phantombench"), "not a folder")):
        with pytest.raises(InputError, match=says):
            find_scan(*args)


def test_organ_mask_of_a_record_straight_from_the_generator(tmp_path):
    organs = write_nifti(tmp_path / "kidney_000_organs.nii.gz", make_phantom_anatomy())
    record = CaseRecord("kidney_000", tmp_path / "kidney_000_image.nii.gz", "CT", "abdomen", "kidney",
                        organs=organs, extra={"tumor_labels": [1]})
    assert int(load_organ_mask(record).array.sum()) == 3


def test_phantombench_missing_folder_says_how_to_generate(tmp_path):
    with pytest.raises(InputError, match="diffugts phantoms --out"):
        load_dataset("phantombench", tmp_path / "cohort")
    with pytest.raises(InputError, match="cases.csv"):
        load_dataset("phantombench", tmp_path)


@pytest.mark.parametrize("text", ["1.0x1.0x2.0", "1.0 x 1.0 x 2.0", "1.0,1.0,2.0"])
def test_parse_spacing_formats(text):
    assert parse_spacing(text) == (1.0, 1.0, 2.0)


@pytest.mark.parametrize("text", ["1x1", "1x0x1", "axbxc", ""])
def test_parse_spacing_rejects_bad_text(text):
    with pytest.raises(InputError, match="three positive numbers"):
        parse_spacing(text)
