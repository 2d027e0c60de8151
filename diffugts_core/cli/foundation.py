"""``diffugts train-foundation`` and ``check-foundation``: the frozen foundation model, made and measured."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..io import InputError, write_text_atomic
from .common import model_inputs, optional_file


def add_train_foundation(subparsers) -> None:
    parser = subparsers.add_parser(
        "train-foundation", help="train the phantom foundation model (VAE + text-conditioned UNet)",
        description="Train the embedded default foundation model on healthy PhantomBench slices "
        "only (CT abdomen, CT thorax, MRI brain) and save it in diffusers format with a model card. "
        "Checkpoints every 200 steps; --resume continues from them.")
    parser.add_argument("--out", type=Path, required=True, help="model folder to write")
    parser.add_argument("--steps", type=int, default=2000, help="UNet steps (default 2000)")
    parser.add_argument("--vae-steps", type=int, default=800, help="VAE steps (default 800)")
    parser.add_argument("--volumes-per-region", type=int, default=12, help="healthy volumes per region (default 12)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    parser.add_argument("--data-seed", type=int, default=1000, help="PhantomBench seed of the training data")
    parser.add_argument("--crop-fraction", type=float, default=0.0,
                        help="share of UNet batches that are random latent crops (default 0)")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    parser.add_argument("--register", metavar="NAME", help="also record every file's sha256 in models/registry.yaml")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(run=_run_train_foundation, paths=lambda args: ([], [("folder", args.out, "model folder")]))


def _run_train_foundation(args) -> int:
    from ..backbone.registry import record_model
    from ..training.foundation import FoundationTrainingConfig, train_foundation

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


def add_check_foundation(subparsers) -> None:
    parser = subparsers.add_parser(
        "check-foundation", help="measure the foundation model on held-out healthy phantoms",
        description="VAE reconstruction (HU MAE, PSNR), healthy inpainting vs a mean fill, the "
        "pseudo-healthy test (a -40 HU tumor inpainted back toward its organ; ratio must be <= "
        "0.25) and per-stage times. Exit code 1 when the pseudo-healthy test fails.")
    parser.add_argument("--model", default="default", help="model folder or hub id (default: the shipped model)")
    parser.add_argument("--seed", type=int, default=7, help="PhantomBench seed of the held-out cases (default 7)")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps (default 25)")
    parser.add_argument("--samples", type=int, default=2, help="inpainting samples averaged (default 2)")
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (default 1)")
    parser.add_argument("--json", type=Path, help="also write the report as JSON")
    parser.set_defaults(run=_run_check_foundation, paths=lambda args: (
        model_inputs(args), optional_file(args.json, "JSON report")))


def _run_check_foundation(args) -> int:
    from ..backbone import load_backbone
    from ..experiments.foundation_check import check_foundation, format_report
    from ..inpaint import InpaintConfig
    from ..text import TextEncoder

    backbone = load_backbone(args.model)
    text_encoder = TextEncoder.from_pretrained(backbone.config.text_encoder)
    config = InpaintConfig(steps=args.steps, samples=args.samples, guidance_scale=args.guidance)
    report = check_foundation(backbone, text_encoder, seed=args.seed, config=config)
    print(format_report(report))
    if args.json:
        write_text_atomic(args.json, json.dumps(report, indent=2) + "\n")
    return 0 if report["pass"] else 1
