"""AOVA: anomaly-aware open-vocabulary attention maps (DiffuGTS stages 2-3).

The frozen encoder's three stage features F_l pass through small adapters,
F'_l = a * T_l(F_l) + (1 - a) * F_l (T_l: two 1x1 convolutions; a = 0.5 here: the paper starts at 0.1,
and 0.5 gave better maps on the validation split of seen categories, as the small VAE's features need
more reshaping than a large foundation model's). Per stage, image queries
Q_l = F'_l W_q attend to prompt keys K_l = E W_k (E: pooled text embeddings of the prompts), with a
softmax over prompts: A_l = softmax(cos(Q_l, K_l) / tau). (Cosine instead of the paper's dot product
over sqrt(d): the same ranking, and a temperature that means the same at every stage.) The stage
maps are upsampled to the image grid and averaged: M. The anomaly map S is the sum of the abnormal
prompts' channels.

Prompts compete: every organ's normal prompt, the abnormal prompts in play, and a background
prompt share one softmax. An organ or tumor phrase never seen in training is simply encoded at run
time (open vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .io import InputError
from .preprocess import body_mask
from .text import TextEncoder, check_prompt, ensemble_embedding, load_templates
from .vocabulary import ORGAN_KEYS, ORGAN_LABELS, organ_modality

BACKGROUND = "background"
IGNORE = -100  # target of voxels no prompt is trained on (torch's default ignore_index)
LESION_ORGANS = tuple(key for keys in ORGAN_KEYS.values() for key in keys)  # index + 1 = lesion id in a slice bank


@dataclass(frozen=True)
class PromptSet:
    """The prompts that compete in one softmax, named "background", "<organ>:normal", "<organ>:abnormal"."""

    modality: str
    names: tuple[str, ...]
    texts: tuple[tuple[str, ...], ...]  # the templates behind each name (ensembled)
    embeddings: torch.Tensor  # (P, D) unit vectors

    def index(self, name: str) -> int:
        return self.names.index(name)

    @property
    def abnormal(self) -> list[int]:
        return [i for i, n in enumerate(self.names) if n.endswith(":abnormal")]

    def organ_channels(self, organ: str) -> list[int]:
        return [i for i, n in enumerate(self.names) if n.split(":")[0] == organ]


def build_prompt_set(text_encoder: TextEncoder, modality: str, abnormal_organs=(), *,
                     extra_abnormal: dict[str, str] | None = None, extra_organs=()) -> PromptSet:
    """Background + every organ's normal prompt + the abnormal prompts of ``abnormal_organs``.

    ``extra_abnormal`` adds free-text prompts at run time, e.g. {"spleen": "a CT scan of a spleen with a lesion"};
    ``extra_organs`` adds normal prompts (from the YAML templates) of organs the heads were never trained on.
    """
    templates = load_templates(modality)
    names, texts = [BACKGROUND], [templates.background]
    for organ in dict.fromkeys([*ORGAN_KEYS[templates.modality], *extra_organs]):
        names.append(f"{organ}:normal")
        texts.append(tuple(templates.prompts(organ, "normal")))
    for organ in abnormal_organs:
        names.append(f"{organ}:abnormal")
        texts.append(tuple(templates.prompts(organ, "abnormal")))
    for organ, text in (extra_abnormal or {}).items():
        name = f"{organ}:abnormal"
        if name in names:
            texts[names.index(name)] = (check_prompt(text),)
        else:
            names.append(name)
            texts.append((check_prompt(text),))
    embeddings = torch.stack([ensemble_embedding(text_encoder, t) for t in texts])
    return PromptSet(templates.modality, tuple(names), tuple(texts), embeddings)


class FeatureAdapter(nn.Module):
    """F' = a * T(F) + (1 - a) * F, T = 1x1 conv -> GELU -> 1x1 conv (two linear layers per position)."""

    def __init__(self, channels: int, alpha: float = 0.5):
        super().__init__()
        self.alpha = alpha
        self.transform = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.GELU(), nn.Conv2d(channels, channels, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.alpha * self.transform(features) + (1 - self.alpha) * features


@dataclass
class AOVAOutput:
    maps: torch.Tensor  # (N, P, H, W) mean over stages of the per-stage softmax, on the image grid
    stage_maps: list[torch.Tensor]  # (N, P, h_l, w_l) per stage
    adapted: list[torch.Tensor]  # F'_l


class AOVAHead(nn.Module):
    """Adapters, per-stage W_q and W_k: the trainable part of AOVA (a few hundred k parameters)."""

    def __init__(self, stage_channels=(32, 64, 64), text_dim: int = 384, dim: int = 64, alpha: float = 0.5,
                 tau: float = 0.07):
        super().__init__()
        self.stage_channels = tuple(stage_channels)
        self.text_dim, self.dim, self.tau = text_dim, dim, tau
        self.adapters = nn.ModuleList(FeatureAdapter(c, alpha) for c in stage_channels)
        self.queries = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in stage_channels)
        self.keys = nn.ModuleList(nn.Linear(text_dim, dim) for _ in stage_channels)

    def forward(self, features: list[torch.Tensor], prompts: torch.Tensor, size: tuple[int, int]) -> AOVAOutput:
        adapted = [adapter(f.float()) for adapter, f in zip(self.adapters, features)]
        stage_maps = []
        for feature, query, key in zip(adapted, self.queries, self.keys):
            q = F.normalize(query(feature), dim=1)
            k = F.normalize(key(prompts.to(q.device)), dim=-1)
            stage_maps.append(torch.softmax(torch.einsum("nchw,pc->nphw", q, k) / self.tau, dim=1))
        maps = torch.stack([F.interpolate(a, size=size, mode="bilinear", align_corners=False) for a in stage_maps])
        return AOVAOutput(maps.mean(0), stage_maps, adapted)


