"""The ``diffugts`` command: one entry point, one subcommand per job, ``--help`` on each.

Bad input (a missing or corrupt file, a wrong shape, an unknown category) ends with a one-line
``error: ...`` on stderr naming the file, the problem and the fix, exit code 2, and nothing written.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from . import __version__
from .io import InputError, write_text_atomic
from .outputs import OutputPolicy

EXIT_BAD_INPUT = 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with _one_line_warnings(), _exit_on_termination():
        try:
            inputs, outputs = args.paths(args)
            with OutputPolicy(inputs) as policy:  # every output checked before any model loads
                for kind, path, what in outputs:
                    getattr(policy, kind)(path, what)
                return args.run(args) or 0
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT


@contextmanager
def _one_line_warnings():
    """InputWarnings as ``warning: ...`` lines on stderr, like the ``error: ...`` lines."""
    from .io import InputWarning

    show = warnings.showwarning

    def one_line(message, category, *args, **kwargs):
        if issubclass(category, InputWarning):
            print(f"warning: {message}", file=sys.stderr)
        else:
            show(message, category, *args, **kwargs)

    warnings.showwarning = one_line
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", InputWarning)
            yield
    finally:
        warnings.showwarning = show


@contextmanager
def _exit_on_termination():
    """SIGTERM and SIGHUP end the run as an exception does, so atomic writes remove their temporary files."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    earlier = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in earlier.items():
            signal.signal(sig, handler)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffugts",
        description="DiffuGTS teaching kit: zero-shot tumor segmentation with a frozen foundation diffusion model.",
    )
    parser.add_argument("--version", action="version", version=f"diffugts-core {__version__}")
    parser.set_defaults(paths=lambda args: ([], []))  # (inputs, outputs) of a command that writes nothing
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="segment a PhantomBench case end to end: mask, report and QC picture",
                          description="The main job on the embedded default: generate one PhantomBench case (image, "
                          "organ map, tumor mask as NIfTI), segment it with the shipped model and seen -> unseen heads, "
                          "and write the mask, a JSON report and a QC picture. The default case is the first "
                          "hepatic-vessel tumor of PhantomBench's test split (seed 3000), a category the shipped heads "
                          "never saw.")
    demo.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output folder (default: outputs/demo)")
    demo.add_argument("--category", default="hepatic_vessel",
                      help="tumor category of the demo case (default: hepatic_vessel, unseen by the shipped heads)")
    demo.add_argument("--seed", type=int, default=3000, help="PhantomBench seed (default 3000, the test split)")
    demo.add_argument("--shape", type=_shape, default="128,128,64", help="volume shape X,Y,Z (default 128,128,64)")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(run=_run_demo, paths=lambda args: ([], [("folder", args.out, "output folder")]))

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
    phantoms.set_defaults(run=_run_phantoms, paths=lambda args: (
        [], [("folder", args.out, "output folder"), *_optional_file(args.montage, "montage")]))

    evaluate = sub.add_parser("evaluate", help="DSC and NSD of predicted vs reference masks (files or folders)",
                              description="Compare a predicted mask with a reference (two NIfTI files), or every "
                              "case of two folders (paired by case id: <id>[_pred|_tumor|_mask|_seg|_label].nii.gz). "
                              "Prints JSON: one entry per case and the mean. Empty masks: both empty scores 1, "
                              "exactly one empty scores 0.")
    evaluate.add_argument("--pred", type=Path, required=True, help="predicted mask file or folder")
    evaluate.add_argument("--ref", type=Path, required=True, help="reference mask file or folder")
    evaluate.add_argument("--tolerance-mm", type=float, default=2.0, help="NSD tolerance in mm (default 2)")
    evaluate.add_argument("--json", type=Path, help="also write the JSON to this file")
    evaluate.set_defaults(run=_run_evaluate, paths=lambda args: (
        [args.pred, args.ref], _optional_file(args.json, "JSON report")))

    manifests = sub.add_parser("manifests", help="list dataset manifests, or load a dataset through one",
                               description="Without arguments: list the dataset manifests. With NAME: print it. "
                               "With NAME and --root: read the dataset's case list (MSD dataset.json, KiTS23 "
                               "case folders, PhantomBench cases.csv).")
    manifests.add_argument("name", nargs="?", help="manifest name, e.g. msd_task03_liver")
    manifests.add_argument("--root", type=Path, help="dataset folder to read through the manifest")
    manifests.set_defaults(run=_run_manifests)
    train = sub.add_parser("train-foundation", help="train the phantom foundation model (VAE + text-conditioned UNet)",
                           description="Train the embedded default foundation model on healthy PhantomBench slices "
                           "only (CT abdomen, CT thorax, MRI brain) and save it in diffusers format with a model card. "
                           "Checkpoints every 200 steps; --resume continues from them.")
    train.add_argument("--out", type=Path, required=True, help="model folder to write")
    train.add_argument("--steps", type=int, default=2000, help="UNet steps (default 2000)")
    train.add_argument("--vae-steps", type=int, default=800, help="VAE steps (default 800)")
    train.add_argument("--volumes-per-region", type=int, default=12, help="healthy volumes per region (default 12)")
    train.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    train.add_argument("--data-seed", type=int, default=1000, help="PhantomBench seed of the training data")
    train.add_argument("--crop-fraction", type=float, default=0.0,
                       help="share of UNet batches that are random latent crops (default 0)")
    train.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    train.add_argument("--register", metavar="NAME", help="also record every file's sha256 in models/registry.yaml")
    train.add_argument("--no-progress", action="store_true", help="hide progress bars")
    train.set_defaults(run=_run_train_foundation, paths=lambda args: ([], [("folder", args.out, "model folder")]))
    check = sub.add_parser("check-foundation", help="measure the foundation model on held-out healthy phantoms",
                           description="VAE reconstruction (HU MAE, PSNR), healthy inpainting vs a mean fill, the "
                           "pseudo-healthy test (a -40 HU tumor inpainted back toward its organ; ratio must be <= "
                           "0.25) and per-stage times. Exit code 1 when the pseudo-healthy test fails.")
    check.add_argument("--model", default="default", help="model folder or hub id (default: the shipped model)")
    check.add_argument("--seed", type=int, default=7, help="PhantomBench seed of the held-out cases (default 7)")
    check.add_argument("--steps", type=int, default=25, help="DDIM steps (default 25)")
    check.add_argument("--samples", type=int, default=2, help="inpainting samples averaged (default 2)")
    check.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (default 1)")
    check.add_argument("--json", type=Path, help="also write the report as JSON")
    check.set_defaults(run=_run_check_foundation, paths=lambda args: (
        _model_inputs(args), _optional_file(args.json, "JSON report")))
    heads = sub.add_parser("train-heads", help="train AOVA adapters, W_q, W_k and the region head for a setting",
                           description="Train the small heads on the seen categories of a zero-shot setting (held-out "
                           "categories never reach the training data): AOVA + region head (heads.json), then the "
                           "residual head on their inpainted cases (residual.json), and a residual head for each "
                           "modality no seen category is in, on healthy cases with synthetic anomalies "
                           "(residual_mri.json); thresholds come from validation cases. Weights as safetensors.")
    heads.add_argument("--setting", required=True, help="loo-<category>, seen-unseen or ct-mri")
    heads.add_argument("--out", type=Path, required=True, help="folder to write")
    heads.add_argument("--steps", type=int, default=3000, help="training steps (default 3000)")
    heads.add_argument("--per-category", type=int, default=4, help="training cases per seen category (default 4)")
    heads.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    heads.add_argument("--model", default="default", help="foundation model (default: the shipped one)")
    heads.add_argument("--residual-steps", type=int, default=800, help="residual head training steps (default 800)")
    heads.add_argument("--modality-healthy", type=int, default=16, metavar="N",
                       help="healthy training cases per region for the residual head of a modality no seen category "
                            "is in (MRI brain), 3 synthetic anomalies each (default 16; 0: no such head, the one "
                            "residual head serves every modality; docs/refinement_findings.md section 6)")
    heads.add_argument("--residual-only", action="store_true",
                       help="train only the residual heads, on the AOVA + region heads already in --out")
    heads.add_argument("--cache", type=Path, help="cache folder for the pseudo-healthy images of the residual heads' "
                       "training and validation cases (default: none)")
    heads.add_argument("--register", metavar="NAME", help="also record every file's sha256 in models/registry.yaml")
    heads.add_argument("--no-progress", action="store_true")
    heads.set_defaults(run=_run_train_heads, paths=lambda args: (
        _model_inputs(args), [("folder", args.out, "heads folder"), *_optional_folder(args.cache, "cache folder")]))

    detect = sub.add_parser("detect", help="AOVA anomaly map and region-level detection for one NIfTI volume",
                            description="Run the trained heads (default: the shipped seen -> unseen heads) on a CT or "
                            "MRI volume for one organ. Any organ or tumor phrase works (open vocabulary): --prompt "
                            "replaces the organ's abnormal prompt. Writes the anomaly map S and the kept regions in "
                            "the input's own grid, a JSON report and a PNG.")
    detect.add_argument("image", type=Path, help="CT (HU) or MRI volume, .nii or .nii.gz")
    detect.add_argument("--organ", required=True, help="organ to look in, e.g. liver, lung, colon, spleen, brain")
    detect.add_argument("--prompt", help="free-text abnormal prompt, e.g. 'a CT scan of a spleen with a lesion'")
    detect.add_argument("--modality", default="CT", type=str.upper, choices=("CT", "MRI"))
    detect.add_argument("--organ-mask", type=Path, help="binary organ mask on the image grid (else found by the maps)")
    detect.add_argument("--heads", default="default", help="trained heads folder or registry name (default: shipped)")
    detect.add_argument("--model", default="default", help="foundation model (default: the shipped one)")
    detect.add_argument("-o", "--out", type=Path, required=True, help="output folder")
    detect.set_defaults(run=_run_detect, paths=lambda args: (
        [args.image, args.organ_mask, *_model_inputs(args)],
        [("folder", args.out, "output folder"), *(("file", path, role) for role, path in _detect_outputs(args).items())]))

    aova = sub.add_parser("evaluate-aova", help="AOVA-only DSC, NSD, detection AUROC per unseen category",
                          description="For each setting: train the heads on its seen categories, then report on its "
                          "unseen categories (test split, another seed) DSC, NSD, detection AUROC and the ratio of "
                          "mean S inside the tumor to the surrounding healthy organ.")
    aova.add_argument("--settings", default="all", help="comma-separated settings, or all (default)")
    aova.add_argument("--steps", type=int, default=3000, help="training steps per setting (default 3000)")
    aova.add_argument("--per-category", type=int, default=4, help="training cases per seen category (default 4)")
    aova.add_argument("--test-per-category", type=int, default=4,
                      help="test cases per unseen category, and healthy test cases per region (default 4)")
    aova.add_argument("--model", default="default")
    aova.add_argument("--heads-cache", type=Path, help="keep each setting's trained heads in DIR/<setting>/ and reuse "
                      "them when their training configuration matches")
    aova.add_argument("--json", type=Path, help="also write the rows as JSON")
    aova.add_argument("--training-fit", action="store_true",
                      help="also print, per setting, the mean S inside the heads' own training lesions (per stage)")
    aova.add_argument("--feature-probe", action="store_true",
                      help="also print, per setting, how well the frozen features alone separate its training lesions "
                      "from their organ (pixel AUROC of a linear probe fitted on half the cases, scored on the rest)")
    aova.add_argument("--upper-bound", action="store_true",
                      help="also report, per setting, the same heads on test cases of their *seen* categories: the "
                      "supervised upper bound of the zero-shot figures (ct-mri heads saw every CT category)")
    aova.add_argument("--no-progress", action="store_true")
    aova.set_defaults(run=_run_evaluate_aova, paths=lambda args: (
        _model_inputs(args), [*_optional_file(args.json, "JSON report"),
                              *_optional_folder(args.heads_cache, "heads cache")]))

    segment = sub.add_parser("segment", help="segment tumors in a NIfTI volume, a folder of them or a CSV of cases",
                             description="The whole DiffuGTS pipeline: AOVA maps, region detection, latent inpainting "
                             "to a pseudo-healthy image, residual head. The mask is written in the input's own grid "
                             "and affine. IMAGE may be a folder of .nii/.nii.gz files or a CSV with columns image, "
                             "organ (optional: modality, organ_mask, case_id); -o is then a folder, and a bad case is "
                             "reported and skipped while the rest go on (exit code 1 if any failed).")
    segment.add_argument("image", type=Path, help="CT (HU) or MRI volume (.nii/.nii.gz), a folder of them, or a CSV")
    segment.add_argument("--organ", help="organ to look in, e.g. liver, lung, colon, brain (a CSV may give it per "
                         "case)")
    segment.add_argument("--prompt", help="free-text abnormal prompt, e.g. 'a CT scan of a spleen with a lesion'")
    segment.add_argument("--modality", default="CT", type=str.upper, choices=("CT", "MRI"))
    segment.add_argument("--organ-mask", type=Path, help="binary organ mask on the image grid (else found by the maps)")
    segment.add_argument("-o", "--out", type=Path, required=True, help="mask file (.nii.gz), or a folder in batch mode")
    segment.add_argument("--save-intermediates", type=Path, metavar="DIR",
                         help="also write S, regions, ROI, pseudo-healthy, residuals and probabilities (input grid)")
    segment.add_argument("--report", type=Path, help="JSON report (default: beside the mask)")
    segment.add_argument("--png", type=Path, help="QC picture (default: beside the mask)")
    segment.add_argument("--seeds", type=int, default=1, help="inpainting samples; > 1 adds an uncertainty map")
    segment.add_argument("--seed", type=int, default=0, help="first inpainting seed (default 0)")
    segment.add_argument("--method", choices=("head", "fusion"), default="head",
                         help="refinement: the residual head (default) or the training-free fusion baseline")
    segment.add_argument("--heads", default="default", help="train-heads folder or registry name (default: shipped)")
    segment.add_argument("--model", default="default", help="foundation model (default: the shipped one)")
    segment.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    segment.add_argument("--no-progress", action="store_true")
    segment.set_defaults(run=_run_segment, paths=_segment_paths)

    refine = sub.add_parser("evaluate-refinement", help="DSC of AOVA-only, fusion and the full method per category",
                            description="Run the pipeline on a setting's unseen test cases (PhantomBench seed 3000) and "
                            "report per category DSC and NSD of AOVA-only, the training-free fusion and the full "
                            "method, and inside the tumor the mean HU of the input, the pseudo-healthy image and the "
                            "surrounding healthy organ.")
    refine.add_argument("--heads", default="default", help="train-heads folder or registry name (default: shipped)")
    refine.add_argument("--model", default="default")
    refine.add_argument("--test-per-category", type=int, default=4, help="test cases per category (default 4)")
    refine.add_argument("--upper-bound", action="store_true", help="score the setting's seen categories instead")
    refine.add_argument("--json", type=Path, help="also write categories and cases as JSON")
    refine.add_argument("--no-progress", action="store_true")
    refine.set_defaults(run=_run_evaluate_refinement, paths=lambda args: (
        _model_inputs(args), _optional_file(args.json, "JSON report")))

    bench = sub.add_parser("benchmark", help="speed: per-stage time and peak memory of the default pipeline",
                           description="--speed: segment a 128x128x64 PhantomBench CT case at default settings, print "
                           "per-stage time and peak memory, and ROI-cropped vs full-slice inpainting side by side "
                           "(time ratio and DSC of both). --windows: ROI windows of several contexts against whole "
                           "slices on validation cases (time, and MAE of the pseudo-healthy image against the truth).")
    which = bench.add_mutually_exclusive_group(required=True)
    which.add_argument("--speed", action="store_true", help="the speed benchmark")
    which.add_argument("--windows", action="store_true", help="the ROI-window study")
    which.add_argument("--setting", help="the zero-shot benchmark of a setting: loo, seen-unseen, mri, all (or one "
                       "setting's own name, e.g. loo-liver); writes results.json, table.md, per_case.csv to --out")
    bench.add_argument("--quick", action="store_true",
                       help="--setting: the CI size (2 test cases per unseen category instead of 12)")
    bench.add_argument("--out", type=Path, help="--setting: folder for the results (one subfolder per setting)")
    bench.add_argument("--seed", type=int, default=0, help="--setting: inpainting and reconstruction seed (default 0)")
    bench.add_argument("--heads-cache", type=Path, help="--setting: folder of heads, one subfolder per setting "
                       "(missing ones are trained there, as by evaluate-aova; seen-unseen uses the shipped heads "
                       "unless DIR/seen-unseen exists). With it, the table gains the supervised upper bound (each "
                       "category's heads from the leave-one-out setting that holds out the next category), and a "
                       "results.json of the same configuration and heads already in --out is reused, not run again")
    bench.add_argument("--cases", type=int, default=3, help="--speed: cases (default 3: liver, hepatic vessel, kidney)")
    bench.add_argument("--per-category", type=int, default=2,
                       help="--windows: validation cases per seen category (default 2)")
    bench.add_argument("--model", default="default", help="--windows: foundation model folder (default: shipped)")
    bench.add_argument("--json", type=Path, help="also write the figures as JSON")
    gate = sub.add_parser("regression-gate", help="hold a quick benchmark's results against the committed baseline",
                          description="Compare a quick seen -> unseen benchmark (the regression notebook's "
                          "results.json) with the baseline: the full method's DSC and NSD per test case, per unseen "
                          "category and on the mean within the baseline's tolerances, above AOVA-only, the "
                          "reconstruction baseline and the non-generative fill on the mean, each category above its "
                          "floor, detection AUROC >= 0.5 where the baseline lists it. Exit code 1 when it fails. "
                          "--record makes the results the golden ones instead (baseline metrics and results_quick.json "
                          "beside it) and prints every gated figure that moved.")
    gate.add_argument("--results", type=Path, required=True, help="results.json of a quick seen -> unseen benchmark")
    gate.add_argument("--baseline", type=Path, default=Path("notebooks/regression/baseline.json"),
                      help="baseline file (default: notebooks/regression/baseline.json)")
    gate.add_argument("--record", action="store_true", help="make --results the golden results (say why in the commit)")
    gate.set_defaults(run=_run_regression_gate, paths=lambda args: (
        [args.results], [("file", args.baseline, "baseline"),
                         ("file", args.baseline.with_name("results_quick.json"), "golden results")]
        if args.record else []))

    bench.set_defaults(run=_run_benchmark, paths=lambda args: (
        _model_inputs(args), [*_optional_file(args.json, "JSON report"), *_optional_folder(args.out, "results folder"),
                              *_optional_folder(args.heads_cache, "heads cache")]))
    return parser


