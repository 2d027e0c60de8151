"""Text-driven region-level anomaly detection (DiffuGTS stage 4).

Candidate regions are the 3D connected components of S > threshold inside the organ region. Each
region gets an embedding pooled from the adapted encoder features under it; the embedding is
compared with every prompt embedding (cosine / tau, softmax over prompts) and the mass on the
abnormal prompts is the region's anomaly probability. Regions judged normal are dropped (the
false-positive filter); the case-level score is the highest region probability (or, with no
region, the highest S in the organ), which gives the detection AUROC.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import ndimage

from .aova import AOVAResult, PromptSet, run_aova
from .io import check_same_grid
from .preprocess import model_grid_plan


class RegionHead(nn.Module):
    """Pools adapted features under a region and scores the pooled vector against the prompts."""

    def __init__(self, stage_channels=(32, 64, 64), text_dim: int = 384, dim: int = 64, tau: float = 0.07):
        super().__init__()
        self.tau = tau
        self.project = nn.Sequential(nn.Linear(sum(stage_channels), dim), nn.GELU(), nn.Linear(dim, dim))
        self.key = nn.Linear(text_dim, dim)

    @staticmethod
    def pool(adapted: list[torch.Tensor], masks: torch.Tensor) -> torch.Tensor:
        """(R, sum C_l): masked feature means. ``masks``: (R, N, H, W) weights over the N slices of ``adapted``."""
        pooled = []
        for feature in adapted:  # (N, C, h, w)
            weights = F.adaptive_avg_pool2d(masks.flatten(0, 1)[:, None].float(), feature.shape[-2:])
            weights = weights.view(masks.shape[0], masks.shape[1], *feature.shape[-2:])  # (R, N, h, w)
            total = weights.sum((1, 2, 3)).clamp_min(1e-6)
            pooled.append(torch.einsum("rnhw,nchw->rc", weights, feature) / total[:, None])
        return torch.cat(pooled, dim=1)

    def logits(self, pooled: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """(R, P) prompt logits of each region."""
        region = F.normalize(self.project(pooled), dim=-1)
        keys = F.normalize(self.key(prompts.to(region.device)), dim=-1)
        return region @ keys.T / self.tau

    def anomaly_probability(self, pooled: torch.Tensor, prompt_set: PromptSet) -> torch.Tensor:
        return torch.softmax(self.logits(pooled, prompt_set.embeddings), dim=-1)[:, prompt_set.abnormal].sum(-1)


@dataclass
class Region:
    mask: np.ndarray  # (X, Y, Z) bool
    voxels: int
    mean_s: float
    probability: float


@dataclass
class Detection:
    anomaly: np.ndarray  # S on the volume grid
    organ_region: np.ndarray  # where the organ is (bool)
    regions: list[Region] = field(default_factory=list)
    kept: np.ndarray | None = None  # union of the regions judged abnormal
    case_score: float = 0.0


@dataclass(frozen=True)
class DetectionThresholds:
    anomaly: float = 0.5  # S threshold for candidate regions
    region: float = 0.5  # anomaly probability a region needs to be kept
    organ: float = 0.3  # organ-map threshold for the organ region
    min_voxels: int = 3
    provenance: str = "defaults"


def candidate_regions(anomaly: np.ndarray, organ_region: np.ndarray, threshold: float, min_voxels: int):
    """3D connected components of S > threshold inside the organ region, largest first."""
    labels, count = ndimage.label((anomaly > threshold) & organ_region)
    sizes = np.bincount(labels.ravel())[1:]
    return [labels == i + 1 for i in np.argsort(-sizes) if sizes[i] >= min_voxels]


@torch.no_grad()
def find_regions(heads, aova: AOVAResult, thresholds: DetectionThresholds,
                 organ_mask: np.ndarray | None = None) -> Detection:
    """Candidate regions of S in the organ region, scored by the region head; the kept union."""
    if organ_mask is None:
        organ_mask = (aova.organ_probability > thresholds.organ) & aova.body
        # a tumor the maps give to another prompt is a hole in the organ: fill holes slice by slice
        organ_mask = np.stack([ndimage.binary_fill_holes(organ_mask[..., k]) for k in range(organ_mask.shape[-1])], -1)
    organ_region = ndimage.binary_dilation(organ_mask.astype(bool), iterations=2)
    detection = Detection(aova.anomaly, organ_region, kept=np.zeros(aova.anomaly.shape, bool))
    for mask in candidate_regions(aova.anomaly, organ_region, thresholds.anomaly, thresholds.min_voxels):
        slices = np.flatnonzero(mask.any((0, 1)))  # pool over the region's own slices only: the same mean, faster
        weights = torch.from_numpy(mask[..., slices].transpose(2, 0, 1)[None].astype(np.float32))
        pooled = RegionHead.pool([feature[slices] for feature in aova.output.adapted], weights)
        probability = float(heads.region.anomaly_probability(pooled, aova.prompt_set))
        detection.regions.append(Region(mask, int(mask.sum()), float(aova.anomaly[mask].mean()), probability))
        if probability >= thresholds.region:
            detection.kept |= mask
    detection.case_score = max((r.probability * r.mean_s for r in detection.regions), default=0.0)
    return detection


def detect_case(heads, backbone, text_encoder, image: np.ndarray, modality: str, organ: str, *,
                prompt: str | None = None, organ_mask: np.ndarray | None = None, features=None) -> Detection:
    """AOVA, then region-level detection with the heads' validated thresholds."""
    aova = run_aova(heads, backbone, text_encoder, image, modality, organ, prompt=prompt, features=features)
    return find_regions(heads, aova, heads.thresholds, organ_mask)


@dataclass
class VolumeDetection:
    """AOVA + detection of one NIfTI volume, with the maps taken back to the input's own grid."""

    image: np.ndarray  # the volume on the processing grid (RAS, model spacing)
    aova: AOVAResult  # on the processing grid
    detection: Detection  # on the processing grid
    anomaly: np.ndarray  # S on the input grid
    organ_probability: np.ndarray  # on the input grid
    kept: np.ndarray  # regions judged abnormal, on the input grid (bool)


def detect_volume(heads, backbone, text_encoder, volume, modality: str, organ: str, *,
                  prompt: str | None = None, organ_mask=None) -> VolumeDetection:
    """Any NIfTI volume (``io.Volume``): to the model's grid (RAS, model spacing), AOVA + detection, and back.

    ``organ_mask`` (a ``Volume`` on the same grid) replaces the organ region the maps would find.
    """
    modality = modality.upper()
    plan = model_grid_plan(volume, modality, backbone.config.slice_shape)
    fill = -1000.0 if modality == "CT" else 0.0  # air, so padding is outside the body
    image = plan.apply(volume.array.astype(np.float32), order=1, fill=fill)
    if organ_mask is not None:
        check_same_grid(volume, organ_mask)
        organ_mask = plan.apply((organ_mask.array > 0).astype(np.uint8), order=0) > 0
    aova = run_aova(heads, backbone, text_encoder, image, modality, organ, prompt=prompt)
    detection = find_regions(heads, aova, heads.thresholds, organ_mask)
    return VolumeDetection(image, aova, detection, plan.invert(aova.anomaly), plan.invert(aova.organ_probability),
                           plan.invert(detection.kept.astype(np.uint8), kind="mask").astype(bool))
