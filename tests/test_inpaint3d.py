"""ROI sub-volume inpainting on tiny random-weight MAISI bundles: the scheduler adapter against MONAI's schedulers and
an exact oracle, the crop's window and its cost, the input kept outside the ROI, determinism, and the crop against
the whole volume (the same result when the window covers the grid; otherwise a difference no larger than a new
seed's)."""

import copy

import numpy as np
import pytest
import torch
from scipy import ndimage

from diffugts_core.backbone.maisi import MaisiBackbone, write_tiny_bundle
from diffugts_core.inpaint3d import LatentSchedule, VolumeInpaintConfig, inpaint_volume, inpainting_window
from diffugts_core.io import InputError

VARIANTS = ("rflow", "ddpm")
SHAPE = (64, 64, 32)
CONFIG = VolumeInpaintConfig(steps=10, context=1)  # context 1: a 16 x 16 x 8-cell grid leaves room for a crop
MASK_HU = 300  # |image - pseudo-healthy| above this, inside the ROI: the mask compared between crop and whole


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    root = tmp_path_factory.mktemp("maisi3d")
    return {v: MaisiBackbone.from_bundle(write_tiny_bundle(root / v, v), device="cpu") for v in VARIANTS}


@pytest.fixture(scope="module")
def case():
    """Soft tissue (40 HU) in air with a +150 HU lesion; the ROI is the lesion grown by 2 voxels (0.9 % of the
    volume, away from the edges, so that its window is a real crop)."""
    grid = np.indices(SHAPE)
    centre = np.array(SHAPE)[:, None, None, None] / 2
    body = (((grid - centre) / (0.42 * np.array(SHAPE)[:, None, None, None])) ** 2).sum(0) <= 1
    image = np.where(body, 40.0, -1000.0) + np.random.default_rng(0).normal(0, 10, SHAPE)
    lesion = ((grid - np.array([22, 26, 14])[:, None, None, None]) ** 2).sum(0) <= 25
    image[lesion] += 150
    return image.astype(np.float32), ndimage.binary_dilation(lesion, iterations=2)


@pytest.fixture(scope="module")
def results(backbones, case):
    """Pseudo-healthy volumes per variant: crop, whole, whole with another seed, and a crop whose window is the
    whole grid."""
    image, roi = case
    out = {}
    for variant, backbone in backbones.items():
        out[variant] = {
            "crop": inpaint_volume(backbone, image, "CT", roi, CONFIG, crop=True),
            "whole": inpaint_volume(backbone, image, "CT", roi, CONFIG, crop=False),
            "seed 1": inpaint_volume(backbone, image, "CT", roi, VolumeInpaintConfig(steps=10, seed=1), crop=False),
            "wide crop": inpaint_volume(backbone, image, "CT", roi, VolumeInpaintConfig(steps=10, context=8)),
        }
    return out


def noised_pair(schedule, t, t_next, seed=0):
    generator = torch.Generator().manual_seed(seed)
    z0, eps = (torch.randn(1, 4, 8, 8, 8, generator=generator) for _ in range(2))
    return z0, eps, schedule.noised(z0, eps, t), schedule.noised(z0, eps, t_next)