def _optional_file(path: Path | None, what: str) -> list:
    return [("file", path, what)] if path is not None else []


def _optional_folder(path: Path | None, what: str) -> list:
    return [("folder", path, what)] if path is not None else []


def _detect_outputs(args) -> dict[str, Path]:
    stem = args.image.name.removesuffix(".gz").removesuffix(".nii")
    return {"anomaly map": args.out / f"{stem}_anomaly.nii.gz", "regions": args.out / f"{stem}_regions.nii.gz",
            "report": args.out / f"{stem}_detection.json", "picture": args.out / f"{stem}_aova.png"}


def _is_batch(source: Path) -> bool:
    return source.is_dir() or source.suffix.lower() == ".csv"


def _model_inputs(args) -> list[Path]:
    """The heads and foundation model folders a command reads, where given as folders: never an output."""
    return [Path(value) for value in (getattr(args, "heads", None), getattr(args, "model", None))
            if value not in (None, "default") and Path(value).exists()]


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
    from . import phantoms
    from .aova import CATEGORY_ORGAN
    from .io import load_volume
    from .metrics import dice
    from .pipeline import DiffuGTSPipeline
    from .reports import write_segmentation

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


def _run_train_foundation(args) -> int:
    from .backbone.registry import record_model
    from .backbone.training import FoundationTrainingConfig, train_foundation

    if min(args.steps, args.vae_steps, args.volumes_per_region) < 1:
        raise InputError("--steps, --vae-steps and --volumes-per-region must be at least 1")
    if not 0 <= args.crop_fraction <= 1:
        raise InputError(f"--crop-fraction must be between 0 and 1, got {args.crop_fraction}")
    config = FoundationTrainingConfig(unet_steps=args.steps, vae_steps=args.vae_steps, seed=args.seed,
                                      data_seed=args.data_seed, volumes_per_region=args.volumes_per_region,
                                      crop_fraction=args.crop_fraction)
    command = f"diffugts train-foundation --out {args.out} --steps {args.steps} --vae-steps {args.vae_steps} " \
        f"--volumes-per-region {args.volumes_per_region} --seed {args.seed} --data-seed {args.data_seed}" \
        + (f" --crop-fraction {args.crop_fraction:g}" if args.crop_fraction else "") + (" --resume" if args.resume else "")
    start = time.perf_counter()
    folder = train_foundation(args.out, config, resume=args.resume, progress=not args.no_progress, command=command)
    print(f"wrote {folder} in {(time.perf_counter() - start) / 60:.1f} min")
    if args.register:
        history = json.loads((folder / "checkpoints" / "state.json").read_text())["commands"]
        entry = record_model(args.register, folder, command=" && ".join(history), licence="Apache-2.0",
                             description="phantom foundation model: AutoencoderKL + text-conditioned UNet, healthy "
                             "PhantomBench only")
        print(f"registered {args.register}: {len(entry['files'])} files, {entry['size_mb']} MB")
    return 0


