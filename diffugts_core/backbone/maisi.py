"""MAISI (NVIDIA, MONAI) as the frozen foundation model: its 3D VAE and latent diffusion UNet, read from a local bundle.

The networks are MONAI's own classes (``monai.apps.generation.maisi.networks``: ``AutoencoderKlMaisi``,
``DiffusionModelUNetMaisi``) and the scheduler is MONAI's (``RFlowScheduler`` or ``DDPMScheduler``), built from the
bundle's network config and loaded with its weight files; nothing of MAISI is re-implemented here.

A bundle folder is laid out as MAISI distributes it (the weights are not vendored: fetch them from NVIDIA's release,
e.g. the Hugging Face repository ``nvidia/NV-Generate-CT``, under NVIDIA's licence)::

    configs/config_network_rflow.json    the networks and the noise scheduler (or ..._ddpm.json)
    configs/environment_rflow-ct.json    trained_autoencoder_path, trained_diffusion_path (relative to the folder)
    models/autoencoder_v1.pt             the VAE: a plain state dict
    models/diff_unet_3d_rflow-ct.pt      the UNet: {"unet_state_dict": ..., "scale_factor": tensor, ...}

The MONAI tutorials' ``config_maisi3d-{rflow,ddpm}.json`` + ``environment_maisi3d-*.json`` and the MONAI model-zoo
bundle's ``configs/inference.json`` are read too. :func:`write_tiny_bundle` writes a random-weight bundle of the same
classes and format, small enough for tests.

What MAISI takes and the kit gives it:

- Intensity: CT [-1000, 1000] HU -> [0, 1], clipped; MRI the volume's 0th-99.5th percentiles -> [0, 1], not clipped
  (MAISI's ``ScaleIntensityRangePercentilesd(..., clip=False)``). The VAE's output is in the same space.
- Grid: the VAE halves each side twice (4x per axis) and the UNet three times, so a volume is padded to multiples
  of 32 (:meth:`MaisiBackbone.volume_to_batch`) and cropped back (:meth:`MaisiBackbone.batch_to_volume`).
- Conditioning: MAISI is not text-conditioned. Its UNet takes the voxel spacing (mm x 100), the rflow UNet a modality
  class label, the ddpm UNet the top and bottom body region (one-hot x 100). :class:`MaisiConditioning` carries them;
  any other ``Conditioning`` passed to ``denoise`` (text tokens, attention mask, organ map) is ignored and MAISI's
  defaults are used (1.5 mm isotropic CT of the abdomen).
- Prediction: the rflow UNet predicts a velocity, which ``denoise`` turns into the noise prediction the protocol
  promises (:func:`noise_from_velocity`); the ddpm UNet predicts the noise itself.
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
from collections.abc import Mapping
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import (
    AutoencoderKlMaisi,
    MaisiConvolution,
    MaisiDownsample,
    MaisiResBlock,
)
from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi
from monai.networks.schedulers import DDPMScheduler, RFlowScheduler

from ..io import InputError, InputWarning, one_line
from ..runtime import resolve_device
from .base import Conditioning, IntensityMap, block_outputs, ct_intensity_map

# (variant, network config, file naming the weights) under configs/, newest first: NVIDIA's NV-Generate-CTMR
# release, the MONAI tutorials (generation/maisi), the MONAI model-zoo bundle (maisi_ct_generative, whose variant
# its noise scheduler tells).
BUNDLE_LAYOUTS = (
    ("rflow", "config_network_rflow.json", "environment_rflow-ct.json"),
    ("ddpm", "config_network_ddpm.json", "environment_ddpm-ct.json"),
    ("rflow", "config_maisi3d-rflow.json", "environment_maisi3d-rflow.json"),
    ("ddpm", "config_maisi3d-ddpm.json", "environment_maisi3d-ddpm.json"),
    (None, "inference.json", "inference.json"),
)
VARIANTS = ("rflow", "ddpm")
SCHEDULERS = {"RFlowScheduler": RFlowScheduler, "DDPMScheduler": DDPMScheduler}
# MAISI's modality class labels (configs/modality_mapping.json: ct 1, mri 8)
MODALITY_CLASS = {"CT": 1, "MRI": 8}
# MAISI's body regions, top to bottom (scripts/find_masks.py), and the kit's region names
BODY_REGION_INDEX = {"head": 0, "brain": 0, "chest": 1, "thorax": 1, "abdomen": 2, "pelvis": 3, "lower": 3}
CT_WINDOW_HU = (-1000.0, 1000.0)
CUDA_ONLY_FLAGS = ("use_flash_attention", "norm_float16")
MRI_PERCENTILES = (0.0, 99.5)


@dataclass
class MaisiConditioning(Conditioning):
    """What MAISI's UNet is conditioned on instead of text: the case's voxel spacing (mm, x/y/z of the RAS grid), its
    modality (the rflow UNet) and the body regions at the top and bottom of the volume (the ddpm UNet). The text
    fields inherited from ``Conditioning`` are ignored."""

    spacing_mm: tuple[float, float, float] = (1.5, 1.5, 1.5)
    modality: str = "CT"
    body_region: tuple[str, str] = ("abdomen", "abdomen")  # (top, bottom)

    def __post_init__(self):
        if self.modality.upper() not in MODALITY_CLASS:
            raise InputError(f"MAISI knows the modalities {', '.join(MODALITY_CLASS)}, not {self.modality!r}")
        for region in self.body_region:
            if region.lower() not in BODY_REGION_INDEX:
                raise InputError(f"MAISI's body regions are {', '.join(BODY_REGION_INDEX)}, not {region!r}")
        if len(self.spacing_mm) != 3 or not all(s > 0 for s in self.spacing_mm):
            raise InputError(f"spacing_mm must be three positive sizes in mm, got {self.spacing_mm}")


@dataclass(frozen=True)
class MaisiKitConfig:
    """What the kit's stages need to know beside MAISI's own networks: the processing grid's in-plane size (the kit's
    resampling: 2.5 mm CT voxels, 128 x 128 slices, as the heads were trained on PhantomBench; any multiple of 32
    avoids padding) and the text encoder the AOVA heads' prompts are embedded with (MAISI has none of its own)."""

    slice_shape: tuple[int, int] = (128, 128)
    text_encoder: str = "all-MiniLM-L6-v2"