@pytest.mark.parametrize("variant", VARIANTS)
def test_schedule_follows_monais_scheduler_as_maisi_sets_it(backbones, variant):
    scheduler = backbones[variant].scheduler
    before = getattr(scheduler, "num_inference_steps", None)
    schedule = LatentSchedule(scheduler, 30, 16 ** 3)
    assert getattr(scheduler, "num_inference_steps", None) == before  # the backbone's scheduler is left as it was
    reference = copy.deepcopy(scheduler)
    if variant == "rflow":  # MAISI's call: the grid's cell count shifts the timesteps (to noise above 32^3)
        reference.set_timesteps(30, input_img_size_numel=16 ** 3)
        assert schedule.levels[0][0] == 1000.0 and schedule.levels[1][0] != pytest.approx(1000 * (1 - 1 / 30))
    else:
        reference.set_timesteps(30)
    assert [t for t, _ in schedule.levels] == [float(t) for t in reference.timesteps]
    assert [t_next for _, t_next in schedule.levels][:-1] == [t for t, _ in schedule.levels][1:]
    assert schedule.levels[-1][1] is None
    assert LatentSchedule(scheduler, 1000, 16 ** 3).walks_every_timestep == (variant == "ddpm")
    assert not schedule.walks_every_timestep


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_step_with_the_true_model_output_lands_on_the_noised_latent(backbones, variant):
    """The oracle: if the network predicted exactly (the true noise; the true velocity z_0 - eps), a deterministic
    step from z_0 noised to t reaches z_0 noised to the next level with the same noise."""
    schedule = LatentSchedule(backbones[variant].scheduler, 30, 16 ** 3)
    for t, t_next in (schedule.levels[0], schedule.levels[12], schedule.levels[-1]):
        if variant == "rflow" and t_next is not None:
            t_next = float(int(t_next))  # MONAI's rflow step goes to int(next_t)
        z0, eps, z_t, z_next = noised_pair(schedule, t, t_next)
        output = z0 - eps if variant == "rflow" else eps
        stepped = schedule.step(output, t, t_next, z_t, torch.Generator())
        torch.testing.assert_close(stepped, z_next, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_jump_back_gives_the_noised_latent_at_the_noisier_level(backbones, variant):
    """RePaint's jump: z_0 noised to t_next, taken back to t, is add_noise's mixture at t: the same weight on z_0 and
    noise of the same variance (renoised is linear: probe it with z_0 and each noise alone)."""
    schedule = LatentSchedule(backbones[variant].scheduler, 30, 16 ** 3)
    t, t_next = schedule.levels[10]
    one, zero = torch.ones(1, 1, 1, 1, 1), torch.zeros(1, 1, 1, 1, 1)
    signal_next, noise_next = schedule.noised(one, zero, t_next), schedule.noised(zero, one, t_next)
    signal_t, noise_t = schedule.noised(one, zero, t), schedule.noised(zero, one, t)
    kept, fresh = schedule.renoised(one, t_next, t, zero), schedule.renoised(zero, t_next, t, one)
    torch.testing.assert_close(kept * signal_next, signal_t)
    torch.testing.assert_close((kept * noise_next) ** 2 + fresh ** 2, noise_t ** 2)


def test_the_rflow_velocity_is_the_unets_own_output(backbones):
    """At t < T the velocity the schedule reads off the UNet is the one the backbone's noise implies (eps = z_t -
    (1 - t/T) v); at t = T, where the noise holds no velocity, it is still read."""
    backbone = backbones["rflow"]
    schedule = LatentSchedule(backbone.scheduler, 30, 16 ** 3)
    z = torch.randn(1, 4, 8, 8, 8, generator=torch.Generator().manual_seed(3))
    t = schedule.levels[5][0]
    velocity = schedule.model_output(backbone, z, t, None)
    torch.testing.assert_close(backbone.denoise(z, t, None), z - (1 - t / 1000) * velocity, atol=1e-5, rtol=1e-5)
    assert velocity.abs().mean() > 0 and schedule.model_output(backbone, z, 1000.0, None).abs().mean() > 0
    assert not backbone.unet._forward_hooks


def test_the_window_is_the_rois_box_with_context_rounded_to_the_unets_multiple(backbones, case):
    backbone, (_, roi) = backbones["rflow"], case
    window = inpainting_window(backbone, roi, CONFIG)
    marked = np.argwhere(roi)
    for axis, cells in enumerate(window.latent):
        low, high = marked[:, axis].min() // 4, marked[:, axis].max() // 4 + 1
        assert cells.start <= low - 1 and cells.stop >= high + 1  # the box and its context inside
        assert (cells.stop - cells.start) % backbone.denoiser_multiple == 0
        assert 0 <= cells.start < cells.stop <= window.grid[axis]
    assert window.grid == (16, 16, 8)
    assert window.cells == 8 ** 3 < inpainting_window(backbone, roi, CONFIG, crop=False).cells == 16 * 16 * 8
    assert window.voxels[0] == slice(4 * window.latent[0].start, 4 * window.latent[0].stop)
    assert inpainting_window(backbone, roi, VolumeInpaintConfig(context=8)).cells == 16 * 16 * 8  # clipped to the grid


@pytest.mark.parametrize("variant", VARIANTS)
def test_outside_the_roi_the_input_is_kept_and_inside_it_is_regenerated(results, case, variant):
    image, roi = case
    untouched = image.copy()
    for healthy in results[variant].values():
        assert healthy.shape == image.shape and healthy.dtype == np.float32
        assert np.array_equal(healthy[~roi], image[~roi])
        assert np.abs(healthy[roi] - image[roi]).mean() > 50 and np.isfinite(healthy).all()
    assert np.array_equal(image, untouched)


@pytest.mark.parametrize("variant", VARIANTS)
def test_crop_is_the_whole_volume_when_its_window_covers_the_grid(results, variant):
    """Same noise (drawn for the whole grid), same schedule (the whole grid's): only the window can differ."""
    assert np.array_equal(results[variant]["wide crop"], results[variant]["whole"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_same_seed_same_volume_and_another_seed_another(backbones, case, results, variant):
    image, roi = case
    again = inpaint_volume(backbones[variant], image, "CT", roi, CONFIG, crop=True)
    assert np.array_equal(again, results[variant]["crop"])
    assert not np.array_equal(results[variant]["seed 1"][roi], results[variant]["whole"][roi])


@pytest.mark.parametrize("variant", VARIANTS)
def test_crop_and_whole_give_the_same_mask_as_far_as_a_new_seed_does(results, case, variant):
    """A random-weight network is chaotic: any change to what it sees (the crop's edge, 4 voxels of context here)
    changes its sample about as much as a new seed does (measured: mean |crop - whole| in the ROI 656 HU rflow, 379
    ddpm, against 580 and 758 between seeds). So the crop's mask must agree with the whole volume's at least as well
    as two seeds of the whole volume agree, within 0.05 Dice (measured: 0.88 against 0.85 rflow, 0.94 against 0.97
    ddpm)."""
    image, roi = case

    def mask(healthy):
        return (np.abs(image - healthy) > MASK_HU) & roi

    def dice(a, b):
        return 2 * (a & b).sum() / (a.sum() + b.sum())

    whole = mask(results[variant]["whole"])
    assert 0.5 < whole.sum() / roi.sum() < 1  # the threshold splits the ROI: not trivially all or nothing
    assert dice(mask(results[variant]["crop"]), whole) >= dice(mask(results[variant]["seed 1"]), whole) - 0.05


def test_bad_inputs_get_a_clear_error_and_an_empty_roi_returns_the_image(backbones, case):
    image, roi = case
    with pytest.raises(InputError, match="ROI of its shape"):
        inpaint_volume(backbones["rflow"], image, "CT", roi[:32], CONFIG)
    unchanged = inpaint_volume(backbones["rflow"], image, "CT", np.zeros_like(roi), CONFIG)
    assert np.array_equal(unchanged, image)
    with pytest.raises(TypeError, match="RFlowScheduler or DDPMScheduler"):
        LatentSchedule(object(), 10, 512)
