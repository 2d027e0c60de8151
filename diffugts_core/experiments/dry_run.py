"""What a ``diffugts segment`` run will cost, estimated before anything heavy starts (``--dry-run``).

Method. The chosen model's networks are built from its configuration alone, with random weights (what a call costs
does not depend on the weights), on the chosen device. Each network the run calls (the VAE encoder, which the AOVA
and residual feature passes also run; the denoiser; the decoder) is called once at a small size to warm up, then
timed once at a calibration size while the memory it takes is measured: on CUDA the allocated memory, on a CPU the
rise of the process's resident set, sampled every 5 ms. That gives seconds and megabytes per cell (voxel for the VAE,
latent cell for the denoiser). The run's calls are then counted for the case's size (encode, denoising steps x
samples, decode, feature passes) and their cells multiplied by the per-cell seconds; the peak is the memory held
before the run (the process with the networks built; on CUDA the weights) plus the per-cell megabytes of the call
with the most of them.

Assumptions. Cost is linear in cells: true of convolutions, not of the denoiser's attention, which grows with the
square of its tokens (at MAISI's two coarsest levels, a small share of a call). Per-cell costs at the calibration
size are a little higher than at large sizes (fixed per-call overheads), so large runs come out a little slow.
Loading the weights, the text encoder, preprocessing and the small trained heads are not counted. The 2D default's
ROI is assumed to reach every axial slice (an upper bound: its scattered candidate regions reached 49-56 of 64
slices in docs/results/speed.md); MAISI runs on the same processing grid, its DDIM steps those the heads' residual
config names, and its ROI is one spherical lesion of ``lesion_share`` of the volume (``maisi_roi.lesion_case``, the
lesion its table measures), inpainted in the window ``inpaint3d`` uses.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..backbone import is_maisi_model
from ..io import InputError, Volume
from ..preprocess import model_grid_plan
from ..runtime import measured, resident_mb, resolve_device

DEFAULT_LESION_SHARE = 0.05  # the largest lesion: the case ROI sub-volume inpainting has to pay off for
# the grid of each timed call: about 32,768 cells, large enough that fixed per-call costs are a small part; the 2D
# denoiser on a batch of 32 slices (the run's own call), the 3D one on 16^3 latent cells (32^3 takes a minute on a CPU)
CALIBRATION_SLICES = {"encoder": 2, "denoiser": 32, "decoder": 2}
CALIBRATION_SIDE = {"encoder": 32, "denoiser": 64, "decoder": 32}  # voxels; the denoiser's latent grid is a quarter
FEATURE_BATCH = 32  # slices per feature pass of the 2D pipeline (aova.volume_features, residual.feature_residual)


@dataclass(frozen=True)
class NetworkCost:
    """One network's measured cost per cell (voxel, or latent cell for the denoiser) on the device."""

    seconds_per_cell: float
    mb_per_cell: float


@dataclass(frozen=True)
class Calls:
    """The calls one stage of the run makes to one network."""

    stage: str
    network: str  # "encoder" (feature passes too), "denoiser" or "decoder"
    count: int
    cells: int  # over all the calls
    largest: int  # cells of the largest call (what sets the memory)


@dataclass
class RunEstimate:
    model: str
    device: str
    threads: int
    grid: str  # the grid the model runs on, in words
    plans: dict[str, list[Calls]]  # path ("whole slices", "ROI window", "whole volume") -> its calls
    costs: dict[str, NetworkCost]
    held_mb: float  # memory held before any call: the process with the networks built (CUDA: the weights)
    settings: str  # steps, samples, guidance, in words

    def seconds(self, path: str) -> float:
        return sum(call.cells * self.costs[call.network].seconds_per_cell for call in self.plans[path])

    def stage_seconds(self, path: str) -> dict[str, float]:
        stages: dict[str, float] = {}
        for call in self.plans[path]:
            stages[call.stage] = stages.get(call.stage, 0.0) + call.cells * self.costs[call.network].seconds_per_cell
        return stages

    def peak_mb(self, path: str) -> float:
        return self.held_mb + max(call.largest * self.costs[call.network].mb_per_cell for call in self.plans[path])