@dataclass(frozen=True)
class BundleFiles:
    """The three files a MAISI backbone is read from."""

    variant: str
    config: Path
    autoencoder: Path
    diffusion: Path


def noise_from_velocity(z_t: torch.Tensor, velocity: torch.Tensor, timesteps: torch.Tensor,
                        num_train_timesteps: int) -> torch.Tensor:
    """The noise a rectified-flow velocity implies.

    MONAI's ``RFlowScheduler.add_noise`` mixes z_t = (1 - s) z_0 + s eps with s = t / T, and MAISI trains the UNet on
    the velocity v = z_0 - eps (``diff_model_train.py``: target ``images - noise``). Hence
    eps = z_t - (1 - s) v."""
    s = timesteps.to(z_t.device, z_t.dtype).reshape(-1, *([1] * (z_t.ndim - 1))) / num_train_timesteps
    return z_t - (1 - s) * velocity


def usable_splits(latent_side: int, configured: int) -> int:
    """How many pieces MAISI's VAE may cut a grid into along its split axis (``num_splits``, which saves GPU memory).

    ``MaisiConvolution`` fails, or silently returns wrong values, when a piece of the coarsest level (the latent
    grid) is under 3 cells or the pieces are unequal (measured against unsplit runs: 2-6, 8 and 16 splits, sides of
    8-132 voxels). So a count too large for the grid is lowered to the largest that divides the latent side into
    pieces of at least 3 cells. The weights do not depend on it."""
    for splits in range(max(configured, 1), 1, -1):
        if latent_side % splits == 0 and latent_side >= 3 * splits:
            return splits
    return 1


