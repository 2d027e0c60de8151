"""``diffugts demo``: one PhantomBench case, generated and segmented end to end."""

from __future__ import annotations

import time
from pathlib import Path

from ..io import InputError
from .common import volume_shape


def add_demo(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="segment a PhantomBench case end to end: mask, report and QC picture",
        description="The main job on the embedded default: generate one PhantomBench case (image, "
        "organ map, tumor mask as NIfTI), segment it with the shipped model and seen -> unseen heads, "
        "and write the mask, a JSON report and a QC picture. The default case is the first "
        "hepatic-vessel tumor of PhantomBench's test split (seed 3000), a category the shipped heads "
        "never saw.")
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output folder (default: outputs/demo)")
    parser.add_argument("--category", default="hepatic_vessel",
                        help="tumor category of the demo case (default: hepatic_vessel, unseen by the shipped heads)")
    parser.add_argument("--seed", type=int, default=3000, help="PhantomBench seed (default 3000, the test split)")
    parser.add_argument("--shape", type=volume_shape, default="128,128,64",
                        help="volume shape X,Y,Z (default 128,128,64)")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(run=_run_demo, paths=lambda args: ([], [("folder", args.out, "output folder")]))


def _run_demo(args) -> int:
    from ..data import phantoms
    from ..io import load_volume
    from ..metrics import dice
    from ..pipeline import DiffuGTSPipeline
    from ..reports import write_segmentation
    from ..vocabulary import CATEGORY_ORGAN

    if args.category not in phantoms.CATEGORIES:
        raise InputError(f"unknown category {args.category!r}; choose from {', '.join(phantoms.CATEGORIES)}")
    start = time.perf_counter()
    case = phantoms.generate_case(args.category, 0, args.seed, args.shape)
    record = phantoms.write_case(case, args.out)
    print(f"case {case.case_id}: {case.modality} {case.region}, shape {case.image.shape}, "
          f"spacing {tuple(round(s, 3) for s in case.spacing)} mm, tumor {case.tumor_voxels} voxels")
    pipeline = DiffuGTSPipeline.from_pretrained()
    organ = CATEGORY_ORGAN[case.category]
    volume = load_volume(record.image)
    result = pipeline(volume, organ, modality=case.modality, progress=not args.no_progress)
    tumor = case.tumor > 0
    written = write_segmentation(pipeline, result, args.out / f"{case.case_id}_mask.nii.gz", image=record.image,
                                 protect=[record.image], modality=case.modality, truth=tumor)
    role = "seen" if case.category in pipeline.heads.seen else "unseen"
    print(f"segmented the {organ} ({case.category} is {role} by the {pipeline.heads.setting} heads): "
          f"{int(result.mask.sum())} voxels, DSC {dice(result.mask, tumor):.3f} against the phantom's tumor "
          f"(AOVA-only {dice(result.detection.kept, tumor):.3f})")
    for path in (record.image, record.organs, record.tumor, *written):
        print(f"wrote {path}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0
