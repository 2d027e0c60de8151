"""``diffugts train-specialist``: the supervised specialist of a tumor category, a calibration row of the benchmark."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..io import InputError
from ..vocabulary import CATEGORIES


def add_train_specialist(subparsers) -> None:
    parser = subparsers.add_parser(
        "train-specialist", help="train the supervised specialist of a tumor category (a calibration row)",
        description="Train a plain MONAI BasicUNet (2D, neighbouring slices as input channels, full "
        "resolution, from scratch) with Dice + BCE on training cases of one tumor category "
        "(PhantomBench training seed, never test cases); its threshold comes from validation cases "
        "of that category. The benchmark's 'supervised specialist' calibration row: the nnU-Net-style "
        "ceiling, not a zero-shot method. Writes specialist.safetensors and specialist.json.")
    parser.add_argument("--category", required=True, choices=CATEGORIES, help="the tumor category")
    parser.add_argument("--out", type=Path, required=True, help="folder to write")
    # the defaults are SpecialistConfig's (tests/test_calibration.py holds them equal), written out so that --help
    # loads no model code
    parser.add_argument("--steps", type=int, default=1500, help="training steps (default 1500)")
    parser.add_argument("--train-cases", type=int, default=40, help="training cases of the category (default 40)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then the CPU), cpu, cuda, ...")
    parser.add_argument("--register", metavar="NAME", help="also record every file's sha256 in models/registry.yaml")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(run=_run_train_specialist, paths=lambda args: ([], [("folder", args.out, "specialist folder")]))


def _run_train_specialist(args) -> int:
    from ..backbone.registry import record_model
    from ..training.specialist import SpecialistConfig, train_specialist

    if min(args.steps, args.train_cases) < 1:
        raise InputError("--steps and --train-cases must be at least 1")
    config = replace(SpecialistConfig(), category=args.category, steps=args.steps, train_cases=args.train_cases,
                     seed=args.seed)
    specialist = train_specialist(config, device=args.device, progress=not args.no_progress)
    specialist.save(args.out)
    print(f"{args.category}: trained in {specialist.training_s:.0f} s; threshold {specialist.threshold:g} from "
          f"{specialist.provenance}")
    print(f"wrote {args.out}")
    if args.register:
        command = (f"diffugts train-specialist --category {args.category} --out {args.out} --steps {args.steps} "
                   f"--train-cases {args.train_cases} --seed {args.seed}")
        entry = record_model(args.register, Path(args.out), command=command, licence="Apache-2.0",
                             description=f"supervised specialist of {args.category} (calibration row of the zero-shot "
                             "benchmark): MONAI BasicUNet 2.5D trained on PhantomBench training cases of the category")
        print(f"registered {args.register}: {len(entry['files'])} files, {entry['size_mb']} MB")
    return 0
