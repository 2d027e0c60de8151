"""Frozen foundation diffusion models behind one protocol (see ``base.FrozenBackbone``)."""

from .attention import capture_cross_attention, word_maps
from .base import Conditioning, FrozenBackbone, IntensityMap
from .diffusers2d import DiffusersSliceBackbone, SliceBackboneConfig
from .registry import DEFAULT_MODEL, verified_model_path


def load_backbone(name_or_path="default", *, device="auto", verify: bool = True) -> DiffusersSliceBackbone:
    """The shipped phantom model (``"default"``), a diffusers model folder, or a hub id."""
    return DiffusersSliceBackbone.from_pretrained(name_or_path, device=device, verify=verify)


__all__ = ["Conditioning", "DEFAULT_MODEL", "DiffusersSliceBackbone", "FrozenBackbone", "IntensityMap",
           "SliceBackboneConfig", "capture_cross_attention", "load_backbone", "verified_model_path", "word_maps"]