def anomaly_map(output: AOVAOutput, prompt_set: PromptSet) -> torch.Tensor:
    """S: (N, H, W), the probability mass on the abnormal prompts."""
    return output.maps[:, prompt_set.abnormal].sum(1)


def stage_anomaly_maps(output: AOVAOutput, prompt_set: PromptSet) -> list[torch.Tensor]:
    """S of each stage on its own grid, (N, h_l, w_l): what the mean over stages is made of."""
    return [maps[:, prompt_set.abnormal].sum(1) for maps in output.stage_maps]


def prompt_map(output: AOVAOutput, prompt_set: PromptSet, name: str) -> torch.Tensor:
    """(N, H, W): the mass one prompt ("background", "liver:normal", "lung:abnormal", ...) wins."""
    return output.maps[:, prompt_set.index(name)]


def organ_map(output: AOVAOutput, prompt_set: PromptSet, organ: str) -> torch.Tensor:
    """(N, H, W): the mass on the organ's normal and abnormal prompts (where the organ is)."""
    return output.maps[:, prompt_set.organ_channels(organ)].sum(1)


def organ_voxels(organs: np.ndarray, modality: str, organ: str) -> np.ndarray:
    """Where a prompt organ is in a PhantomBench label map: the union of its labels (``ORGAN_KEYS``)."""
    return np.isin(organs, [ORGAN_LABELS[name] for name in ORGAN_KEYS[modality][organ]])


def prompt_targets(organs: np.ndarray, lesions: dict[str, np.ndarray], prompt_set: PromptSet) -> np.ndarray:
    """Per-voxel index of the prompt that should win: background, the organ's normal prompt, or, where
    ``lesions[organ]`` is set, that organ's abnormal prompt (which must be in the set). Air outside
    the body is ``IGNORE``: it looks like lung, and which prompt claims it does not matter."""
    target = np.where(organs > 0, prompt_set.index(BACKGROUND), IGNORE).astype(np.int64)
    for organ in ORGAN_KEYS[prompt_set.modality]:
        target[organ_voxels(organs, prompt_set.modality, organ)] = prompt_set.index(f"{organ}:normal")
    for organ, mask in lesions.items():
        if not np.any(mask):
            continue
        name = f"{organ}:abnormal"
        if name not in prompt_set.names:
            raise ValueError(f"no prompt {name!r} in this set: is the category held out?")
        target[mask.astype(bool)] = prompt_set.index(name)
    return target


def aova_loss(output: AOVAOutput, target: torch.Tensor, tumor: torch.Tensor, prompt_set: PromptSet) -> dict:
    """Cross-entropy over prompts, plus Dice + BCE of S against the tumor mask."""
    log_maps = torch.log(output.maps.clamp_min(1e-6))
    ce = F.nll_loss(log_maps, target, ignore_index=IGNORE)
    s = anomaly_map(output, prompt_set).clamp(1e-6, 1 - 1e-6)
    bce = F.binary_cross_entropy(s, tumor)
    intersection = (s * tumor).sum()
    dice = 1 - (2 * intersection + 1) / (s.sum() + tumor.sum() + 1)
    return {"ce": ce, "bce": bce, "dice": dice, "total": ce + bce + dice}


