"""Static pictures: slice montages with overlays (organs, tumor, any float map), saved as PNG.

Arrays are taken in RAS voxel order (processing space, or PhantomBench as written). Axial slices
are shown in the radiological convention: patient right on the image's left, anterior at the top.
The interactive viewer of the notebooks builds on these functions and falls back to them when no
widget front end is present.
"""

from __future__ import annotations

import base64
import importlib.util
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap

from .io import atomic_path
from .preprocess import CT_WINDOWS, normalize_mri
from .vocabulary import ORGAN_LABELS

# One colour per organ label id (see ORGAN_LABELS); index 0 is transparent.
_ORGAN_COLOURS = {
    1: "#f2e394", 2: "#c0504d", 3: "#f5f5f5", 4: "#8c564b", 5: "#9467bd", 6: "#2ca02c", 7: "#98df8a",
    8: "#ff7f0e", 9: "#d62728", 10: "#e377c2", 11: "#bcbd22", 12: "#1f77b4", 13: "#aec7e8", 14: "#ff9896",
    15: "#17becf", 20: "#1f77b4", 21: "#7f7f7f", 22: "#dbdb8d",
}
ORGAN_CMAP = ListedColormap(["#00000000"] + [_ORGAN_COLOURS.get(i, "#7f7f7f") for i in range(1, 23)])


VIEW_AXES = {"axial": 2, "coronal": 1, "sagittal": 0}


def view_slice(volume: np.ndarray, view: str, k: int) -> np.ndarray:
    """Slice ``k`` of a RAS array along ``view``, oriented for display.

    Axial and coronal: patient right on the image's left (radiological); axial: anterior at the top;
    coronal and sagittal: superior at the top; sagittal: anterior on the left.
    """
    return display_plane(np.take(np.asarray(volume), k, axis=VIEW_AXES[view]))


def display_plane(plane: np.ndarray) -> np.ndarray:
    """A 2D array indexed (first in-plane axis, second) in RAS order, turned for display (radiological)."""
    return np.asarray(plane).T[::-1, ::-1]


def axial(volume: np.ndarray, k: int) -> np.ndarray:
    """Axial slice ``k`` of a RAS array, oriented for display (radiological convention)."""
    return view_slice(volume, "axial", k)


