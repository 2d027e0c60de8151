"""The whole DiffuGTS pipeline as one object, composed like a diffusers pipeline.

``DiffuGTSPipeline`` holds the frozen backbone, the text encoder, the AOVA + region heads and the residual head of one
setting. Calling it on a volume runs, on the model's processing grid (RAS, model spacing):

1. the frozen encoder's stage features and the AOVA maps (S, the organ map);
2. region-level detection (candidate regions of S in the organ region, scored by the region head);
3. the region of interest: every candidate region, enlarged by a margin in mm;
4. latent inpainting of that region to a pseudo-healthy image H (several seeds -> mean and spread);
5. the pixel and feature residuals, the residual head's refined probability, and the training-free fusion;
6. post-processing (threshold, inside the ROI, small components dropped), then back to the input's own grid.

Every intermediate is kept on the result, with per-stage timings.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from . import plausibility
from .detect import Detection
from .inpaint import InpaintConfig
from .aova import AOVAResult, conditioning_organs, run_aova
from .detect import find_regions
from .heads import TrainedHeads, heads_folder
from .io import InputError, Volume, check_same_grid
from .preprocess import SpatialPlan, model_grid_plan
from .reports import intermediate_names
from .inpaint import coarse_roi, inpaint_region
from .residual import (Residuals, TrainedResidualHead, final_mask, fusion_map, head_inputs, load_modality_heads,
                       refined_probability, residuals_of)
from .text import check_organ, check_prompt
from .vocabulary import organ_body_region


@dataclass
class SegmentationResult:
    """One case through the pipeline. Maps are on the processing grid; ``mask`` (and ``to_input_grid``) on the
    input's."""

    mask: np.ndarray  # final tumor mask on the input grid (bool)
    affine: np.ndarray  # the input's affine
    organ: str
    prompt: str | None
    image: np.ndarray  # the volume on the processing grid
    aova: AOVAResult
    detection: Detection
    residuals: Residuals
    probability: np.ndarray  # the residual head's refined probability
    fusion: np.ndarray  # the training-free fusion map
    refined: np.ndarray  # final mask on the processing grid
    thresholds: dict
    seeds: int
    timings: dict[str, float] = field(default_factory=dict)
    plan: SpatialPlan | None = None  # None when the input was already on the processing grid
    warnings: list[str] = field(default_factory=list)  # what was assumed about a doubtful input (plausibility)

    @property
    def intermediates(self) -> dict[str, np.ndarray]:
        """Every intermediate map by name (processing grid), in the order of :func:`intermediate_names`."""
        maps = {"anomaly": self.aova.anomaly, "organ_probability": self.aova.organ_probability,
                "regions": self.detection.kept, "roi": self.residuals.roi, "pseudo_healthy": self.residuals.healthy,
                "pixel_residual": self.residuals.pixel, "feature_residual": self.residuals.feature,
                "refined_probability": self.probability, "fusion": self.fusion, "uncertainty": self.residuals.spread}
        return {name: maps[name] for name in intermediate_names(self.seeds)}

    def to_input_grid(self, array: np.ndarray) -> np.ndarray:
        if self.plan is None:
            return array
        binary = array.dtype == bool
        out = self.plan.invert(array.astype(np.uint8) if binary else array, kind="mask" if binary else "continuous")
        return out.astype(bool) if binary else out


