import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib import image as mpimg

from diffugts_core import viz


def _marked_volume():
    """A RAS volume with one bright voxel at patient right (high x), anterior (high y), superior (high z)."""
    volume = np.zeros((10, 12, 8))
    volume[8, 10, 6] = 1
    return volume


def test_axial_slice_is_radiological():
    plane = viz.view_slice(_marked_volume(), "axial", 6)
    row, col = np.argwhere(plane == 1)[0]
    assert plane.shape == (12, 10)
    assert col < plane.shape[1] / 2  # patient right on the image's left
    assert row < plane.shape[0] / 2  # anterior at the top


def test_coronal_and_sagittal_put_superior_at_the_top():
    volume = _marked_volume()
    coronal = viz.view_slice(volume, "coronal", 10)
    sagittal = viz.view_slice(volume, "sagittal", 8)
    assert np.argwhere(coronal == 1)[0][0] < coronal.shape[0] / 2
    assert np.argwhere(coronal == 1)[0][1] < coronal.shape[1] / 2  # right on the left, as in axial
    assert np.argwhere(sagittal == 1)[0][0] < sagittal.shape[0] / 2
    assert np.argwhere(sagittal == 1)[0][1] < sagittal.shape[1] / 2  # anterior on the left


def test_view_aspect_keeps_millimetres_square():
    assert viz.view_aspect((2.5, 2.5, 4.0), "axial") == 1.0
    assert viz.view_aspect((2.5, 2.5, 4.0), "coronal") == pytest.approx(4.0 / 2.5)


def test_pick_slices_follow_the_focus_mask():
    focus = np.zeros((4, 4, 40), bool)
    focus[..., 20:26] = True
    slices = viz.pick_slices(40, 4, focus)
    assert min(slices) == 20 and max(slices) == 25
    assert viz.tumor_centre_slice(focus) in range(20, 26)


