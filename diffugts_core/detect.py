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

from .aova import PromptSet


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
