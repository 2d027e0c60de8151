"""The ``diffugts`` command: one entry point, one subcommand per job, ``--help`` on each.

Bad input (a missing or corrupt file, a wrong shape, an unknown category) ends with a one-line
``error: ...`` on stderr naming the file, the problem and the fix, exit code 2, and nothing written.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import __version__
from .io import InputError, write_text_atomic

EXIT_BAD_INPUT = 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffugts",
        description="DiffuGTS teaching kit: zero-shot tumor segmentation with a frozen foundation diffusion model.",
    )
    parser.add_argument("--version", action="version", version=f"diffugts-core {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="generate a PhantomBench case and write its NIfTI files and a montage PNG",
                          description="The main job on the embedded default. For now it generates one PhantomBench "
                          "case (image, organ map, tumor mask as NIfTI) and a labelled PNG montage; the segmentation "
                          "stages will make it segment the case.")
    demo.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output folder (default: outputs/demo)")
    demo.add_argument("--category", default="liver", help="tumor category of the demo case (default: liver)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--shape", type=_shape, default="128,128,64", help="volume shape X,Y,Z (default 128,128,64)")
    demo.set_defaults(run=_run_demo)

    phantoms = sub.add_parser("phantoms", help="generate a PhantomBench cohort (NIfTI + cases.csv)",
                              description="Write DIR/<id>_image.nii.gz, <id>_organs.nii.gz, <id>_tumor.nii.gz for "
                              "each case and DIR/cases.csv. Same seed, same bytes.")
    phantoms.add_argument("--out", type=Path, required=True, help="output folder")
    phantoms.add_argument("--categories", default="liver,kidney,pancreas,lung,colon,hepatic_vessel,brain",
                          help="comma-separated tumor categories (default: all seven)")
    phantoms.add_argument("--per-category", type=int, default=1, help="cases per category (default 1)")
    phantoms.add_argument("--healthy", type=int, default=0, help="healthy cases, cycling over the regions in view")
    phantoms.add_argument("--seed", type=int, default=0)
    phantoms.add_argument("--shape", type=_shape, default="128,128,64", help="volume shape X,Y,Z (default 128,128,64)")
    phantoms.add_argument("--montage", type=Path, help="also write a PNG with one row per case")
    phantoms.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    phantoms.set_defaults(run=_run_phantoms)

    evaluate = sub.add_parser("evaluate", help="DSC and NSD of predicted vs reference masks (files or folders)",
                              description="Compare a predicted mask with a reference (two NIfTI files), or every "
                              "case of two folders (paired by case id: <id>[_pred|_tumor|_mask|_seg|_label].nii.gz). "
                              "Prints JSON: one entry per case and the mean. Empty masks: both empty scores 1, "
                              "exactly one empty scores 0.")
    evaluate.add_argument("--pred", type=Path, required=True, help="predicted mask file or folder")
    evaluate.add_argument("--ref", type=Path, required=True, help="reference mask file or folder")
    evaluate.add_argument("--tolerance-mm", type=float, default=2.0, help="NSD tolerance in mm (default 2)")
    evaluate.add_argument("--json", type=Path, help="also write the JSON to this file")
    evaluate.set_defaults(run=_run_evaluate)

    manifests = sub.add_parser("manifests", help="list dataset manifests, or load a dataset through one",
                               description="Without arguments: list the dataset manifests. With NAME: print it. "
                               "With NAME and --root: read the dataset's case list (MSD dataset.json, KiTS23 "
                               "case folders, PhantomBench cases.csv).")
    manifests.add_argument("name", nargs="?", help="manifest name, e.g. msd_task03_liver")
    manifests.add_argument("--root", type=Path, help="dataset folder to read through the manifest")
    manifests.set_defaults(run=_run_manifests)
    return parser


def _shape(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must be three integers like 128,128,64, got {text!r}") from None
    if len(shape) != 3 or min(shape) < 16:
        raise argparse.ArgumentTypeError(f"shape must be three integers of at least 16, got {text!r}")
    return shape


def _categories(text: str) -> list[str]:
    from .phantoms import CATEGORIES

    categories = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown or not categories:
        raise InputError(f"unknown categories {unknown or [text]}; choose from {','.join(CATEGORIES)}")
    return categories


def _run_demo(args) -> int:
    from . import phantoms, viz

    if args.category not in phantoms.CATEGORIES:
        raise InputError(f"unknown category {args.category!r}; choose from {', '.join(phantoms.CATEGORIES)}")
    start = time.perf_counter()
    case = phantoms.generate_case(args.category, 0, args.seed, args.shape)
    record = phantoms.write_case(case, args.out)
    window = "lung" if case.region == "thorax" else "soft_tissue"
    figure = viz.montage(case.image, modality=case.modality, window=window, organs=case.organs, tumor=case.tumor,
                         title=f"PhantomBench {case.case_id} ({case.modality}, seed {args.seed}): organs and tumor (red)")
    png = viz.save_figure(figure, args.out / f"{case.case_id}_montage.png")
    print(f"case {case.case_id}: {case.modality} {case.region}, shape {case.image.shape}, "
          f"spacing {tuple(round(s, 3) for s in case.spacing)} mm, tumor {case.tumor_voxels} voxels")
    for path in (record.image, record.organs, record.tumor, png):
        print(f"wrote {path}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def _run_phantoms(args) -> int:
    from . import phantoms, viz

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


def _run_evaluate(args) -> int:
    from . import metrics

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


def _run_manifests(args) -> int:
    from . import manifests

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


if __name__ == "__main__":
    sys.exit(main())
