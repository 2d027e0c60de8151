"""The commands that load no model: ``phantoms`` makes data, ``evaluate`` scores masks, ``manifests`` reads datasets."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..io import InputError, write_text_atomic
from .common import optional_file, volume_shape


def add_phantoms(subparsers) -> None:
    parser = subparsers.add_parser(
        "phantoms", help="generate a PhantomBench cohort (NIfTI + cases.csv)",
        description="Write DIR/<id>_image.nii.gz, <id>_organs.nii.gz, <id>_tumor.nii.gz for "
        "each case and DIR/cases.csv. Same seed, same bytes.")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--categories", default="liver,kidney,pancreas,lung,colon,hepatic_vessel,brain",
                        help="comma-separated tumor categories (default: all seven)")
    parser.add_argument("--per-category", type=int, default=1, help="cases per category (default 1)")
    parser.add_argument("--healthy", type=int, default=0, help="healthy cases, cycling over the regions in view")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", type=volume_shape, default="128,128,64",
                        help="volume shape X,Y,Z (default 128,128,64)")
    parser.add_argument("--montage", type=Path, help="also write a PNG with one row per case")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(run=_run_phantoms, paths=lambda args: (
        [], [("folder", args.out, "output folder"), *optional_file(args.montage, "montage")]))


def _run_phantoms(args) -> int:
    from .. import viz
    from ..data import phantoms

    categories = _categories(args.categories)
    if args.per_category < 0 or args.healthy < 0:
        raise InputError("--per-category and --healthy must be zero or more")
    start = time.perf_counter()
    records = phantoms.generate_cohort(args.out, categories, args.per_category, args.healthy, args.seed, args.shape,
                                       progress=not args.no_progress)
    print(f"wrote {len(records)} cases and {args.out / 'cases.csv'} in {time.perf_counter() - start:.1f} s")
    if args.montage:
        first_of_each = {}
        for record in records:  # one case per category (and per healthy region), read back from disk
            first_of_each.setdefault((record.category, record.region), record)
        cases = [phantoms.read_case(record) for record in first_of_each.values()]
        viz.save_figure(viz.case_grid(cases, title=f"PhantomBench, seed {args.seed}"), args.montage)
        print(f"wrote {args.montage}")
    return 0


def _categories(text: str) -> list[str]:
    from ..data.phantoms import CATEGORIES

    categories = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown or not categories:
        raise InputError(f"unknown categories {unknown or [text]}; choose from {','.join(CATEGORIES)}")
    return categories


def add_evaluate(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="DSC and NSD of predicted vs reference masks (files or folders)",
        description="Compare a predicted mask with a reference (two NIfTI files), or every "
        "case of two folders (paired by case id: <id>[_pred|_tumor|_mask|_seg|_label].nii.gz). "
        "Prints JSON: one entry per case and the mean. Empty masks: both empty scores 1, "
        "exactly one empty scores 0.")
    parser.add_argument("--pred", type=Path, required=True, help="predicted mask file or folder")
    parser.add_argument("--ref", type=Path, required=True, help="reference mask file or folder")
    parser.add_argument("--tolerance-mm", type=float, default=2.0, help="NSD tolerance in mm (default 2)")
    parser.add_argument("--json", type=Path, help="also write the JSON to this file")
    parser.set_defaults(run=_run_evaluate, paths=lambda args: (
        [args.pred, args.ref], optional_file(args.json, "JSON report")))


def _run_evaluate(args) -> int:
    from .. import metrics

    if args.pred.is_dir() != args.ref.is_dir():
        raise InputError(f"--pred {args.pred} and --ref {args.ref} must both be files or both be folders")
    if args.tolerance_mm <= 0:
        raise InputError(f"--tolerance-mm must be positive, got {args.tolerance_mm}")
    if args.ref.is_dir():
        results = metrics.evaluate_folders(args.pred, args.ref, args.tolerance_mm)
    else:
        results = [metrics.evaluate_pair(args.pred, args.ref, args.tolerance_mm)]
    report = {"cases": [r.to_dict() for r in results], "mean": metrics.summarize(results)}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        write_text_atomic(args.json, text + "\n")
    return 0


def add_manifests(subparsers) -> None:
    parser = subparsers.add_parser(
        "manifests", help="list dataset manifests, or load a dataset through one",
        description="Without arguments: list the dataset manifests. With NAME: print it. "
        "With NAME and --root: read the dataset's case list (MSD dataset.json, KiTS23 "
        "case folders, PhantomBench cases.csv).")
    parser.add_argument("name", nargs="?", help="manifest name, e.g. msd_task03_liver")
    parser.add_argument("--root", type=Path, help="dataset folder to read through the manifest")
    parser.set_defaults(run=_run_manifests)


def _run_manifests(args) -> int:
    from ..data import manifests

    if args.name is None:
        for name in manifests.list_manifests():
            manifest = manifests.load_manifest(name)
            print(f"{name:28s} {manifest.kind:9s} {manifest.modality:5s} {manifest.title}")
        return 0
    manifest = manifests.load_manifest(args.name)
    if args.root is None:
        print(f"{manifest.title}\n  kind: {manifest.kind}, modality: {manifest.modality}, region: {manifest.region}")
        print(f"  source: {manifest.source['homepage']}\n  get it: {manifest.source['download']}")
        print(f"  licence: {manifest.licence}\n  labels: {manifest.labels}, tumor labels: {manifest.tumor_labels}")
        print(f"  roles: {manifest.roles}\n  layout ({manifest.layout}):\n{manifest.layout_tree}")
        return 0
    records = manifests.load_dataset(manifest, args.root)
    print(f"{len(records)} cases in {args.root} ({manifest.title})")
    for record in records[:10]:
        print(f"  {record.case_id}: {record.image}")
    return 0
