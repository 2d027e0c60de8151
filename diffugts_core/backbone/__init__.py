"""Frozen foundation diffusion models behind one protocol (see ``base.FrozenBackbone``)."""

from pathlib import Path

from .attention import capture_cross_attention, word_maps
from .base import Conditioning, FrozenBackbone, IntensityMap
from .diffusers2d import DiffusersSliceBackbone, SliceBackboneConfig
from .registry import DEFAULT_MODEL, verified_model_path


def is_maisi_model(name_or_path) -> bool:
    """Whether ``name_or_path`` is a MAISI bundle folder. A bundle keeps its network configs in configs/ (a diffusers
    folder has none), so MONAI's generative networks are imported only for such a folder."""
    if not (Path(str(name_or_path)).expanduser() / "configs").is_dir():
        return False
    from .maisi import is_maisi_bundle

    return is_maisi_bundle(name_or_path)


def load_backbone(name_or_path="default", *, device="auto", verify: bool = True) -> FrozenBackbone:
    """The shipped phantom model (``"default"``), a diffusers model folder, a hub id, or a MAISI bundle folder."""
    if is_maisi_model(name_or_path):
        from .maisi import MaisiBackbone

        return MaisiBackbone.from_bundle(name_or_path, device=device)
    return DiffusersSliceBackbone.from_pretrained(name_or_path, device=device, verify=verify)


__all__ = ["Conditioning", "DEFAULT_MODEL", "DiffusersSliceBackbone", "FrozenBackbone", "IntensityMap",
           "SliceBackboneConfig", "capture_cross_attention", "is_maisi_model", "load_backbone", "verified_model_path",
           "word_maps"]
