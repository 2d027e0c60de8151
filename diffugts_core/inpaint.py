"""Latent inpainting to a pseudo-healthy image (training-free, RePaint-style).

z_0 = E(I); starting from noise, each DDIM step predicts the masked latents from the healthy
prompt (classifier-free guidance toward it), while the known latents are the encoded image
re-noised to the same step: z_{t-1} = m * step(z_t) + (1 - m) * noised(z_0). Optional resampling
(RePaint's jumps) re-noises and repeats each step to harmonise the two. The decoded result is
pasted back only inside the mask, so the image outside it is untouched.

Only slices that hold some mask are inpainted, so the cost grows with the lesions' extent, not with the
volume. ``roi=True`` denoises only latent windows around the lesions (each group of nearby components:
its bounding box plus ``context`` latent cells on each side, because a model trained on whole slices
inpaints a bare crop badly).
"""

from __future__ import annotations

import hashlib
import json
import weakref
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import ndimage
from tqdm.auto import tqdm

from .backbone.base import Conditioning, FrozenBackbone, context_channels, organ_cover
from .io import InputError, atomic_path
from .preprocess import PREPROCESS_VERSION


INPAINT_VERSION = 3  # bump when the algorithm changes (keys cached pseudo-healthy images); 3: lesion windows


@dataclass
class InpaintConfig:
    steps: int = 25  # DDIM steps (50 was no better than 25 in our measurements)
    guidance_scale: float = 1.0  # 1: the healthy prompt alone; > 1: pushed further from the empty prompt
    resample: int = 1  # RePaint repeats per step (1: none)
    samples: int = 1  # several seeds -> their mean (and spread, an uncertainty map)
    seed: int = 0
    batch_size: int = 32
    roi: bool = False  # True: denoise latent windows around the lesions only (measured: no faster with scattered
    # candidates, and 2 DSC points lower; see docs/findings/refinement.md); False: the masked slices, whole
    context: int = 6  # latent cells of known context around each lesion group's bounding box, on each side
    window_multiple: int = 8  # window sides are multiples of this many latent cells: few sizes, large batches


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
                   progress: bool = False, on_step=None, organ_maps: torch.Tensor | None = None) -> torch.Tensor:
    """Pseudo-healthy slices in model space: (N, C, H, W) image, (N, 1, H, W) mask -> (samples, N, C, H, W).
    ``organ_maps`` (N, organs, h, w) on the latent grid: what an organ-aware denoiser sees of where each organ is.

    ``on_step(step, t, latents)``, if given, sees after every DDIM step the current estimate of the clean latents
    (the model's prediction inside the mask, the known latents outside) of the batch being denoised: whole slices with
    ``roi=False``, windows otherwise. Notebook 05 decodes them to watch the tumor disappear."""
    scheduler = type(backbone.scheduler).from_config(backbone.scheduler.config)
    scheduler.set_timesteps(config.steps)
    todo = torch.nonzero(mask.flatten(1).any(1)).flatten().tolist()
    results = x.unsqueeze(0).repeat(config.samples, 1, 1, 1, 1)
    if not todo:
        return results
    offsets = getattr(backbone, "denoiser_context", ())
    # the slices to encode: those to inpaint and, for a through-plane denoiser, the neighbours it sees
    encoded = sorted(set(todo) | {k + o for k in todo for o in offsets if 0 <= k + o < len(x)})
    position = {k: i for i, k in enumerate(encoded)}
    z_encoded = torch.cat([backbone.encode(x[encoded[i:i + config.batch_size]])
                           for i in range(0, len(encoded), config.batch_size)])
    cells_encoded = latent_mask(mask[encoded], backbone.latent_downsample).to(z_encoded.device)
    rows_todo = [position[k] for k in todo]
    z_known, cells = z_encoded[rows_todo], cells_encoded[rows_todo]
    full = (slice(None), slice(None))
    multiple = backbone.denoiser_multiple  # what the denoiser's down-sampling needs
    quantum = min(-(-config.window_multiple // multiple) * multiple, *cells.shape[-2:])
    # (row in todo, window): whole slices, or windows around groups of nearby lesions, denoised in batches of one size
    windows = [(j, w) for j in range(len(todo))
               for w in (lesion_windows(cells[j, 0], config.context, quantum) if config.roi else [full])]
    by_size: dict[tuple, list] = {}
    for j, (rows, cols) in windows:
        key = (rows.stop - rows.start, cols.stop - cols.start) if config.roi else "whole slices"
        by_size.setdefault(key, []).append((j, (rows, cols)))
    size = config.batch_size
    batches = [group[i:i + size] for group in by_size.values() for i in range(0, len(group), size)]
    for sample in range(config.samples):
        generator = torch.Generator().manual_seed(config.seed + sample)
        z = z_known.clone()
        for batch in tqdm(batches, desc=f"inpaint {sample + 1}/{config.samples}", disable=not progress):
            z0 = torch.stack([z_known[j, :, rows, cols] for j, (rows, cols) in batch])
            m = torch.stack([cells[j, :, rows, cols] for j, (rows, cols) in batch])
            extra = {}
            if organ_maps is not None:
                extra["organs"] = torch.stack([organ_maps[todo[j], :, rows, cols] for j, (rows, cols) in batch])
            if offsets:
                latents, unknown = zip(*(_neighbours(z_encoded, cells_encoded, position, todo[j] + np.array(offsets),
                                                     rows, cols) for j, (rows, cols) in batch))
                extra["context"] = context_channels(torch.stack(latents), torch.stack(unknown))
            if extra:
                cond, uncond = (None if c is None else replace(c, **extra) for c in (cond, uncond))
            denoised = _denoise(backbone, scheduler, z0, m, cond, uncond, config, generator, on_step)
            for k, (j, (rows, cols)) in enumerate(batch):  # only the masked cells: windows of one slice may overlap
                z[j, :, rows, cols] = torch.where(m[k].bool(), denoised[k], z[j, :, rows, cols])
        decoded = torch.cat([backbone.decode(z[i:i + size]) for i in range(0, len(todo), size)])
        pixel = mask[todo].to(decoded.dtype).expand_as(decoded)
        results[sample, todo] = pixel * decoded.cpu() + (1 - pixel) * x[todo]
    return results


def _neighbours(z: torch.Tensor, cells: torch.Tensor, position: dict[int, int], slices, rows: slice, cols: slice):
    """The encoded latents (O, C, h, w) of ``slices`` in a window and their unknown cells (O, h, w): a slice outside
    the volume is all unknown, as in training."""
    latents = z.new_zeros(len(slices), *z[0, :, rows, cols].shape)
    unknown = cells.new_ones(len(slices), *latents.shape[-2:])
    for i, k in enumerate(slices):
        if int(k) in position:
            latents[i], unknown[i] = z[position[int(k)], :, rows, cols], cells[position[int(k)], 0, rows, cols]
    return latents, unknown


def lesion_windows(cells: torch.Tensor, context: int, quantum: int) -> list[tuple[slice, slice]]:
    """Latent windows around the marked cells of one (h, w) slice: one per group of connected components whose boxes,
    grown by ``context`` cells, overlap; sides rounded up to a multiple of ``quantum`` and kept inside the grid."""
    labels, count = ndimage.label(cells.bool().cpu().numpy())
    boxes = [[box[0].start - context, box[0].stop + context, box[1].start - context, box[1].stop + context]
             for box in ndimage.find_objects(labels)]
    merged = True
    while merged:  # merge overlapping boxes until none overlap
        merged = False
        for a in range(len(boxes)):
            for b in range(a + 1, len(boxes)):
                p, q = boxes[a], boxes[b]
                if p[0] < q[1] and q[0] < p[1] and p[2] < q[3] and q[2] < p[3]:
                    boxes[a] = [min(p[0], q[0]), max(p[1], q[1]), min(p[2], q[2]), max(p[3], q[3])]
                    del boxes[b]
                    merged = True
                    break
            if merged:
                break
    size = cells.shape
    return [tuple(_fit(low, high, n, quantum) for low, high, n in ((b[0], b[1], size[0]), (b[2], b[3], size[1])))
            for b in boxes]


def _fit(low: int, high: int, size: int, quantum: int) -> slice:
    """[low, high) grown to a multiple of ``quantum`` around its centre, then shifted inside [0, size)."""
    length = min(size, -(-(high - low) // quantum) * quantum)
    start = min(max(0, (low + high - length) // 2), size - length)
    return slice(start, start + length)


def _denoise(backbone, scheduler, z0, m, cond, uncond, config, generator, on_step=None):
    """RePaint in latent space: the masked cells are generated, the others follow the noised known latents."""
    n = z0.shape[0]
    noise = lambda: torch.randn(z0.shape, generator=generator).to(z0.device)  # noqa: E731 (one line, reused)
    z = noise()
    timesteps = list(scheduler.timesteps)
    alphas = scheduler.alphas_cumprod.to(z0.device)
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else None
        for repeat in range(config.resample):
            eps = _guided_noise(backbone, z, t, cond.expand(n), None if uncond is None else uncond.expand(n),
                                config.guidance_scale)
            step = scheduler.step(eps, t, z)
            z_prev = step.prev_sample
            known = z0 if t_prev is None else scheduler.add_noise(z0, noise(), torch.full((n,), int(t_prev)))
            z_prev = m * z_prev + (1 - m) * known
            if repeat + 1 < config.resample and t_prev is not None:  # jump back to t and denoise again
                ratio = alphas[int(t)] / alphas[int(t_prev)]
                z = ratio.sqrt() * z_prev + (1 - ratio).sqrt() * noise()
            else:
                z = z_prev
        if on_step is not None:
            on_step(i, int(t), m * step.pred_original_sample + (1 - m) * z0)
    return z


def _guided_noise(backbone, z, t, cond, uncond, scale):
    if uncond is None or scale == 1.0:
        return backbone.denoise(z, t, cond)
    tokens = torch.cat([uncond.tokens, cond.tokens])
    masks = None if cond.attention_mask is None else torch.cat([uncond.attention_mask, cond.attention_mask])
    organs = None if cond.organs is None else torch.cat([uncond.organs, cond.organs])
    context = None if cond.context is None else torch.cat([uncond.context, cond.context])
    eps_uncond, eps_cond = backbone.denoise(torch.cat([z, z]), t, Conditioning(tokens, masks, organs, context)).chunk(2)
    return eps_uncond + scale * (eps_cond - eps_uncond)


@torch.no_grad()
def reconstruct_slices(backbone: FrozenBackbone, x: torch.Tensor, cond: Conditioning, uncond: Conditioning | None = None,
                       *, strength: float = 0.5, config: InpaintConfig = InpaintConfig()) -> torch.Tensor:
    """The reconstruction baseline (DDPM-MAD, AnoDDPM): noise whole slices to ``strength`` of the schedule and denoise
    them with the healthy prompt; nothing is known, so a lesion is replaced by whatever the model finds likely there.
    (N, C, H, W) -> (N, C, H, W) in model space."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    scheduler = type(backbone.scheduler).from_config(backbone.scheduler.config)
    scheduler.set_timesteps(config.steps)
    timesteps = list(scheduler.timesteps)[-max(1, round(strength * config.steps)):]
    generator = torch.Generator().manual_seed(config.seed)
    out = []
    for i in range(0, len(x), config.batch_size):
        z0 = backbone.encode(x[i:i + config.batch_size])
        z = scheduler.add_noise(z0, torch.randn(z0.shape, generator=generator).to(z0.device),
                                torch.full((len(z0),), int(timesteps[0])))
        for t in timesteps:
            eps = _guided_noise(backbone, z, t, cond.expand(len(z)), None if uncond is None else uncond.expand(len(z)),
                                config.guidance_scale)
            z = scheduler.step(eps, t, z).prev_sample
        out.append(backbone.decode(z).cpu())
    return torch.cat(out) if out else x.clone()


def reconstruct(backbone, image: np.ndarray, modality: str, slices: np.ndarray, cond: Conditioning,
                uncond: Conditioning | None = None, *, strength: float = 0.5,
                config: InpaintConfig = InpaintConfig()) -> np.ndarray:
    """``reconstruct_slices`` on the axial slices where ``slices`` (bool, one per slice) is set, in image units; the
    other slices are the input."""
    intensity = backbone.intensity(modality, image)
    x = backbone.volume_to_slices(intensity.forward(image))
    todo = np.flatnonzero(slices)
    out = x.clone()
    if len(todo):
        out[todo] = reconstruct_slices(backbone, x[todo], cond, uncond, strength=strength, config=config)
    reconstructed = intensity.inverse(backbone.slices_to_volume(out))
    return np.where(np.asarray(slices, bool)[None, None, :], reconstructed, image)


def ring_fill(image: np.ndarray, mask: np.ndarray, ring_voxels: int = 2) -> np.ndarray:
    """The non-generative fill ablation: each connected component of ``mask`` filled with the mean of a ring of known
    voxels around it (``ring_voxels`` wide). No model: what DiffuGTS would do if inpainting knew nothing of anatomy."""
    labels, count = ndimage.label(np.asarray(mask, bool))
    filled = np.array(image, dtype=np.float32, copy=True)
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        grown = tuple(slice(max(0, b.start - ring_voxels - 1), b.stop + ring_voxels + 1) for b in box)
        component = labels[grown] == index
        ring = ndimage.binary_dilation(component, iterations=ring_voxels) & (labels[grown] == 0)
        known = image[grown][ring]
        filled[grown][component] = known.mean() if known.size else image[grown][component].mean()
    return filled


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
                   progress: bool = False, organs: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Inpaint a 3D volume (X, Y, Z in the image's units) inside ``mask``: (mean, spread over samples). ``organs``
    (X, Y, Z: 0 none, i + 1 the backbone's i-th organ channel) is what an organ-aware denoiser is told of where each
    organ is; a denoiser without organ channels ignores it."""
    intensity = backbone.intensity(modality, image)
    x = backbone.volume_to_slices(intensity.forward(image))
    m = torch.from_numpy(np.ascontiguousarray(np.asarray(mask, bool).transpose(2, 0, 1)[:, None]))
    channels = len(getattr(backbone, "organ_channels", ()))
    maps = None if organs is None or not channels else organ_cover(
        torch.from_numpy(np.ascontiguousarray(np.asarray(organs, np.uint8).transpose(2, 0, 1))), channels,
        backbone.latent_downsample)
    samples = inpaint_slices(backbone, x, m, cond, uncond, config, progress, organ_maps=maps)
    inside = np.asarray(mask, bool)
    # paste back in image units: outside the mask the input is returned bit for bit (model space clips)
    volumes = np.stack([np.where(inside, intensity.inverse(backbone.slices_to_volume(s)), image) for s in samples])
    return volumes.mean(0), volumes.std(0)


def inpaint_region(backbone, text_encoder, image: np.ndarray, modality: str, region: str, organ: str,
                   roi: np.ndarray, config: InpaintConfig, *, cache: Path | None = None,
                   progress: bool = False, organs: np.ndarray | None = None,
                   spacing=None) -> tuple[np.ndarray, np.ndarray]:
    """The pseudo-healthy image (mean over samples, and their spread), from ``cache`` when it holds this exact case.
    ``organs``: the organ map an organ-aware denoiser sees (see ``pseudo_healthy``). A 3D backbone inpaints a latent
    sub-volume around the ROI instead (``inpaint3d``), conditioned on the case's ``spacing`` (mm), modality and region
    rather than on text."""
    if not roi.any():
        return image.copy(), np.zeros(image.shape, np.float32)
    volumetric = getattr(backbone, "spatial_dims", 2) == 3
    if volumetric and spacing is None:
        raise InputError("a 3D foundation model is conditioned on the voxel spacing; pass spacing=(x, y, z) in mm")
    if not getattr(backbone, "organ_channels", ()):
        organs = None  # nothing reads it, so it must not change the cache key
    key = None if cache is None else _cache_key(backbone, image, roi, modality, region, organ, config, organs,
                                                 spacing if volumetric else None)
    if key is not None and (cache / f"{key}.npz").is_file():
        stored = np.load(cache / f"{key}.npz")
        return stored["healthy"], stored["spread"]
    if volumetric:
        from .inpaint3d import pseudo_healthy_volume  # MONAI's schedulers load only for a 3D model

        healthy, spread = pseudo_healthy_volume(backbone, image, modality, roi, config, spacing=spacing,
                                                region=region, progress=progress)
    else:
        cond, uncond = healthy_conditioning(text_encoder, modality, region, organ)
        healthy, spread = pseudo_healthy(backbone, image, modality, roi, cond, uncond, config, progress, organs)
    if key is not None:
        cache.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache / f"{key}.npz", suffix=".npz") as tmp:
            np.savez_compressed(tmp, healthy=healthy.astype(np.float32), spread=spread.astype(np.float32))
    return healthy, spread


def _cache_key(backbone, image, roi, modality, region, organ, config: InpaintConfig, organs=None, spacing=None) -> str:
    digest = hashlib.sha256()
    arrays = [np.ascontiguousarray(image, np.float32), np.ascontiguousarray(roi, bool)]
    if organs is not None:  # (absent from the keys of models without organ channels: their caches stay valid)
        arrays.append(np.ascontiguousarray(organs, np.uint8))
    for array in arrays:
        digest.update(str(array.shape).encode())
        digest.update(array.tobytes())
    digest.update(json.dumps([modality, region, organ, PREPROCESS_VERSION, INPAINT_VERSION, asdict(config)]).encode())
    if spacing is not None:  # what a 3D model is conditioned on (absent for 2D models: their caches stay valid)
        digest.update(json.dumps([round(float(s), 6) for s in spacing]).encode())
    digest.update(model_fingerprint(backbone).encode())
    return digest.hexdigest()[:32]

_FINGERPRINTS = weakref.WeakKeyDictionary()  # one hash per loaded backbone


def model_fingerprint(backbone) -> str:
    """sha256 of the frozen model's weights (what a cached pseudo-healthy image depends on): every torch module the
    backbone holds, whatever its architecture."""
    if backbone not in _FINGERPRINTS:
        digest = hashlib.sha256()
        modules = [(name, value) for name, value in sorted(vars(backbone).items()) if isinstance(value, nn.Module)]
        for module_name, module in modules:
            for name, tensor in sorted(module.state_dict().items()):
                digest.update(f"{module_name}.{name}".encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        _FINGERPRINTS[backbone] = digest.hexdigest()
    return _FINGERPRINTS[backbone]


def coarse_roi(detection, spacing, margin_mm: float, organ_reach: bool = False) -> np.ndarray:
    """Every candidate region (kept by the region head or not: the residual head is the second filter), enlarged;
    with ``organ_reach``, also the whole organ region when the region head kept a region (the organ is flagged)."""
    coarse = np.zeros(detection.anomaly.shape, bool)
    for region in detection.regions:
        coarse |= region.mask
    if organ_reach and detection.kept is not None and detection.kept.any():
        coarse |= detection.organ_region
    return enlarge_mask(coarse, spacing, margin_mm)
