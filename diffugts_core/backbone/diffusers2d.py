"""The slice-wise diffusers backbone: ``AutoencoderKL`` + ``UNet2DConditionModel`` + a DDIM scheduler.

A 3D volume (RAS, in model space) becomes a batch of axial slices, optionally with neighbouring
slices as channels; results go back to 3D, so masks and metrics stay volumetric. The three encoder
stages are read with forward hooks on the VAE encoder's down blocks, not by forking diffusers.

A model folder holds ``vae/``, ``unet/`` and ``scheduler/`` as written by ``save_pretrained`` (and
``controlnet/`` where a ControlNet branch steers the UNet: ``controlled.py``) and a
small ``diffugts_backbone.json`` with what the diffusers configs do not say (slice shape, CT
intensity knots, the text encoder the UNet was trained with).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..io import InputError, write_text_atomic
from ..runtime import hub_unreachable_message, locate_pretrained, resolve_device
from .base import (Conditioning, IntensityMap, block_outputs, context_channels, ct_intensity_map,
                   mri_intensity_map)
from .controlled import ControlledUNet

BACKBONE_CONFIG = "diffugts_backbone.json"


@dataclass
class SliceBackboneConfig:
    slice_shape: tuple[int, int] = (128, 128)
    context_slices: int = 0  # neighbours on each side, stacked as channels
    # CT HU -> model space: soft tissue gets most of the range (40 HU = 0.12 model units, 3x MAISI's window)
    ct_knots_hu: tuple[float, ...] = (-1000.0, -200.0, 300.0, 1500.0)
    ct_values: tuple[float, ...] = (-1.0, -0.7, 0.8, 1.0)
    text_encoder: str = "all-MiniLM-L6-v2"
    max_length: int = 24
    # the organs whose map (cover fractions at the latent grid) an organ-aware UNet takes as extra input channels
    organ_channels: tuple[str, ...] = ()
    # slice offsets whose known latents (and unknown masks) a through-plane UNet takes as extra input channels, so that
    # it inpaints a slice from the structure running on above and below the lesion (empty: each slice on its own)
    denoiser_context: tuple[int, ...] = ()
    extra: dict = field(default_factory=dict)  # provenance written by training

    @classmethod
    def from_json(cls, text: str) -> "SliceBackboneConfig":
        data = json.loads(text)
        for key in ("slice_shape", "ct_knots_hu", "ct_values", "organ_channels", "denoiser_context"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


class DiffusersSliceBackbone:
    """A frozen 2D latent diffusion model used slice by slice (satisfies ``FrozenBackbone``)."""

    spatial_dims = 2

    def __init__(self, vae, unet, scheduler, config: SliceBackboneConfig = SliceBackboneConfig(), *, device="auto"):
        self.device = resolve_device(device)
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        self.unet = unet.to(self.device).eval().requires_grad_(False)
        self.scheduler = scheduler
        self.config = config
        self.source: Path | None = None  # the model folder, when loaded from one (reports hash its weights)
        expected = 1 + 2 * config.context_slices
        if vae.config.in_channels not in (expected, 3):
            raise InputError(f"the VAE takes {vae.config.in_channels} channels; this backbone makes {expected} "
                             "(1 + 2 x context_slices) or 3 (grey replicated for RGB models)")

    # ---- loading and saving -------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = "default", *, device="auto", verify: bool = True):
        """Load from a folder, a hub id, or ``"default"`` (the shipped phantom model, sha256-verified)."""
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

        from .registry import DEFAULT_MODEL, verified_model_path

        if str(name_or_path) == "default":
            name_or_path = verified_model_path(DEFAULT_MODEL) if verify else None
        source = locate_pretrained(name_or_path, what="diffusion model")
        try:
            # low_cpu_mem_usage=False: plain loading, no `accelerate` needed for these small models
            vae = AutoencoderKL.from_pretrained(source, subfolder="vae", low_cpu_mem_usage=False)
            unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", low_cpu_mem_usage=False)
            scheduler = DDIMScheduler.from_pretrained(source, subfolder="scheduler")
            if (Path(source) / "controlnet").is_dir():  # a UNet steered by a ControlNet branch (through-plane context)
                unet = ControlledUNet.from_pretrained(source, unet)
        except (OSError, ValueError) as exc:
            if Path(source).is_dir():
                raise InputError(f"{source}: not a diffusers model folder with vae/, unet/ and scheduler/ ({exc})") from None
            raise InputError(hub_unreachable_message(source, "diffusion model", f"loading failed ({exc})")) from None
        config_file = Path(source) / BACKBONE_CONFIG
        config = SliceBackboneConfig.from_json(config_file.read_text()) if config_file.is_file() else \
            SliceBackboneConfig(slice_shape=(vae.config.sample_size,) * 2)
        backbone = cls(vae, unet, scheduler, config, device=device)
        backbone.source = Path(source) if Path(source).is_dir() else None
        return backbone

    def save_pretrained(self, folder: str | Path) -> Path:
        folder = Path(folder)
        self.vae.save_pretrained(folder / "vae")
        if isinstance(self.unet, ControlledUNet):
            self.unet.save_pretrained(folder)
        else:
            self.unet.save_pretrained(folder / "unet")
        self.scheduler.save_pretrained(folder / "scheduler")
        write_text_atomic(folder / BACKBONE_CONFIG, json.dumps(asdict(self.config), indent=2) + "\n")
        return folder

    # ---- protocol attributes ------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def latent_downsample(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def organ_channels(self) -> tuple[str, ...]:
        """The organs an organ-aware denoiser takes a map of (empty for a denoiser without one)."""
        return self.config.organ_channels

    @property
    def denoiser_context(self) -> tuple[int, ...]:
        """The slice offsets a through-plane denoiser sees the known latents of (empty for one without)."""
        return self.config.denoiser_context

    @property
    def denoiser_multiple(self) -> int:
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def text_conditioned(self) -> bool:
        return self.unet.config.cross_attention_dim is not None

    def intensity(self, modality: str, volume: np.ndarray) -> IntensityMap:
        if modality.upper() == "CT":
            return ct_intensity_map(self.config.ct_knots_hu, self.config.ct_values)
        if modality.upper() == "MRI":
            return mri_intensity_map(volume)
        raise InputError(f"unknown modality {modality!r}; use CT or MRI")

    # ---- volumes <-> slice batches -------------------------------------------------------
    def volume_to_slices(self, volume: np.ndarray) -> torch.Tensor:
        """(X, Y, Z) model-space volume -> (Z, C, X, Y) axial slices, neighbours as channels."""
        volume = np.asarray(volume, np.float32)
        if volume.ndim != 3 or tuple(volume.shape[:2]) != tuple(self.config.slice_shape):
            raise InputError(f"volume of shape {volume.shape}: this backbone works on axial slices of "
                             f"{self.config.slice_shape}; resample or pad in-plane first (preprocess.plan_spatial)")
        k = self.config.context_slices
        padded = np.pad(volume, ((0, 0), (0, 0), (k, k)), mode="edge")
        slices = np.stack([padded[:, :, i:i + 2 * k + 1] for i in range(volume.shape[2])])  # (Z, X, Y, C)
        batch = torch.from_numpy(np.ascontiguousarray(slices.transpose(0, 3, 1, 2)))
        if self.vae.config.in_channels == 3 and batch.shape[1] == 1:
            batch = batch.repeat(1, 3, 1, 1)
        return batch

    def slices_to_volume(self, slices: torch.Tensor) -> np.ndarray:
        """(Z, C, X, Y) -> (X, Y, Z), keeping the centre channel (the mean for replicated RGB)."""
        slices = slices.detach().float().cpu()
        replicated = self.config.context_slices == 0 and slices.shape[1] == 3
        centre = slices.mean(1) if replicated else slices[:, slices.shape[1] // 2]
        return centre.permute(1, 2, 0).numpy()

    # ---- the frozen model -----------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        posterior = self.vae.encode(x.to(self.device)).latent_dist
        z = posterior.sample(generator) if sample else posterior.mean
        return z * self.scaling_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z.to(self.device) / self.scaling_factor).sample

    @torch.no_grad()
    def encode_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Three encoder stages, fine to coarse: the outputs of the VAE encoder's first three down blocks; for a VAE
        with two levels (one halving), the first block before its halving (the full grid), the second block and the
        middle block."""
        encoder = self.vae.encoder
        if len(encoder.down_blocks) >= 3:
            blocks = list(encoder.down_blocks)[:3]
        else:
            blocks = [encoder.down_blocks[0].resnets[-1], encoder.down_blocks[-1], encoder.mid_block]
        with block_outputs(blocks) as outputs:
            self.vae.encoder(x.to(self.device))
        return outputs

    @torch.no_grad()
    def denoise(self, z_t: torch.Tensor, t, cond: Conditioning | None) -> torch.Tensor:
        if cond is None or cond.tokens is None:
            raise ValueError("this denoiser is text-conditioned: pass a Conditioning (the empty prompt's token "
                             "states for an unconditional prediction)")
        cond = cond.expand(z_t.shape[0])
        mask = None if cond.attention_mask is None else cond.attention_mask.to(self.device)
        z_t = z_t.to(self.device)
        offsets = len(self.denoiser_context)
        organ_channels = self.unet.config.in_channels - self.latent_channels * (1 + offsets) - offsets
        if organ_channels:  # an organ-aware UNet: its map as extra channels (an empty map when none is known)
            organs = cond.organs if cond.organs is not None else \
                torch.zeros(z_t.shape[0], organ_channels, *z_t.shape[2:])
            if tuple(organs.shape) != (z_t.shape[0], organ_channels, *z_t.shape[2:]):
                raise ValueError(f"organ map of shape {tuple(organs.shape)} for latents {tuple(z_t.shape)}; the "
                                 f"denoiser takes {organ_channels} organ channels on the latent grid")
            z_t = torch.cat([z_t, organs.to(self.device, z_t.dtype)], 1)
        if offsets:  # a through-plane UNet: the neighbouring slices' known latents (none known when not given)
            batch, _, *grid = z_t.shape
            context = cond.context if cond.context is not None else context_channels(
                torch.zeros(batch, offsets, self.latent_channels, *grid), torch.ones(batch, offsets, *grid))
            if tuple(context.shape) != (batch, offsets * (self.latent_channels + 1), *grid):
                raise ValueError(f"context of shape {tuple(context.shape)} for latents {(batch, *grid)}; the denoiser "
                                 f"takes {offsets} neighbouring slices' latents and masks on the latent grid")
            z_t = torch.cat([z_t, context.to(self.device, z_t.dtype)], 1)
        return self.unet(z_t, t, encoder_hidden_states=cond.tokens.to(self.device), encoder_attention_mask=mask).sample
