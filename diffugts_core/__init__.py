"""diffugts_core: the DiffuGTS pipeline, stage by stage, for teaching and exploration.

Product, one job per module: ``vocabulary`` (categories, organs, regions, modalities, label ids), ``io`` (NIfTI
in/out), ``outputs`` (where results may be written), ``preprocess`` (orientation, spacing, windows), ``data``
(PhantomBench, real datasets through manifests, the settings with their seeds and splits), ``text`` (text encoder,
prompts), ``backbone`` (the frozen foundation diffusion model), ``aova`` (anomaly-aware attention maps), ``detect``
(region-level detection), ``heads`` (the trained heads of a setting), ``inpaint`` (pseudo-healthy synthesis),
``residual`` (pixel and feature residuals, the residual head), ``pipeline`` (all stages composed, volume in, mask
out), ``reports`` (report and QC picture of a segmentation), ``metrics`` (DSC, NSD, AUROC), ``viz`` (pictures), ``cli``
(the ``diffugts`` command). Apart from it: ``training`` (the foundation model, the heads, the residual heads,
train-or-reuse recipes) and ``experiments`` (the zero-shot benchmark, the regression gate, the AOVA and refinement
evaluations, studies, the foundation check), which the product never imports.
"""

__version__ = "0.1.0"

# what a user calls, by module; loaded on first use so `import diffugts_core` and `diffugts --help` stay light
_EXPORTS = {
    **dict.fromkeys(("load_backbone",), "backbone"),
    **dict.fromkeys(("run_aova",), "aova"),
    **dict.fromkeys(("detect_case", "detect_volume"), "detect"),
    **dict.fromkeys(("TrainedHeads", "load_heads"), "heads"),
    **dict.fromkeys(("InpaintConfig", "pseudo_healthy"), "inpaint"),
    **dict.fromkeys(("DiffuGTSPipeline", "SegmentationResult"), "pipeline"),
    **dict.fromkeys(("TrainedResidualHead",), "residual"),
    **dict.fromkeys(("CaseRecord", "InputError", "Volume", "load_image_and_label", "load_volume", "save_volume"), "io"),
    **dict.fromkeys(("list_manifests", "load_dataset", "load_manifest", "load_organ_mask", "load_tumor_mask"),
                    "data.manifests"),
    **dict.fromkeys(("detection_auroc", "dice", "evaluate_folders", "evaluate_pair", "roc_curve", "summarize",
                     "surface_dice"), "metrics"),
    **dict.fromkeys(("PhantomCase", "generate_case", "generate_cohort"), "data.phantoms"),
    **dict.fromkeys(("CT_WINDOWS", "SpatialConfig", "SpatialPlan", "normalize_mri", "plan_spatial", "window_ct"), "preprocess"),
    **dict.fromkeys(("TextEncoder",), "text"),
    **dict.fromkeys(("SliceViewer", "case_grid", "montage", "save_figure"), "viz"),
    **dict.fromkeys(("CATEGORIES", "CATEGORY_ORGAN", "CT_CATEGORIES", "ORGAN_LABELS"), "vocabulary"),
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


__all__ = sorted(_EXPORTS)
