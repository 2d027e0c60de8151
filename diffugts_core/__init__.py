"""diffugts_core: the DiffuGTS pipeline, stage by stage, for teaching and exploration.

Stages (one module each): ``io`` (NIfTI in/out), ``preprocess`` (orientation, spacing, windows),
``phantoms`` (PhantomBench), ``manifests`` (real datasets), ``text`` (text encoder, prompts),
``backbone`` (the frozen foundation diffusion model), ``aova`` (anomaly-aware attention maps),
``detect`` (region-level detection), ``heads`` (training and running the small heads per zero-shot
setting), ``inpaint`` (pseudo-healthy synthesis), ``residual`` (pixel and feature residuals, the residual head),
``pipeline`` (all stages composed, volume in, mask out), ``metrics`` (DSC, NSD, AUROC), ``benchmark`` (speed, and the
zero-shot table with its baselines and ablations),
``viz`` (pictures), ``cli`` (the ``diffugts`` command).
"""

__version__ = "0.1.0"

# what a user calls, by module; loaded on first use so `import diffugts_core` and `diffugts --help` stay light
_EXPORTS = {
    **dict.fromkeys(("load_backbone",), "backbone"),
    **dict.fromkeys(("ZeroShotConfig", "zero_shot_benchmark"), "benchmark"),
    **dict.fromkeys(("HeadsConfig", "TrainedHeads", "detect_case", "detect_volume", "load_heads", "run_aova",
                     "train_heads"), "heads"),
    **dict.fromkeys(("InpaintConfig", "pseudo_healthy"), "inpaint"),
    **dict.fromkeys(("DiffuGTSPipeline", "SegmentationResult"), "pipeline"),
    **dict.fromkeys(("ResidualConfig", "TrainedResidualHead", "train_modality_heads", "train_residual_head"), "residual"),
    **dict.fromkeys(("CaseRecord", "InputError", "Volume", "load_image_and_label", "load_volume", "save_volume"), "io"),
    **dict.fromkeys(("list_manifests", "load_dataset", "load_manifest", "load_organ_mask", "load_tumor_mask"), "manifests"),
    **dict.fromkeys(("detection_auroc", "dice", "evaluate_folders", "evaluate_pair", "roc_curve", "summarize",
                     "surface_dice"), "metrics"),
    **dict.fromkeys(("CATEGORIES", "CT_CATEGORIES", "ORGAN_LABELS", "PhantomCase", "generate_case",
                     "generate_cohort"), "phantoms"),
    **dict.fromkeys(("CT_WINDOWS", "SpatialConfig", "SpatialPlan", "normalize_mri", "plan_spatial", "window_ct"), "preprocess"),
    **dict.fromkeys(("TextEncoder",), "text"),
    **dict.fromkeys(("SliceViewer", "case_grid", "montage", "save_figure"), "viz"),
}


def __getattr__(name: str):
    from importlib import import_module
    from importlib.util import find_spec

    if name not in _EXPORTS:
        if not name.startswith("_") and find_spec(f"{__name__}.{name}") is not None:  # a submodule, e.g. dg.phantoms
            return import_module(f".{name}", __name__)
        raise AttributeError(f"module 'diffugts_core' has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "CATEGORIES", "CT_CATEGORIES", "CT_WINDOWS", "CaseRecord", "DiffuGTSPipeline", "HeadsConfig", "InpaintConfig", "InputError",
    "ORGAN_LABELS", "PhantomCase", "SliceViewer", "SpatialConfig", "SpatialPlan", "TextEncoder", "TrainedHeads",
    "Volume", "case_grid", "detect_case", "detect_volume", "detection_auroc", "dice", "evaluate_folders",
    "evaluate_pair", "generate_case", "generate_cohort", "list_manifests", "load_backbone", "load_dataset",
    "load_heads", "load_image_and_label", "load_manifest", "load_organ_mask", "load_tumor_mask", "load_volume",
    "montage", "normalize_mri", "plan_spatial", "pseudo_healthy", "ResidualConfig", "roc_curve", "run_aova",
    "save_figure", "save_volume", "SegmentationResult", "summarize", "surface_dice", "train_heads",
    "train_modality_heads", "train_residual_head", "TrainedResidualHead", "window_ct", "ZeroShotConfig",
    "zero_shot_benchmark",
]