def _run_check_foundation(args) -> int:
    from .backbone import load_backbone
    from .backbone.quality import check_foundation, format_report
    from .inpaint import InpaintConfig
    from .text import TextEncoder

    backbone = load_backbone(args.model)
    text_encoder = TextEncoder.from_pretrained(backbone.config.text_encoder)
    config = InpaintConfig(steps=args.steps, samples=args.samples, guidance_scale=args.guidance)
    report = check_foundation(backbone, text_encoder, seed=args.seed, config=config)
    print(format_report(report))
    if args.json:
        write_text_atomic(args.json, json.dumps(report, indent=2) + "\n")
    return 0 if report["pass"] else 1


def _run_train_heads(args) -> int:
    from .backbone import load_backbone
    from .backbone.registry import load_registry, record_model
    from .heads import HeadsConfig, TrainedHeads, setting_categories, train_heads
    from .residual import ResidualConfig, train_modality_heads, train_residual_head
    from .text import TextEncoder

    seen, unseen = setting_categories(args.setting)
    if args.residual_steps < 1:
        raise InputError("--residual-steps must be at least 1")
    if args.modality_healthy < 0:
        raise InputError("--modality-healthy must be 0 or more")
    backbone = load_backbone(args.model)
    text_encoder = TextEncoder.from_pretrained(backbone.config.text_encoder)
    config = HeadsConfig(setting=args.setting, steps=args.steps, train_per_category=args.per_category, seed=args.seed)
    start = time.perf_counter()
    if args.residual_only:
        if not (args.out / "heads.json").is_file():
            raise InputError(f"{args.out}: no heads.json; --residual-only trains on heads already there (drop the flag "
                             "to train both)")
        heads = TrainedHeads.load(args.out)
        if heads.setting != args.setting:
            raise InputError(f"{args.out} holds heads of {heads.setting}, not {args.setting}")
    else:
        heads = train_heads(backbone, text_encoder, config, progress=not args.no_progress)
    residual_config = ResidualConfig(steps=args.residual_steps, seed=args.seed, modality_healthy=args.modality_healthy)
    residual = train_residual_head(heads, backbone, text_encoder, residual_config, cache=args.cache,
                                   progress=not args.no_progress)
    modality_heads = train_modality_heads(heads, backbone, text_encoder, residual_config, cache=args.cache,
                                          progress=not args.no_progress)
    if not args.residual_only:
        heads.save(args.out)
    for stale in args.out.glob("residual_*.*"):  # modality heads of an earlier run that this one does not replace
        stale.unlink()
    for head in (residual, *modality_heads):
        head.save(args.out)
    print(f"setting {args.setting}: seen {', '.join(seen)}; unseen {', '.join(unseen)}")
    print(f"thresholds: {heads.thresholds}; refinement: {residual.thresholds}")
    for head in modality_heads:
        print(f"refinement of {head.modality} cases (their own residual head): {head.thresholds}")
    print(f"wrote {args.out} in {(time.perf_counter() - start) / 60:.1f} min")
    if args.register:
        command = (f"diffugts train-heads --setting {args.setting} --out {args.out} --steps {args.steps} "
                   f"--per-category {args.per_category} --residual-steps {args.residual_steps} --seed {args.seed}"
                   + (f" --modality-healthy {args.modality_healthy}"
                      if args.modality_healthy != ResidualConfig().modality_healthy else "")
                   + (" --residual-only" if args.residual_only else ""))
        earlier = load_registry().get(args.register, {}).get("command") if args.residual_only else None
        if earlier:  # how the AOVA heads beside it were made: the first command of the earlier entry
            command = f"{earlier.split(' && ')[0]} && {command}"
        entry = record_model(args.register, Path(args.out), command=command, licence="Apache-2.0",
                             description=f"AOVA + region heads and residual heads, setting {args.setting} "
                             f"(seen: {', '.join(seen)}), on the {args.model} foundation model")
        print(f"registered {args.register}: {len(entry['files'])} files, {entry['size_mb']} MB")
    return 0


