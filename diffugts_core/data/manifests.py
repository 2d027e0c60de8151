"""Dataset manifests: what each dataset is, where to get it, and how its folder becomes CaseRecords.

One YAML per dataset ships as package data (``diffugts_core.data_manifests``). A manifest names the
source and licence (real datasets are never bundled: the user downloads them and accepts their
licence), the folder layout, which label values count as tumour and as organ, and the role the
dataset plays in each zero-shot setting of the evaluation protocol:

* ``loo``: leave one of the six CT categories out; it is "test", the other five "train".
* ``seen_unseen``: liver, kidney, pancreas train; lung, colon, hepatic_vessel test.
* ``mri``: the CT categories train; MRI brain test.

A role is "train", "test" or "excluded" (the dataset takes no part in that setting).
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import numpy as np
import yaml

from ..io import CaseRecord, InputError, Volume, load_volume
from ..vocabulary import CATEGORY_ORGAN, CT_CATEGORIES, ORGAN_LABELS, category_organ_labels

MANIFEST_PACKAGE = "diffugts_core.data_manifests"
SEEN_CATEGORIES = ("liver", "kidney", "pancreas")
UNSEEN_CATEGORIES = ("lung", "colon", "hepatic_vessel")
SETTINGS = ("loo", "seen_unseen", "mri")
LAYOUTS = ("msd", "kits23", "phantombench")
MIXED = "mixed"  # modality/region/category of a dataset whose cases differ (PhantomBench)
LOO_RULE = "test when held out, else train"
BY_CASE_CATEGORY = "by case category"
ROLE_VALUES = ("train", "test", "excluded", LOO_RULE, BY_CASE_CATEGORY)
REQUIRED_KEYS = (
    "name", "title", "kind", "source", "licence", "citation", "modality", "region", "category",
    "layout", "labels", "tumor_labels", "organ_labels", "image_channel", "spacing_notes", "roles",
)


@dataclass
class Manifest:
    """One dataset's manifest.

    ``organ_labels`` lists the label values of the organ that hosts the tumour (tumour included); an
    empty list means the dataset labels no organ, None that it depends on the case (PhantomBench:
    the organ map ids of the case category's organ).
    """

    name: str
    title: str
    kind: str  # "real" or "synthetic"
    source: dict[str, str]  # "homepage" and "download" (how to get it)
    licence: str
    citation: list[str]
    modality: str  # "CT", "MRI" or MIXED
    region: str
    category: str
    layout: str  # one of LAYOUTS
    layout_tree: str  # the expected folder tree, for humans and error messages
    labels: dict[int, str]
    tumor_labels: list[int]
    organ_labels: list[int] | None
    image_channel: int | None  # channel of a 4D image to use (MSD Task01); None for 3D images
    spacing_notes: str
    roles: dict[str, str]  # setting -> one of ROLE_VALUES
    categories: list[str] = field(default_factory=list)
    generator: dict | None = None
    seeds: dict | None = None
    counts: dict | None = None
    extra: dict = field(default_factory=dict)  # keys this module does not know

    @classmethod
    def from_dict(cls, data: dict, origin: str) -> Manifest:
        """Build and validate a manifest; ``origin`` (file or name) words the error messages."""
        if not isinstance(data, dict):
            raise InputError(f"{origin}: a manifest must be a YAML mapping, got {type(data).__name__}.")
        missing = [key for key in REQUIRED_KEYS if key not in data]
        _require(not missing, origin, f"missing keys {missing}")
        layout = data["layout"]
        _require(isinstance(layout, dict) and layout.get("format") in LAYOUTS and "tree" in layout, origin,
                 f"layout must be a mapping with 'tree' and 'format' (one of {LAYOUTS})")
        _require(data["kind"] in ("real", "synthetic"), origin, "kind must be 'real' or 'synthetic'")
        _require(isinstance(data["source"], dict) and {"homepage", "download"} <= data["source"].keys(), origin,
                 "source must be a mapping with 'homepage' and 'download'")
        try:
            labels = {int(value): str(label) for value, label in data["labels"].items()}
        except (AttributeError, TypeError, ValueError):
            raise InputError(f"{origin}: labels must map integer values to names.") from None
        for key in ("tumor_labels", "organ_labels"):
            values = data[key]
            _require(values is None or set(values) <= labels.keys(), origin, f"{key} {values} not all in labels")
        roles = data["roles"]
        _require(isinstance(roles, dict) and roles.keys() <= set(SETTINGS), origin, f"roles must be in {SETTINGS}")
        _require(set(roles.values()) <= set(ROLE_VALUES), origin, f"role values must be in {ROLE_VALUES}")
        known = set(REQUIRED_KEYS) | {"categories", "generator", "seeds", "counts"}
        citation = data["citation"]
        return cls(
            **{key: data[key] for key in REQUIRED_KEYS if key not in ("layout", "labels", "citation")},
            citation=[citation] if isinstance(citation, str) else list(citation),
            layout=layout["format"],
            layout_tree=str(layout["tree"]).rstrip(),
            labels=labels,
            categories=data.get("categories") or [data["category"]],
            generator=data.get("generator"),
            seeds=data.get("seeds"),
            counts=data.get("counts"),
            extra={key: value for key, value in data.items() if key not in known},
        )


def _require(condition: bool, origin: str, problem: str) -> None:
    if not condition:
        raise InputError(f"{origin}: invalid manifest: {problem}.")


def list_manifests() -> list[str]:
    """Names of the manifests shipped with the package (e.g. "msd_task03_liver")."""
    folder = files(MANIFEST_PACKAGE)
    return sorted(entry.name.removesuffix(".yaml") for entry in folder.iterdir() if entry.name.endswith(".yaml"))


def load_manifest(name_or_path: str | Path) -> Manifest:
    """Load a shipped manifest by bare name, or any manifest YAML by path."""
    text_name = str(name_or_path)
    if isinstance(name_or_path, Path) or text_name.endswith((".yaml", ".yml")):
        path = Path(name_or_path)
        if not path.is_file():
            raise InputError(f"{path}: manifest file not found; pass a YAML path or one of {list_manifests()}.")
        resource, origin = path, str(path)
    elif text_name in list_manifests():
        resource, origin = files(MANIFEST_PACKAGE) / f"{text_name}.yaml", f"manifest {text_name!r}"
    else:
        raise InputError(f"{text_name!r}: no such manifest; available: {', '.join(list_manifests())}.")
    try:
        data = yaml.safe_load(resource.read_text())
    except yaml.YAMLError as exc:
        raise InputError(f"{origin}: not valid YAML ({exc}).") from None
    return Manifest.from_dict(data, origin)


def load_dataset(manifest: Manifest | str, root: str | Path) -> list[CaseRecord]:
    """The labelled cases of a dataset unpacked at ``root``, as CaseRecords.

    Order: dataset.json's training list (MSD), case folders by name (KiTS23), cases.csv rows (PhantomBench).
    """
    manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise _not_found(manifest, root, "dataset folder")
    loaders = {"msd": _load_msd, "kits23": _load_kits23, "phantombench": _load_phantombench}
    return loaders[manifest.layout](manifest, root)


def find_scan(image: str | Path, dataset: str | None = None, case: str | None = None) -> tuple[Path, CaseRecord | None]:
    """The image file of a scan: ``image`` itself (a NIfTI file), or, when ``image`` is a dataset folder, the case
    ``case`` (default: its first) of that folder read through the manifest ``dataset``, with its record (tumor and
    organ labels, where the dataset has them)."""
    image = Path(image).expanduser()
    if not image.is_dir():
        if dataset is not None or case is not None:
            raise InputError(f"{image}: not a folder; a dataset and a case pick a scan from a dataset folder. Pass the "
                             "folder, or leave the dataset and the case out for a single NIfTI file.")
        return image, None
    if dataset is None:
        raise InputError(f"{image}: is a folder; name its dataset manifest ({', '.join(list_manifests())}) to pick a "
                         "case from it, or pass a NIfTI file.")
    records = load_dataset(dataset, image)
    if not records:
        raise InputError(f"{image}: no cases found through the manifest {dataset!r}.")
    if case is None:
        return records[0].image, records[0]
    chosen = [record for record in records if record.case_id == case]
    if not chosen:
        shown = ", ".join(record.case_id for record in records[:5]) + (", ..." if len(records) > 5 else "")
        raise InputError(f"{image}: no case {case!r} in this {dataset} folder; its cases: {shown}")
    return chosen[0].image, chosen[0]


def _not_found(manifest: Manifest, path: Path, what: str) -> InputError:
    if manifest.kind == "synthetic":
        fix = f"Generate it with: {manifest.source['download']}."
    else:
        fix = (
            f"It is not bundled with this kit; get it from {manifest.source['homepage']}: "
            f"{manifest.source['download']}. Downloading means accepting its licence: {manifest.licence}."
        )
    return InputError(f"{path}: {what} of {manifest.title} not found. {fix}\nExpected layout:\n{manifest.layout_tree}")


def _check_file(path: Path, manifest: Manifest, problem: str) -> Path:
    if not path.is_file():
        raise InputError(
            f"{path}: {problem}; this copy of {manifest.title} is incomplete, "
            f"get it again ({manifest.source['download']})."
        )
    return path


def _record(manifest: Manifest, case_id: str, image: Path, tumor: Path, organs: Path | None, **fields) -> CaseRecord:
    fields = {"modality": manifest.modality, "region": manifest.region, "category": manifest.category} | fields
    extra = {
        "tumor_labels": list(manifest.tumor_labels),
        "organ_labels": None if manifest.organ_labels is None else list(manifest.organ_labels),
        "image_channel": manifest.image_channel,
    }
    return CaseRecord(case_id, image, tumor=tumor, organs=organs, dataset=manifest.name, extra=extra, **fields)


def _organ_source(manifest: Manifest, label: Path) -> Path | None:
    # MSD/KiTS label maps hold organ and tumour together; an empty organ_labels means no organ is labelled.
    return label if manifest.organ_labels else None


def _load_msd(manifest: Manifest, root: Path) -> list[CaseRecord]:
    index_path = root / "dataset.json"
    if not index_path.is_file():
        raise _not_found(manifest, index_path, "dataset.json")
    try:
        index = json.loads(index_path.read_text())
        entries = [(entry["image"], entry["label"]) for entry in index["training"]]
        found_labels = {int(value) for value in index.get("labels", {})}
    except (KeyError, TypeError, ValueError) as exc:  # ValueError covers bad JSON and bad encoding
        raise InputError(
            f"{index_path}: not an MSD dataset.json ({type(exc).__name__}: {exc}); unpack the task again."
        ) from None
    if found_labels and found_labels != manifest.labels.keys():
        raise InputError(
            f"{index_path}: label values {sorted(found_labels)} differ from {manifest.name}'s "
            f"{sorted(manifest.labels)}; {root} holds another dataset ({index.get('name')!r}), "
            f"pass the {manifest.title} folder."
        )
    records = []
    for image_entry, label_entry in entries:
        image = _check_file(root / image_entry, manifest, "image listed in dataset.json is missing")
        label = _check_file(root / label_entry, manifest, "label listed in dataset.json is missing")
        case_id = image.name.removesuffix(".gz").removesuffix(".nii")
        records.append(_record(manifest, case_id, image, label, _organ_source(manifest, label)))
    return records


def _load_kits23(manifest: Manifest, root: Path) -> list[CaseRecord]:
    case_root = root / "dataset" if (root / "dataset").is_dir() else root  # root may be the kits23 repository
    case_dirs = sorted(path for path in case_root.glob("case_*") if path.is_dir())
    if not case_dirs:
        raise _not_found(manifest, case_root, "case folders (case_00000/, ...)")
    records = []
    for case_dir in case_dirs:
        image = _check_file(case_dir / "imaging.nii.gz", manifest, "imaging not downloaded (run kits23_download_data)")
        label = _check_file(case_dir / "segmentation.nii.gz", manifest, "segmentation missing")
        records.append(_record(manifest, case_dir.name, image, label, _organ_source(manifest, label)))
    return records


def _load_phantombench(manifest: Manifest, root: Path) -> list[CaseRecord]:
    table = root / "cases.csv"
    if not table.is_file():
        raise _not_found(manifest, table, "cases.csv")
    with table.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = ("id", "modality", "region", "category", "tumor_voxels", "spacing")
    if rows and not set(columns) <= rows[0].keys():
        raise InputError(f"{table}: needs columns {list(columns)}, found {list(rows[0])}; generate the cohort again.")
    records = []
    for row in rows:
        case_id = row["id"]
        image, organs, tumor = (
            _check_file(root / f"{case_id}_{part}.nii.gz", manifest, f"{part} file listed in cases.csv is missing")
            for part in ("image", "organs", "tumor")
        )
        try:
            spacing = parse_spacing(row["spacing"])
            tumor_voxels = int(row["tumor_voxels"]) if row["tumor_voxels"].strip() else None
        except ValueError as exc:  # InputError included
            raise InputError(f"{table}: case {case_id!r}: {exc}") from None
        record = _record(
            manifest, case_id, image, tumor, organs,
            modality=row["modality"], region=row["region"], category=row["category"],
            tumor_voxels=tumor_voxels, spacing=spacing,
        )
        record.extra["organ_labels"] = _phantom_organ_labels(record.category)
        records.append(record)
    return records


def _phantom_organ_labels(category: str) -> list[int]:
    # The organ map labels the whole anatomy (fat, muscle, bone, ...); the case's organ is its category's.
    organs = category_organ_labels(category) if category in CATEGORY_ORGAN else ()  # healthy: none
    return sorted(ORGAN_LABELS[organ] for organ in organs)


def parse_spacing(text: str) -> tuple[float, float, float]:
    """Parse voxel spacing written as "1.0x1.0x2.0", "1.0 x 1.0 x 2.0" or "1.0,1.0,2.0" (mm)."""
    try:
        spacing = tuple(float(part) for part in re.split(r"\s*[x×,]\s*", text.strip()))
    except ValueError:
        spacing = ()
    if len(spacing) != 3 or not all(0 < value < float("inf") for value in spacing):
        raise InputError(f"spacing {text!r}: expected three positive numbers in mm, e.g. '1.0x1.0x2.0'.")
    return spacing


def load_tumor_mask(record: CaseRecord) -> Volume:
    """Binary (uint8) tumour mask of a case: its label voxels whose value is in ``tumor_labels``."""
    if record.tumor is None:
        raise InputError(f"{record.image}: case {record.case_id!r} of {record.dataset} has no tumour label file.")
    return _binary_mask(record.tumor, record.extra.get("tumor_labels"), "tumor label")


def load_organ_mask(record: CaseRecord) -> Volume | None:
    """Binary (uint8) mask of the tumour's host organ (tumour included), or None where none is labelled."""
    if "organ_labels" in record.extra:
        organ_labels = record.extra["organ_labels"]
    elif record.dataset == "phantombench":  # a record straight from the generator
        organ_labels = _phantom_organ_labels(record.category)
    else:
        organ_labels = None  # a dedicated organ mask: every nonzero voxel
    if record.organs is None or organ_labels == []:
        return None
    return _binary_mask(record.organs, organ_labels, "organ label")


def _binary_mask(path: Path, values: list[int] | None, role: str) -> Volume:
    label = load_volume(path, role=role, dtype=np.int16)
    selected = label.array != 0 if values is None else np.isin(label.array, values)
    return Volume(array=selected.astype(np.uint8), affine=label.affine, path=label.path)


def category_role(category: str, setting: str, held_out: str | None = None) -> str:
    """Role ("train", "test" or "excluded") of a tumour category in a zero-shot setting."""
    _check_setting(setting, held_out)
    if setting == "loo":
        return "test" if category == held_out else "train" if category in CT_CATEGORIES else "excluded"
    if setting == "seen_unseen":
        return "train" if category in SEEN_CATEGORIES else "test" if category in UNSEEN_CATEGORIES else "excluded"
    return "test" if category == "brain" else "train" if category in CT_CATEGORIES else "excluded"


def setting_role(
    manifest: Manifest, setting: str, held_out: str | None = None, *, category: str | None = None
) -> str:
    """Role of a dataset in a setting, as its manifest declares; ``held_out`` is needed for "loo".

    A dataset whose cases span several categories (PhantomBench) needs ``category``: the role of its
    cases of that category.
    """
    _check_setting(setting, held_out)
    category = category or manifest.category
    declared = manifest.roles.get(setting, "excluded")
    if declared == BY_CASE_CATEGORY:
        if category == MIXED:
            raise ValueError(f"{manifest.name} spans several categories; pass category=, one of {manifest.categories}.")
        return category_role(category, setting, held_out)
    if declared == LOO_RULE:
        return "test" if category == held_out else "train"
    return declared


def _check_setting(setting: str, held_out: str | None) -> None:
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; valid settings: {', '.join(SETTINGS)}.")
    if setting == "loo" and held_out not in CT_CATEGORIES:
        raise ValueError(f"setting 'loo' needs held_out, one of {', '.join(CT_CATEGORIES)}; got {held_out!r}.")
