"""The AOVA heads measured: per unseen category on test cases (DSC, NSD, detection AUROC, S inside vs outside the
tumor), how well they fit their own training lesions, and a linear probe of the frozen features."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import phantoms
from ..aova import LESION_ORGANS, anomaly_map, build_prompt_set, organ_voxels, stage_anomaly_maps, volume_features
from ..detect import detect_case
from ..data.splits import role_categories, split_cases
from ..heads import HeadsConfig, TrainedHeads
from ..metrics import detection_auroc, dice, surface_dice
from ..training.heads import SliceBank, lesion_kind, training_bank
from ..vocabulary import CATEGORY_ORGAN, category_region, organ_modality


@torch.no_grad()
def training_fit(heads: TrainedHeads, backbone, text_encoder, *, bank: SliceBank | None = None,
                 shape=phantoms.DEFAULT_SHAPE) -> list[dict]:
    """How well the heads fit the lesions they were trained on: mean S inside every training lesion, aggregated and
    per stage, by organ and kind ("real": a seen category's tumor; "synthetic"). Rebuilds the training slices unless
    ``bank`` (from ``training_bank`` with the heads' config and seed) is given."""
    if bank is None:
        bank = training_bank(backbone, heads.config, np.random.default_rng(heads.config.seed), shape=shape)
    prompt_sets = {m: build_prompt_set(text_encoder, m, [o for o in heads.abnormal_organs if organ_modality(o) == m])
                   for m in set(bank.modalities)}
    size = tuple(bank.organs.shape[-2:])
    values: dict[tuple[str, str], list[list[float]]] = {}
    for index in range(len(bank.organs)):
        lesions = bank.lesions[index].numpy()
        if not lesions.any():
            continue
        prompt_set = prompt_sets[bank.modalities[index]]
        output = heads.aova([f[index:index + 1].float() for f in bank.features], prompt_set.embeddings, size)
        stages = [F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[0, 0].numpy()
                  for m in stage_anomaly_maps(output, prompt_set)]
        anomaly = anomaly_map(output, prompt_set)[0].numpy()
        for lesion in np.unique(lesions[lesions > 0]):
            organ, inside = LESION_ORGANS[lesion - 1], lesions == lesion
            means = [float(m[inside].mean()) for m in [anomaly, *stages]]
            values.setdefault((organ, lesion_kind(bank.categories[index], organ)), []).append(means)
    rows = []
    for (organ, kind), v in sorted(values.items()):
        means = np.mean(v, axis=0)
        rows.append({"organ": organ, "kind": kind, "slices": len(v), "s": float(means[0]),
                     "s_stages": [float(x) for x in means[1:]]})
    return rows


def feature_probe(bank: SliceBank, *, max_per_class: int = 20000, seed: int = 0) -> list[dict]:
    """How well the frozen features alone tell a lesion from the rest of its organ, whatever head sits on them.

    Per organ and kind ("real": a seen category's tumor; "synthetic"): a class-balanced logistic regression on the
    features at each position of the finest stage's grid (coarser stages upsampled), fitted on the slices of half
    the cases and scored as pixel AUROC on the other half. "auroc_context" adds each feature's 5x5 and 11x11
    neighbourhood means (what a query that sees a few centimetres could use); "auroc_organ_relative" adds each
    feature minus its mean over the organ in that slice (what a query that knows the organ's own appearance could use;
    the organ comes from the labels here). Per-position linear queries, as in the paper, work with what "auroc" sees.
    """
    size = tuple(bank.features[0].shape[-2:])
    step = bank.organs.shape[-1] // size[-1]
    organs, lesions = bank.organs[:, ::step, ::step].numpy(), bank.lesions[:, ::step, ::step].numpy()
    groups: dict[tuple[str, str], list[int]] = {}
    for index, category in enumerate(bank.categories):
        for lesion in np.unique(lesions[index][lesions[index] > 0]):
            organ = LESION_ORGANS[lesion - 1]
            groups.setdefault((organ, lesion_kind(category, organ)), []).append(index)
    rng = np.random.default_rng(seed)
    rows = []
    for (organ, kind), indices in sorted(groups.items()):
        cases = sorted({bank.cases[i] for i in indices})
        if len(cases) < 2:
            continue
        fit_cases = set(cases[::2])
        # per probe, fit / score -> (features, labels) of every lesion and organ position
        data = {name: {True: ([], []), False: ([], [])} for name in ("auroc", "auroc_context", "auroc_organ_relative")}
        for index in indices:
            features = torch.cat([F.interpolate(f[index:index + 1].float(), size=size, mode="bilinear",
                                                align_corners=False) for f in bank.features], 1)
            organ_mask = organ_voxels(organs[index], bank.modalities[index], organ)
            inside = lesions[index] == 1 + LESION_ORGANS.index(organ)
            organ_mean = features[0][:, torch.from_numpy(organ_mask | inside)].mean(1)  # the organ as seen
            neighbourhoods = [F.avg_pool2d(features, k, 1, k // 2, count_include_pad=False) for k in (5, 11)]
            probes = {"auroc": features, "auroc_context": torch.cat([features, *neighbourhoods], 1),
                      "auroc_organ_relative": torch.cat([features, features - organ_mean[None, :, None, None]], 1)}
            split = bank.cases[index] in fit_cases  # True: fit, False: score
            for name, probe in probes.items():
                for mask, label in ((inside, 1), (organ_mask & (lesions[index] == 0), 0)):
                    features_at = probe[0][:, torch.from_numpy(mask)].T
                    data[name][split][0].append(features_at)
                    data[name][split][1].append(torch.full((len(features_at),), float(label)))
        row = {"organ": organ, "kind": kind, "cases": len(cases)}
        for name, splits in data.items():
            (x_fit, y_fit), (x_score, y_score) = [(torch.cat(x), torch.cat(y))
                                                  for x, y in (splits[True], splits[False])]
            if y_fit.min() == y_fit.max() or y_score.min() == y_score.max():
                row[name] = float("nan")
                continue
            keep = np.concatenate([rng.permutation(np.flatnonzero(y_fit.numpy() == c))[:max_per_class] for c in (0, 1)])
            weights = _fit_logistic(x_fit[keep], y_fit[keep])
            row[name] = detection_auroc((x_score @ weights[:-1] + weights[-1]).numpy(), y_score.numpy().astype(int))
        rows.append(row)
    return rows


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-3) -> torch.Tensor:
    """Class-balanced L2 logistic regression (L-BFGS) -> (weights..., bias) in the original feature units."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    balance = torch.where(y > 0, 0.5 / y.mean(), 0.5 / (1 - y.mean()))
    parameters = torch.zeros(x.shape[1] + 1, requires_grad=True)
    optimizer = torch.optim.LBFGS([parameters], max_iter=200, line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        logits = z @ parameters[:-1] + parameters[-1]
        value = (balance * F.binary_cross_entropy_with_logits(logits, y, reduction="none")).mean()
        value = value + l2 * parameters[:-1].square().sum()
        value.backward()
        return value

    optimizer.step(loss)
    weights = parameters.detach()[:-1] / std
    return torch.cat([weights, (parameters.detach()[-1] - (weights * mean).sum())[None]])


def evaluate_heads(heads: TrainedHeads, backbone, text_encoder, config: HeadsConfig | None = None, *,
                   role: str = "unseen", tolerance_mm: float = 2.0, progress: bool = False,
                   shape=phantoms.DEFAULT_SHAPE) -> list[dict]:
    """AOVA-only results on the setting's unseen categories (test split): one row per category.

    ``role="seen"`` scores test cases of the categories the heads *were* trained on instead: the supervised upper bound
    of the zero-shot figures, on the same frozen model with the same recipe (the test split's seed is not the training
    seed, so the cases themselves are new)."""
    config = config or heads.config
    categories = role_categories(heads.setting, role)
    cases = list(split_cases(heads.setting, "test", config, shape, test_role=role))
    per_case = []
    for case in tqdm(cases, desc=f"test {heads.setting}", disable=not progress):
        organ = CATEGORY_ORGAN.get(case.category) or ("brain" if case.modality == "MRI" else None)
        organs = [organ] if organ else []
        if case.category == "healthy":  # a healthy case is scored once per evaluated organ of its region
            organs = [CATEGORY_ORGAN[c] for c in categories
                      if category_region(c) == case.region]
        features = volume_features(backbone, case.image, case.modality)
        for organ in dict.fromkeys(organs):
            detection = detect_case(heads, backbone, text_encoder, case.image, case.modality, organ, features=features)
            row = {"case": case.case_id, "category": case.category, "organ": organ, "score": detection.case_score}
            if case.category != "healthy":
                tumor = case.tumor.astype(bool)
                organ_truth = case.organ_mask(case.category) & ~tumor
                inside, outside = detection.anomaly[tumor].mean(), detection.anomaly[organ_truth].mean()
                row.update(dsc=dice(detection.kept, tumor),
                           nsd=surface_dice(detection.kept, tumor, case.spacing, tolerance_mm),
                           s_in=float(inside), s_out=float(outside))
            per_case.append(row)
    rows = []
    for category in categories:
        tumor_rows = [r for r in per_case if r["category"] == category]
        healthy_rows = [r for r in per_case if r["category"] == "healthy" and r["organ"] == CATEGORY_ORGAN[category]]
        scores = [r["score"] for r in tumor_rows + healthy_rows]
        labels = [1] * len(tumor_rows) + [0] * len(healthy_rows)
        s_in = float(np.mean([r["s_in"] for r in tumor_rows]))
        s_out = float(np.mean([r["s_out"] for r in tumor_rows]))
        rows.append({"setting": heads.setting, "category": category, "role": role, "cases": len(tumor_rows),
                     "dsc": float(np.mean([r["dsc"] for r in tumor_rows])),
                     "nsd": float(np.mean([r["nsd"] for r in tumor_rows])),
                     "auroc": detection_auroc(scores, labels) if healthy_rows else float("nan"),
                     "s_in": s_in, "s_out": s_out, "s_in_out_ratio": s_in / max(s_out, 1e-6),
                     "cases_s_higher_inside": sum(r["s_in"] > r["s_out"] for r in tumor_rows),
                     "thresholds": heads.thresholds.provenance})
    return rows