def _run_detect(args) -> int:
    from . import plausibility, viz
    from .backbone import load_backbone
    from .backbone.registry import sha256_file
    from .heads import TrainedHeads, detect_volume, heads_folder
    from .io import load_volume, save_volume
    from .text import TextEncoder, check_organ, check_prompt

    if args.prompt is not None:
        args.prompt = check_prompt(args.prompt)  # before any model loads
    args.organ = check_organ(args.organ)
    start = time.perf_counter()
    volume = load_volume(args.image)
    doubts = plausibility.emit(plausibility.intensity_warnings(volume.array, args.modality))
    organ_mask = load_volume(args.organ_mask, role="organ mask", dtype=np.uint8) if args.organ_mask else None
    folder = heads_folder(args.heads)
    heads = TrainedHeads.load(folder)
    backbone = load_backbone(args.model)
    text_encoder = TextEncoder.from_pretrained(backbone.config.text_encoder)
    result = detect_volume(heads, backbone, text_encoder, volume, args.modality, args.organ, prompt=args.prompt,
                           organ_mask=organ_mask)
    doubts += plausibility.emit(plausibility.prompt_set_warnings(text_encoder, result.aova.prompt_set, args.organ,
                                                                 organ_mask_given=organ_mask is not None))
    stem = args.image.name.removesuffix(".gz").removesuffix(".nii")
    paths = _detect_outputs(args)
    written = [save_volume(result.anomaly.astype(np.float32), volume.affine, paths["anomaly map"]),
               save_volume(result.kept, volume.affine, paths["regions"])]
    prompt_set = result.aova.prompt_set
    report = {
        "image": str(args.image), "organ": args.organ, "modality": args.modality,
        "prompts": {name: list(texts) for name, texts in zip(prompt_set.names, prompt_set.texts)},
        "heads": {"folder": str(folder), "setting": heads.setting, "seen": list(heads.seen),
                  "sha256": sha256_file(folder / "heads.safetensors")},
        "thresholds": vars(heads.thresholds),
        "case_score": result.detection.case_score,
        "regions": [{"voxels": r.voxels, "mean_s": r.mean_s, "probability": r.probability,
                     "kept": r.probability >= heads.thresholds.region} for r in result.detection.regions],
        "warnings": doubts,
        "seconds": round(time.perf_counter() - start, 2),
    }
    written.append(write_text_atomic(paths["report"], json.dumps(report, indent=2) + "\n"))
    figure = viz.montage(result.image, modality=args.modality,
                         maps={"S": result.aova.anomaly}, tumor=result.detection.kept,
                         title=f"{stem}: S for {args.organ!r}, kept regions in red")
    written.append(viz.save_figure(figure, paths["picture"]))
    kept = sum(r["kept"] for r in report["regions"])
    print(f"{stem}: {len(report['regions'])} candidate regions, {kept} kept; case score {report['case_score']:.3f}")
    for path in written:
        print(f"wrote {path}")
    print(f"done in {report['seconds']:.1f} s")
    return 0


