"""``diffugts train-foundation`` and ``check-foundation``: the frozen foundation model, made and measured."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from ..io import InputError, write_text_atomic
from .common import model_inputs, optional_file


def add_train_foundation(subparsers) -> None:
    parser = subparsers.add_parser(
        "train-foundation", help="train the phantom foundation model (VAE + text-conditioned UNet)",
        description="Train the embedded default foundation model on healthy PhantomBench slices "
        "only (CT abdomen, CT thorax, MRI brain) and save it in diffusers format with a model card. "
        "Checkpoints (weights and optimiser, safetensors) at regular steps; --resume continues from them. "
        "--recipe v2: 5 mm latent cells, neighbouring slices as VAE channels, an organ-aware UNet, 300 "
        "volumes, trained until the validation losses flatten (--max-minutes splits it into runs). --recipe v3: v2's "
        "VAE, and its UNet fine-tuned to see the known latents of its slice and of slices above and below "
        "(through-plane context); --recipe v3-controlnet: the same context read by a ControlNet branch, v2's UNet "
        "frozen. Run v3 and v3-controlnet from the repository root, where models/phantom_foundation_v2 is.")
    parser.add_argument("--out", type=Path, required=True, help="model folder to write")
    parser.add_argument("--recipe", choices=("v1", "v2", "v3", "v3-controlnet"), default="v1",
                        help="architecture and data: v1 (the shipped model), v2, v3 or v3-controlnet (default v1)")
    parser.add_argument("--steps", type=int, help="UNet steps (v1 default 2000; v2: a cap, default 60000)")
    parser.add_argument("--vae-steps", type=int, help="VAE steps (v1 default 800; v2: a cap, default 30000)")
    parser.add_argument("--volumes-per-region", type=int,
                        help="healthy volumes per region (v1 default 12, v2 default 100)")
    parser.add_argument("--max-minutes", type=float,
                        help="stop at the first checkpoint after this long; --resume goes on")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    parser.add_argument("--data-seed", type=int, default=1000, help="PhantomBench seed of the training data")
    parser.add_argument("--crop-fraction", type=float, default=0.0,
                        help="share of UNet batches that are random latent crops (default 0)")
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, mps (default auto)")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    parser.add_argument("--register", metavar="NAME", help="also record every file's sha256 in models/registry.yaml")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(run=_run_train_foundation, paths=lambda args: ([], [("folder", args.out, "model folder")]))


def _run_train_foundation(args) -> int:
    from ..backbone.registry import record_model
    from ..training.foundation import RECIPES, train_foundation

    recipe = RECIPES[args.recipe]
    steps = recipe.unet_steps if args.steps is None else args.steps
    vae_steps = recipe.vae_steps if args.vae_steps is None else args.vae_steps
    volumes = recipe.volumes_per_region if args.volumes_per_region is None else args.volumes_per_region
    if min(steps, vae_steps, volumes) < 1:
        raise InputError("--steps, --vae-steps and --volumes-per-region must be at least 1")
    if not 0 <= args.crop_fraction <= 1:
        raise InputError(f"--crop-fraction must be between 0 and 1, got {args.crop_fraction}")
    if args.max_minutes is not None and args.max_minutes <= 0:
        raise InputError(f"--max-minutes must be positive, got {args.max_minutes}")
    config = replace(recipe, unet_steps=steps, vae_steps=vae_steps, seed=args.seed, data_seed=args.data_seed,
                     volumes_per_region=volumes, crop_fraction=args.crop_fraction, max_minutes=args.max_minutes)
    recipe_flag = f" --recipe {args.recipe}" if args.recipe != "v1" else ""
    command = f"diffugts train-foundation --out {args.out}{recipe_flag}" + \
        f" --steps {steps} --vae-steps {vae_steps} --volumes-per-region {volumes} --seed {args.seed} " \
        f"--data-seed {args.data_seed}" + (f" --crop-fraction {args.crop_fraction:g}" if args.crop_fraction else "") \
        + (f" --max-minutes {args.max_minutes:g}" if args.max_minutes else "") + (" --resume" if args.resume else "")
    start = time.perf_counter()
    folder = train_foundation(args.out, config, resume=args.resume, progress=not args.no_progress, command=command,
                              device=args.device)
    print(f"wrote {folder} in {(time.perf_counter() - start) / 60:.1f} min")
    if args.register:
        history = json.loads((folder / "checkpoints" / "state.json").read_text())["commands"]
        entry = record_model(args.register, folder, command=" && ".join(history), licence="Apache-2.0",
                             description="phantom foundation model: AutoencoderKL + text-conditioned UNet, healthy "
                             "PhantomBench only")
        print(f"registered {args.register}: {len(entry['files'])} files, {entry['size_mb']} MB")
    return 0


def seed_list(text: str) -> tuple[int, ...]:
    """'20-27' or '20,22,25' -> the seeds."""
    try:
        if "-" in text.strip("-"):
            first, last = (int(part) for part in text.split("-", 1))
            if last < first:
                raise ValueError
            return tuple(range(first, last + 1))
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give seeds as a range (20-27) or a list (20,22)") from None


def add_check_foundation(subparsers) -> None:
    parser = subparsers.add_parser(
        "check-foundation", help="measure the foundation model on held-out healthy phantoms",
        description="VAE reconstruction (HU MAE, PSNR), healthy inpainting vs a mean fill, the "
        "pseudo-healthy test (a -40 HU tumor inpainted back toward its organ in the liver, spleen, "
        "kidney and pancreas of two cases; each ratio must be <= 0.25; an organ-aware model is given "
        "the cases' organ maps) and per-stage times. Exit code 1 when the pseudo-healthy test fails.")
    parser.add_argument("--model", default="default", help="model folder or hub id (default: the shipped model)")
    parser.add_argument("--seed", type=int, default=7, help="PhantomBench seed of the held-out cases (default 7)")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps (default 25)")
    parser.add_argument("--samples", type=int, default=2, help="inpainting samples averaged (default 2)")
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (default 1)")
    parser.add_argument("--pseudo-healthy-seeds", type=seed_list, default=(), metavar="SEEDS",
                        help="run the pseudo-healthy test on the healthy abdomens of these seeds instead of SEED and "
                        "SEED + 1: a range (20-27) or a list (20,22)")
    parser.add_argument("--organs", type=lambda text: tuple(text.split(",")),
                        help="organs of the pseudo-healthy test, comma-separated (default: all four)")
    parser.add_argument("--json", type=Path, help="also write the report as JSON")
    parser.set_defaults(run=_run_check_foundation, paths=lambda args: (
        model_inputs(args), optional_file(args.json, "JSON report")))


def _run_check_foundation(args) -> int:
    from ..backbone import load_backbone
    from ..experiments.foundation_check import PSEUDO_HEALTHY_ORGANS, check_foundation, format_report
    from ..inpaint import InpaintConfig
    from ..text import TextEncoder

    backbone = load_backbone(args.model)
    text_encoder = TextEncoder.from_pretrained(backbone.config.text_encoder)
    config = InpaintConfig(steps=args.steps, samples=args.samples, guidance_scale=args.guidance)
    report = check_foundation(backbone, text_encoder, seed=args.seed, config=config,
                              pseudo_healthy_seeds=args.pseudo_healthy_seeds, organs=args.organs or PSEUDO_HEALTHY_ORGANS)
    print(format_report(report))
    if args.json:
        write_text_atomic(args.json, json.dumps(report, indent=2) + "\n")
    return 0 if report["pass"] else 1