class MaisiBackbone:
    """MAISI's frozen VAE and diffusion UNet on (N, C, X, Y, Z) volumes (satisfies ``FrozenBackbone``)."""

    spatial_dims = 3
    text_conditioned = False
    organ_channels: tuple[str, ...] = ()  # MAISI's organ masks go to its ControlNet, which the kit does not load
    denoiser_context: tuple[int, ...] = ()  # 3D: its denoiser sees the slices above and below anyway

    def __init__(self, autoencoder: AutoencoderKlMaisi, unet: DiffusionModelUNetMaisi, scheduler, scale_factor: float,
                 *, device="auto"):
        self.device = resolve_device(device)
        self.autoencoder = autoencoder.to(self.device).eval().requires_grad_(False)
        self.unet = unet.to(self.device).eval().requires_grad_(False)
        self.scheduler = scheduler
        self.scale_factor = float(scale_factor)
        self.config = MaisiKitConfig()
        self.source: Path | None = None  # the bundle folder, when loaded from one
        self.files: BundleFiles | None = None

    # ---- loading ---------------------------------------------------------------------------
    @classmethod
    def from_bundle(cls, folder: str | Path, *, variant: str | None = None, device="auto") -> "MaisiBackbone":
        """Read a MAISI bundle folder (see the module docstring): the rflow or the ddpm variant, the first one found
        when ``variant`` is None. Weight files are read as plain tensors (``weights_only=True``); one that needs full
        unpickling is loaded so after a warning."""
        files = bundle_files(folder, variant)
        device = resolve_device(device)
        definitions = read_network_config(files.config)
        # flash attention and float16 group norms need CUDA (MONAI refuses the one without it, and the other hands a
        # float16 tensor to a float32 convolution outside CUDA autocast); neither changes the weights
        cuda_only = () if device.type == "cuda" else CUDA_ONLY_FLAGS
        autoencoder = build_network(definitions, "autoencoder_def", AutoencoderKlMaisi, files.config, off=cuda_only)
        unet = build_network(definitions, "diffusion_unet_def", DiffusionModelUNetMaisi, files.config, off=cuda_only)
        scheduler = build_scheduler(definitions, files)
        load_weights(autoencoder, load_checkpoint(files.autoencoder), files.autoencoder, files.config)
        checkpoint = load_checkpoint(files.diffusion)
        missing = [key for key in ("unet_state_dict", "scale_factor") if not
                   (isinstance(checkpoint, Mapping) and key in checkpoint)]
        if missing:
            raise InputError(f"{files.diffusion}: not a MAISI diffusion checkpoint (no {' or '.join(missing)}); use "
                             f"the diff_unet_3d_*.pt file of NVIDIA's MAISI release")
        load_weights(unet, checkpoint["unet_state_dict"], files.diffusion, files.config)
        backbone = cls(autoencoder, unet, scheduler, float(checkpoint["scale_factor"]), device=device)
        backbone.source, backbone.files = Path(folder).expanduser(), files
        return backbone

    # ---- protocol attributes ---------------------------------------------------------------
    @property
    def variant(self) -> str:
        return "rflow" if isinstance(self.scheduler, RFlowScheduler) else "ddpm"

    @property
    def latent_channels(self) -> int:
        return int(self.autoencoder.latent_channels)

    @property
    def latent_downsample(self) -> int:
        return 2 ** sum(isinstance(m, MaisiDownsample) for m in self.autoencoder.encoder.blocks)

    @property
    def denoiser_multiple(self) -> int:
        return 2 ** (len(self.unet.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """A volume side the VAE and the UNet both take must be a multiple of this (32 for MAISI)."""
        return self.latent_downsample * self.denoiser_multiple

    @property
    def scaling_factor(self) -> float:
        return self.scale_factor

    def intensity(self, modality: str, volume: np.ndarray) -> IntensityMap:
        if modality.upper() == "CT":
            return ct_intensity_map(CT_WINDOW_HU, (0.0, 1.0))
        if modality.upper() == "MRI":
            return mri_percentile_map(volume)
        raise InputError(f"unknown modality {modality!r}; use CT or MRI")

    def case_conditioning(self, spacing, modality: str, region: str) -> MaisiConditioning:
        """The denoiser's conditioning for a case: its voxel spacing (mm), modality and body region (top and bottom
        alike: the kit's regions are one field of view each)."""
        return MaisiConditioning(tuple(float(s) for s in spacing), modality.upper(), (region, region))

    # ---- volumes <-> batches -----------------------------------------------------------------
    def volume_to_batch(self, volume: np.ndarray) -> torch.Tensor:
        """(X, Y, Z) model-space volume -> (1, 1, X', Y', Z'), padded at the high end of each axis to a multiple of
        ``size_multiple`` with 0 (air for CT, as MAISI pads), so latent cell i covers voxels 4i..4i+3."""
        volume = np.asarray(volume, np.float32)
        if volume.ndim != 3:
            raise InputError(f"a volume of shape {volume.shape}: MAISI takes one 3D volume (X, Y, Z)")
        padding = [(0, -side % self.size_multiple) for side in volume.shape]
        return torch.from_numpy(np.pad(volume, padding))[None, None]

    def batch_to_volume(self, batch: torch.Tensor, shape: tuple[int, int, int]) -> np.ndarray:
        """(1, 1, X', Y', Z') -> the (X, Y, Z) volume ``volume_to_batch`` padded."""
        x, y, z = shape
        return batch[0, 0, :x, :y, :z].detach().float().cpu().numpy()

    # ---- the frozen model --------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x: torch.Tensor, *, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        _check_grid(x, self.latent_downsample, "encode")
        with self._running(self._latent_shape(x)):
            mean, sigma = self.autoencoder.encode(x.to(self.device))
        z = mean.float()
        if sample:
            where = self.device if generator is None else generator.device
            noise = torch.randn(z.shape, generator=generator, device=where)
            z = z + sigma.float() * noise.to(self.device)
        return z * self.scale_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        _check_grid(z, 1, "decode")
        with self._running(tuple(z.shape[2:])):
            return self.autoencoder.decode(z.to(self.device) / self.scale_factor).float()

    def encoder_stages(self) -> list[torch.nn.Module]:
        """One block per VAE level, fine to coarse: the block before each ``MaisiDownsample``, then the last
        residual block (MAISI: 64, 128 and 256 channels at 1, 1/2 and 1/4 of the grid)."""
        blocks = list(self.autoencoder.encoder.blocks)
        stages = [blocks[i - 1] for i, block in enumerate(blocks) if isinstance(block, MaisiDownsample)]
        return stages + [[block for block in blocks if isinstance(block, MaisiResBlock)][-1]]

    @torch.no_grad()
    def encode_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder stages' outputs (see ``encoder_stages``), read with forward hooks removed afterwards."""
        _check_grid(x, self.latent_downsample, "encode_features")
        with block_outputs(self.encoder_stages()) as outputs, self._running(self._latent_shape(x)):
            self.autoencoder.encoder(x.to(self.device))
        return [output.float() for output in outputs]

    @torch.no_grad()
    def denoise(self, z_t: torch.Tensor, t, cond: Conditioning | None = None) -> torch.Tensor:
        """The noise prediction at timestep ``t`` (one for the batch, or one per latent). ``cond``: a
        ``MaisiConditioning`` for the case's spacing, modality and body region; anything else (text tokens,
        attention mask, organ map) is ignored, as MAISI is not text-conditioned, and MAISI's defaults are used."""
        _check_grid(z_t, self.denoiser_multiple, "denoise")
        case = cond if isinstance(cond, MaisiConditioning) else MaisiConditioning()
        z_t = z_t.to(self.device, torch.float32)
        batch = z_t.shape[0]
        timesteps = torch.as_tensor(t, dtype=torch.float32, device=self.device).reshape(-1).expand(batch)
        inputs = {"spacing_tensor": torch.tensor(case.spacing_mm, device=self.device).mul(100.0).expand(batch, 3)}
        if self.unet.include_top_region_index_input:
            top, bottom = (_region_one_hot(region, self.device).mul(100.0).expand(batch, 4)
                           for region in case.body_region)
            inputs.update(top_region_index_tensor=top, bottom_region_index_tensor=bottom)
        if self.unet.num_class_embeds is not None:
            inputs["class_labels"] = torch.full((batch,), MODALITY_CLASS[case.modality.upper()], device=self.device)
        with self._running():
            prediction = self.unet(z_t, timesteps, **inputs).float()
        if self.variant == "rflow":
            return noise_from_velocity(z_t, prediction, timesteps, self.scheduler.num_train_timesteps)
        return prediction

    def _latent_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        return tuple(side // self.latent_downsample for side in x.shape[2:])

    @contextmanager
    def _running(self, latent_shape: tuple[int, ...] | None = None):
        """Model calls as MAISI runs them: under float16 autocast on CUDA (its float16 group norms need it), and,
        for a VAE call on a grid of ``latent_shape`` cells, with as many splits as that grid allows."""
        with ExitStack() as stack:
            stack.enter_context(torch.autocast("cuda", dtype=torch.float16) if self.device.type == "cuda"
                                else nullcontext())
            if latent_shape is not None:
                stack.enter_context(_splits_for(self.autoencoder, latent_shape))
            yield


# ---- reading a bundle ---------------------------------------------------------------------------
def is_maisi_bundle(path) -> bool:
    """Whether ``path`` is a folder with a MAISI network config where ``bundle_files`` looks for one."""
    folder = Path(str(path)).expanduser()
    return folder.is_dir() and any((folder / "configs" / config).is_file() for _, config, _ in BUNDLE_LAYOUTS)


def bundle_files(folder: str | Path, variant: str | None = None) -> BundleFiles:
    """The network config and the two weight files of a bundle, checked to exist."""
    folder = Path(folder).expanduser()
    if variant is not None and variant not in VARIANTS:
        raise InputError(f"MAISI variant {variant!r}: use one of {', '.join(VARIANTS)}")
    layouts = [layout for layout in BUNDLE_LAYOUTS if variant is None or layout[0] in (variant, None)]
    found = next(((tag, folder / "configs" / config, folder / "configs" / environment)
                  for tag, config, environment in layouts if (folder / "configs" / config).is_file()), None)
    if found is None:
        expected = " or ".join(f"configs/{config}" for _, config, _ in layouts)
        raise InputError(f"{folder}: no MAISI network config ({expected}); copy the configs/ folder of NVIDIA's "
                         f"MAISI release (NV-Generate-CTMR) into it")
    tag, config, environment = found
    if not environment.is_file():
        raise InputError(f"{environment}: missing; it names the weight files (trained_autoencoder_path, "
                         f"trained_diffusion_path); copy it from the configs/ folder of NVIDIA's MAISI release")
    paths = _read_json(environment)
    weights = []
    for key in ("trained_autoencoder_path", "trained_diffusion_path"):
        if not isinstance(paths.get(key), str):
            raise InputError(f"{environment}: no {key}; name the weight file there (relative to {folder})")
        path = folder / _bundle_relative(paths[key], environment)
        if not path.is_file():
            raise InputError(f"{path}: missing ({key} in {environment.name}); download it from NVIDIA's MAISI "
                             f"release into {path.parent}")
        weights.append(path)
    scheduler_variant = _scheduler_variant(_read_json(config), config)
    if variant is not None and scheduler_variant != variant:
        raise InputError(f"{config}: its noise scheduler is the {scheduler_variant} variant, not {variant}")
    if tag is not None and tag != scheduler_variant:
        raise InputError(f"{config}: named {tag} but its noise scheduler is the {scheduler_variant} variant; use "
                         f"the config of NVIDIA's release unchanged")
    return BundleFiles(scheduler_variant, config, *weights)


def _bundle_relative(value: str, environment: Path) -> str:
    # the model-zoo bundle writes its paths as expressions over its models folder: "$@model_dir + '/name.pt'"
    if value.startswith("$"):
        match = re.fullmatch(r"\$@model_dir\s*\+\s*'/([^']+)'", value.strip())
        if match is None:
            raise InputError(f"{environment}: cannot read the path {value!r}; write it as a path relative to the "
                             f"bundle folder")
        return f"models/{match.group(1)}"
    return value


def read_network_config(path: Path) -> dict:
    """The network config with its "@name" references resolved (its "$" expressions are refused, never run)."""
    config = _read_json(path)

    def resolve(value):
        if isinstance(value, str) and value.startswith("@"):
            if value[1:] not in config:
                raise InputError(f"{path}: {value} refers to no entry of the file")
            return resolve(config[value[1:]])
        if isinstance(value, str) and value.startswith("$"):
            raise InputError(f"{path}: the expression {value!r} is not read; write the value itself")
        if isinstance(value, list):
            return [resolve(item) for item in value]
        if isinstance(value, dict):  # MONAI's other "_" keys (_requires_, _desc_) say how to run, not what to build
            return {key: resolve(item) for key, item in value.items() if key == "_target_" or not key.startswith("_")}
        return value

    return {key: resolve(config[key]) for key in ("autoencoder_def", "diffusion_unet_def", "noise_scheduler")
            if key in config}


def build_network(definitions: dict, key: str, network_class, config: Path, *, off=()):
    """One MONAI network from its definition, with the flags named in ``off`` turned off where it sets them."""
    definition = definitions.get(key)
    if definition is None:
        raise InputError(f"{config}: no {key}; use the network config of NVIDIA's MAISI release")
    if definition.get("_target_", "").rsplit(".", 1)[-1] != network_class.__name__:
        raise InputError(f"{config}: {key} builds {definition.get('_target_')!r}; the kit builds MONAI's "
                         f"{network_class.__name__} only")
    arguments = {name: value for name, value in definition.items() if name != "_target_"}
    arguments.update({name: False for name in off if name in arguments})
    try:
        return network_class(**arguments)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{config}: {key} does not build a {network_class.__name__} ({one_line(exc)})") from None


def build_scheduler(definitions: dict, files: BundleFiles):
    """MONAI's scheduler of the bundle's variant (``bundle_files`` has checked it is one of ``SCHEDULERS``)."""
    definition = dict(definitions["noise_scheduler"])
    try:
        scheduler = SCHEDULERS[definition.pop("_target_").rsplit(".", 1)[-1]](**definition)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{files.config}: noise_scheduler does not build ({one_line(exc)})") from None
    if isinstance(scheduler, DDPMScheduler) and scheduler.prediction_type != "epsilon":
        raise InputError(f"{files.config}: a DDPM scheduler predicting {scheduler.prediction_type}; MAISI's ddpm UNet "
                         "predicts the noise (epsilon)")
    return scheduler


def load_checkpoint(path: Path):
    """``torch.load`` as plain tensors; a file that needs full unpickling (which runs code stored in it) is loaded so
    only after a warning naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise InputError(f"{path}: not a readable PyTorch file ({one_line(exc)}); download it again") from None
        reason = next((line for line in str(exc).splitlines() if "Unsupported global" in line), one_line(exc))
        warnings.warn(f"{path}: holds more than tensors ({reason.strip()}); unpickling it in full, which runs code "
                      "stored in the file: use only weight files from NVIDIA's own MAISI release", InputWarning,
                      stacklevel=3)
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError) as exc:
        raise InputError(f"{path}: not a readable PyTorch file ({one_line(exc)}); download it again") from None


def load_weights(network: torch.nn.Module, state, weights: Path, config: Path) -> None:
    """Load a state dict that must fit the network exactly; a mismatch is one line naming both files."""
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{weights}: not a state dict of tensors; use the weight file of NVIDIA's MAISI release")
    expected = network.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    reshaped = sorted(k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape)
    problems = [f"{len(missing)} missing (e.g. {missing[0]})"] if missing else []
    problems += [f"{len(unexpected)} unexpected (e.g. {unexpected[0]})"] if unexpected else []
    problems += [f"{len(reshaped)} of another shape (e.g. {reshaped[0]}: {tuple(state[reshaped[0]].shape)} in the "
                 f"file, {tuple(expected[reshaped[0]].shape)} in the config)"] if reshaped else []
    if problems:
        raise InputError(f"{weights}: these weights do not fit the network {config.name} describes "
                         f"({'; '.join(problems)}); use the network config that came with them (same MAISI release "
                         "and variant)")
    network.load_state_dict(state)


def _scheduler_variant(config: dict, path: Path) -> str:
    scheduler = config.get("noise_scheduler")
    target = str(scheduler.get("_target_", "")) if isinstance(scheduler, dict) else ""
    name = target.rsplit(".", 1)[-1]
    if name not in SCHEDULERS:
        raise InputError(f"{path}: noise_scheduler {target or '(none)'!r}; MAISI uses RFlowScheduler or "
                         "DDPMScheduler")
    return "rflow" if name == "RFlowScheduler" else "ddpm"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a readable JSON file ({one_line(exc)})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: a JSON object expected")
    return data


# ---- model calls ------------------------------------------------------------------------------
def mri_percentile_map(volume: np.ndarray) -> IntensityMap:
    """MAISI's MRI normalisation: the 0th and 99.5th percentiles -> 0 and 1, continued linearly (unclipped) to the
    volume's maximum."""
    volume = np.asarray(volume)
    lower, upper = (float(v) for v in np.percentile(volume, MRI_PERCENTILES))
    if not upper > lower:
        raise InputError(f"the MRI volume is constant ({lower:g}); nothing to normalise")
    knots, values = [lower, upper], [0.0, 1.0]
    highest = float(volume.max())
    if highest > upper:
        knots.append(highest)
        values.append((highest - lower) / (upper - lower))
    return IntensityMap(tuple(knots), tuple(values))


def _region_one_hot(region: str, device) -> torch.Tensor:
    one_hot = torch.zeros(4, device=device)
    one_hot[BODY_REGION_INDEX[region.lower()]] = 1.0
    return one_hot


def _check_grid(x: torch.Tensor, multiple: int, call: str) -> None:
    if x.ndim != 5 or any(side % multiple for side in x.shape[2:]):
        raise ValueError(f"{call} takes (N, C, X, Y, Z) with sides that are multiples of {multiple}, got "
                         f"{tuple(x.shape)}; pad volumes with volume_to_batch")


@contextmanager
def _splits_for(autoencoder: AutoencoderKlMaisi, latent_shape: tuple[int, ...]):
    """Every VAE convolution cut into ``usable_splits`` pieces along its split axis for a grid of ``latent_shape``
    cells; the configured counts restored afterwards."""
    convolutions = [m for m in autoencoder.modules() if isinstance(m, MaisiConvolution)]
    configured = [m.num_splits for m in convolutions]
    try:
        for module, splits in zip(convolutions, configured):
            module.num_splits = usable_splits(latent_shape[module.dim_split], splits)
        yield
    finally:
        for module, splits in zip(convolutions, configured):
            module.num_splits = splits


# ---- a tiny bundle for tests and notebooks -------------------------------------------------------
TINY_GRID = 32  # voxels per side of the volume that sets a tiny bundle's scale factor


def tiny_network_config(variant: str = "rflow", *, num_splits: int = 1) -> dict:
    """A network config in MAISI's format with MAISI's architecture and flags at toy width (VAE channels 8/16/16,
    UNet 8/16/16/16); the noise schedulers are MAISI's own."""
    if variant not in VARIANTS:
        raise InputError(f"MAISI variant {variant!r}: use one of {', '.join(VARIANTS)}")
    networks = "monai.apps.generation.maisi.networks"
    unet = {
        "_target_": f"{networks}.diffusion_model_unet_maisi.DiffusionModelUNetMaisi",
        "spatial_dims": "@spatial_dims", "in_channels": "@latent_channels", "out_channels": "@latent_channels",
        "num_channels": [8, 16, 16, 16], "attention_levels": [False, False, True, True],
        "num_head_channels": [0, 0, 8, 8], "num_res_blocks": 1, "norm_num_groups": 8, "use_flash_attention": True,
        "include_top_region_index_input": "@include_body_region",
        "include_bottom_region_index_input": "@include_body_region", "include_spacing_input": True,
    }
    if variant == "rflow":
        unet |= {"num_class_embeds": 128, "resblock_updown": True, "include_fc": True}
        scheduler = {"_target_": "monai.networks.schedulers.rectified_flow.RFlowScheduler", "num_train_timesteps": 1000,
                     "use_discrete_timesteps": False, "use_timestep_transform": True, "sample_method": "uniform",
                     "scale": 1.4}
    else:
        unet |= {"include_fc": False, "resblock_updown": False}
        scheduler = {"_target_": "monai.networks.schedulers.ddpm.DDPMScheduler", "num_train_timesteps": 1000,
                     "beta_start": 0.0015, "beta_end": 0.0195, "schedule": "scaled_linear_beta", "clip_sample": False}
    return {
        "spatial_dims": 3, "image_channels": 1, "latent_channels": 4, "include_body_region": variant == "ddpm",
        "autoencoder_def": {
            "_target_": f"{networks}.autoencoderkl_maisi.AutoencoderKlMaisi",
            "spatial_dims": "@spatial_dims", "in_channels": "@image_channels", "out_channels": "@image_channels",
            "latent_channels": "@latent_channels", "num_channels": [8, 16, 16], "num_res_blocks": [2, 2, 2],
            "norm_num_groups": 8, "norm_eps": 1e-06, "attention_levels": [False, False, False],
            "with_encoder_nonlocal_attn": False, "with_decoder_nonlocal_attn": False, "use_checkpointing": False,
            "use_convtranspose": False, "norm_float16": True, "num_splits": num_splits, "dim_split": 1,
        },
        "diffusion_unet_def": unet,
        "noise_scheduler": scheduler,
    }


def write_tiny_bundle(folder: str | Path, variant: str = "rflow", *, seed: int = 0, num_splits: int = 1) -> Path:
    """A random-weight MAISI bundle in MAISI's own layout and file formats (see the module docstring), with the
    networks of ``tiny_network_config``: what tests and notebooks run MAISI's code path on without its weights."""
    folder = Path(folder)
    config = tiny_network_config(variant, num_splits=num_splits)
    (folder / "configs").mkdir(parents=True, exist_ok=True)
    (folder / "models").mkdir(exist_ok=True)
    config_file = folder / "configs" / f"config_network_{variant}.json"
    config_file.write_text(json.dumps(config, indent=4) + "\n")
    weights = {"trained_autoencoder_path": "models/autoencoder_v1.pt",
               "trained_diffusion_path": f"models/diff_unet_3d_{variant}-ct.pt"}
    (folder / "configs" / f"environment_{variant}-ct.json").write_text(json.dumps(weights, indent=4) + "\n")

    definitions = read_network_config(config_file)
    torch.manual_seed(seed)
    autoencoder = build_network(definitions, "autoencoder_def", AutoencoderKlMaisi, config_file, off=CUDA_ONLY_FLAGS)
    unet = build_network(definitions, "diffusion_unet_def", DiffusionModelUNetMaisi, config_file, off=CUDA_ONLY_FLAGS)
    # MONAI zero-initialises the last convolution of the UNet and of each of its residual blocks, so an untrained UNet
    # predicts 0 whatever its input, timestep and conditioning; a stand-in for trained weights has to answer them
    for parameter in unet.parameters():
        if not parameter.any():
            torch.nn.init.normal_(parameter, std=0.05)
    # MAISI's scale factor: 1 / std of the latents (diff_model_train.calculate_scale_factor)
    unscaled = MaisiBackbone(autoencoder, unet, None, 1.0, device="cpu")
    latents = unscaled.encode(torch.rand(1, 1, TINY_GRID, TINY_GRID, TINY_GRID))
    torch.save(autoencoder.state_dict(), folder / weights["trained_autoencoder_path"])
    torch.save({"unet_state_dict": unet.state_dict(), "scale_factor": 1.0 / latents.std(),
                "num_train_timesteps": config["noise_scheduler"]["num_train_timesteps"]},
               folder / weights["trained_diffusion_path"])
    return folder
