"""Training the AOVA and region heads of a zero-shot setting on the slice bank of its seen categories and healthy
cases, and choosing the detection thresholds on the validation split. The abnormal prompt of a held-out category's
organ is not among the training prompts; healthy cases are part of training so the maps learn what normal looks like.

Beyond the paper (switchable, ``synthetic_anomalies``): every training case also gets a few synthetic anomalies, each
a smooth random blob in a random organ of its modality, filled either with another tissue of the same image (foreign
tissue) or with the organ made 30-150 HU (MRI: 15-60 %) brighter or darker, labelled abnormal for that organ. It
teaches the maps "different from this organ's normal appearance" rather than "looks like a seen tumor type"; it comes
from no tumor category, held out or not.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from tqdm.auto import tqdm

from ..data import phantoms
from ..backbone.registry import foundation_sha256
from ..aova import (IGNORE, LESION_ORGANS, AOVAHead, anomaly_map, aova_loss, build_prompt_set, organ_voxels,
                    prompt_targets, run_aova, volume_features)
from ..detect import DetectionThresholds, RegionHead, find_regions
from ..data.splits import SEEDS, setting_categories, split_cases
from ..heads import HeadsConfig, TrainedHeads
from ..metrics import dice
from ..vocabulary import CATEGORY_ORGAN, ORGAN_KEYS, organ_modality


@dataclass
class SliceBank:
    features: list[torch.Tensor]  # (N, C_l, h_l, w_l), float16
    organs: torch.Tensor  # (N, H, W) int16
    lesions: torch.Tensor  # (N, H, W) int8: 0 none, else 1 + index in LESION_ORGANS of the lesion's organ
    categories: list[str | None]  # the source case's tumor category (None: healthy): checked for leaks
    modalities: list[str]
    cases: list[str]  # the source case's id

    @property
    def tumor(self) -> torch.Tensor:
        return self.lesions > 0

    def lesion_masks(self, lesions: np.ndarray) -> dict[str, np.ndarray]:
        return {LESION_ORGANS[i - 1]: lesions == i for i in np.unique(lesions) if i > 0}


def insert_synthetic_anomaly(image: np.ndarray, organs: np.ndarray, modality: str, spacing, rng):
    """A smooth random blob in a random organ, brighter or darker than it: (image, mask, organ key)."""
    present = [(key, organ_voxels(organs, modality, key)) for key in ORGAN_KEYS[modality]]
    present = [(key, mask) for key, mask in present if mask.sum() > 200]
    key, organ = present[rng.integers(len(present))]
    depth = ndimage.distance_transform_edt(organ, sampling=spacing)
    candidates = np.argwhere(depth > 3.0) if (depth > 3.0).any() else np.argwhere(organ)
    centre = candidates[rng.integers(len(candidates))]
    radius = rng.uniform(5.0, 15.0)
    grid = np.ogrid[tuple(slice(0, n) for n in image.shape)]
    distance = np.sqrt(sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, spacing)))
    wobble = ndimage.gaussian_filter(rng.normal(size=image.shape), 2.0)
    mask = (distance / radius + 0.15 * wobble / (wobble.std() + 1e-6) < 1) & organ  # an irregular edge
    base = float(np.median(image[organ]))
    others = [label for label in np.unique(organs) if label and not np.isin(label, organs[organ]).any()]
    if others and rng.random() < 0.5:  # foreign tissue: the median of another labelled tissue of this image
        value = float(np.median(image[organs == others[rng.integers(len(others))]]))
    elif modality == "CT":  # the organ itself, brighter or darker
        value = base + rng.choice([-1, 1]) * rng.uniform(30, 150)
    else:
        value = base * (1 + rng.choice([-1, 1]) * rng.uniform(0.15, 0.6))
    out = image.copy()
    out[mask] = value + 0.3 * (image[mask] - base)  # keeps a little of the organ's texture
    return out, mask, key


def build_slice_bank(backbone, cases, *, rng: np.random.Generator, normal_slices: int = 8, synthetic: int = 3,
                     progress=False) -> SliceBank:
    """Training slices: every tumor (and synthetic anomaly) slice, plus a few others with anatomy, per case."""
    features, organs, lesions, categories, modalities, case_ids = [[], [], []], [], [], [], [], []
    for case in tqdm(list(cases), desc="features", disable=not progress):
        image = case.image
        lesion = np.zeros(case.organs.shape, np.int8)
        if case.category != "healthy":
            lesion[case.tumor > 0] = 1 + LESION_ORGANS.index(CATEGORY_ORGAN[case.category])
        for _ in range(synthetic):
            image, blob, organ = insert_synthetic_anomaly(image, case.organs, case.modality, case.spacing, rng)
            lesion[blob & (lesion == 0)] = 1 + LESION_ORGANS.index(organ)
        lesion_slices = np.flatnonzero(lesion.any((0, 1)))
        others = np.setdiff1d(np.flatnonzero((case.organs > 0).mean((0, 1)) > 0.05), lesion_slices)
        picked = np.concatenate([lesion_slices, rng.choice(others, min(normal_slices, len(others)), replace=False)])
        stage = volume_features(backbone, image, case.modality)
        for l in range(3):
            features[l].append(stage[l][picked].half())
        organs.append(torch.from_numpy(case.organs[:, :, picked].transpose(2, 0, 1).astype(np.int16)))
        lesions.append(torch.from_numpy(lesion[:, :, picked].transpose(2, 0, 1)))
        categories += [None if case.category == "healthy" else case.category] * len(picked)
        modalities += [case.modality] * len(picked)
        case_ids += [case.case_id] * len(picked)
    return SliceBank([torch.cat(f) for f in features], torch.cat(organs), torch.cat(lesions), categories, modalities,
                     case_ids)


def train_heads(backbone, text_encoder, config: HeadsConfig = HeadsConfig(), *, progress: bool = True,
                shape=phantoms.DEFAULT_SHAPE) -> TrainedHeads:
    """Train AOVA + region head on the setting's seen categories; pick thresholds on its validation split."""
    seen, _ = setting_categories(config.setting)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    bank = training_bank(backbone, config, rng, progress, shape)
    leaked = {c for c in bank.categories if c is not None} - set(seen)
    if leaked:  # the data loader itself is checked, not the convention
        raise RuntimeError(f"categories {sorted(leaked)} are not seen in {config.setting} but reached its training set")
    abnormal = tuple(LESION_ORGANS[i - 1] for i in sorted(set(bank.lesions.unique().tolist()) - {0}))
    prompt_sets = {m: build_prompt_set(text_encoder, m, [o for o in abnormal if organ_modality(o) == m])
                   for m in ("CT", "MRI")}
    channels = [f.shape[1] for f in bank.features]
    aova = AOVAHead(channels, text_encoder.hidden_size, config.dim, alpha=config.adapter_alpha)
    region = RegionHead(channels, text_encoder.hidden_size, config.dim)
    heads = TrainedHeads(aova, region, config.setting, seen, DetectionThresholds(), config, abnormal,
                         foundation_sha256(backbone))
    _fit(heads, bank, prompt_sets, config, rng, progress)
    validation = list(split_cases(config.setting, "validation", config, shape))
    heads.thresholds = choose_thresholds(heads, backbone, text_encoder, validation)
    return heads