def _run_evaluate_aova(args) -> int:
    from .backbone import load_backbone
    from .heads import (SETTINGS, HeadsConfig, cached_heads, evaluate_heads, feature_probe, train_heads, training_bank,
                        training_fit)
    from .text import TextEncoder

    settings = SETTINGS if args.settings == "all" else tuple(s.strip() for s in args.settings.split(","))
    backbone = load_backbone(args.model)
    text_encoder = TextEncoder.from_pretrained(backbone.config.text_encoder)
    rows, upper_bound_rows = [], []  # the means below are over the zero-shot rows only
    print(f"{'setting':20s} {'unseen':15s} {'cases':>5s} {'DSC':>6s} {'NSD':>6s} {'AUROC':>6s} {'S in':>6s} "
          f"{'S out':>6s} {'S in/out':>8s} {'in>out':>6s}")
    for setting in settings:
        config = HeadsConfig(setting=setting, steps=args.steps, train_per_category=args.per_category,
                             test_per_category=args.test_per_category)
        heads = cached_heads(args.heads_cache / setting, config) if args.heads_cache else None
        if heads is None:
            heads = train_heads(backbone, text_encoder, config, progress=not args.no_progress)
            if args.heads_cache:
                heads.save(args.heads_cache / setting)
        for row in evaluate_heads(heads, backbone, text_encoder, config):
            rows.append(row)
            print(f"{setting:20s} {_aova_row(row)}", flush=True)
        if args.upper_bound:
            print(f"  {setting}: the same heads on test cases of their seen categories (supervised upper bound)")
            for row in evaluate_heads(heads, backbone, text_encoder, config, role="seen"):
                upper_bound_rows.append(row)
                print(f"  {'seen':18s} {_aova_row(row)}", flush=True)
        bank = (training_bank(backbone, config, np.random.default_rng(config.seed))
                if args.training_fit or args.feature_probe else None)  # built once for both diagnostics
        if args.training_fit:
            print(f"  {setting}: mean S inside the heads' own training lesions")
            print(f"  {'organ':10s} {'kind':10s} {'slices':>6s} {'S':>6s} {'stage1':>6s} {'stage2':>6s} {'stage3':>6s}")
            for fit in training_fit(heads, backbone, text_encoder, bank=bank):
                stages = " ".join(f"{x:6.3f}" for x in fit["s_stages"])
                print(f"  {fit['organ']:10s} {fit['kind']:10s} {fit['slices']:6d} {fit['s']:6.3f} {stages}", flush=True)
        if args.feature_probe:
            print(f"  {setting}: linear probe on the frozen features, lesion vs the rest of its organ (pixel AUROC)")
            print(f"  {'organ':10s} {'kind':10s} {'cases':>5s} {'AUROC':>6s} {'+context':>8s} {'+organ-relative':>15s}")
            for probe in feature_probe(bank):
                print(f"  {probe['organ']:10s} {probe['kind']:10s} {probe['cases']:5d} {probe['auroc']:6.3f} "
                      f"{probe['auroc_context']:8.3f} {probe['auroc_organ_relative']:15.3f}", flush=True)
    for key in ("dsc", "nsd", "auroc"):
        print(f"mean {key}: {np.nanmean([r[key] for r in rows]):.3f}")
    if args.json:
        write_text_atomic(args.json, json.dumps(rows + upper_bound_rows, indent=2) + "\n")
    return 0


