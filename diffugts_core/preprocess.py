"""Preprocessing: invertible spatial steps and intensity normalisation.

Spatial steps (MONAI style: each does one thing and can be undone) are recorded in a
:class:`SpatialPlan`: reorient to RAS (a pure permutation/flip of the voxel array, so oblique and
LPS inputs round-trip exactly), resample to a target spacing, and pad (or centre-crop) to a shape or
to a multiple of N. ``plan.apply`` takes a volume to processing space; ``plan.invert`` takes any
array computed there (mask, probability, map) back onto the input's own voxel grid, so a written
mask overlays the input voxel for voxel in any viewer.

Intensity: named CT windows (MAISI's [-1000, 1000] HU -> [0, 1] and the radiological
soft-tissue / liver / lung / bone windows) and MRI percentile normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
from nibabel import orientations
from scipy import ndimage

from .io import InputError, Volume

# (lower, upper) HU; radiological windows are width/level: soft tissue W400/L40, liver W150/L60,
# lung W1500/L-600, bone W1800/L400. MAISI maps [-1000, 1000] HU to [0, 1].
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "maisi": (-1000.0, 1000.0),
    "soft_tissue": (-160.0, 240.0),
    "liver": (-15.0, 135.0),
    "lung": (-1350.0, 150.0),
    "bone": (-500.0, 1300.0),
}


def window_ct(hu: np.ndarray, window: str | tuple[float, float] = "maisi") -> np.ndarray:
    """Clip HU to a window and scale to [0, 1]."""
    lower, upper = _window_bounds(window)
    return np.clip((np.asarray(hu, np.float32) - lower) / (upper - lower), 0.0, 1.0)


def unwindow_ct(values: np.ndarray, window: str | tuple[float, float] = "maisi") -> np.ndarray:
    """Inverse of :func:`window_ct` inside the window (clipped values stay at the bounds)."""
    lower, upper = _window_bounds(window)
    return np.asarray(values, np.float32) * (upper - lower) + lower


def _window_bounds(window) -> tuple[float, float]:
    if isinstance(window, str):
        if window not in CT_WINDOWS:
            raise ValueError(f"unknown CT window {window!r}; choose from {', '.join(CT_WINDOWS)} or pass (lower, upper)")
        return CT_WINDOWS[window]
    lower, upper = (float(v) for v in window)
    if not upper > lower:
        raise ValueError(f"window upper bound must exceed lower bound, got ({lower}, {upper})")
    return lower, upper


def body_mask(image: np.ndarray, modality: str) -> np.ndarray:
    """The patient's body, slice by slice: CT above -500 HU, MRI above 5 % of its 99th percentile; holes
    (lungs, bowel gas) filled."""
    threshold = -500.0 if modality.upper() == "CT" else 0.05 * float(np.percentile(image, 99))
    inside = image > threshold
    return np.stack([ndimage.binary_fill_holes(inside[:, :, k]) for k in range(image.shape[2])], axis=2)


def normalize_mri(image: np.ndarray, lower_percentile: float = 0.0, upper_percentile: float = 99.5,
                  mask: np.ndarray | None = None) -> np.ndarray:
    """Map the [lower, upper] percentiles (of the foreground, by default non-zero voxels) to [0, 1], clipped."""
    image = np.asarray(image, np.float32)
    foreground = image[mask] if mask is not None else image[image > 0]
    if foreground.size == 0:
        raise InputError("MRI volume has no foreground voxels (all zero); check the file.")
    lower, upper = np.percentile(foreground, [lower_percentile, upper_percentile])
    return np.clip((image - lower) / max(upper - lower, 1e-6), 0.0, 1.0)


@dataclass(frozen=True)
class SpatialConfig:
    """What processing space looks like. ``None`` leaves that step out."""

    target_spacing: tuple[float, float, float] | None = None
    target_shape: tuple[int, int, int] | None = None  # pad / centre-crop to exactly this
    divisible_by: int | tuple[int, int, int] | None = None  # else pad up to a multiple of this


@dataclass(frozen=True)
class SpatialPlan:
    """The recorded spatial steps for one input grid; apply forward, invert backward."""

    input_shape: tuple[int, int, int]
    input_affine: np.ndarray
    to_ras: np.ndarray  # nibabel orientation transform, input axes -> RAS
    ras_shape: tuple[int, int, int]
    ras_affine: np.ndarray
    resampled_shape: tuple[int, int, int]
    pad_before: tuple[int, int, int]  # negative = cropped
    shape: tuple[int, int, int]  # processing-space shape
    affine: np.ndarray  # processing-space affine

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in nib.affines.voxel_sizes(self.affine))

    def apply(self, array: np.ndarray, *, order: int = 1, fill: float = 0.0) -> np.ndarray:
        """Input grid -> processing space. ``order`` 0 for labels, 1 for images."""
        if tuple(array.shape) != self.input_shape:
            raise InputError(f"array shape {array.shape} does not match the planned input shape {self.input_shape}")
        ras = orientations.apply_orientation(array, self.to_ras)
        resampled = _resample(ras, self.resampled_shape, order)
        return _pad_or_crop(resampled, self.pad_before, self.shape, fill)

    def invert(self, array: np.ndarray, *, kind: str = "continuous") -> np.ndarray:
        """Processing space -> input grid. ``kind``: "continuous" (linear), "mask" (binary), "labels"."""
        if tuple(array.shape) != self.shape:
            raise ValueError(f"array shape {array.shape} is not the processing shape {self.shape}")
        unpadded = _pad_or_crop(array, tuple(-p for p in self.pad_before), self.resampled_shape, 0)
        if kind == "continuous":
            ras = _resample(unpadded.astype(np.float32), self.ras_shape, 1)
        elif kind == "mask":
            ras = _resample(unpadded.astype(np.float32), self.ras_shape, 1) >= 0.5
        elif kind == "labels":
            ras = _resample_labels(unpadded, self.ras_shape)
        else:
            raise ValueError(f"kind must be 'continuous', 'mask' or 'labels', got {kind!r}")
        from_ras = orientations.ornt_transform(orientations.axcodes2ornt("RAS"), orientations.io_orientation(self.input_affine))
        out = orientations.apply_orientation(ras, from_ras)
        return out.astype(array.dtype) if kind != "continuous" else out


def plan_spatial(volume: Volume, config: SpatialConfig = SpatialConfig()) -> SpatialPlan:
    shape = volume.shape
    to_ras = orientations.ornt_transform(orientations.io_orientation(volume.affine), orientations.axcodes2ornt("RAS"))
    ras_shape = tuple(int(s) for s in orientations.apply_orientation(np.empty(shape, np.uint8), to_ras).shape)
    ras_affine = volume.affine @ orientations.inv_ornt_aff(to_ras, shape)
    ras_spacing = nib.affines.voxel_sizes(ras_affine)

    resampled_shape = ras_shape
    resampled_affine = ras_affine
    if config.target_spacing is not None:
        target = np.asarray(config.target_spacing, float)
        if target.shape != (3,) or np.any(target <= 0):
            raise InputError(f"target spacing must be three positive numbers (mm), got {config.target_spacing}")
        resampled_shape = tuple(max(1, int(round(n * s / t))) for n, s, t in zip(ras_shape, ras_spacing, target))
        scale = np.array(ras_shape) / np.array(resampled_shape)
        resampled_affine = ras_affine @ _scale_affine(scale)

    if config.target_shape is not None:
        final = tuple(int(s) for s in config.target_shape)
    elif config.divisible_by is not None:
        div = np.broadcast_to(np.asarray(config.divisible_by, int), (3,))
        final = tuple(int(np.ceil(n / d) * d) for n, d in zip(resampled_shape, div))
    else:
        final = resampled_shape
    pad_before = tuple((f - n) // 2 for f, n in zip(final, resampled_shape))
    affine = resampled_affine.copy()
    affine[:3, 3] -= resampled_affine[:3, :3] @ np.array(pad_before, float)
    return SpatialPlan(shape, volume.affine.copy(), to_ras, ras_shape, ras_affine, resampled_shape, pad_before, final, affine)


def _scale_affine(scale: np.ndarray) -> np.ndarray:
    # voxel i of the new grid covers input voxels [i*s, (i+1)*s): its centre is at (i + 0.5) * s - 0.5
    matrix = np.diag(np.append(scale, 1.0))
    matrix[:3, 3] = (scale - 1) / 2
    return matrix


def _resample(array: np.ndarray, out_shape: tuple[int, int, int], order: int) -> np.ndarray:
    if tuple(array.shape) == tuple(out_shape):
        return array
    scale = np.array(array.shape) / np.array(out_shape)
    return ndimage.affine_transform(array, scale, offset=(scale - 1) / 2, output_shape=out_shape, order=order,
                                    mode="nearest")


def _resample_labels(labels: np.ndarray, out_shape) -> np.ndarray:
    # linear interpolation of each label's indicator, then the most likely label: no half-voxel bias
    values = np.unique(labels)
    best = np.full(out_shape, -1.0, np.float32)
    out = np.zeros(out_shape, labels.dtype)
    for value in values:
        score = _resample((labels == value).astype(np.float32), out_shape, 1)
        better = score > best
        out[better], best[better] = value, score[better]
    return out


def _pad_or_crop(array: np.ndarray, before: tuple[int, int, int], out_shape, fill: float) -> np.ndarray:
    out = np.full(out_shape, fill, dtype=array.dtype)
    src, dst = [], []
    for b, n_in, n_out in zip(before, array.shape, out_shape):
        start_out, start_in = max(b, 0), max(-b, 0)
        length = min(n_in - start_in, n_out - start_out)
        src.append(slice(start_in, start_in + length))
        dst.append(slice(start_out, start_out + length))
    out[tuple(dst)] = array[tuple(src)]
    return out


# The grid the default model and heads were trained on (PhantomBench at 128 x 128 x 64): CT 320 mm in-plane
# at 2.5 mm and 4 mm slices; MRI brain 1.5 x 1.78 x 3 mm.
PREPROCESS_VERSION = 1  # bump when the processing grid or the intensity maps change (keys cached pseudo-healthy images)
MODEL_SPACING_MM = {"CT": (2.5, 2.5, 4.0), "MRI": (1.5, 1.78125, 3.0)}


def model_grid_plan(volume: Volume, modality: str, slice_shape=(128, 128)) -> SpatialPlan:
    """RAS, the model's spacing, and the in-plane size the model was trained on (slices kept as many as they come)."""
    spacing = MODEL_SPACING_MM.get(modality.upper())
    if spacing is None:
        raise InputError(f"no processing grid for modality {modality!r}; use CT or MRI")
    resampled = plan_spatial(volume, SpatialConfig(target_spacing=spacing))
    return plan_spatial(volume, SpatialConfig(target_spacing=spacing,
                                              target_shape=(*slice_shape, resampled.resampled_shape[2])))