@torch.no_grad()
def volume_features(backbone, image: np.ndarray, modality: str, batch: int = 32) -> list[torch.Tensor]:
    """The frozen encoder's three stage features for every axial slice: (Z, C_l, h_l, w_l) each.

    A 3D backbone encodes the whole volume at once; each stage, (C_l, h_l, w_l, d_l) over the padded grid, is cut to
    the cells that cover the image and resampled linearly along z to the image's Z slices, in-plane grids kept. The
    heads are per-position (1x1) maps that upsample in-plane, so they run on a 3D model's stages unchanged, and the
    maps come out trilinearly upsampled (z here, x and y in the heads)."""
    intensity = backbone.intensity(modality, image)
    if getattr(backbone, "spatial_dims", 2) == 3:
        return _volume_stages_as_slices(backbone, intensity.forward(image))
    x = backbone.volume_to_slices(intensity.forward(image))
    chunks = [backbone.encode_features(x[i:i + batch]) for i in range(0, len(x), batch)]
    return [torch.cat([c[l] for c in chunks]).cpu() for l in range(3)]


def _volume_stages_as_slices(backbone, volume: np.ndarray) -> list[torch.Tensor]:
    padded = backbone.volume_to_batch(volume)
    sides = volume.shape
    out = []
    for stage in backbone.encode_features(padded):
        cells = [-(-side * stage.shape[2 + axis] // padded.shape[2 + axis]) for axis, side in enumerate(sides)]
        cut = stage[:, :, :cells[0], :cells[1], :cells[2]].float().cpu()
        # along z: from the cells' centres to the slices' centres over the cells' extent, then cut to the image
        depth = cells[2] * padded.shape[4] // stage.shape[4]
        along_z = F.interpolate(cut, size=(cells[0], cells[1], depth), mode="trilinear", align_corners=False)
        out.append(along_z[0, :, :, :, :sides[2]].permute(3, 0, 1, 2).contiguous())
    return out


@dataclass
class AOVAResult:
    """AOVA on one volume: the prompt set, the maps, S and the organ probability on the volume grid."""

    prompt_set: object
    output: object  # AOVAOutput over the volume's slices
    anomaly: np.ndarray  # (X, Y, Z)
    organ_probability: np.ndarray  # (X, Y, Z)
    body: np.ndarray  # (X, Y, Z) bool, from the image (the maps are not trained outside the body)


@torch.no_grad()
def run_aova(heads, backbone, text_encoder, image: np.ndarray, modality: str, organ: str, *,
             prompt: str | None = None, features=None) -> AOVAResult:
    """``organ`` names the organ (seen or not); ``prompt`` replaces its abnormal prompt with free text."""
    modality = modality.upper()
    abnormal = [o for o in heads.abnormal_organs if organ_modality(o) == modality]
    if organ not in abnormal and not prompt:
        abnormal.append(organ)  # an unseen organ: its abnormal prompt is encoded now (open vocabulary)
    prompt_set = build_prompt_set(text_encoder, modality, abnormal, extra_abnormal={organ: prompt} if prompt else None,
                                  extra_organs=[organ])
    features = features if features is not None else volume_features(backbone, image, modality)
    channels = tuple(f.shape[1] for f in features)
    if channels != tuple(heads.aova.stage_channels):
        raise InputError(f"these heads were trained on a model whose encoder stages have {heads.aova.stage_channels} "
                         f"channels, this model's have {channels}; train heads on it with `diffugts train-heads "
                         "--model MODEL` and pass their folder as the heads")
    output = heads.aova([f.float() for f in features], prompt_set.embeddings, tuple(image.shape[:2]))
    return AOVAResult(prompt_set, output, anomaly_map(output, prompt_set).permute(1, 2, 0).numpy(),
                      organ_map(output, prompt_set, organ).permute(1, 2, 0).numpy(), body_mask(image, modality))


def conditioning_organs(aova: AOVAResult, organ_names: tuple[str, ...], *, threshold: float, organ: str | None = None,
                        organ_mask: np.ndarray | None = None) -> np.ndarray:
    """(X, Y, Z) uint8: the kit's own localisation of ``organ_names`` as an organ-aware denoiser takes it (0: none,
    i + 1: the i-th name): in each body voxel the organ whose maps hold the most mass, where that mass reaches
    ``threshold``. A given ``organ_mask`` is ``organ``'s region instead of its map (a user's or TotalSegmentator's)."""
    maps, prompt_set = aova.output.maps, aova.prompt_set
    mass = torch.zeros((len(organ_names), maps.shape[0], *maps.shape[2:]))
    for channel, name in enumerate(organ_names):
        if prompt_set.organ_channels(name):  # organs of the other modality have no prompts here
            mass[channel] = organ_map(aova.output, prompt_set, name)
    best, which = mass.max(0)
    index = torch.where(best >= threshold, which + 1, 0).permute(1, 2, 0).numpy().astype(np.uint8)
    index[~aova.body] = 0
    if organ_mask is not None and organ in organ_names:
        mine = organ_names.index(organ) + 1
        index[index == mine] = 0
        index[np.asarray(organ_mask, bool)] = mine
    return index
