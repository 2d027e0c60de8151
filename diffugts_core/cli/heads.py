"""``diffugts train-heads``, ``detect`` and ``evaluate-aova``: the small heads, trained, run and scored."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..io import InputError, write_text_atomic
from .common import model_inputs, optional_file, optional_folder


def add_train_heads(subparsers) -> None:
    parser = subparsers.add_parser(
        "train-heads", help="train the AOVA, region and residual heads of a setting",
        description="Train the small heads on the seen categories of a zero-shot setting (held-out "
        "categories never reach the training data): AOVA + region head (heads.json), then the "
        "residual head on their inpainted cases (residual.json), and a residual head for each "
        "modality no seen category is in, on healthy cases with synthetic anomalies "
        "(residual_mri.json); thresholds come from validation cases. Weights as safetensors.")
    parser.add_argument("--setting", required=True, help="loo-<category>, seen-unseen or ct-mri")
    parser.add_argument("--out", type=Path, required=True, help="folder to write")
    parser.add_argument("--steps", type=int, default=3000, help="training steps (default 3000)")
    parser.add_argument("--per-category", type=int, default=4, help="training cases per seen category (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    parser.add_argument("--model", default="default", help="foundation model (default: the shipped one)")
    parser.add_argument("--residual-steps", type=int, default=800, help="residual head training steps (default 800)")
    parser.add_argument("--organ-reach", action="store_true",
                        help="refinement reach: when detection flags the organ, the residual head's region of interest "
                        "also holds the whole organ region (in training and at run time)")
    parser.add_argument("--modality-healthy", type=int, default=16, metavar="N",
                        help="healthy training cases per region for the residual head of a modality no seen category "
                             "is in (MRI brain), 3 synthetic anomalies each (default 16; 0: no such head, the one "
                             "residual head serves every modality; docs/findings/refinement.md section 6)")
    parser.add_argument("--residual-only", action="store_true",
                        help="train only the residual heads, on the AOVA + region heads already in --out")
    parser.add_argument("--cache", type=Path, help="cache folder for the pseudo-healthy images of the residual heads' "
                        "training and validation cases (default: none)")
    parser.add_argument("--register", metavar="NAME", help="also record every file's sha256 in models/registry.yaml")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(run=_run_train_heads, paths=lambda args: (
        model_inputs(args), [("folder", args.out, "heads folder"), *optional_folder(args.cache, "cache folder")]))


def _run_train_heads(args) -> int:
    from ..backbone import load_backbone
    from ..backbone.registry import load_registry, record_model
    from ..data.splits import setting_categories
    from ..heads import HeadsConfig, TrainedHeads
    from ..pipeline import check_trained_on
    from ..training.heads import train_heads
    from ..training.recipes import remove_residual_heads
    from ..residual import ResidualConfig
    from ..training.residual import train_modality_heads, train_residual_head
    from ..text import TextEncoder

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
        check_trained_on(backbone, args.model, args.out, heads)
    else:
        heads = train_heads(backbone, text_encoder, config, progress=not args.no_progress)
        # kept at once (an hour's work on v2), without an earlier run's residual heads, which do not match them: a
        # residual stage that stops goes on with --residual-only
        heads.save(args.out)
        remove_residual_heads(args.out)
        print(f"wrote the AOVA and region heads to {args.out}; if the residual stage stops, --residual-only goes on "
              "from them")
    residual_config = ResidualConfig(steps=args.residual_steps, seed=args.seed, modality_healthy=args.modality_healthy,
                                     organ_reach=args.organ_reach)
    residual = train_residual_head(heads, backbone, text_encoder, residual_config, cache=args.cache,
                                   progress=not args.no_progress)
    modality_heads = train_modality_heads(heads, backbone, text_encoder, residual_config, cache=args.cache,
                                          progress=not args.no_progress)
    remove_residual_heads(args.out)  # those of an earlier run, modality heads this one does not replace among them
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
                   + (" --organ-reach" if args.organ_reach else "") + (" --residual-only" if args.residual_only else ""))
        earlier = load_registry().get(args.register, {}).get("command") if args.residual_only else None
        if earlier:  # how the AOVA heads beside it were made: the first command of the earlier entry
            command = f"{earlier.split(' && ')[0]} && {command}"
        entry = record_model(args.register, Path(args.out), command=command, licence="Apache-2.0",
                             description=f"AOVA + region heads and residual heads, setting {args.setting} "
                             f"(seen: {', '.join(seen)}), on the {args.model} foundation model")
        print(f"registered {args.register}: {len(entry['files'])} files, {entry['size_mb']} MB")
    return 0


def add_detect(subparsers) -> None:
    parser = subparsers.add_parser(
        "detect", help="AOVA anomaly map and region-level detection for one NIfTI volume",
        description="Run the trained heads (default: the shipped seen -> unseen heads) on a CT or "
        "MRI volume for one organ. Any organ or tumor phrase works (open vocabulary): --prompt "
        "replaces the organ's abnormal prompt. Writes the anomaly map S and the kept regions in "
        "the input's own grid, a JSON report and a PNG.")
    parser.add_argument("image", type=Path, help="CT (HU) or MRI volume, .nii or .nii.gz")
    parser.add_argument("--organ", required=True, help="organ to look in, e.g. liver, lung, colon, spleen, brain")
    parser.add_argument("--prompt", help="free-text abnormal prompt, e.g. 'a CT scan of a spleen with a lesion'")
    parser.add_argument("--modality", default="CT", type=str.upper, choices=("CT", "MRI"))
    parser.add_argument("--organ-mask", type=Path, help="binary organ mask on the image grid (else found by the maps)")
    parser.add_argument("--heads", default="default", help="trained heads folder or registry name (default: shipped)")
    parser.add_argument("--model", default="default", help="foundation model (default: the shipped one)")
    parser.add_argument("-o", "--out", type=Path, required=True, help="output folder")
    parser.set_defaults(run=_run_detect, paths=lambda args: (
        [args.image, args.organ_mask, *model_inputs(args)],
        [("folder", args.out, "output folder"), *(("file", path, role) for role, path in _detect_outputs(args).items())]))


def _run_detect(args) -> int:
    from .. import plausibility, viz
    from ..backbone import load_backbone
    from ..backbone.registry import sha256_file
    from ..detect import detect_volume
    from ..heads import TrainedHeads, heads_folder
    from ..io import load_volume, save_volume
    from ..text import TextEncoder, check_organ, check_prompt

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


def _detect_outputs(args) -> dict[str, Path]:
    stem = args.image.name.removesuffix(".gz").removesuffix(".nii")
    return {"anomaly map": args.out / f"{stem}_anomaly.nii.gz", "regions": args.out / f"{stem}_regions.nii.gz",
            "report": args.out / f"{stem}_detection.json", "picture": args.out / f"{stem}_aova.png"}


def add_evaluate_aova(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate-aova", help="AOVA-only DSC, NSD, detection AUROC per unseen category",
        description="For each setting: train the heads on its seen categories, then report on its "
        "unseen categories (test split, another seed) DSC, NSD, detection AUROC and the ratio of "
        "mean S inside the tumor to the surrounding healthy organ.")
    parser.add_argument("--settings", default="all", help="comma-separated settings, or all (default)")
    parser.add_argument("--steps", type=int, default=3000, help="training steps per setting (default 3000)")
    parser.add_argument("--per-category", type=int, default=4, help="training cases per seen category (default 4)")
    parser.add_argument("--test-per-category", type=int, default=4,
                        help="test cases per unseen category, and healthy test cases per region (default 4)")
    parser.add_argument("--model", default="default")
    parser.add_argument("--heads-cache", type=Path, help="keep each setting's trained heads in DIR/<setting>/ and "
                        "reuse them when their training configuration matches")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    parser.add_argument("--training-fit", action="store_true",
                        help="also print, per setting, the mean S inside the heads' own training lesions (per stage)")
    parser.add_argument("--feature-probe", action="store_true",
                        help="also print, per setting, how well the frozen features alone separate its training "
                        "lesions from their organ (pixel AUROC of a linear probe fitted on half the cases, scored on "
                        "the rest)")
    parser.add_argument("--upper-bound", action="store_true",
                        help="also report, per setting, the same heads on test cases of their *seen* categories: the "
                        "supervised upper bound of the zero-shot figures (ct-mri heads saw every CT category)")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(run=_run_evaluate_aova, paths=lambda args: (
        model_inputs(args), [*optional_file(args.json, "JSON report"),
                             *optional_folder(args.heads_cache, "heads cache")]))


def _run_evaluate_aova(args) -> int:
    from ..backbone import load_backbone
    from ..experiments.aova import evaluate_heads, feature_probe, training_fit
    from ..data.splits import SETTINGS
    from ..heads import HeadsConfig
    from ..training.heads import train_heads, training_bank
    from ..training.recipes import train_or_reuse_heads
    from ..text import TextEncoder

    settings = SETTINGS if args.settings == "all" else tuple(s.strip() for s in args.settings.split(","))
    backbone = load_backbone(args.model)
    text_encoder = TextEncoder.from_pretrained(backbone.config.text_encoder)
    rows, upper_bound_rows = [], []  # the means below are over the zero-shot rows only
    print(f"{'setting':20s} {'unseen':15s} {'cases':>5s} {'DSC':>6s} {'NSD':>6s} {'AUROC':>6s} {'S in':>6s} "
          f"{'S out':>6s} {'S in/out':>8s} {'in>out':>6s}")
    for setting in settings:
        config = HeadsConfig(setting=setting, steps=args.steps, train_per_category=args.per_category,
                             test_per_category=args.test_per_category)
        heads = (train_or_reuse_heads(args.heads_cache / setting, config, backbone, text_encoder,
                                      progress=not args.no_progress) if args.heads_cache
                 else train_heads(backbone, text_encoder, config, progress=not args.no_progress))
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


def _aova_row(row: dict) -> str:
    return (f"{row['category']:15s} {row['cases']:5d} {row['dsc']:6.3f} {row['nsd']:6.3f} {row['auroc']:6.3f} "
            f"{row['s_in']:6.3f} {row['s_out']:6.3f} {row['s_in_out_ratio']:8.2f} "
            f"{row['cases_s_higher_inside']:>3d}/{row['cases']:<2d}")
