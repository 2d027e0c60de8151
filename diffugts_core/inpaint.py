"""Latent inpainting to a pseudo-healthy image (training-free, RePaint-style).

z_0 = E(I); starting from noise, each DDIM step predicts the masked latents from the healthy
prompt (classifier-free guidance toward it), while the known latents are the encoded image
re-noised to the same step: z_{t-1} = m * step(z_t) + (1 - m) * noised(z_0). Optional resampling
(RePaint's jumps) re-noises and repeats each step to harmonise the two. The decoded result is
pasted back only inside the mask, so the image outside it is untouched.

Only slices that hold some mask are inpainted: the cost grows with the lesion's extent, not with
the volume.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from tqdm.auto import tqdm

from .backbone.base import Conditioning, FrozenBackbone


@dataclass
class InpaintConfig:
    steps: int = 25  # DDIM steps (50 was no better than 25 in our measurements)
    guidance_scale: float = 1.0  # 1: the healthy prompt alone; > 1: pushed further from the empty prompt
    resample: int = 1  # RePaint repeats per step (1: none)
    samples: int = 1  # several seeds -> their mean (and spread, an uncertainty map)
    seed: int = 0
    batch_size: int = 32


def enlarge_mask(mask: np.ndarray, spacing, margin_mm: float) -> np.ndarray:
    """Dilate a 3D mask by ``margin_mm`` (an ellipsoid in voxels, so the margin is isotropic in mm)."""
    if margin_mm <= 0:
        return mask.astype(bool)
    radius = [int(np.ceil(margin_mm / s)) for s in spacing]
    grid = np.ogrid[tuple(slice(-r, r + 1) for r in radius)]
    ball = sum((g * s / margin_mm) ** 2 for g, s in zip(grid, spacing)) <= 1.0
    return ndimage.binary_dilation(mask.astype(bool), structure=ball)


def latent_mask(mask: torch.Tensor, downsample: int) -> torch.Tensor:
    """(N, 1, H, W) pixel mask -> latent grid by max-pooling: any coverage marks the latent cell."""
    return F.max_pool2d(mask.float(), kernel_size=downsample, stride=downsample)


@torch.no_grad()
def inpaint_slices(backbone: FrozenBackbone, x: torch.Tensor, mask: torch.Tensor, cond: Conditioning,
                   uncond: Conditioning | None = None, config: InpaintConfig = InpaintConfig(),
                   progress: bool = False) -> torch.Tensor:
    """Pseudo-healthy slices in model space: (N, C, H, W) image, (N, 1, H, W) mask -> (samples, N, C, H, W)."""
    scheduler = type(backbone.scheduler).from_config(backbone.scheduler.config)
    scheduler.set_timesteps(config.steps)
    todo = torch.nonzero(mask.flatten(1).any(1)).flatten()
    results = x.unsqueeze(0).repeat(config.samples, 1, 1, 1, 1)
    for sample in range(config.samples):
        generator = torch.Generator().manual_seed(config.seed + sample)
        for start in tqdm(range(0, len(todo), config.batch_size), desc=f"inpaint {sample + 1}/{config.samples}",
                          disable=not progress):
            index = todo[start:start + config.batch_size]
            decoded = _inpaint_batch(backbone, scheduler, x[index], mask[index], cond, uncond, config, generator)
            m = mask[index].to(decoded.dtype).expand_as(decoded)
            results[sample, index] = m * decoded.cpu() + (1 - m) * x[index]
    return results


def _inpaint_batch(backbone, scheduler, x, mask, cond, uncond, config, generator):
    n = x.shape[0]
    z0 = backbone.encode(x)
    m = latent_mask(mask, backbone.latent_downsample).to(z0.device)
    noise = lambda: torch.randn(z0.shape, generator=generator).to(z0.device)  # noqa: E731 (one line, reused)
    z = noise()
    timesteps = list(scheduler.timesteps)
    alphas = scheduler.alphas_cumprod.to(z0.device)
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else None
        for repeat in range(config.resample):
            eps = _guided_noise(backbone, z, t, cond.expand(n), None if uncond is None else uncond.expand(n),
                                config.guidance_scale)
            z_prev = scheduler.step(eps, t, z).prev_sample
            known = z0 if t_prev is None else scheduler.add_noise(z0, noise(), torch.full((n,), int(t_prev)))
            z_prev = m * z_prev + (1 - m) * known
            if repeat + 1 < config.resample and t_prev is not None:  # jump back to t and denoise again
                ratio = alphas[int(t)] / alphas[int(t_prev)]
                z = ratio.sqrt() * z_prev + (1 - ratio).sqrt() * noise()
            else:
                z = z_prev
    return backbone.decode(z)


def _guided_noise(backbone, z, t, cond, uncond, scale):
    if uncond is None or scale == 1.0:
        return backbone.denoise(z, t, cond)
    tokens = torch.cat([uncond.tokens, cond.tokens])
    masks = None if cond.attention_mask is None else torch.cat([uncond.attention_mask, cond.attention_mask])
    eps_uncond, eps_cond = backbone.denoise(torch.cat([z, z]), t, Conditioning(tokens, masks)).chunk(2)
    return eps_uncond + scale * (eps_cond - eps_uncond)


def healthy_conditioning(text_encoder, modality: str, region: str, organ: str) -> tuple[Conditioning, Conditioning]:
    """The healthy prompt in the foundation model's own caption style, and the empty prompt (for guidance).

    The phantom model learned captions like "a CT scan of the abdomen showing liver"; that phrasing
    of the organ is its notion of "healthy".
    """
    from .text import load_templates

    templates = load_templates(modality)
    prompt = templates.caption.format(region=region, organs=templates.organs.get(organ, organ.replace("_", " ")))
    return prompt_conditioning(text_encoder, prompt)


def prompt_conditioning(text_encoder, prompt: str) -> tuple[Conditioning, Conditioning]:
    """A prompt's token states and the empty prompt's (the unconditional branch of guidance)."""
    embedded = text_encoder.encode([prompt, ""])
    cond = Conditioning(embedded.tokens[:1], embedded.attention_mask[:1])
    uncond = Conditioning(embedded.tokens[1:], embedded.attention_mask[1:])
    return cond, uncond


def pseudo_healthy(backbone, image: np.ndarray, modality: str, mask: np.ndarray, cond: Conditioning,
                   uncond: Conditioning | None = None, config: InpaintConfig = InpaintConfig(),
                   progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Inpaint a 3D volume (X, Y, Z in the image's units) inside ``mask``: (mean, spread over samples)."""
    intensity = backbone.intensity(modality, image)
    x = backbone.volume_to_slices(intensity.forward(image))
    m = torch.from_numpy(np.ascontiguousarray(np.asarray(mask, bool).transpose(2, 0, 1)[:, None]))
    samples = inpaint_slices(backbone, x, m, cond, uncond, config, progress)
    inside = np.asarray(mask, bool)
    # paste back in image units: outside the mask the input is returned bit for bit (model space clips)
    volumes = np.stack([np.where(inside, intensity.inverse(backbone.slices_to_volume(s)), image) for s in samples])
    return volumes.mean(0), volumes.std(0)
