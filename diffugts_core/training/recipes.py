"""Train-or-reuse recipes: the heads a setting needs, and the supervised specialist of a category, trained once into a
folder and reused while their configuration holds."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..backbone import load_backbone
from ..data.splits import role_categories
from ..heads import HeadsConfig, TrainedHeads, cached_heads
from ..pipeline import DiffuGTSPipeline, check_trained_on
from ..residual import ResidualConfig, TrainedResidualHead, load_modality_heads
from ..text import TextEncoder
from ..vocabulary import category_modality
from .heads import train_heads
from .residual import modality_regions, train_modality_heads, train_residual_head
from .specialist import META, SpecialistConfig, TrainedSpecialist, shipped_specialist, train_specialist


def remove_residual_heads(folder: Path) -> None:
    """Delete the residual heads (residual.* and residual_<modality>.*) in a heads folder: they were trained on the
    AOVA heads that were there, and do not carry over to new ones."""
    for stale in Path(folder).glob("residual*.*"):
        if stale.suffix in (".json", ".safetensors"):
            stale.unlink()


def train_or_reuse_heads(folder: Path, config: HeadsConfig, backbone, text_encoder, *,
                         progress: bool = True) -> TrainedHeads:
    """The heads of ``config`` saved in ``folder``; trained and saved there first when missing or trained with
    another configuration (which also drops the residual heads trained on the old ones)."""
    heads = cached_heads(folder, config)
    if heads is None:
        heads = train_heads(backbone, text_encoder, config, progress=progress)
        heads.save(folder)
        remove_residual_heads(folder)
    return heads


def setting_pipeline(setting: str, heads_cache: Path | None, *, model: str | Path = "default",
                     progress: bool = False):
    """The pipeline on foundation ``model`` with the heads of ``setting``: the `train-heads` folder
    ``heads_cache/<setting>`` (the same cache as `evaluate-aova --heads-cache`), trained there first (AOVA heads, then
    the residual heads: the MRI head only where the setting's test cases are MRI) when it is missing or was trained
    with another configuration than the defaults; for seen -> unseen on the shipped model, the shipped heads unless
    that folder exists. The residual heads' pseudo-healthy training images are cached in
    ``heads_cache/pseudo_healthy``. A cache serves one model: cached heads that record another encoder are refused
    (``pipeline.check_trained_on``) before any residual head is trained on them, not retrained here."""
    shipped_model = str(model) == "default"
    if (setting == "seen-unseen" and shipped_model
            and (heads_cache is None or not (Path(heads_cache) / setting).is_dir())):
        return DiffuGTSPipeline.from_pretrained()
    if heads_cache is None:
        needs = "its own heads" if shipped_model else f"heads trained on {model}"
        raise ValueError(f"setting {setting} needs {needs}: pass --heads-cache DIR, where they are trained once "
                         "(about 15 min per setting on 2 cores with the shipped model) and reused")
    folder = Path(heads_cache) / setting
    config = HeadsConfig(setting=setting)
    backbone = load_backbone(model)
    text_encoder = TextEncoder.from_pretrained(backbone.config.text_encoder)
    heads = train_or_reuse_heads(folder, config, backbone, text_encoder, progress=progress)
    check_trained_on(backbone, model, folder, heads)  # before an hour of residual training on them, not after
    cache = Path(heads_cache) / "pseudo_healthy"
    if not (folder / "residual.json").is_file() or stale(TrainedResidualHead.load(folder)):
        train_residual_head(heads, backbone, text_encoder, cache=cache, progress=progress).save(folder)
    needed = set(modality_regions(heads)) & evaluated_modalities(setting)  # MRI for ct-mri; none for the CT settings
    modality_heads = load_modality_heads(folder)
    if any(m not in modality_heads or stale(modality_heads[m]) for m in needed):
        for head in train_modality_heads(heads, backbone, text_encoder, cache=cache, progress=progress):
            head.save(folder)
    return DiffuGTSPipeline.from_pretrained(folder, model=model)


def stale(residual_head: TrainedResidualHead) -> bool:
    """Whether a cached residual head was trained with another configuration than the defaults; the refinement reach
    is the heads' own choice (`train-heads --organ-reach`, chosen on validation), not a sign of staleness."""
    return residual_head.config != replace(ResidualConfig(), organ_reach=residual_head.config.organ_reach)


def evaluated_modalities(setting: str) -> set[str]:
    """The modalities of a setting's unseen (test) categories."""
    return {category_modality(category) for category in role_categories(setting, "unseen")}


def specialist_for(category: str, cache: Path | None = None, *, progress: bool = False) -> TrainedSpecialist:
    """The supervised specialist of ``category`` (a calibration row of the benchmark) with the default configuration:
    the one in ``cache/specialist-<category>``; else the shipped one; else trained now (a few CPU minutes) and saved
    there when there is a cache. A cached one of another configuration is trained again."""
    config = SpecialistConfig(category=category)
    folder = None if cache is None else Path(cache) / f"specialist-{category}"
    if folder is not None and (folder / META).is_file():
        cached = TrainedSpecialist.load(folder)
        if cached.config == config:
            return cached
    shipped = shipped_specialist(category)
    if shipped is not None and (folder is None or not folder.is_dir()):
        return shipped
    trained = train_specialist(config, progress=progress)
    if folder is not None:
        trained.save(folder)
    return trained