class DiffuGTSPipeline:
    """Backbone + text encoder + AOVA/region heads + residual heads of one zero-shot setting: the seen categories'
    head (``residual``) and one per modality no seen category is in (``modality_heads``, e.g. {"MRI": ...})."""

    def __init__(self, backbone, text_encoder, heads: TrainedHeads, residual: TrainedResidualHead, *,
                 modality_heads: dict[str, TrainedResidualHead] | None = None, source: Path | None = None):
        self.modality_heads = dict(modality_heads or {})
        for head in (residual, *self.modality_heads.values()):
            if head.setting != heads.setting:
                raise InputError(f"the residual head was trained for {head.setting}, the AOVA heads for "
                                 f"{heads.setting}; use heads and residual heads of one setting (one train-heads "
                                 "folder)")
        self.backbone, self.text_encoder, self.heads, self.residual = backbone, text_encoder, heads, residual
        self.heads_folder = source  # where the heads came from (reports hash their weights)

    def residual_head(self, modality: str) -> TrainedResidualHead:
        """The residual head that refines a ``modality`` case: its own, or the seen categories' head."""
        return self.modality_heads.get(modality.upper(), self.residual)

    @classmethod
    def from_pretrained(cls, heads: str | Path = "default", model: str | Path = "default", *, device="auto"):
        """The shipped model and heads ("default"), or a foundation model folder and a `train-heads` folder."""
        from .backbone import load_backbone
        from .text import TextEncoder

        folder = heads_folder(heads)
        backbone = load_backbone(model, device=device)
        text_encoder = TextEncoder.from_pretrained(backbone.config.text_encoder, device=device)
        heads, residual, modality_heads = (TrainedHeads.load(folder), TrainedResidualHead.load(folder),
                                           load_modality_heads(folder))
        check_trained_on(backbone, model, folder, heads, [residual, *modality_heads.values()])
        return cls(backbone, text_encoder, heads, residual, modality_heads=modality_heads, source=folder)

    def weights_sha256(self) -> dict[str, str]:
        """sha256 of every weight file behind the pipeline: the foundation model's and the heads'."""
        from .backbone.registry import foundation_sha256, sha256_file

        weights = {f"model/{part}": digest for part, digest in foundation_sha256(self.backbone).items()}
        if self.heads_folder is not None:
            weights.update({f"heads/{p.name}": sha256_file(p) for p in sorted(self.heads_folder.glob("*.safetensors"))})
        return weights

    def __call__(self, volume: Volume, organ: str, *, modality: str = "CT", prompt: str | None = None,
                 organ_mask: Volume | None = None, seeds: int = 1, seed: int = 0, method: str = "head",
                 inpaint_steps: int | None = None, progress: bool = False) -> SegmentationResult:
        """Any NIfTI volume (``io.Volume``) -> a tumor mask in its own grid, and every intermediate.

        ``method``: "head" (the residual head, the full method) or "fusion" (the training-free baseline).
        ``inpaint_steps``: DDIM steps of the inpainting (None: the residual head's, what its thresholds were fitted
        with); fewer are quicker and for a first look only (the notebooks' smoke runs)."""
        modality = modality.upper()
        doubts = plausibility.emit(plausibility.intensity_warnings(volume.array, modality))
        start = time.perf_counter()
        plan = model_grid_plan(volume, modality, self.backbone.config.slice_shape)
        image = plan.apply(volume.array.astype(np.float32), order=1, fill=-1000.0 if modality == "CT" else 0.0)
        mask = None
        if organ_mask is not None:
            check_same_grid(volume, organ_mask)
            mask = plan.apply((organ_mask.array > 0).astype(np.uint8), order=0) > 0
        prepare = time.perf_counter() - start
        inpaint = None
        if inpaint_steps is not None:
            if inpaint_steps < 1:
                raise InputError(f"inpaint_steps must be at least 1, got {inpaint_steps}")
            inpaint = replace(self.residual_head(modality).config.inpaint, steps=inpaint_steps)
        result = self.segment_grid(image, plan.spacing, organ, modality=modality, prompt=prompt, organ_mask=mask,
                                   seeds=seeds, seed=seed, method=method, inpaint=inpaint, progress=progress)
        start = time.perf_counter()
        result.plan, result.affine = plan, volume.affine
        result.mask = result.to_input_grid(result.refined)
        result.timings = {"preprocess": prepare, **result.timings, "to_input_grid": time.perf_counter() - start}
        result.warnings = doubts + result.warnings
        return result

    @torch.no_grad()
    def segment_grid(self, image: np.ndarray, spacing, organ: str, *, modality: str = "CT", prompt: str | None = None,
                     organ_mask: np.ndarray | None = None, seeds: int = 1, seed: int = 0, method: str = "head",
                     inpaint: InpaintConfig | None = None, roi: np.ndarray | None = None,
                     progress: bool = False) -> SegmentationResult:
        """The pipeline on a volume already on the processing grid (a PhantomBench case, for instance).

        ``inpaint`` replaces the residual head's inpainting settings (ROI windows, steps; ``seeds``/``seed`` still
        apply), as the benchmarks compare them. ``roi`` replaces the region of interest that detection gives (every
        candidate region, enlarged): a mask on the processing grid, inpainted and refined in its place. For
        calibration only: the benchmark's oracle-ROI row hands it the true organ region."""
        organ = check_organ(organ)
        if prompt is not None:
            prompt = check_prompt(prompt)
        if seeds < 1:
            raise InputError(f"seeds must be at least 1, got {seeds}")
        if method not in ("head", "fusion"):
            raise InputError(f"method must be 'head' (residual head) or 'fusion' (training-free), not {method!r}")
        if roi is not None and np.shape(roi) != np.shape(image):
            raise InputError(f"the region of interest has shape {np.shape(roi)}, the image {np.shape(image)}")
        timings: dict[str, float] = {}
        region = organ_body_region(organ)
        residual_head = self.residual_head(modality)
        config = residual_head.config
        with _timed(timings, "aova"):
            aova = run_aova(self.heads, self.backbone, self.text_encoder, image, modality, organ, prompt=prompt)
        doubts = plausibility.emit(plausibility.prompt_set_warnings(self.text_encoder, aova.prompt_set, organ,
                                                                    organ_mask_given=organ_mask is not None))
        with _timed(timings, "detection"):
            detection = find_regions(self.heads, aova, self.heads.thresholds, organ_mask)
            roi = coarse_roi(detection, spacing, config.margin_mm, config.organ_reach) if roi is None else \
                np.asarray(roi, bool)
        with _timed(timings, "inpainting"):
            inpaint = replace(inpaint or config.inpaint, samples=seeds, seed=seed)
            organs = None if not getattr(self.backbone, "organ_channels", ()) else conditioning_organs(
                aova, self.backbone.organ_channels, threshold=self.heads.thresholds.organ, organ=organ,
                organ_mask=organ_mask)
            healthy, spread = inpaint_region(self.backbone, self.text_encoder, image, modality, region, organ, roi,
                                             inpaint, progress=progress, organs=organs, spacing=spacing)
        with _timed(timings, "residuals"):
            residuals = residuals_of(self.backbone, image, modality, roi, healthy, spread)
        with _timed(timings, "residual_head"):
            probability = refined_probability(residual_head.head, head_inputs(self.backbone, image, modality,
                                                                              residuals, aova.anomaly), roi)
            fusion = fusion_map(residuals)
        with _timed(timings, "postprocess"):
            thresholds = residual_head.thresholds
            score, threshold = (probability, thresholds.head) if method == "head" else (fusion, thresholds.fusion)
            refined = final_mask(score, threshold, roi, config.min_voxels)
        return SegmentationResult(
            mask=refined, affine=np.diag([*spacing, 1.0]), organ=organ, prompt=prompt, image=image, aova=aova,
            detection=detection, residuals=residuals, probability=probability, fusion=fusion, refined=refined,
            thresholds={"detection": vars(self.heads.thresholds), "refinement": vars(thresholds), "method": method,
                        "residual_head": residual_head.stem(residual_head.modality)},
            seeds=seeds, timings=timings, warnings=doubts)