# ---- the networks, from the configuration alone ----------------------------------------------------------------------
def maisi_networks(folder: str | Path, device: torch.device):
    """A ``MaisiBackbone`` with the bundle's networks at random weights: only its network config is read."""
    from ..backbone.maisi import (BUNDLE_LAYOUTS, CUDA_ONLY_FLAGS, AutoencoderKlMaisi, DiffusionModelUNetMaisi,
                                  MaisiBackbone, build_network, read_network_config)

    folder = Path(folder).expanduser()
    config = next(folder / "configs" / name for _, name, _ in BUNDLE_LAYOUTS if (folder / "configs" / name).is_file())
    definitions = read_network_config(config)
    off = () if device.type == "cuda" else CUDA_ONLY_FLAGS  # as MaisiBackbone.from_bundle builds them
    autoencoder = build_network(definitions, "autoencoder_def", AutoencoderKlMaisi, config, off=off)
    unet = build_network(definitions, "diffusion_unet_def", DiffusionModelUNetMaisi, config, off=off)
    return MaisiBackbone(autoencoder, unet, None, 1.0, device=device)


def slice_model_networks(model: str | Path, device: torch.device):
    """A ``DiffusersSliceBackbone`` with the model folder's VAE and UNet at random weights (their configs only)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from ..backbone.diffusers2d import BACKBONE_CONFIG, DiffusersSliceBackbone, SliceBackboneConfig
    from ..backbone.registry import DEFAULT_MODEL, load_registry, models_root

    folder = models_root() / load_registry()[DEFAULT_MODEL]["path"] if str(model) == "default" else \
        Path(model).expanduser()
    if not (folder / "vae").is_dir() or not (folder / "unet").is_dir():
        raise InputError(f"{folder}: --dry-run reads a local model folder (vae/ and unet/ configs, or a MAISI "
                         "bundle's configs/); download a hub model first")
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
    config_file = folder / BACKBONE_CONFIG
    config = SliceBackboneConfig.from_json(config_file.read_text()) if config_file.is_file() else \
        SliceBackboneConfig(slice_shape=(vae.config.sample_size,) * 2)
    return DiffusersSliceBackbone(vae, unet, None, config, device=device)


# ---- measuring -------------------------------------------------------------------------------------------------------
@torch.no_grad()
def network_costs(backbone) -> dict[str, NetworkCost]:
    """Each network called once on a grid half the calibration size's sides (to warm up), then timed and measured on
    the calibration grid (``CALIBRATION_SLICES`` or ``CALIBRATION_SIDE``)."""
    from ..backbone.base import Conditioning

    down = backbone.latent_downsample
    if backbone.spatial_dims == 3:
        cond = None

        def image(network, warm):
            return torch.rand(1, 1, *(CALIBRATION_SIDE[network] // (2 if warm else 1),) * 3)
    else:
        cond = Conditioning(torch.zeros(1, backbone.config.max_length, backbone.unet.config.cross_attention_dim))

        def image(network, warm):
            slices = CALIBRATION_SLICES[network] // (2 if warm else 1)
            return torch.rand(slices, backbone.vae.config.in_channels, *backbone.config.slice_shape)

    def latents(x):
        return torch.randn(x.shape[0], backbone.latent_channels, *(side // down for side in x.shape[2:]))

    calls = {"encoder": backbone.encode, "denoiser": lambda x: backbone.denoise(latents(x), 500, cond),
             "decoder": lambda x: backbone.decode(latents(x))}
    costs = {}
    for network, call in calls.items():
        call(image(network, warm=True))
        x = image(network, warm=False)
        release_freed_memory()  # else the call reuses what the warm-up freed and the resident set does not rise
        with measured(backbone.device) as result:
            call(x)
        cells = x[:, :1].numel() // (down ** backbone.spatial_dims if network == "denoiser" else 1)
        costs[network] = NetworkCost(result[0] / cells, max(result[1], 0.0) / cells)
    return costs


def release_freed_memory() -> None:
    """Hand memory the C allocator keeps after a free back to the system (glibc's malloc_trim; elsewhere nothing)."""
    library = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(library), "malloc_trim", None) if library else None
    if trim is not None:
        trim(0)


def held_mb(backbone) -> float:
    if backbone.device.type == "cuda":
        return torch.cuda.memory_allocated(backbone.device) / 2 ** 20
    return resident_mb()


