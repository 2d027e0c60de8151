"""Shipped weights: ``models/registry.yaml`` lists every file of a model with its sha256.

Files are verified before loading; a changed or corrupt file is refused with a message that says
how to restore or rebuild it. ``record_model`` writes an entry after training.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

import yaml

from ..io import InputError, write_text_atomic

DEFAULT_MODEL = "phantom-foundation"


def models_root() -> Path:
    return Path(str(resources.files("diffugts_core.models")))


def registry_path() -> Path:
    return models_root() / "registry.yaml"


def load_registry() -> dict:
    path = registry_path()
    return yaml.safe_load(path.read_text()) or {} if path.is_file() else {}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def foundation_sha256(backbone) -> dict[str, str]:
    """sha256 of the weights of a foundation model loaded from a folder, by part: "vae" and "unet" for a diffusers
    folder (its components' weight files only, not a training run's checkpoints/ beside them), the file names for a
    MAISI bundle; {} for a model built in memory."""
    files = getattr(backbone, "files", None)  # a MAISI bundle's weight files
    if files is not None:
        return {p.name: sha256_file(p) for p in (files.autoencoder, files.diffusion)}
    source = getattr(backbone, "source", None)
    if source is None:
        return {}
    return {p.parent.name: sha256_file(p) for p in sorted(Path(source).glob("*/diffusion_pytorch_model.safetensors"))}


def encoder_part(backbone) -> str:
    """The part of ``foundation_sha256`` whose weights give the features that AOVA heads read."""
    files = getattr(backbone, "files", None)
    return "vae" if files is None else files.autoencoder.name


def verified_model_path(name: str = DEFAULT_MODEL, registry: dict | None = None, root: Path | None = None) -> Path:
    """The folder of a registered model, after checking every file's sha256."""
    registry = load_registry() if registry is None else registry
    if name not in registry:
        raise InputError(f"no registered model {name!r}; registered: {', '.join(registry) or 'none'}")
    entry = registry[name]
    folder = (root or models_root()) / entry["path"]
    for relative, expected in entry["files"].items():
        path = folder / relative
        if not path.is_file():
            raise InputError(f"{path}: missing file of model {name!r}; restore it (git checkout -- {path}) or "
                             f"rebuild the model: {entry['command']}")
        actual = sha256_file(path)
        if actual != expected:
            raise InputError(f"{path}: sha256 {actual[:12]}... does not match the registry ({expected[:12]}...); the "
                             f"file was changed or is corrupt. Restore it (git checkout -- {path}) or rebuild the "
                             f"model and its registry entry: {entry['command']}")
    return folder


def record_model(name: str, folder: Path, *, command: str, licence: str, description: str,
                 registry_file: Path | None = None) -> dict:
    """Hash every file under ``folder`` (weights and configs) into the registry entry ``name``."""
    registry_file = registry_file or registry_path()
    registry = yaml.safe_load(registry_file.read_text()) or {} if registry_file.is_file() else {}
    files = {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*"))
             if p.is_file() and "checkpoints" not in p.parts}
    registry[name] = {"path": str(folder.resolve().relative_to(registry_file.parent.resolve())),
                      "description": description, "licence": licence, "command": command,
                      "size_mb": round(sum((folder / f).stat().st_size for f in files) / 1e6, 2), "files": files}
    write_text_atomic(registry_file, "# Shipped models: every file with its sha256 (verified at load time).\n"
                      + yaml.safe_dump(registry, sort_keys=False))
    return registry[name]
