"""The protocol every frozen foundation model satisfies, and the intensity maps backbones own.

A backbone maps images to its own model space and back, encodes to latents and decodes, exposes
the encoder's three internal stages (for AOVA), predicts noise ``denoise(z_t, t, cond)`` and carries
its inference scheduler. The stages that use it (aova, detect, inpaint, residual) only see this
protocol, so a 3D backbone (MAISI) plugs in beside the 2D slice-wise one: for a 2D backbone a
"batch" is a stack of axial slices (N, C, H, W); for a 3D one it is (N, C, D, H, W).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from ..io import InputError


@runtime_checkable
class FrozenBackbone(Protocol):
    spatial_dims: int  # 2: slice-wise; 3: volumetric
    latent_channels: int
    latent_downsample: int  # pixels per latent cell along each axis
    denoiser_multiple: int  # a latent window the denoiser takes must be a multiple of this along each axis
    scaling_factor: float  # latents are scaled by this before diffusion (as in Stable Diffusion)
    text_conditioned: bool
    organ_channels: tuple[str, ...]  # the organs an organ-aware denoiser takes a map of (empty: none)
    denoiser_context: tuple[int, ...]  # slice offsets a through-plane denoiser sees the known latents of
    scheduler: object  # a diffusers scheduler with set_timesteps / step / add_noise
    device: torch.device

    def intensity(self, modality: str, volume: np.ndarray) -> "IntensityMap": ...

    def encode_features(self, x: torch.Tensor) -> list[torch.Tensor]: ...

    def encode(self, x: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor: ...

    def decode(self, z: torch.Tensor) -> torch.Tensor: ...

    def denoise(self, z_t: torch.Tensor, t: torch.Tensor | int, cond: "Conditioning | None") -> torch.Tensor: ...


@dataclass
class Conditioning:
    """What the denoiser is conditioned on: token states (+ mask) for text-conditioned models."""

    tokens: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    # for an organ-aware denoiser: (B, organs, x, y) cover fractions of its organs at the latent grid (None: no map)
    organs: torch.Tensor | None = None
    # for a through-plane denoiser: (B, offsets x (latent + 1), x, y), the known latents of its neighbouring slices and
    # where they are unknown (``context_channels``; None: nothing known)
    context: torch.Tensor | None = None

    def expand(self, batch: int) -> "Conditioning":
        if self.tokens is None or self.tokens.shape[0] == batch:
            return self
        if self.tokens.shape[0] != 1:
            raise ValueError(f"conditioning batch {self.tokens.shape[0]} cannot broadcast to {batch}")
        mask = None if self.attention_mask is None else self.attention_mask.expand(batch, -1)
        return Conditioning(self.tokens.expand(batch, -1, -1), mask, self.organs, self.context)


def context_channels(latents: torch.Tensor, unknown: torch.Tensor) -> torch.Tensor:
    """(B, O, C, x, y) latents of O neighbouring slices and (B, O, x, y) their unknown cells (1: to be generated, or
    no such slice) -> (B, O x (C + 1), x, y), what a through-plane denoiser takes beside z_t: the known latents (0
    where unknown), then the unknown masks. Training and inpainting build it alike here."""
    unknown = unknown.to(latents.dtype)
    return torch.cat([(latents * (1 - unknown[:, :, None])).flatten(1, 2), unknown], 1)


def organ_cover(index_slices: torch.Tensor, channels: int, downsample: int) -> torch.Tensor:
    """(B, X, Y) organ indices (0: none, i + 1: the i-th organ channel) -> (B, channels, X / d, Y / d): the share of
    each latent cell each organ covers (the map an organ-aware denoiser takes)."""
    one_hot = torch.nn.functional.one_hot(index_slices.long(), channels + 1)[..., 1:]
    return torch.nn.functional.avg_pool2d(one_hot.permute(0, 3, 1, 2).float(), downsample)


@dataclass(frozen=True)
class IntensityMap:
    """A monotone piecewise-linear map from image intensity to model space [-1, 1], and its inverse.

    CT uses fixed HU knots; MRI uses the volume's own percentiles (so ``inverse`` restores its scale).
    """

    knots: tuple[float, ...]  # image intensities, increasing
    values: tuple[float, ...]  # model values at the knots, increasing from -1 to 1

    def forward(self, image: np.ndarray) -> np.ndarray:
        return np.interp(image, self.knots, self.values).astype(np.float32)

    def inverse(self, model: np.ndarray) -> np.ndarray:
        return np.interp(model, self.values, self.knots).astype(np.float32)

    def slope_at(self, intensity: float) -> float:
        """Model units per image unit at an intensity: how visible a contrast is to the model."""
        i = int(np.clip(np.searchsorted(self.knots, intensity) - 1, 0, len(self.knots) - 2))
        return (self.values[i + 1] - self.values[i]) / (self.knots[i + 1] - self.knots[i])


def ct_intensity_map(knots_hu: Sequence[float], values: Sequence[float]) -> IntensityMap:
    return IntensityMap(tuple(float(k) for k in knots_hu), tuple(float(v) for v in values))


def mri_intensity_map(volume: np.ndarray, lower_percentile: float = 0.0, upper_percentile: float = 99.5) -> IntensityMap:
    """Percentiles of the volume -> [-1, 1] (values beyond are clipped)."""
    lower, upper = (float(v) for v in np.percentile(volume, [lower_percentile, upper_percentile]))
    if not upper > lower:
        raise InputError(f"the MRI volume is constant ({lower:g}); nothing to normalise")
    return IntensityMap((lower, upper), (-1.0, 1.0))


@contextmanager
def block_outputs(modules):
    """Within the block, a list that holds each module's latest output (forward hooks, removed on leaving)."""
    outputs: list = [None] * len(modules)

    def keeper(i):
        def hook(_module, _inputs, output):
            outputs[i] = output
        return hook

    handles = [m.register_forward_hook(keeper(i)) for i, m in enumerate(modules)]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()