def test_montage_rows_and_png_written_atomically(tmp_path):
    image = np.random.default_rng(0).normal(40, 20, (32, 32, 16))
    organs = np.zeros(image.shape, np.uint8)
    organs[8:24, 8:24, 4:12] = 4
    tumor = np.zeros(image.shape, np.uint8)
    tumor[12:18, 12:18, 6:10] = 1
    fig = viz.montage(image, organs=organs, tumor=tumor, maps={"score": tumor * 0.8}, n_slices=4)
    panels, bars = _panels(fig), [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(panels) == 3 * 4  # image, organs, score rows; one column per tumor slice
    assert len(bars) == 1 and bars[0].get_ylim() == pytest.approx((0.0, 0.8))  # one scale for the row's slices
    assert {im.get_clim() for ax in panels[8:] for im in ax.images[1:]} == {(0.0, 0.8)}
    assert [t.get_text() for t in panels[7].get_legend().get_texts()] == ["liver"]  # the organ legend (label 4)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["tumor"]
    path = viz.save_figure(fig, tmp_path / "m.png")
    assert mpimg.imread(path).shape[2] in (3, 4)
    assert [p.name for p in tmp_path.iterdir()] == ["m.png"]  # no temp file left behind


def test_montage_draws_other_images_in_grey_and_the_truth_in_cyan():
    image = np.full((32, 32, 16), 40.0)
    healthy = image.copy()
    healthy[12:18, 12:18, 6:10] = 200.0
    truth = np.zeros(image.shape, bool)
    truth[12:18, 12:18, 6:10] = True
    fig = viz.montage(image, images={"pseudo-healthy": healthy}, truth=truth, maps={"p": truth * 0.5}, n_slices=2)
    panels = _panels(fig)
    assert [ax.get_ylabel() for ax in panels[::2]] == ["image", "pseudo-healthy", "p"]
    shown = panels[2].images[0].get_array()  # the pseudo-healthy row shows H itself, in the same window
    assert shown.max() > panels[0].images[0].get_array().max()
    cyan = [c for ax in panels for c in ax.collections]
    assert cyan and all(np.allclose(c.get_edgecolor()[0][:3], (0, 1, 1)) for c in cyan)
    assert all(s in range(6, 10) for s in viz.pick_slices(16, 2, truth))


def _panels(fig):
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def test_frame_slider_shows_the_chosen_frame():
    pytest.importorskip("ipywidgets")
    frames = [np.full((16, 16), v, np.float32) for v in (-100.0, 40.0, 300.0)]
    box = viz.frame_slider(frames, ["a", "b", "c"])
    slider, picture = box.children
    assert slider.max == 2 and slider.value == 2 and picture.value[:4] == b"\x89PNG"
    last = picture.value
    slider.value = 0
    assert picture.value != last


def test_slice_viewer_widget_drives_the_figure():
    ipywidgets = pytest.importorskip("ipywidgets")
    image = np.zeros((32, 32, 16))
    tumor = np.zeros(image.shape, np.uint8)
    tumor[10:14, 10:14, 11] = 1
    viewer = viz.SliceViewer(image, layers={"tumor": tumor, "score": tumor * 0.5}, spacing=(2.5, 2.5, 4.0))
    assert viewer.index == 11  # opens on the tumor
    box = viewer.widget()
    controls = box.children[1].children
    slider = next(c for c in controls if isinstance(c, ipywidgets.IntSlider))
    view = next(c for c in controls if isinstance(c, ipywidgets.ToggleButtons))
    slider.value = 3
    assert viewer.index == 3
    view.value = "sagittal"
    assert viewer.view == "sagittal" and slider.max == 31
    toggles = [c for c in controls[-1].children if isinstance(c, ipywidgets.Checkbox)]
    toggles[1].value = False
    assert viewer.visible == {"tumor"}
    assert "sagittal" in viewer.figure().axes[0].get_title()


def test_slice_viewer_rejects_a_layer_on_another_grid():
    with pytest.raises(ValueError, match="layer 'tumor' has shape"):
        viz.SliceViewer(np.zeros((8, 8, 8)), layers={"tumor": np.zeros((8, 8, 4))})


def test_slice_viewer_picture_follows_the_slider():
    ipywidgets = pytest.importorskip("ipywidgets")
    image = np.zeros((32, 32, 16))
    image[:, :, 8:] = 100.0
    viewer = viz.SliceViewer(image, spacing=(2.5, 2.5, 4.0))
    box = viewer.widget()
    picture = box.children[0]
    assert isinstance(picture, ipywidgets.Image) and picture.value[:4] == b"\x89PNG"
    before = picture.value
    next(c for c in box.children[1].children if isinstance(c, ipywidgets.IntSlider)).value = 2
    assert picture.value != before  # a dark slice now, the picture was redrawn


def test_benchmark_bars_draw_one_bar_per_method_and_group_and_leave_n_a_empty():
    results = {"setting": "ct-mri", "methods": {"full": "DiffuGTS", "supervised": "Supervised upper bound"},
               "categories": [{"category": "brain", "dsc_full": 0.3, "dsc_supervised": None}],
               "mean_unseen": {"dsc_full": 0.3, "dsc_supervised": None}}
    fig = viz.benchmark_bars(results, "dsc")
    heights = [bar.get_height() for bar in fig.axes[0].patches]
    assert heights[:2] == [0.3, 0.3] and np.isnan(heights[2:]).all()  # brain and mean: DiffuGTS drawn, no bound
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["brain", "mean"]


def test_scan_overview_marks_orientation_scale_and_hu_bands():
    volume = np.full((40, 30, 20), -1000.0)
    volume[10:30, 5:25, 5:15] = 40.0
    fig = viz.scan_overview(volume, (1.0, 2.0, 4.0), "CT")
    views = fig.axes[:3]
    letters = [sorted(t.get_text() for t in ax.texts if len(t.get_text()) == 1) for ax in views]
    assert letters == [sorted("RLAP"), sorted("RLSI"), sorted("APSI")]
    for ax, column_mm in zip(views, (1.0, 1.0, 2.0)):  # displayed columns run along x, x, y
        (x0, x1), _ = ax.lines[0].get_data()
        assert x1 - x0 == pytest.approx(50.0 / column_mm)  # the 5 cm bar in the view's own pixels
        assert any(t.get_text() == "5 cm" for t in ax.texts)
    assert fig.axes[3].get_xlabel() == "HU"
    assert [t.get_text() for t in fig.axes[3].get_legend().get_texts()] == list(viz.CT_HU_BANDS)
    plt.close(fig)


def test_slice_viewer_tells_mask_from_truth_scales_its_maps_and_marks_orientation():
    image = np.zeros((32, 32, 16))
    truth = np.zeros(image.shape, np.uint8)
    truth[10:16, 10:16, 8] = 1
    mask = np.roll(truth, 3, axis=0)
    score = np.zeros(image.shape)
    score[..., 8], score[..., 2] = 0.5, 2.0  # the slice shown is not the one with the maximum
    viewer = viz.SliceViewer(image, spacing=(2.5, 2.5, 4.0), layers={"mask": mask, "ground truth": truth, "S": score})
    fig = viewer.figure()
    ax, bar = fig.axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["mask", "ground truth"]
    assert [tuple(c.get_edgecolor()[0][:3]) for c in ax.collections] == [(1.0, 0.0, 0.0), (0.0, 1.0, 1.0)]
    assert bar.get_ylabel() == "S" and bar.get_ylim() == pytest.approx((0.0, 2.0))  # the volume's scale
    assert sorted(t.get_text() for t in ax.texts if len(t.get_text()) == 1) == sorted("RLAP")
    plt.close(fig)


def test_slice_viewer_widget_keeps_the_visible_layers_and_reads_out_hu_at_the_probe():
    ipywidgets = pytest.importorskip("ipywidgets")
    image = np.full((32, 32, 16), -1000.0)
    image[20, 5, 8] = 55.0
    viewer = viz.SliceViewer(image, spacing=(2.5, 2.5, 4.0), layers={"tumor": (image > 0).astype(np.uint8),
                                                                       "score": image * 0.0})
    viewer.visible = {"tumor"}
    controls = viewer.widget().children[1].children
    toggles = {c.description: c.value for c in controls[-1].children}
    assert toggles == {"tumor": True, "score": False} and viewer.visible == {"tumor"}
    sliders = {c.description: c for c in controls if isinstance(c, ipywidgets.IntSlider)}
    readout = next(c for c in controls if isinstance(c, ipywidgets.Label))
    sliders["slice"].value, sliders["probe x"].value, sliders["probe y"].value = 8, 20, 5
    assert readout.value.startswith("voxel (20, 5, 8): 55 HU") and "tumor 1" in readout.value


def test_overlay_panels_share_one_colour_scale_or_give_each_map_its_own():
    image = np.zeros((16, 16, 4))
    maps = {"a": np.full((16, 16, 4), 0.2), "b": np.full((16, 16, 4), 3.0)}
    shared = viz.overlay_panels(image, maps, 2)
    bars = [ax for ax in shared.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 1 and bars[0].get_ylim() == pytest.approx((0.0, 1.0))
    own = viz.overlay_panels(image, maps, 2, vmax=None)
    assert [ax.get_ylim()[1] for ax in own.axes if ax.get_label() == "<colorbar>"] == pytest.approx([0.2, 3.0])
    plt.close("all")


def _lesion_volume():
    image = np.full((40, 36, 20), 40.0, np.float32)
    mask = np.zeros(image.shape, bool)
    mask[24:31, 8:15, 12:17] = True  # off centre (its centre voxel 27, 11, 14): the static view must go to it
    image[mask] = -20.0
    return image, mask


def test_widgets_carry_their_picture_for_readers_without_a_kernel():
    """An executed copy read without a kernel shows the widget's picture (image/png) and a sentence, not its repr."""
    pytest.importorskip("ipywidgets")
    import base64

    image, mask = _lesion_volume()
    box = viz.SliceViewer(image, layers={"mask": mask}).widget()
    bundle = box._repr_mimebundle_()
    picture = box.children[0]
    assert base64.b64decode(bundle["image/png"]) == picture.value  # the slice the viewer shows
    assert "children=" not in bundle["text/plain"] and "slice viewer" in bundle["text/plain"]
    assert picture.layout.align_self == "flex-start"  # drawn at its own size, not stretched to the box
    explorer = viz.prompt_explorer(lambda text: viz.figure_png(plt.figure()), "a tumor")
    assert "image/png" not in explorer._repr_mimebundle_()  # nothing drawn yet: only the sentence


def test_view3d_static_goes_through_the_lesion_with_a_legend_and_one_scale():
    image, mask = _lesion_volume()
    fig = viz.view3d(image, {"mask": mask, "S": mask * 0.8, "p": mask * 0.3}, spacing=(2.5, 2.5, 4.0),
                     backend="static")
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert [ax.get_title() for ax in panels] == ["axial, slice 14", "coronal, slice 11", "sagittal, slice 27"]
    assert all([t.get_text() for t in ax.get_legend().get_texts()] == ["mask"] for ax in panels)
    assert len(fig.axes) == 4 and "S / p (one scale)" in fig.axes[3].get_ylabel()
    with pytest.raises(ValueError, match="unknown 3D backend 'vtk'"):
        viz.view3d(image, backend="vtk")
    with pytest.raises(ValueError, match="layer 'mask' has shape"):
        viz.view3d(image, {"mask": mask[:, :, :10]}, backend="static")


def test_view3d_niivue_loads_the_volume_and_layers_in_their_millimetres():
    pytest.importorskip("ipyniivue")
    import base64

    import nibabel as nib
    from ipyniivue import NiiVue

    image, mask = _lesion_volume()
    box = viz.view3d(image, {"mask": mask, "S": mask * 0.8}, spacing=(2.5, 2.5, 4.0))  # auto: ipyniivue installed
    viewer = next(child for child in box.children if isinstance(child, NiiVue))
    assert [v.name for v in viewer.volumes] == ["image.nii", "mask.nii", "S.nii"]
    assert [v.colormap for v in viewer.volumes] == ["gray", "red", "warm"]
    assert (viewer.volumes[0].cal_min, viewer.volumes[0].cal_max) == (-160.0, 240.0)  # the soft-tissue window
    loaded = nib.Nifti1Image.from_bytes(viewer.volumes[1].data)
    assert np.array_equal(np.asarray(loaded.dataobj) > 0, mask) and loaded.get_data_dtype() == np.uint8
    ct = nib.Nifti1Image.from_bytes(viewer.volumes[0].data)
    assert ct.get_data_dtype() == np.int16 and np.array_equal(np.asarray(ct.dataobj), np.rint(image))  # HU, whole
    assert nib.aff2axcodes(loaded.affine) == ("R", "A", "S") and loaded.header.get_zooms() == (2.5, 2.5, 4.0)
    picture = base64.b64decode(box._repr_mimebundle_()["image/png"])
    assert picture[:4] == b"\x89PNG"  # the static three-plane figure, for executed copies
