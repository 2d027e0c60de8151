"""ROI sub-volume inpainting against whole-volume inpainting on MAISI's 3D networks: latent cells denoised, voxels
decoded, wall time and peak memory, for a spherical lesion of a given share of the volume.

Tiny random-weight bundles (``maisi.write_tiny_bundle``) at 64^3 and 128^3; MAISI's real-size architecture (its VAE
64/128/256 and the UNet of NV-Generate's ``config_network_rflow.json``) with random weights at 64^3 on a CPU, and at
128^3 and 256 x 256 x 128 too when a GPU is at hand. Figures only: nothing here is asserted (these machines are noisy).

    python -m diffugts_core.experiments.maisi_roi
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi
from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi
from monai.networks.schedulers import RFlowScheduler

from ..backbone.maisi import CUDA_ONLY_FLAGS, MaisiBackbone, write_tiny_bundle
from ..inpaint3d import VolumeInpaintConfig, inpaint_volume, inpainting_window
from ..runtime import measured, resolve_device

# MAISI's networks at their real size (NV-Generate-CT configs/config_network_rflow.json; MONAI 1.6.1 classes)
REAL_AUTOENCODER = {
    "spatial_dims": 3, "in_channels": 1, "out_channels": 1, "latent_channels": 4, "num_channels": [64, 128, 256],
    "num_res_blocks": [2, 2, 2], "norm_num_groups": 32, "norm_eps": 1e-06, "attention_levels": [False, False, False],
    "with_encoder_nonlocal_attn": False, "with_decoder_nonlocal_attn": False, "use_checkpointing": False,
    "use_convtranspose": False, "norm_float16": True, "num_splits": 4, "dim_split": 1,
}
REAL_UNET = {
    "spatial_dims": 3, "in_channels": 4, "out_channels": 4, "num_channels": [64, 128, 256, 512],
    "attention_levels": [False, False, True, True], "num_head_channels": [0, 0, 32, 32], "num_res_blocks": 2,
    "use_flash_attention": True, "include_top_region_index_input": False, "include_bottom_region_index_input": False,
    "include_spacing_input": True, "num_class_embeds": 128, "resblock_updown": True, "include_fc": True,
}
REAL_SCHEDULER = {"num_train_timesteps": 1000, "use_discrete_timesteps": False, "use_timestep_transform": True,
                  "sample_method": "uniform", "scale": 1.4}
TINY_SHAPES = ((64, 64, 64), (128, 128, 128))
REAL_SHAPES_CPU = ((64, 64, 64),)
REAL_SHAPES_GPU = ((64, 64, 64), (128, 128, 128), (256, 256, 128))
LESION_SHARES = (0.005, 0.05)  # of the volume: a small lesion and the largest
MEASURE_CONFIG = VolumeInpaintConfig(steps=10)  # fewer than MAISI's 30: both paths scale alike with the steps


@dataclass
class RoiRow:
    model: str
    shape: tuple[int, int, int]
    lesion_share: float
    path: str  # "crop" or "whole"
    latent_cells: int
    voxels_decoded: int
    seconds: float
    peak_mb: float


def real_size_backbone(device="auto") -> MaisiBackbone:
    """MAISI's real-size rflow networks with MONAI's random initialisation (scale factor 1)."""
    device = resolve_device(device)
    off = {} if device.type == "cuda" else dict.fromkeys(CUDA_ONLY_FLAGS, False)
    autoencoder = AutoencoderKlMaisi(**(REAL_AUTOENCODER | {k: v for k, v in off.items() if k in REAL_AUTOENCODER}))
    unet = DiffusionModelUNetMaisi(**(REAL_UNET | {k: v for k, v in off.items() if k in REAL_UNET}))
    return MaisiBackbone(autoencoder, unet, RFlowScheduler(**REAL_SCHEDULER), 1.0, device=device)


def lesion_case(shape: tuple[int, int, int], share: float) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like volume (soft tissue in air, HU) with one spherical lesion of ``share`` of the volume, off centre;
    the lesion is the ROI."""
    grid = np.indices(shape, dtype=np.float32)
    sides = np.array(shape, np.float32)[:, None, None, None]
    body = (((grid - sides / 2) / (0.45 * sides)) ** 2).sum(0) <= 1
    radius = (3 * share * np.prod(shape) / (4 * np.pi)) ** (1 / 3)
    centre = 0.4 * sides
    lesion = ((grid - centre) ** 2).sum(0) <= radius ** 2
    image = np.where(body, 40.0, -1000.0) + np.random.default_rng(0).normal(0, 10, shape)
    return np.where(lesion, image + 150.0, image).astype(np.float32), lesion


