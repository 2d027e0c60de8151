"""ROI sub-volume latent inpainting for 3D backbones (MAISI): a pseudo-healthy region generated in a latent crop
around it, so the cost grows with the lesion, not with the volume.

The loop is the RePaint-style one of ``inpaint.py`` on 5D latents: the masked latent cells are generated from noise,
the others follow the encoded image re-noised to each step's level, z_next = m * step(z_t) + (1 - m) * noised(z_0),
with optional jumps back (RePaint's resampling). MAISI is not text-conditioned, so there is no guidance.

``crop=True`` encodes, denoises and decodes only a window around the ROI: the bounding box of its latent cells grown
by ``context`` cells on each side, each side rounded up to the denoiser's multiple (8 latent cells for MAISI) and kept
inside the volume. ``crop=False`` runs the same loop on the whole volume. Both draw their noise for the whole latent
grid from the seed and cut their window out of it, and both follow the schedule MAISI sets for the whole grid, so a
crop differs from the whole volume only by what the networks see beyond the window's edge.

:class:`LatentSchedule` drives MONAI's two schedulers as ``MaisiBackbone`` carries them (checked in MONAI 1.6.1):

- ``RFlowScheduler.set_timesteps(steps, input_img_size_numel=...)``: with ``use_timestep_transform`` (MAISI's
  setting) the timesteps shift toward noise for larger grids; MAISI passes the latent grid's cell count.
  ``step(velocity, t, z, next_t)`` returns (z at next_t, predicted z_0); MAISI's loop ends with next_t = 0.
  ``add_noise(z_0, eps, t)`` = (1 - t/T) z_0 + (t/T) eps.
- ``DDPMScheduler.set_timesteps(steps)``; ``step(eps, t, z, generator)`` returns (z at t - 1, predicted z_0): one
  *training* timestep whatever the inference schedule, so it is right only when the schedule walks every timestep
  (MAISI's ddpm runs 1000 steps). A shorter schedule steps between its own timesteps deterministically (DDIM, eta 0)
  on the scheduler's own ``alphas_cumprod``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.schedulers import DDPMScheduler, RFlowScheduler
from tqdm.auto import tqdm

from .backbone.base import block_outputs
from .io import InputError


@dataclass(frozen=True)
class VolumeInpaintConfig:
    steps: int = 30  # MAISI's rflow inference runs 30 steps; its ddpm 1000 (fewer: deterministic DDIM steps)
    resample: int = 1  # RePaint repeats per step (1: none)
    seed: int = 0
    context: int = 4  # latent cells of known context on each side of the ROI's box (MAISI: 16 voxels, ~24 mm)


class LatentSchedule:
    """One reverse-process interface over MONAI's ``RFlowScheduler`` and ``DDPMScheduler`` for an inpainting loop:
    ``levels`` (each timestep and the level its step reaches, None for clean), the model output a step takes,
    the step, the known latents noised to a level, and RePaint's jump back to a noisier level."""

    def __init__(self, scheduler, steps: int, grid_cells: int):
        if not isinstance(scheduler, (RFlowScheduler, DDPMScheduler)):
            raise TypeError(f"a 3D inpainting schedule drives MONAI's RFlowScheduler or DDPMScheduler, not "
                            f"{type(scheduler).__name__}")
        self.scheduler = copy.deepcopy(scheduler)  # set_timesteps and add_noise change the scheduler they run on
        self.rectified_flow = isinstance(scheduler, RFlowScheduler)
        self.num_train_timesteps = int(scheduler.num_train_timesteps)
        if self.rectified_flow:
            self.scheduler.set_timesteps(steps, input_img_size_numel=grid_cells)
            timesteps = [float(t) for t in self.scheduler.timesteps]
        else:
            self.scheduler.set_timesteps(steps)
            timesteps = [int(t) for t in self.scheduler.timesteps]
        self.levels: list[tuple[float, float | None]] = list(zip(timesteps, [*timesteps[1:], None]))
        self.walks_every_timestep = not self.rectified_flow and timesteps == list(range(timesteps[0], -1, -1))

    def model_output(self, backbone, z: torch.Tensor, t: float, cond) -> torch.Tensor:
        """What ``step`` takes: the UNet's velocity (rflow) or its noise prediction (ddpm)."""
        if not self.rectified_flow:
            return backbone.denoise(z, t, cond)
        # the backbone returns the noise z_t - (1 - t/T) v, which holds nothing of v at t = T (the first step):
        # read the velocity off the UNet itself, through the backbone's own call
        with block_outputs([backbone.unet]) as outputs:
            backbone.denoise(z, t, cond)
        return outputs[0].float()

    def step(self, output: torch.Tensor, t: float, t_next: float | None, z: torch.Tensor,
             generator: torch.Generator) -> torch.Tensor:
        """z at level t -> z at t_next (None: clean). ``generator`` (on z's device) draws DDPM's ancestral noise."""
        if self.rectified_flow:
            return self.scheduler.step(output, t, z, 0 if t_next is None else t_next)[0]
        if self.walks_every_timestep:
            return self.scheduler.step(output, t, z, generator)[0]
        alpha, alpha_next = self._alpha_cumprod(t, z), self._alpha_cumprod(t_next, z)
        clean = (z - (1 - alpha).sqrt() * output) / alpha.sqrt()
        if self.scheduler.clip_sample:
            clean = clean.clamp(*self.scheduler.clip_sample_values)
        return alpha_next.sqrt() * clean + (1 - alpha_next).sqrt() * output

    def noised(self, z0: torch.Tensor, noise: torch.Tensor, t: float | None) -> torch.Tensor:
        """The known latents at level t (None: themselves). An rflow step lands at ``int(t)`` (MONAI truncates the
        next timestep), a level the UNet is then told is t: at most 1/T apart."""
        if t is None:
            return z0
        dtype = torch.float32 if self.rectified_flow else torch.long
        return self.scheduler.add_noise(z0, noise, torch.full((z0.shape[0],), t, dtype=dtype, device=z0.device))

    def renoised(self, z: torch.Tensor, t_from: float, t_to: float, noise: torch.Tensor) -> torch.Tensor:
        """RePaint's jump back: z at level t_from taken to the noisier level t_to, so that z_0 noised to t_from goes to
        z_0 noised to t_to (``add_noise``'s mixture at t_to, with fresh noise making up the variance)."""
        if self.rectified_flow:  # (1 - s) z_0 + s eps: scale the signal, then top the noise up to s
            s_from, s_to = t_from / self.num_train_timesteps, t_to / self.num_train_timesteps
            keep = (1 - s_to) / (1 - s_from)
            return keep * z + math.sqrt(max(s_to ** 2 - (keep * s_from) ** 2, 0.0)) * noise
        ratio = self._alpha_cumprod(t_to, z) / self._alpha_cumprod(t_from, z)  # sqrt(a) z_0 + sqrt(1 - a) eps
        return ratio.sqrt() * z + (1 - ratio).sqrt() * noise

    def _alpha_cumprod(self, t: int | None, like: torch.Tensor) -> torch.Tensor:
        alphas = self.scheduler.alphas_cumprod
        return (alphas.new_tensor(1.0) if t is None else alphas[int(t)]).to(like.device, like.dtype)


