"""Training the residual heads: on the seen categories' refine split, thresholded on their validation split; a
modality no seen category is in gets a head of its own, trained and thresholded on synthetic anomalies in healthy
cases of that modality (docs/findings/refinement.md section 6)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import phantoms
from ..aova import conditioning_organs, run_aova
from ..backbone.registry import foundation_sha256
from ..detect import find_regions
from ..data.splits import SEEDS, split_cases
from ..heads import TrainedHeads
from ..inpaint import coarse_roi
from ..metrics import dice
from ..residual import (RefinementThresholds, ResidualConfig, ResidualHead, TrainedResidualHead, compute_residuals,
                        final_mask, fusion_map, head_inputs, refined_probability)
from ..vocabulary import CATEGORY_ORGAN, REGION_MODALITY, REGION_ORGAN, category_modality
from .heads import insert_synthetic_anomaly


CROP_DEPTH = 16  # slices in a 3D residual head's training crops (64 mm at the CT processing grid's 4 mm)


@dataclass
class _Example:
    inputs: np.ndarray  # (5, X, Y, Z)
    target: np.ndarray  # (X, Y, Z) bool
    roi: np.ndarray  # (X, Y, Z) bool


def train_residual_head(heads: TrainedHeads, backbone, text_encoder, config: ResidualConfig = ResidualConfig(), *,
                        cache: Path | None = None, progress: bool = True,
                        shape=phantoms.DEFAULT_SHAPE) -> TrainedResidualHead:
    """Train the residual head on the setting's seen categories ("refine" split), pick thresholds on validation.

    The refine split holds new cases of the seen categories: on the AOVA heads' own training cases S is sharper than on
    any new case, and a head trained there learns to trust S too much. The region of interest is built as at test time
    (every candidate region, enlarged): a region grown around the known lesion teaches the head that the middle of the
    region is the tumor."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    cases = list(split_cases(heads.setting, "refine", heads.config, shape))
    leaked = {c.category for c in cases} - {"healthy", *heads.seen}
    if leaked:  # the data loader itself is checked, not the convention
        raise RuntimeError(f"categories {sorted(leaked)} are not seen in {heads.setting} but reached its training set")
    examples = [_example(heads, backbone, text_encoder, case, config, config.synthetic_anomalies, rng, cache)[0]
                for case in tqdm(cases, desc="residual data", disable=not progress)]
    head = ResidualHead(config.channels, backbone.spatial_dims)
    _fit_head(head, examples, config, rng, progress)
    trained = TrainedResidualHead(head.eval(), RefinementThresholds(), config, heads.setting,
                                  foundation_sha256=foundation_sha256(backbone))
    validation = [c for c in split_cases(heads.setting, "validation", heads.config, shape) if c.category != "healthy"]
    maps = [_example(heads, backbone, text_encoder, case, config, 0, rng, cache) for case in validation]
    trained.thresholds = choose_refinement_thresholds(
        trained, maps, f"validation split of seen categories (seed {SEEDS['validation']}, {len(maps)} tumor cases)")
    return trained


def modality_regions(heads: TrainedHeads) -> dict[str, tuple[str, ...]]:
    """The regions of every modality no seen category of ``heads`` is in (MRI: the brain, in every setting)."""
    seen = {category_modality(category) for category in heads.seen}
    return {modality: tuple(r for r, m in REGION_MODALITY.items() if m == modality)
            for modality in sorted(set(REGION_MODALITY.values()) - seen)}


def modality_cases(heads: TrainedHeads, modality: str, split: str, count: int, shape=phantoms.DEFAULT_SHAPE) -> list:
    """``count`` healthy cases of ``split`` in each region of ``modality``."""
    return [phantoms.generate_case("healthy", index, SEEDS[split], shape, region=region)
            for region in modality_regions(heads)[modality] for index in range(count)]


def train_modality_heads(heads: TrainedHeads, backbone, text_encoder, config: ResidualConfig = ResidualConfig(), *,
                         cache: Path | None = None, progress: bool = True,
                         shape=phantoms.DEFAULT_SHAPE) -> list[TrainedResidualHead]:
    """A residual head for each modality no seen category is in, trained on healthy refine-split cases of it with
    synthetic anomalies, and thresholded on synthetic anomalies in healthy validation cases: no tumor of any category
    reaches it, so it is zero-shot for every category of that modality. None when ``config.modality_healthy`` is 0."""
    trained = []
    for modality in modality_regions(heads) if config.modality_healthy else ():
        torch.manual_seed(config.seed)
        rng = np.random.default_rng(config.seed)
        cases = modality_cases(heads, modality, "refine", config.modality_healthy, shape)
        examples = [_example(heads, backbone, text_encoder, case, config, config.modality_anomalies, rng, cache)[0]
                    for case in tqdm(cases, desc=f"residual data ({modality})", disable=not progress)]
        head = ResidualHead(config.channels, backbone.spatial_dims)
        _fit_head(head, examples, config, rng, progress)
        result = TrainedResidualHead(head.eval(), RefinementThresholds(), config, heads.setting, modality,
                                     foundation_sha256(backbone))
        validation_rng = np.random.default_rng(SEEDS["validation"])  # the same validation anomalies for every head
        validation = modality_cases(heads, modality, "validation", config.modality_validation, shape)
        maps = [_example(heads, backbone, text_encoder, case, config, 1, validation_rng, cache) for case in validation]
        result.thresholds = choose_refinement_thresholds(
            result, maps, f"synthetic anomalies in healthy {modality} validation cases (seed {SEEDS['validation']}, "
                          f"{len(maps)} cases)")
        trained.append(result)
    return trained


