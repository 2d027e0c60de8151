"""Residuals between the image and its pseudo-healthy version, and residual learning (DiffuGTS stage 5).

- Pixel residual R_p = |I - H|, both in one normalisation (CT: a soft-tissue window; MRI: the backbone's model space).
- Feature residual R_f = sum over the frozen encoder's three stages of upsample(1 - cos(F_l(I), F_l(H))).
- Residual head: a small convolutional network on [I, H, R_p (signed, smoothed), R_f, S] that outputs refined tumor
  logits inside the region of interest (the enlarged coarse mask). Trained with Dice + BCE on the seen categories of a
  setting only; its threshold comes from the setting's validation split. A modality no seen category is in (MRI brain,
  in every setting) gets a head of its own, trained on healthy cases of that modality with synthetic anomalies and
  thresholded on synthetic anomalies in healthy validation cases: one small head shared across modalities traded CT
  accuracy for MRI accuracy (docs/findings/refinement.md section 6).
- Training-free fusion (the baseline kept beside it): R_p and R_f, each divided by its 99th percentile inside the
  region of interest, averaged, thresholded.

Pseudo-healthy images for training are computed once and cached on disk, keyed by a hash of the image, the region of
interest, the preprocessing and inpainting versions, the inpainting settings and the model's weights.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from scipy import ndimage

from .inpaint import InpaintConfig, inpaint_region
from .io import InputError, atomic_path, write_text_atomic

INPUTS = ("image", "healthy", "signed_pixel_residual", "feature_residual", "anomaly")  # the head's input channels
SMOOTHING_VOXELS = (1.5, 1.5, 0.7)  # Gaussian sigma of the head's signed residual: blobs stay, inpainting texture goes


@dataclass
class ResidualConfig:
    margin_mm: float = 5.0  # the coarse mask is enlarged by this before inpainting
    steps: int = 800
    batch: int = 8
    crop: int = 64  # training crops (pixels), centred on the region of interest
    lr: float = 2e-3
    channels: int = 16
    synthetic_anomalies: int = 1  # per training case (the AOVA heads' recipe; no tumor category)
    # the head of a modality no seen category is in: healthy refine-split cases per region of that modality, with
    # ``modality_anomalies`` synthetic anomalies each (one anomaly in each of 4 brains gave the shared head 35 MRI
    # lesion voxels to learn from), and healthy validation cases per region for its thresholds. 0 cases: no such head,
    # the one head serves every modality
    modality_healthy: int = 16
    modality_anomalies: int = 3
    modality_validation: int = 6
    min_voxels: int = 10  # smaller components of the final mask are dropped
    # refinement reach: when region-level detection keeps a region (the prompted organ is flagged abnormal), the
    # region of interest also holds the whole organ region, so a tumor AOVA's candidates missed can still be reached
    organ_reach: bool = False
    seed: int = 0
    inpaint: InpaintConfig = field(default_factory=InpaintConfig)

    @classmethod
    def from_dict(cls, data: dict) -> "ResidualConfig":
        data = dict(data)
        if data.pop("lesion_free_healthy", 0):  # an experiment of 2026-11, superseded by a head per modality
            raise InputError("this residual head was trained with healthy cases of other modalities mixed in "
                             "(lesion_free_healthy), which a head per modality replaced; train it again with "
                             "`diffugts train-heads --residual-only`")
        data.pop("lesion_free_anomalies", None)
        # keys missing from files saved before they existed take their defaults
        return cls(**{**data, "inpaint": InpaintConfig(**data["inpaint"])})


@dataclass(frozen=True)
class RefinementThresholds:
    head: float = 0.5  # refined probability
    fusion: float = 0.5  # training-free fusion map
    provenance: str = "defaults"


@dataclass
class Residuals:
    """Stage 5 on one volume (processing grid): region of interest, pseudo-healthy image, residuals."""

    roi: np.ndarray  # enlarged coarse mask (bool)
    healthy: np.ndarray  # H, image units
    spread: np.ndarray  # voxelwise std over inpainting samples (0 with one sample)
    pixel: np.ndarray  # R_p = |I - H| in head_intensity units
    feature: np.ndarray  # R_f


class ResidualHead(nn.Module):
    """Three convolutions over [I, H, signed R_p, R_f, S] (5 channels) -> tumor logits; a 5 x 5 pixel view, or
    5 x 5 x 5 voxels with ``spatial_dims=3`` (the head of a 3D foundation model, which sees through-plane too).

    Small on purpose: a 0.13 M-parameter U-shaped head fitted its training lesions (pixel AUROC 0.9-0.99) and
    failed on new cases (0.4-0.8); this one generalises (docs/findings/refinement.md)."""

    def __init__(self, channels: int = 16, spatial_dims: int = 2):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.spatial_dims = spatial_dims
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.net = nn.Sequential(conv(len(INPUTS), channels, 3, padding=1), nn.GELU(),
                                 conv(channels, channels, 3, padding=1), nn.GELU(), conv(channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[:, 0]

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


@dataclass
class TrainedResidualHead:
    head: ResidualHead
    thresholds: RefinementThresholds
    config: ResidualConfig
    setting: str
    modality: str | None = None  # None: the head of the seen categories, which serves every modality without its own
    foundation_sha256: dict[str, str] = field(default_factory=dict)  # the model trained on ({}: not recorded)

    @staticmethod
    def stem(modality: str | None) -> str:
        """File name stem: residual (the seen categories' head), residual_mri (the MRI head)."""
        return "residual" if modality is None else f"residual_{modality.lower()}"

    def save(self, folder: str | Path) -> Path:
        folder, stem = Path(folder), self.stem(self.modality)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / f"{stem}.safetensors", suffix=".safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, str(tmp))
        meta = {"setting": self.setting, **({"modality": self.modality} if self.modality else {}),
                **({"spatial_dims": 3} if self.head.spatial_dims == 3 else {}), "inputs": list(INPUTS),
                "thresholds": asdict(self.thresholds), "config": asdict(self.config),
                "parameters": self.head.parameter_count,
                **({"foundation_sha256": self.foundation_sha256} if self.foundation_sha256 else {})}
        write_text_atomic(folder / f"{stem}.json", json.dumps(meta, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path, modality: str | None = None) -> "TrainedResidualHead":
        folder, stem = Path(folder), cls.stem(modality)
        if not (folder / f"{stem}.json").is_file():
            raise InputError(f"{folder}: no {stem}.json; train the residual head with `diffugts train-heads` "
                             "(it writes it beside heads.json)")
        meta = json.loads((folder / f"{stem}.json").read_text())
        config = ResidualConfig.from_dict(meta["config"])
        head = ResidualHead(config.channels, meta.get("spatial_dims", 2))
        head.load_state_dict(load_file(folder / f"{stem}.safetensors"))
        return cls(head.eval(), RefinementThresholds(**meta["thresholds"]), config, meta["setting"], modality,
                   meta.get("foundation_sha256", {}))


def load_modality_heads(folder: str | Path) -> dict[str, TrainedResidualHead]:
    """The heads of single modalities in a `train-heads` folder (residual_<modality>.json), by modality; none in
    folders trained before they existed, where the one head serves every modality."""
    heads = {}
    for path in sorted(Path(folder).glob("residual_*.json")):
        modality = json.loads(path.read_text()).get("modality")
        if modality:
            heads[modality] = TrainedResidualHead.load(folder, modality)
    return heads


# ---- residuals ---------------------------------------------------------------------------------


def head_intensity(backbone, image: np.ndarray, modality: str, reference: np.ndarray | None = None) -> np.ndarray:
    """Intensities as the head and the pixel residual see them. CT: a soft-tissue window, (HU - 40) / 200 clipped to
    +-3, because the backbone's model space squeezes the 30-40 HU contrasts of tumors against their organ into a few
    hundredths. MRI: the backbone's model space (percentiles of ``reference``, default the image itself), doubled."""
    if modality.upper() == "CT":
        return np.clip((np.asarray(image, np.float32) - 40.0) / 200.0, -3.0, 3.0)
    intensity = backbone.intensity(modality, image if reference is None else reference)
    return 2.0 * intensity.forward(image)


def pixel_residual(backbone, image: np.ndarray, healthy: np.ndarray, modality: str) -> np.ndarray:
    """|I - H| in the head's intensity units (``head_intensity`` of the input image, applied to both)."""
    return np.abs(head_intensity(backbone, image, modality) - head_intensity(backbone, healthy, modality, image))


@torch.no_grad()
def feature_residual(backbone, image: np.ndarray, healthy: np.ndarray, modality: str, roi: np.ndarray,
                     batch: int = 32) -> np.ndarray:
    """Sum over the encoder's three stages of upsample(1 - cos(F_l(I), F_l(H))); computed on the ROI's slices only
    (elsewhere H = I and the residual is 0). A 3D backbone encodes both volumes in the inpainting window only and
    upsamples trilinearly."""
    out = np.zeros(image.shape, np.float32)
    todo = np.flatnonzero(roi.any((0, 1)))
    if len(todo) == 0:
        return out
    intensity = backbone.intensity(modality, image)
    if getattr(backbone, "spatial_dims", 2) == 3:
        return _volume_feature_residual(backbone, intensity, image, healthy, roi)
    x = backbone.volume_to_slices(intensity.forward(image))[todo]
    h = backbone.volume_to_slices(intensity.forward(healthy))[todo]
    maps = []
    for start in range(0, len(todo), batch):
        fi, fh = backbone.encode_features(x[start:start + batch]), backbone.encode_features(h[start:start + batch])
        total = sum(F.interpolate((1 - F.cosine_similarity(a, b, dim=1))[:, None], size=x.shape[-2:],
                                  mode="bilinear", align_corners=False)[:, 0] for a, b in zip(fi, fh))
        maps.append(total.cpu())
    out[:, :, todo] = torch.cat(maps).permute(1, 2, 0).numpy()
    return out


def _volume_feature_residual(backbone, intensity, image: np.ndarray, healthy: np.ndarray, roi: np.ndarray) -> np.ndarray:
    """A 3D backbone's feature residual, encoded in the window the ROI was inpainted in (``inpaint3d``: its box with
    a few latent cells of context), not the whole volume: beyond the window H = I."""
    from .inpaint3d import inpainting_window  # MONAI's schedulers load only for a 3D model

    window = inpainting_window(backbone, roi)
    x, h = (backbone.volume_to_batch(intensity.forward(v))[(..., *window.voxels)] for v in (image, healthy))
    total = sum(F.interpolate((1 - F.cosine_similarity(a, b, dim=1))[:, None].float().cpu(), size=x.shape[2:],
                              mode="trilinear", align_corners=False)[0, 0]
                for a, b in zip(backbone.encode_features(x), backbone.encode_features(h)))
    out = np.zeros(image.shape, np.float32)
    region, inside_window = window.in_image(image.shape)
    out[region] = total[inside_window].numpy()
    out[:, :, ~roi.any((0, 1))] = 0  # as the 2D model's: the ROI's slices only
    return out


def compute_residuals(backbone, text_encoder, image: np.ndarray, modality: str, region: str, organ: str,
                      roi: np.ndarray, config: InpaintConfig, *, cache: Path | None = None,
                      progress: bool = False, organs: np.ndarray | None = None, spacing=None) -> Residuals:
    """Inpaint ``roi`` to a pseudo-healthy image with the organ's healthy prompt (and, for an organ-aware denoiser,
    the ``organs`` map; a 3D denoiser is told the ``spacing`` instead), then both residuals."""
    healthy, spread = inpaint_region(backbone, text_encoder, image, modality, region, organ, roi, config,
                                     cache=cache, progress=progress, organs=organs, spacing=spacing)
    return residuals_of(backbone, image, modality, roi, healthy, spread)


def residuals_of(backbone, image: np.ndarray, modality: str, roi: np.ndarray, healthy: np.ndarray,
                 spread: np.ndarray) -> Residuals:
    return Residuals(roi, healthy, spread, pixel_residual(backbone, image, healthy, modality),
                     feature_residual(backbone, image, healthy, modality, roi))


def scaled_residual(residual: np.ndarray, roi: np.ndarray) -> np.ndarray:
    """A residual divided by its 99th percentile inside the ROI, clipped to [0, 1]; 0 outside the ROI."""
    if not roi.any():
        return np.zeros(roi.shape, np.float32)
    scale = max(float(np.percentile(residual[roi], 99)), 1e-6)
    return np.where(roi, np.clip(residual / scale, 0, 1), 0).astype(np.float32)


def fusion_map(residuals: Residuals) -> np.ndarray:
    """Training-free fusion: R_p and R_f each scaled by its 99th percentile inside the ROI, averaged, in [0, 1]."""
    return (scaled_residual(residuals.pixel, residuals.roi) + scaled_residual(residuals.feature, residuals.roi)) / 2


# ---- the head --------------------------------------------------------------------------------------


def head_inputs(backbone, image: np.ndarray, modality: str, residuals: Residuals, anomaly: np.ndarray) -> np.ndarray:
    """(5, X, Y, Z): I and H (``head_intensity``), the signed pixel residual H - I smoothed inside the ROI, R_f, S.

    The sign says whether the image is darker or brighter than healthy; the smoothing keeps lesion-sized differences
    and drops the texture the inpainting invents. Both measured better than |I - H| on the validation split."""
    image_h = head_intensity(backbone, image, modality)
    healthy_h = head_intensity(backbone, residuals.healthy, modality, image)
    signed = ndimage.gaussian_filter(healthy_h - image_h, SMOOTHING_VOXELS) * residuals.roi
    return np.stack([image_h, healthy_h, signed, residuals.feature, anomaly]).astype(np.float32)


@torch.no_grad()
def refined_probability(head: ResidualHead, inputs: np.ndarray, roi: np.ndarray, batch: int = 16) -> np.ndarray:
    """The head's tumor probability on the ROI's slices (a 3D head: on the ROI's bounding box with the head's reach
    around it); 0 outside the ROI."""
    out = np.zeros(roi.shape, np.float32)
    todo = np.flatnonzero(roi.any((0, 1)))
    head.eval()
    if head.spatial_dims == 3:
        if len(todo):
            reach = 2  # two 3 x 3 x 3 convolutions: the box's edge sees what the whole volume would show it
            box = tuple(slice(max(int(a.min()) - reach, 0), int(a.max()) + reach + 1) for a in np.nonzero(roi))
            x = torch.from_numpy(np.ascontiguousarray(inputs[(slice(None), *box)]))[None]
            out[box] = torch.sigmoid(head(x))[0].numpy()
        return np.where(roi, out, 0)
    for start in range(0, len(todo), batch):
        index = todo[start:start + batch]
        x = torch.from_numpy(np.ascontiguousarray(inputs[..., index].transpose(3, 0, 1, 2)))
        out[..., index] = torch.sigmoid(head(x)).permute(1, 2, 0).numpy()
    return np.where(roi, out, 0)


def final_mask(probability: np.ndarray, threshold: float, roi: np.ndarray, min_voxels: int) -> np.ndarray:
    """Threshold inside the ROI; drop connected components below ``min_voxels``."""
    labels, count = ndimage.label((probability > threshold) & roi)
    if count == 0:
        return labels > 0
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[labels]


# ---- training ----------------------------------------------------------------------------------
