"""``diffugts benchmark`` and ``regression-gate``: speed and zero-shot figures, and the gate held against them."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..io import InputError, write_text_atomic
from .common import model_inputs, optional_file, optional_folder


def add_benchmark(subparsers) -> None:
    parser = subparsers.add_parser(
        "benchmark",
        help="the zero-shot table of a setting (--setting), speed and memory (--speed), the window study (--windows)",
        description="--speed: segment a 128x128x64 PhantomBench CT case at default settings, print "
        "per-stage time and peak memory, and ROI-cropped vs full-slice inpainting side by side "
        "(time ratio and DSC of both). --windows: ROI windows of several contexts against whole "
        "slices on validation cases (time, and MAE of the pseudo-healthy image against the truth).")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--speed", action="store_true", help="the speed benchmark")
    which.add_argument("--windows", action="store_true", help="the ROI-window study")
    which.add_argument("--setting", help="the zero-shot benchmark of a setting: loo, seen-unseen, mri, all (or one "
                       "setting's own name, e.g. loo-liver); writes results.json, table.md, per_case.csv to --out")
    parser.add_argument("--quick", action="store_true",
                        help="--setting: the CI size (2 test cases per unseen category instead of 12; the calibration "
                        "rows without the oracle ROI, which inpaints each case's whole organ once more)")
    parser.add_argument("--out", type=Path, help="--setting: folder for the results (one subfolder per setting)")
    parser.add_argument("--seed", type=int, default=0, help="--setting: inpainting and reconstruction seed (default 0)")
    parser.add_argument("--heads-cache", type=Path, help="--setting: folder of heads, one subfolder per setting "
                        "(missing ones are trained there, as by evaluate-aova; seen-unseen uses the shipped heads "
                        "unless DIR/seen-unseen exists), and of the calibration rows' specialists, DIR/specialist-"
                        "<category> (the shipped one where the cache has none, else trained there). With it, the "
                        "table gains the supervised upper bound (each category's heads from the leave-one-out setting "
                        "that holds out the next category), and a results.json of the same configuration, heads and "
                        "specialists already in --out is reused, not run again")
    parser.add_argument("--no-upper-bound", action="store_true",
                        help="--setting: leave the supervised upper bound out (with --heads-cache it trains the heads "
                        "of the setting that holds out the next category: about an hour a setting on v2)")
    parser.add_argument("--cases", type=int, default=3,
                        help="--speed: cases (default 3: liver, hepatic vessel, kidney)")
    parser.add_argument("--per-category", type=int, default=2,
                        help="--windows: validation cases per seen category (default 2)")
    parser.add_argument("--model", default="default",
                        help="--windows, --setting: foundation model folder (default: shipped); with --setting, "
                        "--heads-cache must hold heads trained on it (or they are trained there)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    parser.set_defaults(run=_run_benchmark, paths=lambda args: (
        model_inputs(args), [*optional_file(args.json, "JSON report"), *optional_folder(args.out, "results folder"),
                             *optional_folder(args.heads_cache, "heads cache")]))


def _run_benchmark(args) -> int:
    from ..experiments.speed import format_speed_report, format_window_study, speed_benchmark, window_study

    if min(args.cases, args.per_category) < 1:
        raise InputError("--cases and --per-category must be at least 1")
    if args.setting:
        return _zero_shot(args)
    if args.windows:
        from ..pipeline import DiffuGTSPipeline

        report = window_study(DiffuGTSPipeline.from_pretrained(model=args.model), per_category=args.per_category)
        print(format_window_study(report))
    else:
        report = speed_benchmark(cases=args.cases)
        print(format_speed_report(report))
    if args.json:
        write_text_atomic(args.json, json.dumps(report, indent=2) + "\n")
    return 0


def _zero_shot(args) -> int:
    from ..experiments.zero_shot import (CALIBRATION, FULL_TEST_PER_CATEGORY, QUICK_CALIBRATION, QUICK_TEST_PER_CATEGORY,
                                         ZeroShotConfig, add_supervised_upper_bound, benchmark_settings,
                                         combine_settings, format_table, reusable_results, write_benchmark,
                                         zero_shot_benchmark)
    from ..data.splits import role_categories
    from ..training.recipes import setting_pipeline, specialist_for

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
            pipeline = setting_pipeline(setting, args.heads_cache, model=args.model, progress=True)
        except ValueError as error:
            raise InputError(str(error)) from None
        specialists = {category: specialist_for(category, args.heads_cache, progress=True)
                       for category in role_categories(setting, "unseen")}  # the calibration rows' specialists
        config = ZeroShotConfig(setting=setting, seed=args.seed,
                                test_per_category=QUICK_TEST_PER_CATEGORY if args.quick else FULL_TEST_PER_CATEGORY,
                                calibration=QUICK_CALIBRATION if args.quick else tuple(CALIBRATION))
        results = reusable_results(args.out / setting, config, pipeline, specialists)
        if results is None:
            results = zero_shot_benchmark(config, pipeline=pipeline, specialists=specialists, progress=True)
            write_benchmark(results, args.out / setting)  # kept if the upper bound's training is stopped
        else:
            print(f"{setting}: reusing {args.out / setting / 'results.json'} (same configuration, heads and "
                  "specialists)")
        if args.heads_cache is not None and not args.no_upper_bound and "supervised_heads" not in results:
            results = add_supervised_upper_bound(
                results, config, lambda name: setting_pipeline(name, args.heads_cache, model=args.model,
                                                                    progress=True), progress=True)
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


def add_regression_gate(subparsers) -> None:
    parser = subparsers.add_parser(
        "regression-gate", help="hold a quick benchmark's results against the committed baseline",
        description="Compare a quick seen -> unseen benchmark (the regression notebook's "
        "results.json) with the baseline: the full method's DSC and NSD per test case, per unseen "
        "category and on the mean within the baseline's tolerances, above AOVA-only, the "
        "reconstruction baseline and the non-generative fill on the mean, each category above its "
        "floor, detection AUROC >= 0.5 where the baseline lists it. Exit code 1 when it fails. "
        "--record makes the results the golden ones instead (baseline metrics and results_quick.json "
        "beside it) and prints every gated figure that moved.")
    parser.add_argument("--results", type=Path, required=True, help="results.json of a quick seen -> unseen benchmark")
    parser.add_argument("--baseline", type=Path, default=Path("notebooks/regression/baseline.json"),
                        help="baseline file (default: notebooks/regression/baseline.json)")
    parser.add_argument("--record", action="store_true",
                        help="make --results the golden results (say why in the commit)")
    parser.set_defaults(run=_run_regression_gate, paths=lambda args: (
        [args.results], [("file", args.baseline, "baseline"),
                         ("file", args.baseline.with_name("results_quick.json"), "golden results")]
        if args.record else []))


def _run_regression_gate(args) -> int:
    from ..experiments.gate import gate_failures, record_baseline, regression_metrics

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
