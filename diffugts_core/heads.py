"""The small trained parts (AOVA adapters, W_q, W_k, region head) for one zero-shot setting.

A setting decides which tumor categories may be seen (DESIGN section 5, ``manifests.category_role``):
``loo-<category>`` (leave one CT category out), ``seen-unseen`` ({liver, kidney, pancreas} seen,
{lung, colon, hepatic_vessel} unseen), ``ct-mri`` (all CT categories seen, MRI brain unseen). Cases of
a category held out in the setting are never generated for its training or validation data, and the
abnormal prompt of its organ is not among the training prompts. Thresholds come from a validation
split of the seen categories (another PhantomBench seed), never from test cases. Healthy cases
are part of training so the maps learn what normal looks like.

Beyond the paper (switchable, ``synthetic_anomalies``): every training case also gets a few synthetic
anomalies, each a smooth random blob in a random organ of its modality, filled either with another tissue
of the same image (foreign tissue) or with the organ made 30-150 HU (MRI: 15-60 %) brighter or darker,
labelled abnormal for that organ. It teaches the maps "different from
this organ's normal appearance" rather than "looks like a seen tumor type"; it comes from no tumor
category, held out or not.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from scipy import ndimage
from tqdm.auto import tqdm

from . import phantoms
from .aova import (IGNORE, LESION_ORGANS, AOVAHead, anomaly_map, aova_loss, build_prompt_set, organ_voxels,
                   prompt_targets, run_aova, stage_anomaly_maps, volume_features)
from .backbone.registry import verified_model_path
from .detect import DetectionThresholds, RegionHead, detect_case, find_regions
from .io import InputError, atomic_path, write_text_atomic
from .manifests import category_role
from .metrics import detection_auroc, dice, surface_dice
from .vocabulary import CATEGORIES, CATEGORY_ORGAN, CT_CATEGORIES, ORGAN_KEYS, category_region, organ_modality

SETTINGS = tuple(f"loo-{c}" for c in CT_CATEGORIES) + ("seen-unseen", "ct-mri")
# PhantomBench seeds of the splits. "refine" trains the residual head: seen categories like "train", but cases the AOVA
# heads never fitted, so the head learns how S behaves on new cases, not on the heads' own training cases.
SEEDS = {"train": 2000, "validation": 2001, "refine": 2002, "test": 3000}


def setting_categories(setting: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(seen, unseen) tumor categories of a setting."""
    if setting not in SETTINGS:
        raise InputError(f"unknown setting {setting!r}; choose from {', '.join(SETTINGS)}")
    name, held_out = (("loo", setting[4:]) if setting.startswith("loo-") else
                      ("seen_unseen" if setting == "seen-unseen" else "mri", None))
    roles = {c: category_role(c, name, held_out) for c in CATEGORIES}
    return (tuple(c for c, r in roles.items() if r == "train"), tuple(c for c, r in roles.items() if r == "test"))


def role_categories(setting: str, role: str) -> tuple[str, ...]:
    """The categories a setting's heads see in training (``"seen"``) or meet only at test time (``"unseen"``)."""
    if role not in ("seen", "unseen"):
        raise ValueError(f"role must be 'seen' or 'unseen', not {role!r}")
    return setting_categories(setting)[role == "unseen"]


@dataclass
class HeadsConfig:
    setting: str = "seen-unseen"
    train_per_category: int = 4
    healthy_per_region: int = 4
    validation_per_category: int = 2
    test_per_category: int = 2  # test cases per unseen category, and healthy test cases per region
    steps: int = 3000
    batch: int = 12
    lr: float = 2e-3
    dim: int = 64
    adapter_alpha: float = 0.5  # a in F' = a * T(F) + (1 - a) * F (the paper starts at 0.1; 0.5 won on validation)
    seed: int = 0
    synthetic_anomalies: int = 3  # per training case, in random organs (0: off, the paper's setup)