@dataclass(frozen=True)
class InpaintingWindow:
    """Where a volume is inpainted: the latent grid of the padded volume, and the window of it that is encoded,
    denoised and decoded (the whole grid without a crop)."""

    grid: tuple[int, int, int]  # latent cells per axis of the padded volume
    latent: tuple[slice, slice, slice]  # the window, in latent cells
    downsample: int  # voxels per latent cell per axis

    @property
    def cells(self) -> int:
        """Latent cells denoised at each step."""
        return math.prod(s.stop - s.start for s in self.latent)

    @property
    def voxels(self) -> tuple[slice, slice, slice]:
        """The window in voxels of the padded volume (what is encoded and decoded)."""
        return tuple(slice(s.start * self.downsample, s.stop * self.downsample) for s in self.latent)

    def in_image(self, shape: tuple[int, int, int]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
        """(the window's part inside an image of ``shape``, the same part in the window's own voxels): the window
        reaches into the padding the image does not have."""
        region = tuple(slice(v.start, min(v.stop, side)) for v, side in zip(self.voxels, shape))
        return region, tuple(slice(0, r.stop - r.start) for r in region)


def roi_cells(backbone, roi_mask: np.ndarray) -> torch.Tensor:
    """(X, Y, Z) ROI -> (1, 1, x, y, z) latent cells of the padded volume, max-pooled: any coverage marks a cell."""
    roi = backbone.volume_to_batch(np.asarray(roi_mask, np.float32))
    return F.max_pool3d(roi, kernel_size=backbone.latent_downsample)


def inpainting_window(backbone, roi_mask: np.ndarray, config: VolumeInpaintConfig = VolumeInpaintConfig(), *,
                      crop: bool = True) -> InpaintingWindow:
    """The latent window ``inpaint_volume`` works on: the ROI's box grown by ``config.context`` cells, sides rounded
    up to ``backbone.denoiser_multiple`` and kept inside the grid (``crop=True``), or the whole grid."""
    cells = roi_cells(backbone, roi_mask)[0, 0]
    grid = tuple(cells.shape)
    if not crop or not cells.any():
        window = tuple(slice(0, side) for side in grid)
    else:
        marked = torch.nonzero(cells)
        low, high = marked.min(0).values.tolist(), (marked.max(0).values + 1).tolist()
        window = tuple(_fit(a - config.context, b + config.context, side, backbone.denoiser_multiple)
                       for a, b, side in zip(low, high, grid))
    return InpaintingWindow(grid, window, backbone.latent_downsample)


def _fit(low: int, high: int, side: int, multiple: int) -> slice:
    """[low, high) grown to a multiple of ``multiple`` about its centre, then shifted inside [0, side) (``side`` is
    itself a multiple, as the padded grid is)."""
    length = min(side, -(-(high - low) // multiple) * multiple)
    start = min(max(0, (low + high - length) // 2), side - length)
    return slice(start, start + length)


@torch.no_grad()
def inpaint_volume(backbone, image: np.ndarray, modality: str, roi_mask: np.ndarray,
                   config: VolumeInpaintConfig = VolumeInpaintConfig(), *, crop: bool = True, cond=None,
                   progress: bool = False) -> np.ndarray:
    """The pseudo-healthy volume: ``image`` (X, Y, Z, in its own units) with the ROI regenerated by the frozen 3D
    model, in the image's units and grid; outside the ROI the input is returned unchanged. ``cond``: the backbone's
    own conditioning (a ``MaisiConditioning``: spacing, modality, body region), or None for its defaults.
    Deterministic for ``config.seed``."""
    image = np.asarray(image)
    inside = np.asarray(roi_mask, bool)
    if image.ndim != 3 or inside.shape != image.shape:
        raise InputError(f"inpaint_volume takes a 3D image and an ROI of its shape, got {image.shape} and "
                         f"{inside.shape}")
    healthy = image.astype(np.float32)
    if not inside.any():
        return healthy
    intensity = backbone.intensity(modality, image)
    window = inpainting_window(backbone, inside, config, crop=crop)
    x = backbone.volume_to_batch(intensity.forward(image))[(..., *window.voxels)]
    z0 = backbone.encode(x)
    known = 1 - roi_cells(backbone, inside)[(..., *window.latent)].to(z0.device)
    schedule = LatentSchedule(backbone.scheduler, config.steps, math.prod(window.grid))
    z = _repaint(backbone, schedule, z0, known, window, cond, config, progress)
    decoded = backbone.decode(z)[0, 0].float().cpu().numpy()
    # paste back in image units inside the ROI only: the window reaches into the padding the volume does not have
    region, inside_window = window.in_image(image.shape)
    generated = intensity.inverse(decoded[inside_window])
    healthy[region] = np.where(inside[region], generated, healthy[region])
    return healthy


def pseudo_healthy_volume(backbone, image: np.ndarray, modality: str, roi_mask: np.ndarray, config, *, spacing,
                          region: str, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """What ``inpaint.pseudo_healthy`` is for a 2D model, for a 3D one: ``config.samples`` ROI sub-volume inpaintings
    (an ``InpaintConfig``: its steps, RePaint repeats and first seed) conditioned on the case's spacing, modality and
    body region; (mean, spread over the samples)."""
    cond = backbone.case_conditioning(spacing, modality, region)
    samples = np.stack([
        inpaint_volume(backbone, image, modality, roi_mask,
                       VolumeInpaintConfig(steps=config.steps, resample=config.resample, seed=config.seed + sample),
                       cond=cond, progress=progress)
        for sample in range(config.samples)])
    return samples.mean(0), samples.std(0)


def _repaint(backbone, schedule: LatentSchedule, z0: torch.Tensor, known: torch.Tensor, window: InpaintingWindow,
             cond, config: VolumeInpaintConfig, progress: bool) -> torch.Tensor:
    """RePaint on the window's latents: the unknown cells generated, the known ones following z_0 noised."""
    generator = torch.Generator().manual_seed(config.seed)
    ancestral = torch.Generator(device=z0.device).manual_seed(config.seed)  # DDPM's own step noise
    shape = (z0.shape[0], z0.shape[1], *window.grid)

    def noise():  # drawn for the whole grid, so a crop has the whole volume's noise inside its window
        return torch.randn(shape, generator=generator)[(..., *window.latent)].to(z0.device)

    z = noise()
    for t, t_next in tqdm(schedule.levels, desc="inpaint (3D)", disable=not progress):
        for repeat in range(config.resample):
            stepped = schedule.step(schedule.model_output(backbone, z, t, cond), t, t_next, z, ancestral)
            z_next = (1 - known) * stepped + known * schedule.noised(z0, noise(), t_next)
            if repeat + 1 < config.resample and t_next is not None:
                z = schedule.renoised(z_next, t_next, t, noise())
            else:
                z = z_next
    return z