def measure(backbone, model: str, shape, share: float, config: VolumeInpaintConfig = MEASURE_CONFIG) -> list[RoiRow]:
    """Crop then whole volume on one case (the crop first, so memory the whole run frees cannot hide the crop's).
    A crop whose window is the whole grid is the whole volume's run and is not run twice."""
    image, roi = lesion_case(shape, share)
    rows = []
    for path in ("crop", "whole"):
        window = inpainting_window(backbone, roi, config, crop=path == "crop")
        if path == "whole" and rows and rows[0].latent_cells == window.cells:
            rows.append(replace(rows[0], path="whole"))
            rows[0].path = "crop (= whole: the window covers the grid)"
            continue
        with measured(backbone.device) as cost:
            inpaint_volume(backbone, image, "CT", roi, config, crop=path == "crop")
        voxels = int(np.prod([s.stop - s.start for s in window.voxels]))
        rows.append(RoiRow(model, tuple(shape), float(roi.mean()), path, window.cells, voxels, *cost))
    return rows


def roi_inpainting_table(*, device="auto", real_size: bool = True, tiny_shapes=TINY_SHAPES,
                         shares=LESION_SHARES, config: VolumeInpaintConfig = MEASURE_CONFIG) -> list[RoiRow]:
    """Crop against whole volume for the tiny networks at ``tiny_shapes`` and each lesion share, and for the
    real-size architecture (the smaller share only) at 64^3, plus 128^3 and 256 x 256 x 128 on a GPU."""
    device = resolve_device(device)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        tiny = MaisiBackbone.from_bundle(write_tiny_bundle(Path(folder) / "rflow", "rflow"), device=device)
        for shape in tiny_shapes:
            for share in shares:
                rows += measure(tiny, "tiny (8/16/16)", shape, share, config)
    if real_size:
        backbone = real_size_backbone(device)
        for shape in REAL_SHAPES_GPU if device.type == "cuda" else REAL_SHAPES_CPU:
            rows += measure(backbone, "real size (64/128/256)", shape, min(shares), config)
    return rows


def markdown(rows: list[RoiRow]) -> str:
    """The table, with whole / crop ratios on each crop row."""
    lines = ["| model | volume | lesion | path | latent cells denoised | voxels decoded | time (s) | peak memory (MB) |"
             " cells whole/crop | time whole/crop | memory whole/crop |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for crop, whole in zip(rows[::2], rows[1::2]):
        for row in (crop, whole):
            ratios = ("", "", "") if row is whole else (
                f"{whole.latent_cells / row.latent_cells:.1f}x", f"{whole.seconds / row.seconds:.1f}x",
                f"{whole.peak_mb / row.peak_mb:.1f}x" if row.peak_mb > 0 else "n/a")
            lines.append(f"| {row.model} | {'x'.join(map(str, row.shape))} | {100 * row.lesion_share:.1f} % | "
                         f"{row.path} | {row.latent_cells:,} | {row.voxels_decoded:,} | {row.seconds:.2f} | "
                         f"{row.peak_mb:.0f} | {' | '.join(ratios)} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-real-size", action="store_true", help="only the tiny networks")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(f"device {device}, {torch.get_num_threads()} thread(s), {MEASURE_CONFIG.steps} steps, context "
          f"{MEASURE_CONFIG.context} latent cells")
    print(markdown(roi_inpainting_table(device=device, real_size=not args.no_real_size)))


if __name__ == "__main__":
    main()