def _segment_paths(args):
    from .reports import segment_cases

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
    return [args.image, args.organ_mask, *_model_inputs(args), *(p for c in cases for p in (c.image, c.organ_mask))], \
        outputs


def _run_segment(args) -> int:
    from .pipeline import DiffuGTSPipeline
    from .reports import segment_cases
    from .text import check_organ, check_prompt

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


def _run_evaluate_refinement(args) -> int:
    from .pipeline import DiffuGTSPipeline, evaluate_refinement

    if args.test_per_category < 1:
        raise InputError("--test-per-category must be at least 1")
    pipeline = DiffuGTSPipeline.from_pretrained(args.heads, args.model)
    rows, cases = evaluate_refinement(pipeline, test_per_category=args.test_per_category,
                                      role="seen" if args.upper_bound else "unseen", progress=not args.no_progress)
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


def _run_benchmark(args) -> int:
    from .benchmark import format_speed_report, format_window_study, speed_benchmark, window_study

    if min(args.cases, args.per_category) < 1:
        raise InputError("--cases and --per-category must be at least 1")
    if args.setting:
        return _zero_shot(args)
    if args.windows:
        from .pipeline import DiffuGTSPipeline

        report = window_study(DiffuGTSPipeline.from_pretrained(model=args.model), per_category=args.per_category)
        print(format_window_study(report))
    else:
        report = speed_benchmark(cases=args.cases)
        print(format_speed_report(report))
    if args.json:
        write_text_atomic(args.json, json.dumps(report, indent=2) + "\n")
    return 0


