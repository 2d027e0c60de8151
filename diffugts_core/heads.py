"""The small trained parts of one zero-shot setting (AOVA adapters, W_q, W_k, region head), with the configuration
they were trained with and their validated detection thresholds: saving, loading, and the shipped default. The
settings and their splits are in ``data.splits``; training is in ``training.heads``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from safetensors.torch import load_file, save_file

from .aova import AOVAHead
from .backbone.registry import verified_model_path
from .detect import DetectionThresholds, RegionHead
from .io import InputError, atomic_path, write_text_atomic


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
    foundation_sha256: dict[str, str] = field(default_factory=dict)  # the model trained on ({}: not recorded)

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
                "text_dim": self.aova.text_dim,
                **({"foundation_sha256": self.foundation_sha256} if self.foundation_sha256 else {})}
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
                   DetectionThresholds(**meta["thresholds"]), config, tuple(meta["abnormal_organs"]),
                   meta.get("foundation_sha256", {}))


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