def training_bank(backbone, config: HeadsConfig, rng: np.random.Generator, progress: bool = False,
                  shape=phantoms.DEFAULT_SHAPE) -> SliceBank:
    """The training slices of a setting; a fresh ``default_rng(config.seed)`` gives the bank the heads were trained on."""
    return build_slice_bank(backbone, split_cases(config.setting, "train", config, shape), rng=rng,
                            synthetic=config.synthetic_anomalies, progress=progress)


def lesion_kind(category: str | None, organ: str) -> str:
    """A lesion in a slice bank: "real" (the tumor of its case's category) or "synthetic"."""
    return "real" if category is not None and CATEGORY_ORGAN[category] == organ else "synthetic"


def _fit(heads, bank: SliceBank, prompt_sets, config: HeadsConfig, rng, progress):
    size = tuple(bank.features[0].shape[-2:])  # losses on the finest stage's grid (1/2 of the image)
    step = bank.organs.shape[-1] // size[-1]
    organs, lesions = bank.organs[:, ::step, ::step].numpy(), bank.lesions[:, ::step, ::step].numpy()
    targets = torch.from_numpy(np.stack([
        prompt_targets(organs[i], bank.lesion_masks(lesions[i]), prompt_sets[bank.modalities[i]])
        for i in range(len(organs))]))
    tumor = torch.from_numpy(lesions > 0)
    by_modality = {m: np.flatnonzero(np.array(bank.modalities) == m) for m in prompt_sets}
    with_tumor = set(np.flatnonzero(tumor.flatten(1).any(1).numpy()))
    parameters = list(heads.aova.parameters()) + list(heads.region.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=1e-4)
    heads.aova.train(), heads.region.train()
    weights = np.array([len(by_modality[m]) for m in prompt_sets], float)
    bar = tqdm(range(config.steps), desc=f"heads {config.setting}", disable=not progress)
    for _ in bar:
        modality = list(prompt_sets)[rng.choice(len(weights), p=weights / weights.sum())]
        pool = by_modality[modality]
        tumor_pool = np.array([i for i in pool if i in with_tumor])
        n_tumor = min(len(tumor_pool), int(config.batch * 0.6))
        index = np.concatenate([rng.choice(tumor_pool, n_tumor) if n_tumor else np.empty(0, int),
                                rng.choice(pool, config.batch - n_tumor)]).astype(int)
        prompt_set = prompt_sets[modality]
        output = heads.aova([f[index].float() for f in bank.features], prompt_set.embeddings, size)
        losses = aova_loss(output, targets[index], tumor[index].float(), prompt_set)
        region_loss = _region_loss(heads.region, output, targets[index], tumor[index], prompt_set, rng)
        loss = losses["total"] + region_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", dice=f"{losses['dice'].item():.3f}")
    heads.aova.eval(), heads.region.eval()