def _zero_shot(args) -> int:
    from .benchmark import (FULL_TEST_PER_CATEGORY, QUICK_TEST_PER_CATEGORY, ZeroShotConfig,
                            add_supervised_upper_bound, benchmark_settings, combine_settings, format_table,
                            reusable_results, setting_pipeline, write_benchmark, zero_shot_benchmark)

    if args.out is None:
        raise InputError("--setting needs --out DIR (where results.json, table.md and per_case.csv go)")
    try:
        settings = benchmark_settings(args.setting)
    except ValueError as error:
        raise InputError(str(error)) from None
    start = time.perf_counter()
    tables, runs = [], []
    for setting in settings:
        try:
            pipeline = setting_pipeline(setting, args.heads_cache, progress=True)
        except ValueError as error:
            raise InputError(str(error)) from None
        config = ZeroShotConfig(setting=setting, seed=args.seed,
                                test_per_category=QUICK_TEST_PER_CATEGORY if args.quick else FULL_TEST_PER_CATEGORY)
        results = reusable_results(args.out / setting, config, pipeline)
        if results is None:
            results = zero_shot_benchmark(config, pipeline=pipeline, progress=True)
            write_benchmark(results, args.out / setting)  # kept if the upper bound's training is stopped
        else:
            print(f"{setting}: reusing {args.out / setting / 'results.json'} (same configuration and heads)")
        if args.heads_cache is not None and "supervised_heads" not in results:
            results = add_supervised_upper_bound(
                results, config, lambda name: setting_pipeline(name, args.heads_cache, progress=True), progress=True)
            write_benchmark(results, args.out / setting)
        runs.append(results)
        tables.append(format_table(results))
        print(tables[-1])
    left_out = [run for run in runs if run["setting"].startswith("loo-")]
    if len(left_out) > 1:  # the paper's leave-one-out table: a column per held-out category, each zero-shot
        tables.insert(0, format_table(combine_settings(left_out)))
        print(tables[0])
    write_text_atomic(args.out / "table.md", "\n".join(tables))
    print(f"wrote {args.out} in {(time.perf_counter() - start) / 60:.1f} min")
    return 0