def check_trained_on(backbone, model, folder: Path, heads: TrainedHeads,
                     residual_heads: Sequence[TrainedResidualHead] = ()) -> None:
    """Refuse heads trained on another encoder than ``backbone``'s: their maps would read features they never saw.
    Warn when residual heads were trained on another denoiser's pseudo-healthy images: usable, but retrain them.
    Heads that record no model (trained before the record existed) pass."""
    from .backbone.registry import encoder_part, foundation_sha256

    if not (heads.foundation_sha256 or any(head.foundation_sha256 for head in residual_heads)):
        return
    current, encoder = foundation_sha256(backbone), encoder_part(backbone)
    if not current:  # a model built in memory
        return
    if heads.foundation_sha256.get(encoder, current.get(encoder)) != current.get(encoder):
        raise InputError(f"{folder}: these heads were trained on another foundation model (its {encoder} weights "
                         f"differ from those of model {model}); train heads on this one: diffugts train-heads "
                         f"--model {model} --setting {heads.setting} --out DIR")
    stale = [TrainedResidualHead.stem(head.modality) for head in residual_heads
             if any(head.foundation_sha256.get(part, digest) != digest for part, digest in current.items())]
    if stale:
        warnings.warn(f"{folder}: {', '.join(stale)} were trained on the pseudo-healthy images of another version of "
                      f"model {model}; retrain them: diffugts train-heads --residual-only --model {model} "
                      f"--setting {heads.setting} --out {folder}", stacklevel=3)


@contextmanager
def _timed(timings: dict, name: str):
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start


# ---- evaluation on PhantomBench -------------------------------------------------------------------
