"""The supervised specialist: a calibration row of the zero-shot benchmark (DESIGN section 5), never a zero-shot method.

A plain MONAI ``BasicUNet``, 2D over 2.5D input (each slice with its neighbours as channels), trained from scratch at
the phantoms' full resolution on the training cases of the one tumor category it is scored on, with Dice + BCE: the
nnU-Net-style ceiling the zero-shot rows are read against. Its threshold is fitted on validation cases of that
category (another PhantomBench seed), never on test cases. Saved as safetensors with a JSON beside it, like the heads;
three are shipped (``models/specialists/<category>``, sha256 in ``models/registry.yaml``) for the benchmark CI runs.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.networks.nets import BasicUNet
from safetensors.torch import load_file, save, save_file
from tqdm.auto import tqdm

from ..backbone.registry import load_registry, verified_model_path
from ..data import phantoms
from ..data.splits import SEEDS
from ..io import InputError, atomic_path, write_text_atomic
from ..metrics import dice
from ..residual import final_mask
from ..runtime import resolve_device

WEIGHTS, META = "specialist.safetensors", "specialist.json"
THRESHOLD_GRID = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # fitted on validation cases of the category


@dataclass
class SpecialistConfig:
    category: str = "lung"
    features: tuple[int, ...] = (16, 16, 32, 64, 128, 16)  # BasicUNet widths: 0.5 M parameters, 2 MB
    context: int = 1  # neighbouring slices on each side, as input channels (2.5D)
    train_cases: int = 40  # cases of the category from the training seed (16 left colon at 0.12 validation DSC)
    validation_cases: int = 4  # cases of the category from the validation seed: the threshold, the reported DSC
    steps: int = 1500  # 600 left hepatic vessel at 0.26 validation DSC, 1,500 at 0.45 (16 cases)
    crop: int = 64  # training patches (pixels, full resolution); inference slides the same window over each slice
    batch: int = 16
    tumor_fraction: float = 0.5  # share of training patches that hold tumor: the tumors are 100-1,300 voxels
    lr: float = 2e-3
    min_voxels: int = 10  # smaller components of the mask are dropped, as in the pipeline
    seed: int = 0

    @classmethod
    def from_dict(cls, data: dict) -> "SpecialistConfig":
        return cls(**{**data, "features": tuple(data["features"])})


def specialist_network(config: SpecialistConfig) -> BasicUNet:
    return BasicUNet(spatial_dims=2, in_channels=2 * config.context + 1, out_channels=1, features=config.features)


def specialist_intensity(image: np.ndarray, modality: str) -> np.ndarray:
    """CT: the residual head's soft-tissue window, (HU - 40) / 200 clipped to +-3; MRI: the volume's 1st to 99th
    percentile mapped to [-1, 1] (MRI has no absolute scale)."""
    image = np.asarray(image, np.float32)
    if modality.upper() == "CT":
        return np.clip((image - 40.0) / 200.0, -3.0, 3.0)
    low, high = np.percentile(image, (1, 99))
    return (2.0 * (image - low) / max(float(high - low), 1e-6) - 1.0).astype(np.float32)


def slice_stacks(intensity: np.ndarray, slices: np.ndarray, context: int) -> np.ndarray:
    """(N, 2 * context + 1, X, Y): each slice of ``slices`` with its neighbours (repeated at the volume's ends)."""
    offsets = np.arange(-context, context + 1)
    index = np.clip(np.asarray(slices)[:, None] + offsets[None], 0, intensity.shape[-1] - 1)
    return np.ascontiguousarray(intensity[..., index].transpose(2, 3, 0, 1))


@dataclass
class TrainedSpecialist:
    network: BasicUNet
    config: SpecialistConfig
    threshold: float = 0.5
    provenance: str = "fixed at 0.5"
    validation_dsc: float | None = None
    training_s: float | None = None

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @torch.no_grad()
    def probability(self, image: np.ndarray, modality: str, batch: int = 16) -> np.ndarray:
        """The tumor probability of every voxel of a volume on the processing grid."""
        self.network.eval()
        intensity = specialist_intensity(image, modality)
        out = np.zeros(image.shape, np.float32)
        window = [min(self.config.crop, n) for n in image.shape[:2]]
        for start in range(0, image.shape[-1], batch):
            slices = np.arange(start, min(start + batch, image.shape[-1]))
            x = torch.from_numpy(slice_stacks(intensity, slices, self.config.context)).to(self.device)
            # the windows it was trained on, overlapping by half and blended with Gaussian weights (nnU-Net's way)
            logits = sliding_window_inference(x, window, batch, self.network, overlap=0.5, mode="gaussian")
            out[..., slices] = torch.sigmoid(logits[:, 0]).permute(1, 2, 0).cpu().numpy()
        return out

    def segment(self, image: np.ndarray, modality: str) -> np.ndarray:
        """The tumor mask: the probability above the fitted threshold, small components dropped."""
        return final_mask(self.probability(image, modality), self.threshold, np.ones(image.shape, bool),
                          self.config.min_voxels)

    def weights_sha256(self) -> str:
        """sha256 of the weights as saved (the bytes of specialist.safetensors)."""
        return hashlib.sha256(save(self._tensors())).hexdigest()

    def summary(self) -> dict:
        """What results.json records of it: configuration, threshold with provenance, validation DSC, weights."""
        return {"config": asdict(self.config), "threshold": self.threshold, "threshold_provenance": self.provenance,
                "validation_dsc": self.validation_dsc, "weights_sha256": self.weights_sha256()}

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.network.state_dict().items()}

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / WEIGHTS, suffix=".safetensors") as tmp:
            save_file(self._tensors(), str(tmp))
        meta = {"category": self.config.category, "network": "monai.networks.nets.BasicUNet (2D, 2.5D input)",
                "config": asdict(self.config), "threshold": self.threshold, "threshold_provenance": self.provenance,
                "validation_dsc": self.validation_dsc, "training_s": self.training_s,
                "parameters": sum(p.numel() for p in self.network.parameters())}
        write_text_atomic(folder / META, json.dumps(meta, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path, device="auto") -> "TrainedSpecialist":
        folder = Path(folder)
        if not (folder / META).is_file():
            raise InputError(f"{folder}: no {META}; train a specialist there with `diffugts train-specialist`")
        meta = json.loads((folder / META).read_text())
        config = SpecialistConfig.from_dict(meta["config"])
        network = specialist_network(config)
        network.load_state_dict(load_file(folder / WEIGHTS))
        return cls(network.to(resolve_device(device)).eval(), config, meta["threshold"], meta["threshold_provenance"],
                   meta["validation_dsc"], meta["training_s"])


def registry_name(category: str) -> str:
    return f"specialist-{category}"


def shipped_specialist(category: str, device="auto") -> TrainedSpecialist | None:
    """The shipped specialist of ``category`` (files checked against the registry), or None when none is shipped."""
    registry = load_registry()
    if registry_name(category) not in registry:
        return None
    return TrainedSpecialist.load(verified_model_path(registry_name(category), registry), device)


def category_cases(category: str, split: str, count: int, shape=phantoms.DEFAULT_SHAPE):
    """``count`` cases of ``category`` from the PhantomBench seed of ``split`` (train or validation, never test), one
    at a time (40 whole cases would hold 0.4 GB)."""
    if split == "test":
        raise ValueError("a specialist never sees test cases")
    for index in range(count):
        yield phantoms.generate_case(category, index, SEEDS[split], shape)


def train_specialist(config: SpecialistConfig, *, cases: list | None = None, validation: list | None = None,
                     device="auto", progress: bool = True) -> TrainedSpecialist:
    """Train a specialist from scratch on ``cases`` (default: ``config.train_cases`` cases of its category from the
    training seed), then fit its threshold on ``validation`` (default: cases from the validation seed; none: 0.5).
    A case is anything with ``image``, ``tumor`` and ``modality``; ``cases`` may be any iterable of them."""
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    cases = category_cases(config.category, "train", config.train_cases) if cases is None else cases
    source = f"{len(validation or ())} validation cases given"
    if validation is None:
        validation = list(category_cases(config.category, "validation", config.validation_cases))
        source = (f"validation cases of {config.category} (PhantomBench seed {SEEDS['validation']}, "
                  f"{len(validation)} cases)")
    volumes, tumors = zip(*[(specialist_intensity(case.image, case.modality), np.asarray(case.tumor) > 0)
                            for case in cases])
    tumor_voxels = [(i, *voxel) for i, tumor in enumerate(tumors) for voxel in np.argwhere(tumor)]
    if not tumor_voxels:
        raise ValueError("the training cases hold no tumor voxel")
    device = resolve_device(device)
    network = specialist_network(config).to(device)
    optimiser = torch.optim.AdamW(network.parameters(), lr=config.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, config.steps)
    loss_fn = DiceCELoss(sigmoid=True, batch=True)  # Dice over the batch: half the patches hold no tumor
    network.train()
    for _ in tqdm(range(config.steps), desc=f"specialist {config.category}", disable=not progress):
        patches = [_patch(volumes, tumors, tumor_voxels, config, rng) for _ in range(config.batch)]
        x, y = (torch.from_numpy(np.stack(arrays)).to(device) for arrays in zip(*patches))
        loss = loss_fn(network(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
    trained = TrainedSpecialist(network.eval(), config)
    if validation:
        fit_threshold(trained, validation, source)
    trained.training_s = round(time.perf_counter() - start, 1)
    return trained


def _patch(volumes: list, tumors: list, tumor_voxels: list, config: SpecialistConfig, rng) -> tuple:
    """One training patch (input stack, tumor target): around a random tumor voxel (anywhere in the patch) with
    probability ``tumor_fraction``, else anywhere in a random case."""
    if rng.random() < config.tumor_fraction:
        i, x, y, z = tumor_voxels[rng.integers(len(tumor_voxels))]
    else:
        i = int(rng.integers(len(volumes)))
        x, y, z = (int(rng.integers(n)) for n in volumes[i].shape)
    size = [min(config.crop, n) for n in volumes[i].shape[:2]]
    x0, y0 = (int(np.clip(c - rng.integers(s), 0, n - s)) for c, s, n in zip((x, y), size, volumes[i].shape))
    window = (slice(x0, x0 + size[0]), slice(y0, y0 + size[1]))
    stack = slice_stacks(volumes[i][window], np.array([z]), config.context)[0]
    return stack, tumors[i][window + (z,)][None].astype(np.float32)


def fit_threshold(specialist: TrainedSpecialist, validation: list, source: str) -> None:
    """The threshold of ``THRESHOLD_GRID`` with the best mean DSC on ``validation`` (the lowest among equals)."""
    scored = [(specialist.probability(case.image, case.modality), np.asarray(case.tumor) > 0) for case in validation]
    means = {t: float(np.mean([dice(final_mask(p, t, np.ones(p.shape, bool), specialist.config.min_voxels), tumor)
                               for p, tumor in scored])) for t in THRESHOLD_GRID}
    specialist.threshold = max(means, key=means.get)
    specialist.validation_dsc = round(means[specialist.threshold], 4)
    specialist.provenance = f"{source}: mean DSC {specialist.validation_dsc:.3f}"
