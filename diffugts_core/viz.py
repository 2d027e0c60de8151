"""Static pictures: slice montages with overlays (organs, tumor, any float map), saved as PNG.

Arrays are taken in RAS voxel order (processing space, or PhantomBench as written). Axial slices
are shown in the radiological convention: patient right on the image's left, anterior at the top.
The interactive viewer of the notebooks builds on these functions and falls back to them when no
widget front end is present.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap

from .io import atomic_path
from .preprocess import CT_WINDOWS, normalize_mri

# One colour per organ label id (see phantoms.ORGAN_LABELS); index 0 is transparent.
_ORGAN_COLOURS = {
    1: "#f2e394", 2: "#c0504d", 3: "#f5f5f5", 4: "#8c564b", 5: "#9467bd", 6: "#2ca02c", 7: "#98df8a",
    8: "#ff7f0e", 9: "#d62728", 10: "#e377c2", 11: "#bcbd22", 12: "#1f77b4", 13: "#aec7e8", 14: "#ff9896",
    15: "#17becf", 20: "#1f77b4", 21: "#7f7f7f", 22: "#dbdb8d",
}
ORGAN_CMAP = ListedColormap(["#00000000"] + [_ORGAN_COLOURS.get(i, "#7f7f7f") for i in range(1, 23)])


def axial(volume: np.ndarray, k: int) -> np.ndarray:
    """Axial slice ``k`` of a RAS array, oriented for display (radiological convention)."""
    return np.asarray(volume)[:, :, k].T[::-1, ::-1]


def display_image(volume: np.ndarray, modality: str = "CT", window: str = "soft_tissue") -> np.ndarray:
    """Grey values in [0, 1] for display: a CT window or MRI percentiles."""
    if modality.upper() == "CT":
        lower, upper = CT_WINDOWS[window]
        return np.clip((volume - lower) / (upper - lower), 0, 1)
    return normalize_mri(volume)


def pick_slices(depth: int, n: int, focus: np.ndarray | None = None) -> list[int]:
    """``n`` axial slice indices: across the focus mask's extent if given and non-empty, else the middle 80%."""
    if focus is not None and np.any(focus):
        ks = np.flatnonzero(np.asarray(focus).any(axis=(0, 1)))
        lo, hi = int(ks.min()), int(ks.max())
    else:
        lo, hi = int(depth * 0.1), int(depth * 0.9) - 1
    return sorted({int(round(v)) for v in np.linspace(lo, hi, n)})


def tumor_centre_slice(tumor: np.ndarray) -> int:
    """The axial slice with the most tumor voxels (the middle slice when there is no tumor)."""
    per_slice = np.asarray(tumor).sum(axis=(0, 1))
    return int(per_slice.argmax()) if per_slice.any() else tumor.shape[2] // 2


def montage(image: np.ndarray, *, modality: str = "CT", window: str = "soft_tissue", organs=None, tumor=None,
            maps: dict[str, np.ndarray] | None = None, slices=None, n_slices: int = 6, alpha: float = 0.4,
            title: str | None = None) -> plt.Figure:
    """A grid of axial slices: the image, then the image with organs, then each float map.

    The tumor (if given) is drawn as a red contour on every panel.
    """
    grey = display_image(image, modality, window)
    slices = list(slices) if slices is not None else pick_slices(image.shape[2], n_slices, tumor)
    rows = [("image", None)]
    if organs is not None:
        rows.append(("organs", organs))
    rows += list((maps or {}).items())
    fig, axes = plt.subplots(len(rows), len(slices), figsize=(2.2 * len(slices), 2.3 * len(rows)), squeeze=False)
    for r, (name, layer) in enumerate(rows):
        for c, k in enumerate(slices):
            ax = axes[r, c]
            ax.imshow(axial(grey, k), cmap="gray", vmin=0, vmax=1)
            if name == "organs":
                ax.imshow(axial(layer, k), cmap=ORGAN_CMAP, vmin=0, vmax=22, alpha=alpha, interpolation="nearest")
            elif layer is not None:
                ax.imshow(axial(layer, k), cmap="magma", alpha=alpha + 0.2)
            if tumor is not None and np.any(axial(tumor, k)):
                ax.contour(axial(tumor, k), levels=[0.5], colors="red", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"z = {k}", fontsize=8)
            if c == 0:
                ax.set_ylabel(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def case_grid(cases, *, alpha: float = 0.4, title: str | None = None) -> plt.Figure:
    """One row per case (image, organs, tumor) at the slice with the most tumor.

    ``cases``: objects with ``case_id``, ``modality``, ``image``, ``organs``, ``tumor`` (PhantomCase).
    """
    fig, axes = plt.subplots(len(cases), 3, figsize=(7.5, 2.5 * len(cases)), squeeze=False)
    for r, case in enumerate(cases):
        k = tumor_centre_slice(case.tumor)
        window = "lung" if getattr(case, "region", "") == "thorax" else "soft_tissue"
        grey = axial(display_image(case.image, case.modality, window), k)
        for c, label in enumerate(("image", "organs", "tumor")):
            ax = axes[r, c]
            ax.imshow(grey, cmap="gray", vmin=0, vmax=1)
            if label == "organs":
                ax.imshow(axial(case.organs, k), cmap=ORGAN_CMAP, vmin=0, vmax=22, alpha=alpha, interpolation="nearest")
            if label == "tumor" and case.tumor.any():
                ax.contour(axial(case.tumor, k), levels=[0.5], colors="red", linewidths=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(label, fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{case.case_id}\n{case.modality}, z={k}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def save_figure(fig: plt.Figure, path: str | Path, dpi: int = 110) -> Path:
    """Save a figure as PNG atomically and close it."""
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return path
