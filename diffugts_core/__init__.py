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

from .backbone import load_backbone
from .benchmark import ZeroShotConfig, zero_shot_benchmark
from .heads import HeadsConfig, TrainedHeads, detect_case, detect_volume, load_heads, run_aova, train_heads
from .inpaint import InpaintConfig, pseudo_healthy
from .pipeline import DiffuGTSPipeline, SegmentationResult
from .residual import ResidualConfig, TrainedResidualHead, train_modality_heads, train_residual_head
from .io import CaseRecord, InputError, Volume, load_image_and_label, load_volume, save_volume
from .manifests import list_manifests, load_dataset, load_manifest, load_organ_mask, load_tumor_mask
from .metrics import detection_auroc, dice, evaluate_folders, evaluate_pair, roc_curve, summarize, surface_dice
from .phantoms import CATEGORIES, CT_CATEGORIES, ORGAN_LABELS, PhantomCase, generate_case, generate_cohort
from .preprocess import CT_WINDOWS, SpatialConfig, SpatialPlan, normalize_mri, plan_spatial, window_ct
from .text import TextEncoder
from .viz import SliceViewer, case_grid, montage, save_figure

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
