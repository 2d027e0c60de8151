"""diffugts_core: the DiffuGTS pipeline, stage by stage, for teaching and exploration.

Stages (one module each): ``io`` (NIfTI in/out), ``preprocess`` (orientation, spacing, windows),
``phantoms`` (PhantomBench), ``manifests`` (real datasets), ``text`` (text encoder, prompts),
``backbone`` (the frozen foundation diffusion model), ``inpaint`` (pseudo-healthy synthesis),
``metrics`` (DSC, NSD, AUROC), ``viz`` (pictures), ``cli`` (the ``diffugts`` command).
"""

__version__ = "0.1.0"

from .backbone import load_backbone
from .inpaint import InpaintConfig, pseudo_healthy
from .io import CaseRecord, InputError, Volume, load_image_and_label, load_volume, save_volume
from .manifests import list_manifests, load_dataset, load_manifest, load_organ_mask, load_tumor_mask
from .metrics import detection_auroc, dice, evaluate_folders, evaluate_pair, summarize, surface_dice
from .phantoms import CATEGORIES, CT_CATEGORIES, ORGAN_LABELS, PhantomCase, generate_case, generate_cohort
from .preprocess import CT_WINDOWS, SpatialConfig, SpatialPlan, normalize_mri, plan_spatial, window_ct
from .text import TextEncoder
from .viz import SliceViewer, case_grid, montage, save_figure

__all__ = [
    "CATEGORIES", "CT_CATEGORIES", "CT_WINDOWS", "CaseRecord", "InpaintConfig", "InputError", "ORGAN_LABELS",
    "PhantomCase", "SliceViewer", "SpatialConfig", "SpatialPlan", "TextEncoder", "Volume", "case_grid",
    "detection_auroc", "dice", "evaluate_folders", "evaluate_pair", "generate_case", "generate_cohort",
    "list_manifests", "load_backbone", "load_dataset", "load_image_and_label", "load_manifest", "load_organ_mask",
    "load_tumor_mask", "load_volume", "montage", "normalize_mri", "plan_spatial", "pseudo_healthy", "save_figure",
    "save_volume", "summarize", "surface_dice", "window_ct",
]