def _region_loss(region_head, output, targets, tumor, prompt_set, rng) -> torch.Tensor:
    """Tumor regions and normal-organ patches, pooled and scored: contrastive CE over prompts + BCE."""
    n, h, w = targets.shape
    output_s = anomaly_map(output, prompt_set).detach()
    masks, labels = [], []
    background = prompt_set.index("background")
    for i in range(n):
        if tumor[i].any():
            mask = torch.zeros(n, h, w)
            mask[i] = tumor[i].float()
            masks.append(mask)
            labels.append(int(targets[i][tumor[i]].mode().values))
        false_positive = (output_s[i] > 0.3) & ~tumor[i] & (targets[i] != IGNORE)  # what the filter must drop
        if false_positive.sum() >= 4:
            mask = torch.zeros(n, h, w)
            mask[i] = false_positive.float()
            masks.append(mask)
            labels.append(int(targets[i][false_positive].mode().values))
        organ = (targets[i] != background) & (targets[i] != IGNORE) & ~tumor[i]
        if organ.any():
            y, x = np.argwhere(organ.numpy())[rng.integers(organ.sum().item())]
            patch = torch.zeros(h, w, dtype=torch.bool)
            patch[max(0, y - 4):y + 4, max(0, x - 4):x + 4] = True
            mask = torch.zeros(n, h, w)
            mask[i] = (patch & organ).float()
            masks.append(mask)
            labels.append(int(targets[i][patch & organ].mode().values))
    if not masks:
        return torch.zeros(())
    pooled = RegionHead.pool(output.adapted, torch.stack(masks))
    logits = region_head.logits(pooled, prompt_set.embeddings)
    labels = torch.tensor(labels)
    abnormal = torch.zeros(len(prompt_set.names), dtype=torch.bool)
    abnormal[prompt_set.abnormal] = True
    probability = torch.softmax(logits, -1)[:, abnormal].sum(-1).clamp(1e-6, 1 - 1e-6)
    return F.cross_entropy(logits, labels) + F.binary_cross_entropy(probability, abnormal[labels].float())


def choose_thresholds(heads: TrainedHeads, backbone, text_encoder, cases) -> DetectionThresholds:
    """Grid search of the S and region thresholds for the best mean DSC on validation tumor cases."""
    prepared = [(case, run_aova(heads, backbone, text_encoder, case.image, case.modality,
                                CATEGORY_ORGAN[case.category])) for case in cases if case.category != "healthy"]
    best = None
    for anomaly in (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6):
        # regions depend on the S threshold only; the region threshold just picks among them
        detections = [find_regions(heads, aova, replace(heads.thresholds, anomaly=anomaly, region=0.0))
                      for _, aova in prepared]
        for region in (0.1, 0.3, 0.5, 0.7, 0.9):
            scores = []
            for (case, _), detection in zip(prepared, detections):
                kept = np.zeros(case.tumor.shape, bool)
                for candidate in detection.regions:
                    if candidate.probability >= region:
                        kept |= candidate.mask
                scores.append(dice(kept, case.tumor))
            if best is None or np.mean(scores) > best[0]:
                best = (float(np.mean(scores)), replace(heads.thresholds, anomaly=anomaly, region=region))
    score, chosen = best
    return replace(chosen, provenance=f"validation split of seen categories (seed {SEEDS['validation']}, "
                   f"{len(prepared)} tumor cases): mean DSC {score:.3f}")