def _run_regression_gate(args) -> int:
    from .benchmark import gate_failures, record_baseline, regression_metrics

    documents = {}
    for role, path in (("results", args.results), ("baseline", args.baseline)):
        try:
            documents[role] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise InputError(f"{path}: cannot read the {role} ({error}); pass the JSON a quick benchmark wrote") from None
    try:
        metrics = regression_metrics(documents["results"])
    except KeyError as missing:
        raise InputError(f"{args.results}: no {missing} in it; pass the results.json of `diffugts benchmark "
                         "--setting seen-unseen --quick` or of the regression notebook") from None
    if args.record:
        moved = record_baseline(args.results, args.baseline)
        print("\n".join(moved) if moved else "no gated figure moved")
        print(f"recorded {args.baseline} and {args.baseline.with_name('results_quick.json')}; say why in the commit")
        return 0
    failures = gate_failures(metrics, documents["baseline"])
    for failure in failures:
        print(f"gate: {failure}")
    print("gate: pass" if not failures else f"gate: FAIL ({len(failures)} checks)")
    return 1 if failures else 0


def _aova_row(row: dict) -> str:
    return (f"{row['category']:15s} {row['cases']:5d} {row['dsc']:6.3f} {row['nsd']:6.3f} {row['auroc']:6.3f} "
            f"{row['s_in']:6.3f} {row['s_out']:6.3f} {row['s_in_out_ratio']:8.2f} "
            f"{row['cases_s_higher_inside']:>3d}/{row['cases']:<2d}")


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