def _example(heads: TrainedHeads, backbone, text_encoder, case, config: ResidualConfig, anomalies: int, rng,
             cache: Path | None) -> tuple[_Example, np.ndarray]:
    """One case with ``anomalies`` synthetic anomalies inserted, as the pipeline sees it: the residual head's inputs,
    the lesion (tumor and anomalies), the region of interest; and the training-free fusion map."""
    image, lesion = case.image, case.tumor > 0
    for _ in range(anomalies):
        image, blob, _ = insert_synthetic_anomaly(image, case.organs, case.modality, case.spacing, rng)
        lesion = lesion | blob
    organ = CATEGORY_ORGAN[case.category] if case.category != "healthy" else REGION_ORGAN[case.region]
    aova = run_aova(heads, backbone, text_encoder, image, case.modality, organ)
    detection = find_regions(heads, aova, heads.thresholds)
    roi = coarse_roi(detection, case.spacing, config.margin_mm, config.organ_reach)
    organs = None if not getattr(backbone, "organ_channels", ()) else conditioning_organs(
        aova, backbone.organ_channels, threshold=heads.thresholds.organ)
    residuals = compute_residuals(backbone, text_encoder, image, case.modality, case.region, organ, roi,
                                  config.inpaint, cache=cache, organs=organs, spacing=case.spacing)
    inputs = head_inputs(backbone, image, case.modality, residuals, aova.anomaly)
    return _Example(inputs, lesion, roi), fusion_map(residuals)


def _fit_head(head: ResidualHead, examples: list[_Example], config: ResidualConfig, rng, progress: bool) -> None:
    slices = [(i, k) for i, e in enumerate(examples) for k in np.flatnonzero(e.roi.any((0, 1)))]
    if not slices:
        raise RuntimeError(f"none of the {len(examples)} training cases has a region of interest: the AOVA heads "
                           "found no candidate region in any of them, so the residual head has nothing to learn from; "
                           "train the heads longer (train-heads --steps) or on more cases (--per-category)")
    with_lesion = [(i, k) for i, k in slices if examples[i].target[..., k].any()] or slices
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=1e-4)
    head.train()
    bar = tqdm(range(config.steps), desc="residual head", disable=not progress)
    for _ in bar:
        picks = [with_lesion[j] for j in rng.integers(len(with_lesion), size=config.batch // 2)]
        picks += [slices[j] for j in rng.integers(len(slices), size=config.batch - len(picks))]
        depth = CROP_DEPTH if head.spatial_dims == 3 else None
        x, y, m = zip(*(_crop(examples[i], k, config.crop, rng, depth) for i, k in picks))
        x, y, m = torch.from_numpy(np.stack(x)), torch.from_numpy(np.stack(y)), torch.from_numpy(np.stack(m))
        logits = head(x)
        loss = _dice_bce(logits, y, m)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    head.eval()


def _crop(example: _Example, k: int, size: int, rng, depth: int | None = None):
    """A size x size crop of slice k around a random ROI pixel (inputs, target, ROI), randomly flipped and turned:
    the head should not learn where in a slice, or in which orientation, the training lesions happened to be. With
    ``depth``, a size x size x depth block centred on slice k (a 3D head's training crop)."""
    roi = example.roi[..., k]
    cx, cy = np.argwhere(roi)[rng.integers(roi.sum())]
    x0 = int(np.clip(cx - size // 2, 0, roi.shape[0] - size))
    y0 = int(np.clip(cy - size // 2, 0, roi.shape[1] - size))
    window = (slice(x0, x0 + size), slice(y0, y0 + size))
    if depth is None:
        through = k
    else:
        z0 = int(np.clip(k - depth // 2, 0, max(example.roi.shape[2] - depth, 0)))
        through = slice(z0, z0 + depth)
    arrays = [example.inputs[(slice(None), *window, through)],
              example.target[(*window, through)].astype(np.float32)[None],
              example.roi[(*window, through)].astype(np.float32)[None]]
    turns, flip = int(rng.integers(4)), bool(rng.integers(2))
    arrays = [np.rot90(a, turns, axes=(1, 2)) for a in arrays]
    arrays = [np.ascontiguousarray(a[:, ::-1] if flip else a) for a in arrays]
    return arrays[0], arrays[1][0], arrays[2][0]


def _dice_bce(logits, target, roi):
    """BCE + soft Dice, both counted inside the ROI only (outside it the pipeline never predicts)."""
    bce = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * roi).sum() / roi.sum().clamp_min(1)
    probability = torch.sigmoid(logits) * roi
    dice_loss = 1 - (2 * (probability * target).sum() + 1) / (probability.sum() + target.sum() + 1)
    return bce + dice_loss


def choose_refinement_thresholds(trained: TrainedResidualHead, maps: list[tuple[_Example, np.ndarray]],
                                 source: str) -> RefinementThresholds:
    """Grid search of the head's and the fusion's thresholds for the best mean DSC on validation examples (the
    examples and fusion maps of ``_example``; ``source`` says which cases they are)."""
    scores = [(example.target, example.roi, refined_probability(trained.head, example.inputs, example.roi), fusion)
              for example, fusion in maps]
    grid = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    chosen = {}
    for name, index in (("head", 2), ("fusion", 3)):
        means = {t: np.mean([dice(final_mask(m[index], t, m[1], trained.config.min_voxels), m[0]) for m in scores])
                 for t in grid}
        best = max(grid, key=lambda t: means[t])
        chosen[name] = (best, means[best])
    return RefinementThresholds(
        head=chosen["head"][0], fusion=chosen["fusion"][0],
        provenance=f"{source}: mean DSC {chosen['head'][1]:.3f} (head), {chosen['fusion'][1]:.3f} (fusion)")
