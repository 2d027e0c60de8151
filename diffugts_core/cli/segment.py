"""``diffugts segment`` and ``evaluate-refinement``: the whole pipeline, run on volumes and scored on phantoms."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from ..io import InputError, write_text_atomic
from .common import model_inputs, optional_file, volume_shape


def add_segment(subparsers) -> None:
    parser = subparsers.add_parser(
        "segment", help="segment tumors in a NIfTI volume, a folder of them or a CSV of cases",
        description="The whole DiffuGTS pipeline: AOVA maps, region detection, latent inpainting "
        "to a pseudo-healthy image, residual head. The mask is written in the input's own grid "
        "and affine. IMAGE may be a folder of .nii/.nii.gz files or a CSV with columns image, "
        "organ (optional: modality, organ_mask, case_id); -o is then a folder, and a bad case is "
        "reported and skipped while the rest go on (exit code 1 if any failed). --dry-run only prints the estimated "
        "time and peak memory of the run (IMAGE's size from its header, or --shape) and exits.")
    parser.add_argument("image", type=Path, nargs="?",
                        help="CT (HU) or MRI volume (.nii/.nii.gz), a folder of them, or a CSV")
    parser.add_argument("--organ", help="organ to look in, e.g. liver, lung, colon, brain (a CSV may give it per "
                        "case)")
    parser.add_argument("--prompt", help="free-text abnormal prompt, e.g. 'a CT scan of a spleen with a lesion'")
    parser.add_argument("--modality", default="CT", type=str.upper, choices=("CT", "MRI"))
    parser.add_argument("--organ-mask", type=Path, help="binary organ mask on the image grid (else found by the maps)")
    parser.add_argument("-o", "--out", type=Path, help="mask file (.nii.gz), or a folder in batch mode (required "
                        "unless --dry-run)")
    parser.add_argument("--save-intermediates", type=Path, metavar="DIR",
                        help="also write S, regions, ROI, pseudo-healthy, residuals and probabilities (input grid)")
    parser.add_argument("--report", type=Path, help="JSON report (default: beside the mask)")
    parser.add_argument("--png", type=Path, help="QC picture (default: beside the mask)")
    parser.add_argument("--seeds", type=int, default=1, help="inpainting samples; > 1 adds an uncertainty map")
    parser.add_argument("--seed", type=int, default=0, help="first inpainting seed (default 0)")
    parser.add_argument("--method", choices=("head", "fusion"), default="head",
                        help="refinement: the residual head (default) or the training-free fusion baseline")
    parser.add_argument("--heads", default="default", help="train-heads folder or registry name (default: shipped)")
    parser.add_argument("--model", default="default", help="foundation model (default: the shipped one)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the estimated time and peak memory of the run on this device, then exit: "
                        "nothing is segmented or written, no weights are read")
    parser.add_argument("--shape", type=volume_shape, metavar="X,Y,Z",
                        help="with --dry-run and no IMAGE: the case's size in voxels (on the model's grid)")
    parser.add_argument("--lesion-share", type=float, default=0.05,
                        help="with --dry-run and a MAISI bundle: the lesion's share of the volume that sets the "
                        "inpainting window (default 0.05)")
    parser.set_defaults(run=_run_segment, paths=_segment_paths)


def _segment_paths(args):
    from ..reports import segment_cases

    if args.dry_run:
        return [p for p in (args.image,) if p is not None], []  # reads at most a header, writes nothing
    missing = [name for name, value in (("IMAGE", args.image), ("-o/--out", args.out)) if value is None]
    if missing:
        raise InputError(f"segment needs {' and '.join(missing)} (only --dry-run runs without them)")
    if args.shape is not None:
        raise InputError("--shape sizes a --dry-run estimate; a run reads the size of IMAGE")
    if _is_batch(args.image) and (args.report or args.png):
        raise InputError("--report and --png name one file each; in batch mode they are written beside each mask")
    cases = segment_cases(args.image, organ=args.organ, modality=args.modality, organ_mask=args.organ_mask,
                          out=args.out)
    outputs = []
    for case in cases:
        outputs.append(("file", case.mask, "mask"))
        for role, path in case.outputs(report=args.report, png=args.png, intermediates=args.save_intermediates,
                                       seeds=max(args.seeds, 1)).items():
            outputs.append(("file", path, {"report": "report", "png": "QC picture"}.get(role, f"{role} map")))
    return [args.image, args.organ_mask, *model_inputs(args), *(p for c in cases for p in (c.image, c.organ_mask))], \
        outputs


def _run_segment(args) -> int:
    from ..pipeline import DiffuGTSPipeline
    from ..reports import segment_cases
    from ..text import check_organ, check_prompt

    if args.dry_run:
        return _dry_run(args)
    if args.prompt is not None:
        args.prompt = check_prompt(args.prompt)  # before any model loads
    if args.organ is not None:
        args.organ = check_organ(args.organ)
    if args.seeds < 1:
        raise InputError(f"--seeds must be at least 1, got {args.seeds}")
    cases = segment_cases(args.image, organ=args.organ, modality=args.modality, organ_mask=args.organ_mask,
                          out=args.out)
    batch = _is_batch(args.image)
    inputs = None if batch else cases[0].load()  # one case: a bad file fails before any model loads
    pipeline = DiffuGTSPipeline.from_pretrained(args.heads, args.model, device=args.device)
    failed = 0
    for case in cases:
        start = time.perf_counter()
        try:
            written = case.run(pipeline, inputs=inputs, prompt=args.prompt, seeds=args.seeds, seed=args.seed,
                               method=args.method, report=args.report, png=args.png,
                               intermediates=args.save_intermediates, progress=not args.no_progress)
        except InputError as exc:
            if not batch:
                raise
            failed += 1
            print(f"error: {case.case_id}: {exc} (skipped)", file=sys.stderr)
            continue
        print(f"{case.case_id}: {written[0].name} in {time.perf_counter() - start:.1f} s")
        for path in written:
            print(f"  wrote {path}")
    if batch:
        print(f"{len(cases) - failed} of {len(cases)} cases segmented" + (f", {failed} skipped" if failed else ""))
    return 1 if failed else 0


def _dry_run(args) -> int:
    from ..experiments.dry_run import case_size, estimate_segment_run, format_estimate

    if (args.image is None) == (args.shape is None):
        raise InputError("--dry-run estimates one case: pass IMAGE (its size is read from the header) or "
                         "--shape X,Y,Z, not both")
    if args.image is not None and _is_batch(args.image):
        raise InputError(f"{args.image}: --dry-run estimates one case; pass one of its NIfTI files")
    if args.seeds < 1:
        raise InputError(f"--seeds must be at least 1, got {args.seeds}")
    shape, affine = case_size(args.image) if args.image is not None else (args.shape, None)
    estimate = estimate_segment_run(args.model, shape=shape, affine=affine, modality=args.modality, heads=args.heads,
                                    seeds=args.seeds, lesion_share=args.lesion_share, device=args.device)
    print(format_estimate(estimate))
    return 0


def _is_batch(source: Path) -> bool:
    return source.is_dir() or source.suffix.lower() == ".csv"


def add_evaluate_refinement(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate-refinement", help="DSC of AOVA-only, fusion and the full method per category",
        description="Run the pipeline on a setting's unseen test cases (PhantomBench seed 3000) and "
        "report per category DSC and NSD of AOVA-only, the training-free fusion and the full "
        "method, and inside the tumor the mean HU of the input, the pseudo-healthy image and the "
        "surrounding healthy organ.")
    parser.add_argument("--heads", default="default", help="train-heads folder or registry name (default: shipped)")
    parser.add_argument("--model", default="default")
    parser.add_argument("--test-per-category", type=int, default=4, help="test cases per category (default 4)")
    parser.add_argument("--upper-bound", action="store_true", help="score the setting's seen categories instead")
    parser.add_argument("--inpaint-steps", type=int, default=None,
                        help="DDIM steps of the inpainting (default: the residual head's; fewer for a quick look only)")
    parser.add_argument("--json", type=Path, help="also write categories and cases as JSON")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(run=_run_evaluate_refinement, paths=lambda args: (
        model_inputs(args), optional_file(args.json, "JSON report")))


def _run_evaluate_refinement(args) -> int:
    from ..experiments.refinement import evaluate_refinement
    from ..pipeline import DiffuGTSPipeline

    if args.test_per_category < 1:
        raise InputError("--test-per-category must be at least 1")
    if args.inpaint_steps is not None and args.inpaint_steps < 1:
        raise InputError("--inpaint-steps must be at least 1")
    pipeline = DiffuGTSPipeline.from_pretrained(args.heads, args.model)
    rows, cases = evaluate_refinement(pipeline, test_per_category=args.test_per_category,
                                      role="seen" if args.upper_bound else "unseen", inpaint_steps=args.inpaint_steps,
                                      progress=not args.no_progress)
    print(f"{'category':15s} {'cases':>5s} {'DSC aova':>8s} {'fusion':>7s} {'full':>6s} {'NSD aova':>8s} {'fusion':>7s} "
          f"{'full':>6s} {'ROI cover':>9s} {'HU input':>8s} {'HU H':>6s} {'HU organ':>8s}")
    for row in rows:
        print(f"{row['category']:15s} {row['cases']:5d} {row['dsc_aova']:8.3f} {row['dsc_fusion']:7.3f} "
              f"{row['dsc_full']:6.3f} {row['nsd_aova']:8.3f} {row['nsd_fusion']:7.3f} {row['nsd_full']:6.3f} "
              f"{row['roi_tumor_coverage']:9.2f} {row['hu_input_in_tumor']:8.1f} {row['hu_healthy_in_tumor']:6.1f} "
              f"{row['hu_organ']:8.1f}")
    for key in ("dsc_aova", "dsc_fusion", "dsc_full"):
        print(f"mean {key}: {np.mean([r[key] for r in rows]):.3f}")
    print(f"thresholds: {rows[0]['thresholds']}")
    if args.json:
        write_text_atomic(args.json, json.dumps({"categories": rows, "cases": cases}, indent=2) + "\n")
    return 0