def view_aspect(spacing, view: str) -> float:
    """imshow aspect (row spacing / column spacing) so that millimetres look square."""
    in_plane = [a for a in range(3) if a != VIEW_AXES[view]]
    return float(spacing[in_plane[1]] / spacing[in_plane[0]])


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
            maps: dict[str, np.ndarray] | None = None, images: dict[str, np.ndarray] | None = None, truth=None,
            slices=None, n_slices: int = 6, alpha: float = 0.4, title: str | None = None,
            tumor_label: str = "tumor", units: dict[str, str] | None = None, spacing=None) -> plt.Figure:
    """A grid of axial slices: the image, other images in the same window (``images``, e.g. a pseudo-healthy one),
    the image with organs, then each float map.

    The tumor (if given) is drawn as a red contour on every panel, named ``tumor_label`` in the legend ("mask" when it
    is a method's mask), a reference mask (``truth``) in cyan. Each map row has one colour scale for all its slices
    (the map's range over the volume) and a colour bar labelled with the map's name and its unit from ``units``; the
    organ row a legend of the organs present. The first panel carries the orientation letters, and a 5 cm bar when
    ``spacing`` (mm) is given.
    """
    grey = display_image(image, modality, window)
    slices = list(slices) if slices is not None else pick_slices(image.shape[2], n_slices,
                                                                  tumor if truth is None else truth)
    rows = [("image", None)] + [(name, display_image(other, modality, window)) for name, other in (images or {}).items()]
    greys = {name for name, _ in rows}
    if organs is not None:
        rows.append(("organs", organs))
    rows += list((maps or {}).items())
    fig, axes = plt.subplots(len(rows), len(slices), figsize=(2.2 * len(slices) + 0.8, 2.3 * len(rows)),
                             squeeze=False, layout="constrained")
    for r, (name, layer) in enumerate(rows):
        grey_row = name in greys
        if layer is not None and not grey_row and name != "organs":
            scale = {"vmin": min(0.0, float(np.min(layer))), "vmax": max(float(np.max(layer)), 1e-6)}
        for c, k in enumerate(slices):
            ax = axes[r, c]
            ax.imshow(axial(layer if grey_row and layer is not None else grey, k), cmap="gray", vmin=0, vmax=1)
            if name == "organs" and not grey_row:
                ax.imshow(axial(layer, k), cmap=ORGAN_CMAP, vmin=0, vmax=22, alpha=alpha, interpolation="nearest")
            elif layer is not None and not grey_row:
                shown = ax.imshow(axial(layer, k), cmap="magma", alpha=alpha + 0.2, **scale)
            if tumor is not None and np.any(axial(tumor, k)):
                ax.contour(axial(tumor, k), levels=[0.5], colors="red", linewidths=0.8)
            if truth is not None and np.any(axial(truth, k)):
                ax.contour(axial(truth, k), levels=[0.5], colors="cyan", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"z = {k}", fontsize=8)
            if c == 0:
                ax.set_ylabel(name, fontsize=9)
        if layer is not None and not grey_row and name != "organs":
            fig.colorbar(shown, ax=axes[r, :], fraction=0.02, pad=0.01, label=_with_unit(name, units))
        if name == "organs":
            present = [int(i) for i in np.unique(np.take(layer, slices, axis=2)) if i > 0]
            names = {i: n for n, i in ORGAN_LABELS.items()}
            axes[r, -1].legend(handles=[plt.Rectangle((0, 0), 1, 1, color=ORGAN_CMAP(i), label=names.get(i, str(i)))
                                        for i in present], fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5),
                               frameon=False)
    mark_orientation(axes[0, 0], "axial", spacing, axial(grey, slices[0]).shape)
    outlines = [plt.Line2D([], [], color=colour, label=label) for mask, colour, label in
                ((tumor, "red", tumor_label), (truth, "cyan", "truth")) if mask is not None]
    if outlines:
        fig.legend(handles=outlines, loc="outside lower center", ncols=len(outlines), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _with_unit(name: str, units: dict[str, str] | None) -> str:
    unit = (units or {}).get(name)
    return f"{name} ({unit})" if unit else name


def overlay_panels(image: np.ndarray, maps: dict[str, np.ndarray], k: int, *, modality: str = "CT",
                   window: str = "soft_tissue", contour=None, alpha: float = 0.6, vmax: float | None = 1.0,
                   title: str | None = None, label: str = "score (0 to 1)", spacing=None) -> plt.Figure:
    """One axial slice ``k``, one panel per float map (3D volumes or 2D slices), the image beneath each.

    Maps of another in-plane size (a coarse stage, a latent grid) are stretched over the image. ``contour``
    (a 3D mask, e.g. the tumor) is drawn in red on every panel. The maps share one colour scale, [0, ``vmax``], and
    one colour bar, labelled ``label`` (what the maps hold, in which unit); ``vmax=None`` scales each map to its own
    maximum, with a colour bar each, labelled with the map's name. The first panel carries the orientation letters, and
    a 5 cm bar when ``spacing`` (mm) is given.
    """
    grey = axial(display_image(image, modality, window), k)
    fig, axes = plt.subplots(1, len(maps), figsize=(2.6 * len(maps) + 0.5, 2.9), squeeze=False, layout="constrained")
    extent = (-0.5, grey.shape[1] - 0.5, grey.shape[0] - 0.5, -0.5)
    for ax, (name, layer) in zip(axes[0], maps.items()):
        plane = axial(layer, k) if np.ndim(layer) == 3 else display_plane(layer)
        ax.imshow(grey, cmap="gray", vmin=0, vmax=1)
        shown = ax.imshow(plane, cmap="magma", alpha=alpha, vmin=0, vmax=vmax, extent=extent, interpolation="bilinear")
        if vmax is None:
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02, label=name)
        if contour is not None and np.any(axial(contour, k)):
            ax.contour(axial(contour, k), levels=[0.5], colors="red", linewidths=0.8)
        ax.set_title(name, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    mark_orientation(axes[0, 0], "axial", spacing, grey.shape)
    if vmax is not None:
        fig.colorbar(shown, ax=axes[0, :], fraction=0.03, pad=0.01, label=label)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def figure_png(fig: plt.Figure, dpi: int = 90) -> bytes:
    """A figure as PNG bytes (closed afterwards): what an ``ipywidgets.Image`` shows."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return buffer.getvalue()


def frame_slider(frames: list[np.ndarray], titles: list[str], *, modality: str = "CT", window: str = "soft_tissue",
                 contour=None, description: str = "step"):
    """A slider over 2D frames (e.g. the denoising steps of one slice), each drawn in the image window.

    Needs a widget front end (JupyterLab); ``montage``-style static figures are what executed copies keep."""
    import ipywidgets as widgets

    def render(i: int) -> bytes:
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.imshow(display_plane(display_image(frames[i], modality, window)), cmap="gray", vmin=0, vmax=1)
        if contour is not None and np.any(contour):
            ax.contour(display_plane(contour), levels=[0.5], colors="red", linewidths=0.8)
        ax.set_title(titles[i], fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        return figure_png(fig)

    slider = widgets.IntSlider(value=len(frames) - 1, min=0, max=len(frames) - 1, description=description,
                               continuous_update=False)
    picture = _fixed_picture(render(slider.value))
    slider.observe(lambda change: setattr(picture, "value", render(change["new"])), names="value")
    return _picture_box("VBox", [slider, picture], picture, f"{description} slider")


def prompt_explorer(render, value: str, *, description: str = "prompt"):
    """A text box and a button around a picture: ``render(text)`` returns PNG bytes for the typed text.

    Needs a widget front end (JupyterLab); nothing is drawn until the button is pressed or Enter is hit.
    """
    import ipywidgets as widgets

    text = widgets.Text(value=value, description=description, layout=widgets.Layout(width="420px"))
    button = widgets.Button(description="show map")
    picture = _fixed_picture()
    status = widgets.Label()

    def update(_=None):
        try:
            picture.value = render(text.value)
            status.value = ""
        except ValueError as exc:  # InputError included: an empty prompt
            status.value = str(exc)

    button.on_click(update)
    text.continuous_update = False
    text.observe(update, names="value")
    return _picture_box("VBox", [widgets.HBox([text, button]), status, picture], picture, f"{description} explorer")


def case_grid(cases, *, alpha: float = 0.4, title: str | None = None) -> plt.Figure:
    """One row per case (image, organs, tumor) at the slice with the most tumor.

    ``cases``: objects with ``case_id``, ``modality``, ``image``, ``organs``, ``tumor`` (PhantomCase).
    """
    fig, axes = plt.subplots(len(cases), 3, figsize=(7.5, 2.5 * len(cases)), squeeze=False, layout="constrained")
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
    return fig


def benchmark_bars(results: dict, metric: str = "dsc") -> plt.Figure:
    """Grouped bars of a zero-shot benchmark (``benchmark.zero_shot_benchmark``): one group per unseen category and the
    mean, one bar per method."""
    groups = [c["category"] for c in results["categories"]] + ["mean"]
    values = {method: np.array([c[f"{metric}_{method}"] for c in results["categories"]]
                               + [results["mean_unseen"][f"{metric}_{method}"]], dtype=float)  # None (n/a): no bar
              for method in results["methods"]}
    fig, ax = plt.subplots(figsize=(1.6 * len(groups) + 3, 3.6))
    width = 0.8 / len(values)
    for i, (method, heights) in enumerate(values.items()):
        ax.bar(np.arange(len(groups)) + (i - (len(values) - 1) / 2) * width, heights, width,
               label=results["methods"][method])
    ax.set_xticks(np.arange(len(groups)), groups)
    ax.set_ylabel(metric.upper())
    ax.set_title(f"{results['setting']}: {metric.upper()} per unseen category")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


# Where each edge of a displayed slice points (left, right, top, bottom), as ``view_slice`` turns it.
VIEW_EDGES = {"axial": ("R", "L", "A", "P"), "coronal": ("R", "L", "S", "I"), "sagittal": ("A", "P", "S", "I")}
CT_HU_BANDS = {"air": (-1100, -900), "fat": (-150, -50), "soft tissue": (0, 100), "bone": (300, 2000)}


def mark_orientation(ax, view: str, spacing, plane_shape, bar_mm: float = 50.0) -> None:
    """Orientation letters on the four edges of a displayed slice and a scale bar of ``bar_mm`` (white, bottom left;
    none when ``spacing`` is None)."""
    left, right, top, bottom = VIEW_EDGES[view]
    style = {"color": "yellow", "fontsize": 9, "fontweight": "bold", "transform": ax.transAxes}
    ax.text(0.02, 0.5, left, ha="left", va="center", **style)
    ax.text(0.98, 0.5, right, ha="right", va="center", **style)
    ax.text(0.5, 0.98, top, ha="center", va="top", **style)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)
    if spacing is None:
        return
    column_mm = spacing[[a for a in range(3) if a != VIEW_AXES[view]][0]]  # displayed columns run along this axis
    rows, columns = plane_shape
    start, bar = 0.06 * columns, bar_mm / column_mm
    ax.plot([start, start + bar], [0.9 * rows] * 2, color="white", linewidth=2)
    ax.text(start + bar / 2, 0.87 * rows, f"{bar_mm / 10:g} cm", color="white", fontsize=7, ha="center", va="bottom")


def scan_overview(image: np.ndarray, spacing, modality: str = "CT", *, title: str | None = None) -> plt.Figure:
    """A first look at a scan (a RAS array): the middle axial, coronal and sagittal slices with their orientation
    letters, a 5 cm scale bar and millimetres drawn square, and the histogram of its intensities (CT: HU, with the
    bands of air, fat, soft tissue and bone)."""
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.4), layout="constrained",
                             gridspec_kw={"width_ratios": [1, 1, 1, 1.3]})
    grey = display_image(image, modality)
    for ax, view in zip(axes, ("axial", "coronal", "sagittal")):
        k = image.shape[VIEW_AXES[view]] // 2
        ax.imshow(view_slice(grey, view, k), cmap="gray", vmin=0, vmax=1, aspect=view_aspect(spacing, view))
        mark_orientation(ax, view, spacing, view_slice(grey, view, k).shape)
        ax.set_title(f"{view}, slice {k}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    values = np.asarray(image, np.float32).ravel()
    hist = axes[3]
    if modality.upper() == "CT":
        hist.hist(np.clip(values, -1100, 2000), bins=200, color="grey", log=True)
        for (name, (low, high)), colour in zip(CT_HU_BANDS.items(), ("#1f77b4", "#f2e394", "#c0504d", "#9467bd")):
            hist.axvspan(low, high, color=colour, alpha=0.35, label=name)
        hist.set_xlabel("HU")
        hist.legend(fontsize=7, loc="upper right")
    else:
        hist.hist(values, bins=200, color="grey", log=True)
        hist.set_xlabel("intensity (arbitrary units)")
    hist.set_ylabel("voxels (log)")
    hist.set_title("intensities", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def save_figure(fig: plt.Figure, path: str | Path, dpi: int = 110) -> Path:
    """Save a figure as PNG atomically and close it."""
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return path


class SliceViewer:
    """Explore a volume and its layers: slice slider, view, window preset, opacity, layer toggles.

    ``layers`` maps a name to an array on the image grid: integer label maps named in
    ``label_layers`` are drawn with the organ colours, binary masks named in ``contour_layers`` as
    contours, anything else as a float heat map. ``figure()`` draws the current settings as a
    static matplotlib figure (what papermill and nbconvert keep); ``widget()`` returns the
    ipywidgets 8 controls with a live figure, for JupyterLab.
    """

    CONTOUR_COLOURS = {"mask": "red", "tumor": "cyan", "ground truth": "cyan"}  # the method's mask red, the truth cyan

    def __init__(self, image: np.ndarray, *, modality: str = "CT", spacing=(1.0, 1.0, 1.0),
                 layers: dict[str, np.ndarray] | None = None, label_layers=("organs",),
                 contour_layers=("tumor", "mask", "ground truth"), window: str = "soft_tissue"):
        self.image = np.asarray(image)
        self.modality = modality.upper()
        self.spacing = tuple(float(s) for s in spacing)
        self.layers = dict(layers or {})
        for name, layer in self.layers.items():
            if np.shape(layer) != self.image.shape:
                raise ValueError(f"layer {name!r} has shape {np.shape(layer)}, the image {self.image.shape}")
        self.label_layers = set(label_layers)
        self.contour_layers = set(contour_layers)
        self.view = "axial"
        focus = next((self.layers[n] for n in self.layers if n in self.contour_layers), None)
        self.index = tumor_centre_slice(focus) if focus is not None else self.image.shape[2] // 2
        self.window = window
        self.alpha = 0.4
        self.visible = set(self.layers)
        # the probed voxel (RAS indices) whose intensity the readout gives: the volume's centre to begin with
        self.probe = [s // 2 for s in self.image.shape]

    def figure(self, *, size: float = 4.0) -> plt.Figure:
        """The current slice with the visible layers, as a static figure: contours in their colours with a legend, a
        colour bar per heat map, orientation letters and a 5 cm bar."""
        heat = [n for n in self.layers if n in self.visible and n not in self.label_layers | self.contour_layers]
        fig, ax = plt.subplots(figsize=(size * (1 + 0.25 * len(heat)), size), layout="constrained")
        for name, shown in self._draw(ax).items():
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02, label=name)
        return fig

    def _draw(self, ax) -> dict:
        """Draw the current slice; returns the heat maps drawn (name -> image), for colour bars."""
        view, k = self.view, self.index
        aspect = view_aspect(self.spacing, view)
        grey = display_image(view_slice(self.image, view, k), self.modality, self.window)
        ax.imshow(grey, cmap="gray", vmin=0, vmax=1, aspect=aspect)
        heat, outlines = {}, []
        for name in [n for n in self.layers if n in self.visible]:
            plane = view_slice(self.layers[name], view, k)
            if name in self.label_layers:
                ax.imshow(plane, cmap=ORGAN_CMAP, vmin=0, vmax=22, alpha=self.alpha, interpolation="nearest",
                          aspect=aspect)
            elif name in self.contour_layers:
                colour = self.CONTOUR_COLOURS.get(name, "red")
                if np.any(plane):
                    ax.contour(plane, levels=[0.5], colors=colour, linewidths=1.0)
                outlines.append(plt.Line2D([], [], color=colour, label=name))
            else:
                layer = self.layers[name]  # one scale for the whole volume: slices compare
                heat[name] = ax.imshow(np.ma.masked_less_equal(plane, 0), cmap="magma", alpha=self.alpha,
                                       aspect=aspect, vmin=0, vmax=max(float(np.max(layer)), 1e-6))
        if outlines:
            ax.legend(handles=outlines, loc="upper right", fontsize=7, framealpha=0.6)
        if view == "axial" and self.probe[2] == k:  # the probed voxel, where display_plane puts it
            ax.plot(grey.shape[1] - 1 - self.probe[0], grey.shape[0] - 1 - self.probe[1], "+", color="lime",
                    markersize=9, markeredgewidth=1.5)
        mark_orientation(ax, view, self.spacing, grey.shape)
        ax.set_title(f"{view} {k} / {self.image.shape[VIEW_AXES[view]] - 1}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        return heat

    def readout(self) -> str:
        """The intensity at the probed voxel (HU for CT), with every layer's value there."""
        i, j, k = self.probe
        unit = " HU" if self.modality == "CT" else ""
        values = ", ".join(f"{name} {float(layer[i, j, k]):.3g}" for name, layer in self.layers.items())
        return f"voxel ({i}, {j}, {k}): {float(self.image[i, j, k]):.0f}{unit}" + (f"; {values}" if values else "")

    def png(self, *, size: float = 4.0, dpi: int = 90) -> bytes:
        """The current view as PNG bytes (what the widget shows)."""
        return figure_png(self.figure(size=size), dpi)

    def widget(self):
        """ipywidgets 8 controls around a live picture (needs a widget front end such as JupyterLab).

        The picture is an ``ipywidgets.Image`` updated with PNG bytes: no output capture, so it
        behaves the same under papermill, where nothing renders it.
        """
        import ipywidgets as widgets

        depth = self.image.shape[VIEW_AXES[self.view]] - 1
        view = widgets.ToggleButtons(options=list(VIEW_AXES), value=self.view, description="view")
        index = widgets.IntSlider(value=self.index, min=0, max=depth, description="slice", continuous_update=False)
        windows = list(CT_WINDOWS) if self.modality == "CT" else ["percentiles"]
        window = widgets.Dropdown(options=windows, value=self.window if self.modality == "CT" else windows[0],
                                  description="window", disabled=self.modality != "CT")
        alpha = widgets.FloatSlider(value=self.alpha, min=0.0, max=1.0, step=0.05, description="opacity")
        toggles = {name: widgets.Checkbox(value=name in self.visible, description=name, indent=False)
                   for name in self.layers}
        picture = _fixed_picture()
        x, y = (widgets.IntSlider(value=self.probe[axis], min=0, max=self.image.shape[axis] - 1, description=name,
                                  continuous_update=False) for axis, name in ((0, "probe x"), (1, "probe y")))
        readout = widgets.Label()

        def redraw(_=None):
            self.view, self.index, self.alpha = view.value, index.value, alpha.value
            if self.modality == "CT":
                self.window = window.value
            self.visible = {name for name, box in toggles.items() if box.value}
            if self.view == "axial":
                self.probe = [x.value, y.value, self.index]
            readout.value = self.readout()
            picture.value = self.png()

        def change_view(change):
            index.max = self.image.shape[VIEW_AXES[change["new"]]] - 1
            index.value = min(index.value, index.max) if change["new"] == "axial" else index.max // 2
            redraw()

        view.observe(change_view, names="value")
        for control in (index, window, alpha, x, y, *toggles.values()):
            control.observe(redraw, names="value")
        redraw()
        controls = widgets.VBox([view, index, window, alpha, x, y, readout, widgets.HBox(list(toggles.values()))])
        return _picture_box("HBox", [picture, controls], picture, "slice viewer")


def _picture_box(kind: str, children, picture, caption: str, **kwargs):
    """An ipywidgets ``HBox``/``VBox`` that also carries a static PNG of ``picture`` (an ``ipywidgets.Image``) in its
    display data. A front end with a kernel draws the live widget; an executed copy read without one (nbconvert HTML,
    GitHub, a Lab with no kernel) falls back to the picture, and ``text/plain`` says what the widget was."""
    import ipywidgets as widgets

    class PictureBox(getattr(widgets, kind)):
        def _repr_mimebundle_(self, **options):
            bundle = super()._repr_mimebundle_(**options)
            bundle["text/plain"] = f"[{caption}: an interactive widget; run the notebook in JupyterLab to use it]"
            if picture.value:
                bundle["image/png"] = base64.b64encode(bytes(picture.value)).decode("ascii")
            return bundle

    return PictureBox(children, **kwargs)


def _fixed_picture(png: bytes = b"") -> "ipywidgets.Image":  # noqa: F821 (imported lazily)
    """An ``ipywidgets.Image`` drawn at its own pixel size: a box stretches its children to its width (or height)."""
    import ipywidgets as widgets

    return widgets.Image(format="png", value=png, layout=widgets.Layout(align_self="flex-start"))


def _niivue_volume(array: np.ndarray, spacing, name: str, dtype=np.float32, **display) -> dict:
    """One layer for ipyniivue: a NIfTI-1 file in memory (RAS voxel axes, so the affine is the spacing). Masks go as
    uint8 and CT as int16 HU: the widget's state, which an executed notebook keeps, is a quarter or half the size."""
    import nibabel as nib

    values = np.asarray(array)
    if np.issubdtype(dtype, np.integer):
        limits = np.iinfo(dtype)
        values = np.clip(np.rint(values.astype(np.float32)), limits.min, limits.max)
    values = values.astype(dtype)
    image = nib.Nifti1Image(values, np.diag([*(float(s) for s in spacing), 1.0]))
    return {"data": image.to_bytes(), "name": f"{name}.nii", **display}


VIEW3D_BACKENDS = ("auto", "niivue", "itkwidgets", "static")


def view3d(image: np.ndarray, layers: dict[str, np.ndarray] | None = None, *, spacing=(1.0, 1.0, 1.0),
           modality: str = "CT", window: str = "soft_tissue", backend: str = "auto", height: int = 560):
    """The volume in 3D with its layers: binary masks (``mask`` red, ``tumor``/``ground truth`` cyan, others green)
    and float maps (warm colours), over the image in its display window.

    ``backend``: "niivue" (ipyniivue, offline: its viewer ships in the wheel; axial, coronal, sagittal and a volume
    rendering), "itkwidgets" (itkwidgets 1.x, which loads its viewer from a CDN, so online only), "static" (a
    matplotlib figure: the three planes through the first mask's centre) or "auto", the first of these installed.
    Widgets carry the static figure as their picture in executed copies."""
    if backend not in VIEW3D_BACKENDS:
        raise ValueError(f"unknown 3D backend {backend!r}; choose from {', '.join(VIEW3D_BACKENDS)}")
    image = np.asarray(image)
    layers = dict(layers or {})
    for name, layer in layers.items():
        if np.shape(layer) != image.shape:
            raise ValueError(f"layer {name!r} has shape {np.shape(layer)}, the image {image.shape}")
    if backend == "auto":
        backend = next((b for b, module in (("niivue", "ipyniivue"), ("itkwidgets", "itkwidgets"))
                        if importlib.util.find_spec(module) is not None), "static")
    if backend == "static":
        return orthogonal_figure(image, layers, spacing=spacing, modality=modality, window=window)
    if backend == "itkwidgets":
        from itkwidgets import view

        masks = [layer for layer in layers.values() if _is_mask(layer)]
        return view(image=image.astype(np.float32), label_image=masks[0].astype(np.uint8) if masks else None)
    import ipywidgets as widgets
    from ipyniivue import MultiplanarType, NiiVue, ShowRender, SliceType

    lower, upper = CT_WINDOWS[window] if modality.upper() == "CT" else np.percentile(image, (0.5, 99.5))
    volumes = [_niivue_volume(image, spacing, "image", np.int16 if modality.upper() == "CT" else np.float32,
                              colormap="gray", cal_min=float(lower), cal_max=float(upper))]
    for name, layer in layers.items():
        if _is_mask(layer):
            colour = {"mask": "red", "tumor": "blue2cyan", "ground truth": "blue2cyan"}.get(name, "green")
            volumes.append(_niivue_volume(layer, spacing, name, np.uint8, colormap=colour, cal_min=0.5, cal_max=1.0,
                                          opacity=0.7))
        else:
            top = max(float(np.max(layer)), 1e-6)
            volumes.append(_niivue_volume(layer, spacing, name, colormap="warm", cal_min=0.1 * top, cal_max=top,
                                          opacity=0.6))
    # the three planes and a volume rendering in a 2 x 2 grid; patient right on the screen's left, as in viz's figures
    viewer = NiiVue(height=height, slice_type=SliceType.MULTIPLANAR, multiplanar_layout=MultiplanarType.GRID,
                    multiplanar_show_render=ShowRender.ALWAYS, is_radiological_convention=True,
                    show_3d_crosshair=True, is_colorbar=True)
    viewer.load_volumes(volumes)
    focus = next((np.asarray(layer) > 0 for layer in layers.values() if _is_mask(layer) and np.any(layer)), None)
    if focus is not None:  # the planes through the first mask's centre, as in the static figure
        viewer.scene.crosshair_pos = [float((c + 0.5) / n) for c, n in zip(np.argwhere(focus).mean(axis=0), image.shape)]
    static = _fixed_picture(figure_png(orthogonal_figure(image, layers, spacing=spacing, modality=modality,
                                                         window=window)))
    legend = widgets.Label(f"NiiVue, 3D: image ({window if modality.upper() == 'CT' else 'percentiles'}) and "
                           + ", ".join(layers) + "; drag to rotate, scroll to move through slices")
    return _picture_box("VBox", [legend, viewer], static, "3D viewer (NiiVue)")


def _is_mask(layer: np.ndarray) -> bool:
    return np.asarray(layer).dtype == bool or set(np.unique(layer).tolist()) <= {0, 1}


def orthogonal_figure(image: np.ndarray, layers: dict[str, np.ndarray] | None = None, *, spacing=(1.0, 1.0, 1.0),
                      modality: str = "CT", window: str = "soft_tissue") -> plt.Figure:
    """Axial, coronal and sagittal planes through the centre of the first mask layer (the volume's centre when there
    is none), masks as contours with a legend, float maps on one shared scale with a colour bar: the static 3D view."""
    layers = dict(layers or {})
    masks = {n: np.asarray(layer) > 0 for n, layer in layers.items() if _is_mask(layer)}
    heat = {n: np.asarray(layer, np.float32) for n, layer in layers.items() if n not in masks}
    focus = next((m for m in masks.values() if m.any()), None)
    centre = ([int(round(c)) for c in np.argwhere(focus).mean(axis=0)] if focus is not None
              else [s // 2 for s in image.shape])
    grey = display_image(image, modality, window)
    top = max((float(np.max(h)) for h in heat.values()), default=0.0) or 1e-6
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.8), layout="constrained")
    shown = None
    for ax, view in zip(axes, ("axial", "coronal", "sagittal")):
        k = centre[VIEW_AXES[view]]
        aspect = view_aspect(spacing, view)
        ax.imshow(view_slice(grey, view, k), cmap="gray", vmin=0, vmax=1, aspect=aspect)
        for name, layer in heat.items():
            shown = ax.imshow(np.ma.masked_less_equal(view_slice(layer, view, k), 0), cmap="magma", alpha=0.5,
                              vmin=0, vmax=top, aspect=aspect)
        handles = []
        for name, mask in masks.items():
            colour = SliceViewer.CONTOUR_COLOURS.get(name, "lime")
            plane = view_slice(mask.astype(np.uint8), view, k)
            if plane.any():
                ax.contour(plane, levels=[0.5], colors=colour, linewidths=1.0)
            handles.append(plt.Line2D([], [], color=colour, label=name))
        if handles:
            ax.legend(handles=handles, loc="upper right", fontsize=7, framealpha=0.6)
        mark_orientation(ax, view, spacing, view_slice(grey, view, k).shape)
        ax.set_title(f"{view}, slice {k}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if shown is not None:
        fig.colorbar(shown, ax=list(axes), fraction=0.02, pad=0.01, label=" / ".join(heat) + " (one scale)")
    return fig