# ---- counting the run's calls ----------------------------------------------------------------------------------------
def slice_model_calls(slices: int, slice_shape: tuple[int, int], downsample: int, inpaint, samples: int) -> list[Calls]:
    """The 2D pipeline's calls on ``slices`` axial slices, the ROI on every one (see the module docstring)."""
    pixels, latent = math.prod(slice_shape), math.prod(s // downsample for s in slice_shape)
    batch = inpaint.batch_size
    batches, feature_batches = math.ceil(slices / batch), math.ceil(slices / FEATURE_BATCH)
    per_step = 2 if inpaint.guidance_scale != 1.0 else 1  # guidance: the empty prompt's branch in the same call
    steps = inpaint.steps * inpaint.resample * samples
    return [
        Calls("aova", "encoder", feature_batches, slices * pixels, min(slices, FEATURE_BATCH) * pixels),
        Calls("inpainting", "encoder", batches, slices * pixels, min(slices, batch) * pixels),
        Calls("inpainting", "denoiser", steps * batches, steps * per_step * slices * latent,
              per_step * min(slices, batch) * latent),
        Calls("inpainting", "decoder", samples * batches, samples * slices * pixels, min(slices, batch) * pixels),
        Calls("residuals", "encoder", 2 * feature_batches, 2 * slices * pixels, min(slices, FEATURE_BATCH) * pixels),
    ]


def maisi_calls(backbone, shape: tuple[int, int, int], lesion_share: float, samples: int, *, crop: bool,
                config) -> list[Calls]:
    """The 3D pipeline's calls: AOVA's feature pass on the whole (padded) volume; encode, steps x samples denoiser
    calls and samples decodes of the inpainting window (``inpaint3d.VolumeInpaintConfig`` ``config``); the residuals'
    two feature passes on it."""
    from ..inpaint3d import inpainting_window
    from .maisi_roi import lesion_case

    window = inpainting_window(backbone, lesion_case(shape, lesion_share)[1], config, crop=crop)
    padded = math.prod(-(-side // backbone.size_multiple) * backbone.size_multiple for side in shape)
    voxels = window.cells * window.downsample ** 3
    steps = config.steps * config.resample * samples
    return [
        Calls("aova", "encoder", 1, padded, padded),
        Calls("inpainting", "encoder", 1, voxels, voxels),
        Calls("inpainting", "denoiser", steps, steps * window.cells, window.cells),
        Calls("inpainting", "decoder", samples, samples * voxels, voxels),
        Calls("residuals", "encoder", 2, 2 * voxels, voxels),
    ]


# ---- the estimate ----------------------------------------------------------------------------------------------------
def case_size(image: Path) -> tuple[tuple[int, int, int], np.ndarray]:
    """A NIfTI file's shape and affine, from its header alone."""
    import nibabel as nib

    path = Path(image)
    if not path.is_file():
        raise InputError(f"{path}: not found; --dry-run reads the size of one NIfTI file (.nii or .nii.gz), or "
                         "pass --shape X,Y,Z instead")
    try:
        header = nib.load(str(path))
    except Exception as exc:  # nibabel raises many kinds for a file that is not NIfTI
        raise InputError(f"{path}: not a NIfTI file, or its header is damaged ({type(exc).__name__}); pass a "
                         ".nii or .nii.gz volume") from None
    shape = tuple(int(s) for s in header.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InputError(f"{path}: shape {header.shape}; a 3D volume is needed")
    return shape, np.asarray(header.affine, np.float64)


def estimate_segment_run(model: str | Path, *, shape: tuple[int, int, int], affine: np.ndarray | None = None,
                         modality: str = "CT", heads: str | Path = "default", seeds: int = 1,
                         lesion_share: float = DEFAULT_LESION_SHARE, device="auto") -> RunEstimate:
    """The time and peak memory of ``diffugts segment`` on a case of ``shape`` (voxels; with ``affine``, resampled
    to the processing grid as the pipeline does; without, taken to be on that grid already)."""
    if not 0 < lesion_share < 1:
        raise InputError(f"--lesion-share must be between 0 and 1 (a share of the volume), got {lesion_share}")
    device = resolve_device(device)
    threads = torch.get_num_threads()
    if is_maisi_model(model):
        from ..inpaint3d import VolumeInpaintConfig  # MONAI's schedulers: imported for a MAISI bundle only

        backbone = maisi_networks(model, device)
        held = held_mb(backbone)
        costs = network_costs(backbone)
        inpaint = residual_inpaint_config(heads, modality)
        config = VolumeInpaintConfig(steps=inpaint.steps, resample=inpaint.resample)
        shape = shape if affine is None else model_grid_plan(
            Volume(np.broadcast_to(np.float32(0), shape), affine), modality, backbone.config.slice_shape).shape
        plans = {"ROI window": maisi_calls(backbone, shape, lesion_share, seeds, crop=True, config=config),
                 "whole volume": maisi_calls(backbone, shape, lesion_share, seeds, crop=False, config=config)}
        grid = (f"{'x'.join(map(str, shape))} voxels (the processing grid), padded to multiples of "
                f"{backbone.size_multiple}; one spherical lesion of {100 * lesion_share:g} % of the volume")
        settings = f"{config.steps} denoising steps x {seeds} sample(s), resample {config.resample}"
        name = f"MAISI bundle {model} (the networks of its config, random weights)"
    else:
        backbone = slice_model_networks(model, device)
        held = held_mb(backbone)
        costs = network_costs(backbone)
        inpaint = residual_inpaint_config(heads, modality)
        slice_shape = tuple(backbone.config.slice_shape)
        slices = shape[2] if affine is None else model_grid_plan(
            Volume(np.broadcast_to(np.float32(0), shape), affine), modality, slice_shape).shape[2]
        plans = {"whole slices": slice_model_calls(slices, slice_shape, backbone.latent_downsample, inpaint, seeds)}
        grid = f"{slices} axial slices of {'x'.join(map(str, slice_shape))} (the model's grid); ROI on every slice"
        settings = (f"{inpaint.steps} DDIM steps x {seeds} sample(s), guidance {inpaint.guidance_scale:g}, "
                    f"resample {inpaint.resample}, batches of {inpaint.batch_size} slices")
        name = "the shipped phantom foundation model" if str(model) == "default" else f"model folder {model}"
    return RunEstimate(name, str(device), threads, grid, plans, costs, held, settings)


def residual_inpaint_config(heads: str | Path, modality: str):
    """The inpainting settings the run's residual head carries (its JSON only, no weights)."""
    from ..heads import heads_folder
    from ..residual import ResidualConfig, TrainedResidualHead

    folder = heads_folder(heads)
    own = folder / f"{TrainedResidualHead.stem(modality.upper())}.json"
    meta = json.loads((own if own.is_file() else folder / f"{TrainedResidualHead.stem(None)}.json").read_text())
    return ResidualConfig.from_dict(meta["config"]).inpaint


def format_estimate(estimate: RunEstimate) -> str:
    costs = ", ".join(f"{network} {1e6 * cost.seconds_per_cell:.2f} us and {1024 * cost.mb_per_cell:.2f} kB per "
                      f"{'latent cell' if network == 'denoiser' else 'voxel'}"
                      for network, cost in estimate.costs.items())
    lines = [f"dry run: {estimate.model} on {estimate.device} ({estimate.threads} thread(s)); nothing is run or written",
             f"  case: {estimate.grid}", f"  run: {estimate.settings}"]
    for path, calls in estimate.plans.items():
        stages = ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in estimate.stage_seconds(path).items())
        cells = sum(c.cells for c in calls if c.network == "denoiser") // max(
            1, sum(c.count for c in calls if c.network == "denoiser"))
        lines.append(f"  {path}: about {format_seconds(estimate.seconds(path))}, peak memory about "
                     f"{estimate.peak_mb(path):,.0f} MB ({stages}; {cells:,} latent cells per denoiser call)")
    lines += [f"  measured here just now: {costs}; {estimate.held_mb:,.0f} MB held before the run",
              "  method: per-cell seconds and memory of each network, timed at a small size on this device, times "
              "the run's calls; loading, the text encoder and preprocessing not counted; memory tends high "
              "(docs/cli.md, segment)"]
    return "\n".join(lines)


def format_seconds(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