@dataclass
class TrainedHeads:
    """AOVA head + region head + the prompts they were trained with + validated thresholds."""

    aova: AOVAHead
    region: RegionHead
    setting: str
    seen: tuple[str, ...]
    thresholds: DetectionThresholds
    config: HeadsConfig
    abnormal_organs: tuple[str, ...] = ()  # organs whose abnormal prompt was a training target

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"aova.{k}": v for k, v in self.aova.state_dict().items()}
        tensors.update({f"region.{k}": v for k, v in self.region.state_dict().items()})
        with atomic_path(folder / "heads.safetensors", suffix=".safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        meta = {"setting": self.setting, "seen": list(self.seen), "abnormal_organs": list(self.abnormal_organs),
                "thresholds": asdict(self.thresholds),
                "config": asdict(self.config), "stage_channels": list(self.aova.stage_channels),
                "text_dim": self.aova.text_dim}
        write_text_atomic(folder / "heads.json", json.dumps(meta, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "TrainedHeads":
        folder = Path(folder)
        meta = json.loads((folder / "heads.json").read_text())
        config = HeadsConfig(**meta["config"])
        aova = AOVAHead(meta["stage_channels"], meta["text_dim"], config.dim, alpha=config.adapter_alpha)
        region = RegionHead(meta["stage_channels"], meta["text_dim"], config.dim)
        tensors = load_file(folder / "heads.safetensors")
        aova.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("aova.")})
        region.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("region.")})
        return cls(aova.eval(), region.eval(), meta["setting"], tuple(meta["seen"]),
                   DetectionThresholds(**meta["thresholds"]), config, tuple(meta["abnormal_organs"]))


DEFAULT_HEADS = "aova-heads-seen-unseen"  # registry name of the shipped heads (seen: liver, kidney, pancreas)


def heads_folder(name_or_path: str | Path = "default") -> Path:
    """The folder of trained heads: a path, or a registry name ("default": the shipped seen -> unseen heads),
    whose files' sha256 are checked against the registry."""
    if Path(name_or_path).is_dir():
        folder = Path(name_or_path)
        if not (folder / "heads.json").is_file():
            raise InputError(f"{folder}: no heads.json; point to a folder written by `diffugts train-heads`")
        return folder
    return verified_model_path(DEFAULT_HEADS if name_or_path == "default" else str(name_or_path))


def load_heads(name_or_path: str | Path = "default") -> TrainedHeads:
    """Trained heads from a folder or a registry name (see ``heads_folder``)."""
    return TrainedHeads.load(heads_folder(name_or_path))


def cached_heads(folder: Path, config: HeadsConfig) -> TrainedHeads | None:
    """Heads saved in ``folder`` if they were trained with ``config`` (the test split's size aside), else None."""
    if not (folder / "heads.json").is_file():
        return None
    heads = TrainedHeads.load(folder)
    return heads if replace(heads.config, test_per_category=config.test_per_category) == config else None


# ---- data --------------------------------------------------------------------------------------

def split_cases(setting: str, split: str, config: HeadsConfig, shape=phantoms.DEFAULT_SHAPE, *,
                test_role: str = "unseen"):
    """PhantomBench cases of a split. Train, refine and validation hold seen categories + healthy only. The test split holds
    the unseen categories, or with ``test_role="seen"`` test cases of the seen ones (for a supervised upper bound)."""
    seed = SEEDS[split]
    if split == "test":
        categories = role_categories(setting, test_role)
        per_category = healthy = config.test_per_category
    else:
        categories = role_categories(setting, "seen")
        training = split in ("train", "refine")
        per_category = config.train_per_category if training else config.validation_per_category
        healthy = config.healthy_per_region if training else 1
    regions = sorted({category_region(c) for c in categories})
    for category in categories:
        for index in range(per_category):
            yield phantoms.generate_case(category, index, seed, shape)
    for region in regions if split == "test" else ("abdomen", "thorax", "brain"):
        for index in range(healthy):
            yield phantoms.generate_case("healthy", index, seed, shape, region=region)


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


# ---- training -----------------------------------------------------------------------------------

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
    heads = TrainedHeads(aova, region, config.setting, seen, DetectionThresholds(), config, abnormal)
    _fit(heads, bank, prompt_sets, config, rng, progress)
    validation = list(split_cases(config.setting, "validation", config, shape))
    heads.thresholds = choose_thresholds(heads, backbone, text_encoder, validation)
    return heads


def training_bank(backbone, config: HeadsConfig, rng: np.random.Generator, progress: bool = False,
                  shape=phantoms.DEFAULT_SHAPE) -> SliceBank:
    """The training slices of a setting; a fresh ``default_rng(config.seed)`` gives the bank the heads were trained on."""
    return build_slice_bank(backbone, split_cases(config.setting, "train", config, shape), rng=rng,
                            synthetic=config.synthetic_anomalies, progress=progress)


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
            values.setdefault((organ, _lesion_kind(bank.categories[index], organ)), []).append(means)
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
            groups.setdefault((organ, _lesion_kind(category, organ)), []).append(index)
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


def _lesion_kind(category: str | None, organ: str) -> str:
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


# ---- inference --------------------------------------------------------------------------------


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


# ---- evaluation -------------------------------------------------------------------------------

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
