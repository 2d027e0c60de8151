"""Training the foundation model: healthy data only, a loadable result, resumable; the shipped model."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffugts_core.data import phantoms
from diffugts_core import vocabulary
from diffugts_core.backbone import DEFAULT_MODEL, DiffusersSliceBackbone, SliceBackboneConfig
from diffugts_core.backbone.registry import load_registry, models_root, verified_model_path
from diffugts_core.training.foundation import (V2, HealthyVolumes, caption, healthy_volumes, load_optimizer,
                                             native_bf16, random_crops, save_optimizer, train_foundation)
from diffugts_core.training import foundation

from .test_backbone import TINY


def test_training_data_are_healthy_slices_with_organ_captions():
    data = healthy_volumes(TINY, SliceBackboneConfig(slice_shape=(32, 32)), progress=False)
    assert data.case_ids == ["healthy_abdomen_000", "healthy_thorax_000", "healthy_brain_000"]
    images = data.stacks(torch.arange(len(data)))
    assert images.shape[1:] == (1, 32, 32) and len(images) == len(data.captions)
    assert float(images.min()) >= -1 and float(images.max()) <= 1
    assert any(c.startswith("a CT scan of the abdomen showing") for c in data.captions)
    assert any(c.startswith("an MRI scan of the brain showing") for c in data.captions)


def test_generated_volumes_are_kept_and_read_back_the_same(tmp_path, monkeypatch):
    made = healthy_volumes(TINY, SliceBackboneConfig(slice_shape=(32, 32)), progress=False, cache=tmp_path)
    monkeypatch.setattr(phantoms, "generate_case", None)  # a second call must not generate anything
    read = healthy_volumes(TINY, SliceBackboneConfig(slice_shape=(32, 32)), progress=False, cache=tmp_path)
    assert torch.equal(read.volumes, made.volumes) and torch.equal(read.organs, made.organs)
    assert torch.equal(read.index, made.index) and (read.captions, read.case_ids) == (made.captions, made.case_ids)
    with pytest.raises(TypeError):  # another seed is another file
        healthy_volumes(TINY, SliceBackboneConfig(slice_shape=(32, 32)), seed=5, progress=False, cache=tmp_path)


def test_a_case_with_a_tumor_never_reaches_the_training_set(monkeypatch):
    real = phantoms.generate_case

    def leaky(category, index, seed, shape, region=None):
        return real("liver", index, seed, shape)  # pretends to be healthy, carries a tumor

    monkeypatch.setattr(phantoms, "generate_case", leaky)
    with pytest.raises(RuntimeError, match="must never see a tumor"):
        healthy_volumes(TINY, SliceBackboneConfig(slice_shape=(32, 32)), progress=False)


def test_slices_come_with_their_neighbours_and_the_organ_map_on_the_latent_grid():
    depth = 3
    volumes = torch.arange(depth, dtype=torch.float16).expand(1, 4, 4, depth).clone()  # each slice holds its index
    organs = torch.zeros(1, 4, 4, depth, dtype=torch.uint8)
    organs[0, :2, :2, 0] = 1 + vocabulary.CONDITIONING_ORGANS.index("liver")
    organs[0, 2:, 2:, 0] = 1 + vocabulary.CONDITIONING_ORGANS.index("kidney")
    organs[0, 3, 0, 0] = 1 + vocabulary.CONDITIONING_ORGANS.index("kidney")
    data = HealthyVolumes(volumes, organs, torch.tensor([[0, 0], [0, 1], [0, 2]]), ["a", "b", "c"], ["case"])
    stacks = data.stacks(torch.tensor([0, 2]), context=1)
    assert stacks[:, :, 0, 0].tolist() == [[0, 0, 1], [1, 2, 2]]  # below the first and above the last: the edge
    maps = data.organ_maps(torch.tensor([0]), downsample=2)
    assert maps.shape == (1, len(vocabulary.CONDITIONING_ORGANS), 2, 2)
    liver, kidney = (vocabulary.CONDITIONING_ORGANS.index(o) for o in ("liver", "kidney"))
    assert maps[0, liver].tolist() == [[1, 0], [0, 0]]
    assert maps[0, kidney].tolist() == [[0, 0], [0.25, 1]]
    assert float(maps.sum()) == 2.25  # nothing else


def test_conditioning_organ_index_counts_an_organs_parts_as_the_organ():
    labels = np.array([0, 1, 4, 10, 6, 7, 8, 12, 13, 11, 5, 21, 14], np.uint8)
    index = vocabulary.conditioning_organ_index(labels)
    names = [vocabulary.CONDITIONING_ORGANS[i - 1] if i else None for i in index]
    assert names == [None, None, "liver", "liver", "kidney", "kidney", "pancreas", "lung", "lung", "colon", "spleen",
                     "brain", None]


def test_caption_names_the_organs_in_view():
    labels = np.zeros((128, 128), np.uint8)
    labels[10:40, 10:40] = vocabulary.ORGAN_LABELS["liver"]
    labels[50:60, 50:60] = vocabulary.ORGAN_LABELS["kidney_left"]
    labels[70:72, 70:72] = vocabulary.ORGAN_LABELS["spleen"]  # 4 voxels: not "in view"
    assert caption(labels, "abdomen", "CT") == "a CT scan of the abdomen showing liver, kidneys"


def test_random_crops_are_windows_of_the_latents_with_sides_the_unet_accepts():
    z = torch.arange(6 * 4 * 32 * 32, dtype=torch.float32).view(6, 4, 32, 32)
    generator = torch.Generator().manual_seed(0)
    sizes = set()
    for _ in range(20):
        crops = random_crops(z, 8, generator)
        h, w = crops.shape[-2:]
        sizes.add((h, w))
        assert crops.shape[:2] == (6, 4) and 8 <= h <= 32 and 8 <= w <= 32 and h % 4 == 0 and w % 4 == 0
        for latent, crop in zip(z, crops):  # each crop is a contiguous window of its own latent
            row, col = divmod(int(crop[0, 0, 0] - latent[0, 0, 0]), 32)
            assert torch.equal(crop, latent[:, row:row + h, col:col + w])
    assert len(sizes) > 5  # the sizes vary


def test_tiny_training_writes_a_loadable_model_and_resumes(tmp_path):
    # bf16 left to the machine (None): used only where the CPU computes it natively, and the card says which
    out = train_foundation(tmp_path / "m", replace(TINY, bf16=None), progress=False, command="test")
    backbone = DiffusersSliceBackbone.from_pretrained(out, device="cpu")
    assert backbone.scaling_factor != 1.0  # set from the latents' spread
    assert backbone.config.extra["data_cases"][0].startswith("healthy_")
    assert "healthy" in (out / "README.md").read_text()
    assert backbone.config.extra["training"]["bf16"] is native_bf16()
    assert f"bf16 autocast: {native_bf16()}." in (out / "README.md").read_text()
    state = json.loads((out / "checkpoints" / "state.json").read_text())
    assert state["vae_step"] == 2 and state["unet_step"] == 2
    cached = list((out / "checkpoints").glob("latents_*.safetensors"))  # the training latents of the finished VAE
    assert len(cached) == 1
    written = cached[0].stat().st_mtime_ns
    longer = replace(TINY, unet_steps=3, crop_fraction=1.0, crop_min=4)  # fine-tuned on crops from step 2
    train_foundation(tmp_path / "m", longer, resume=True, progress=False)
    state = json.loads((out / "checkpoints" / "state.json").read_text())
    assert list((out / "checkpoints").glob("latents_*.safetensors")) == cached
    assert cached[0].stat().st_mtime_ns == written  # read back, not encoded again
    assert state["unet_step"] == 3 and state["vae_step"] == 2  # the VAE was not trained again
    assert state["crops_from_step"] == 2 and "from step 2, 100% of batches random latent crops" in \
        (out / "README.md").read_text()


def test_the_plateau_schedule_halves_the_rate_then_ends_the_phase():
    config = replace(V2, plateau_patience=2, plateau_decays=1)
    plateau = {"best": None, "bad": 0, "decays": 0, "scale": 1.0}
    decisions = [foundation._plateau(plateau, loss, config) for loss in (1.0, 0.9, 0.895, 0.894)]
    assert decisions == [False] * 4 and plateau["scale"] == 0.5 and plateau["decays"] == 1  # 0.895, 0.894: < 1%
    assert [foundation._plateau(plateau, loss, config) for loss in (0.8, 0.81, 0.80)] == [False, False, True]


def test_optimiser_state_round_trips_through_safetensors(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 3)).pow(2).sum().backward()
        optimizer.step()
    save_optimizer(optimizer, tmp_path / "optimizer.safetensors")
    restored = torch.optim.AdamW(model.parameters(), lr=1.0)
    load_optimizer(restored, tmp_path / "optimizer.safetensors")
    assert restored.param_groups[0]["lr"] == 1e-2
    for before, after in zip(optimizer.state.values(), restored.state.values()):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(after[key], before[key])


def test_the_model_card_says_which_runs_used_bf16():
    assert foundation.precision_by_run([False, False]) == "False"
    assert foundation.precision_by_run([None, None, False, False, True]) == \
        "not recorded in runs 1-2, False in runs 3-4, True in run 5"


def test_v2_training_is_resumable_2_5d_and_organ_aware(tmp_path):
    tiny = replace(V2, shape=(32, 32, 16), vae_channels=(16, 16), unet_channels=(16, 32, 32), volumes_per_region=1,
                   validation_volumes_per_region=1, vae_crop=16, vae_steps=4, unet_steps=4, vae_batch=2, unet_batch=2,
                   checkpoint_every=2, bf16=False, max_minutes=1e-6)
    out = tmp_path / "v2"
    train_foundation(out, tiny, progress=False, command="first")  # out of time at the first checkpoint
    state = json.loads((out / "checkpoints" / "state.json").read_text())
    assert state["vae_step"] == 2 and state["unet_step"] == 0 and not (out / "vae").exists()
    assert (out / "checkpoints" / "vae_optimizer.safetensors").is_file()
    assert [sorted(point) for point in state["curves"]["vae"]] == [["lr", "step", "train", "validation"]]
    assert state["seconds"]["vae"] > 0  # booked at the checkpoint, so a killed run keeps its time too
    train_foundation(out, replace(tiny, max_minutes=None), resume=True, progress=False, command="second")
    state = json.loads((out / "checkpoints" / "state.json").read_text())
    assert state["vae_step"] in (2, 4) and state["unet_step"] in (2, 4)  # at the cap, or earlier at a plateau
    assert len(state["curves"]["vae"]) == state["vae_step"] // 2 and state["commands"] == ["first", "second"]
    assert state["bf16"] == [False, False]  # by run: a resume may land on another CPU
    backbone = DiffusersSliceBackbone.from_pretrained(out, device="cpu")
    assert backbone.vae.config.in_channels == 3 and backbone.config.context_slices == 1
    assert backbone.latent_downsample == 2 and backbone.organ_channels == vocabulary.CONDITIONING_ORGANS
    assert backbone.unet.config.in_channels == 4 + len(vocabulary.CONDITIONING_ORGANS)
    # the three AOVA stages: the first at the full grid (before the halving), then two at the latent grid
    stages = backbone.encode_features(torch.zeros(2, 3, 32, 32))
    assert [tuple(f.shape[-2:]) for f in stages] == [(32, 32), (16, 16), (16, 16)]
    assert (out / "training_curves.png").stat().st_size > 1000
    card = (out / "README.md").read_text()
    assert "2x down-sampling" in card and "organ map" in card and "`first && second`" in card
    # the curve's last UNet validation point is the held-out loss of the saved weights, recomputed here from scratch
    # (it once read the last training batch through a closure over the training loop's names)
    validation = healthy_volumes(tiny, backbone.config, seed=tiny.validation_seed,
                                 per_region=tiny.validation_volumes_per_region, progress=False, cache=out / "checkpoints")
    with torch.no_grad():
        pick = foundation._validation_pick(validation)
        latents = backbone.vae.encode(validation.stacks(pick, 1)).latent_dist.mean * backbone.vae.config.scaling_factor
    held_out = foundation.HeldOutNoiseLoss(validation, latents, foundation.build_models(tiny, 384)[2], 2, "cpu",
                                           seed=tiny.seed + 3)
    assert state["curves"]["unet"][-1]["validation"] == pytest.approx(held_out(backbone.unet), abs=2e-6)
    untrained = foundation.build_models(tiny, 384)[1]  # and it is a loss of the weights, not a constant
    assert held_out(untrained) > 0 and held_out(untrained) != pytest.approx(held_out(backbone.unet), abs=1e-4)


# ---- the shipped default -------------------------------------------------------------------

def test_shipped_model_is_registered_small_and_verified():
    entry = load_registry()[DEFAULT_MODEL]
    assert entry["size_mb"] < 30
    folder = verified_model_path(DEFAULT_MODEL)
    assert folder == models_root() / entry["path"]
    assert all((folder / name).is_file() for name in entry["files"])
    assert "train-foundation" in entry["command"]


def test_shipped_model_saw_no_tumor():
    config = json.loads((verified_model_path(DEFAULT_MODEL) / "diffugts_backbone.json").read_text())
    cases = config["extra"]["data_cases"]
    assert cases and all(c.startswith("healthy_") for c in cases)
    # its data seed is none of the seeds the heads train, validate or test on, so no case it saw is a case scored later
    from diffugts_core.data.splits import SEEDS

    assert config["extra"]["training"]["data_seed"] not in SEEDS.values()


def test_neighbour_latents_and_training_holes_mark_what_a_through_plane_denoiser_cannot_see():
    data = healthy_volumes(TINY, SliceBackboneConfig(slice_shape=(32, 32)), progress=False)
    latents = torch.randn(len(data), 4, 8, 8)
    neighbours = foundation.NeighbourLatents(data, latents, (-1, 2))
    first = int(torch.nonzero(data.index[:, 1] == data.index[0, 1])[0])  # the first slice with body of volume 0
    got, unknown = neighbours(torch.tensor([first]))
    volume, k = data.index[first].tolist()
    assert unknown[0, 0].all() and not got[0, 0].any()  # the slice before it has no latent kept (or no slice)
    row = int(torch.nonzero((data.index[:, 0] == volume) & (data.index[:, 1] == k + 2))[0])
    assert torch.equal(got[0, 1], latents[row]) and not unknown[0, 1].any()
    config = replace(V2, shape=(32, 32, 16), context_dropout=0.0, context_holes=1.0, hole_radius_cells=(3.0, 3.0))
    generator = torch.Generator().manual_seed(0)
    organs = torch.zeros(16, 7, 16, 16)
    organs[:, 2, 2:5, 3:6] = 1.0  # the holes are centred in an organ
    holes = foundation.context_holes(torch.zeros(16, 2, 16, 16), (-1, 1), config, generator, organs)
    assert holes.flatten(1).any(1).all()  # every hole reaches a neighbour at most one slice away
    marked = holes.amax(1)  # and lies within its radius (3 cells, and the half cell any cover marks) of the organ
    assert marked[:, 2:5, 3:6].amax((1, 2)).eq(1).all() and not marked[:, 8:].any() and not marked[:, :, 9:].any()
    # each organ in view is as likely a centre as the others, whatever its area: here a 4-cell organ beside a 100-cell one
    organs = torch.zeros(1000, 7, 16, 16)
    organs[:, 0, :10, :10] = 1.0
    organs[:, 3, 12:14, 12:14] = 1.0
    point = replace(config, hole_radius_cells=(0.0, 0.1), context_dropout=0.0, context_holes=1.0)
    holes = foundation.context_holes(torch.zeros(1000, 1, 16, 16), (0,), point, generator, organs)[:, 0]
    assert holes.flatten(1).sum(1).eq(1).all()  # one cell: the centre
    assert 0.45 < holes[:, 12:14, 12:14].sum() / 1000 < 0.55
    assert foundation.context_holes(torch.zeros(4, 2, 8, 8), (-1, 1), replace(config, context_dropout=1.0),
                                    generator).eq(1).all()
    assert not foundation.context_holes(torch.zeros(4, 2, 8, 8), (-1, 1), replace(config, context_holes=0.0),
                                        generator).any()


TINY_V2 = replace(V2, shape=(32, 32, 16), vae_channels=(16, 16), unet_channels=(16, 32, 32), volumes_per_region=1,
                  validation_volumes_per_region=1, vae_crop=16, vae_steps=2, unet_steps=2, vae_batch=2, unet_batch=2,
                  checkpoint_every=2, bf16=False)


@pytest.fixture(scope="module")
def tiny_v2(tmp_path_factory):
    """A finished tiny v2 model folder, for the recipes that start from one."""
    return train_foundation(tmp_path_factory.mktemp("v2") / "v2", TINY_V2, progress=False, command="v2")


def test_v3_starts_from_a_finished_model_and_inpaints_with_the_neighbouring_slices(tmp_path, tiny_v2):
    from diffugts_core import inpaint
    from diffugts_core.backbone.base import Conditioning
    from diffugts_core.inpaint import InpaintConfig

    tiny, source = TINY_V2, tiny_v2
    v3 = replace(tiny, denoiser_context=(-2, 2), init_from=str(source))
    # before any step the new channels are at zero: the source's predictions, whatever the neighbours hold
    vae, unet, *_ = foundation.build_models(v3, 384)
    (tmp_path / "ck").mkdir()
    record = foundation._init_from(source, vae, unet, tmp_path / "ck")
    original = DiffusersSliceBackbone.from_pretrained(source, device="cpu")
    z, organs, tokens = torch.randn(2, 4, 16, 16), torch.rand(2, 7, 16, 16), torch.randn(2, 3, 384)
    with torch.no_grad():
        started = unet(torch.cat([z, organs, torch.randn(2, 10, 16, 16)], 1), 500, encoder_hidden_states=tokens).sample
        expected = original.unet(torch.cat([z, organs], 1), 500, encoder_hidden_states=tokens).sample
    assert torch.allclose(started, expected, atol=1e-5) and len(record["unet"]) == 64
    # so its held-out loss starts at the source's: the same noise and steps, the context drawn after them
    validation = healthy_volumes(tiny, original.config, seed=tiny.validation_seed, per_region=1, progress=False,
                                 cache=source / "checkpoints")
    with torch.no_grad():
        every = original.vae.encode(validation.stacks(torch.arange(len(validation)), 1)).latent_dist.mean \
            * original.scaling_factor  # as training scales them
    scheduler = foundation.build_models(tiny, 384)[2]
    pick = foundation._validation_pick(validation)
    with_context = foundation.HeldOutNoiseLoss(validation, every, scheduler, 2, "cpu", config=v3)
    without = foundation.HeldOutNoiseLoss(validation, every[pick], scheduler, 2, "cpu")
    assert with_context.context.shape == (len(pick), 10, 16, 16) and with_context.context[:, 8:].any()
    assert with_context(unet) == pytest.approx(without(original.unet), abs=1e-6)
    # the first steps train only the context's input weights, v2's UNet held as it was; then the whole UNet
    v3 = replace(v3, unet_steps=4, context_only_steps=2)
    out = train_foundation(tmp_path / "v3", replace(v3, max_minutes=0), progress=False, command="v3")
    held = load_file(out / "checkpoints" / "unet.safetensors")
    conv_in = held.pop("conv_in.weight")
    assert conv_in[:, 11:].abs().sum() > 0 and torch.equal(conv_in[:, :11], unet.conv_in.weight[:, :11])
    assert all(torch.equal(value, unet.state_dict()[key]) for key, value in held.items())
    # a validation plateau during the context-only steps ends them, not the UNet's phase
    plateau = {"unet": {"reached": 2}}
    run = foundation._Run(v3, tmp_path, {"unet_step": 2, "plateau": plateau}, 0.0, torch.device("cpu"))
    assert not foundation._phase_done(run, "unet")
    run.state["context_only_until"] = 2
    assert foundation._phase_done(run, "unet")
    out = train_foundation(tmp_path / "v3", v3, resume=True, progress=False, command="v3")
    state = json.loads((out / "checkpoints" / "state.json").read_text())
    assert state["context_only_until"] == 2 and "The first 2 UNet steps trained only" in (out / "README.md").read_text()
    assert state["init_from"]["model"] == str(source) and state["vae_step"] == 0 and state["unet_step"] == 4
    trained = load_file(out / "checkpoints" / "unet.safetensors")
    assert not torch.equal(trained["conv_in.weight"][:, :11], conv_in[:, :11])
    assert state["curves"]["unet"][0] == {"step": 0, "validation": pytest.approx(with_context(unet), abs=1e-5)}
    assert sum(not torch.equal(value, trained[key]) for key, value in held.items()) > len(held) / 2
    assert not state["curves"]["vae"] and state["curves"]["unet"][-1]["validation"] > 0
    backbone = DiffusersSliceBackbone.from_pretrained(out, device="cpu")
    assert backbone.denoiser_context == (-2, 2) and backbone.unet.config.in_channels == 4 + 7 + 2 * 5
    assert all(torch.equal(a, b) for a, b in zip(backbone.vae.state_dict().values(),
                                                 original.vae.state_dict().values()))  # v2's VAE, as it was
    assert "offsets -2, +2" in (out / "README.md").read_text()
    # inpainting hands the denoiser each slice's neighbours: known latents outside the mask, unknown inside it and
    # past the volume's ends
    x = torch.rand(16, 3, 32, 32) * 2 - 1
    mask = torch.zeros(16, 1, 32, 32)
    mask[3:6, :, 8:16, 8:16] = 1
    mask[15, :, 8:16, 8:16] = 1
    seen = []
    denoise = backbone.denoise
    backbone.denoise = lambda z_t, t, cond: seen.append(cond.context) or denoise(z_t, t, cond)
    result = inpaint.inpaint_slices(backbone, x, mask, Conditioning(torch.randn(1, 3, 384)),
                                    config=InpaintConfig(steps=2, batch_size=8), organ_maps=torch.zeros(16, 7, 16, 16))
    context = seen[0]
    assert context.shape == (4, 2 * 5, 16, 16)  # slices 3, 4, 5, 15; latents of k - 2 and k + 2, then their masks
    known = backbone.encode(x[[1, 7]])
    assert torch.allclose(context[0, :4], known[0]) and not context[0, 8].any()  # slice 3 sees slice 1 whole ...
    assert context[0, 9, 4:8, 4:8].eq(1).all() and context[0, 9].sum() == 16  # ... and slice 5 but its masked cells
    assert not context[0, 4:8, 4:8, 4:8].any() and context[0, 4:8, :4].abs().sum() > 0
    assert torch.allclose(context[2, 4:8], known[1]) and not context[2, 9].any()  # slice 5 sees slice 7 whole
    assert context[3, 9].eq(1).all() and not context[3, 4:8].any()  # slice 17 is past the volume's end: unknown
    assert torch.equal(result[0, 6:15], x[6:15]) and not torch.equal(result[0, 3:6], x[3:6])


def test_v3_controlnet_steers_the_source_unet_which_stays_as_it_was(tmp_path, tiny_v2):
    from diffugts_core.backbone.attention import capture_cross_attention
    from diffugts_core.backbone.base import Conditioning
    from diffugts_core.backbone.controlled import ControlledUNet

    v3c = replace(TINY_V2, denoiser_context=(-2, 2), init_from=str(tiny_v2), controlnet=True, unet_lr=1e-2)
    with pytest.raises(ValueError, match="context_only_steps=0"):
        foundation.build_models(replace(v3c, context_only_steps=2), 384)
    # at the start the branch adds nothing (zero-initialised outputs): the source's predictions, whatever the context
    vae, unet, *_ = foundation.build_models(v3c, 384)
    (tmp_path / "ck").mkdir()
    foundation._init_from(tiny_v2, vae, unet, tmp_path / "ck")
    original = DiffusersSliceBackbone.from_pretrained(tiny_v2, device="cpu")
    z, organs, tokens = torch.randn(2, 4, 16, 16), torch.rand(2, 7, 16, 16), torch.randn(2, 3, 384)
    with torch.no_grad():
        started = unet(torch.cat([z, organs, torch.randn(2, 10, 16, 16)], 1), 500, encoder_hidden_states=tokens).sample
        expected = original.unet(torch.cat([z, organs], 1), 500, encoder_hidden_states=tokens).sample
    assert isinstance(unet, ControlledUNet) and torch.allclose(started, expected, atol=1e-5)
    branch = unet.controlnet.state_dict()
    assert torch.equal(branch["down_blocks.0.resnets.0.conv1.weight"],
                       original.unet.state_dict()["down_blocks.0.resnets.0.conv1.weight"])  # a copy of the encoder
    # training moves the branch only
    out = train_foundation(tmp_path / "v3c", v3c, progress=False, command="v3c")
    trained = load_file(out / "checkpoints" / "unet.safetensors")
    source = original.unet.state_dict()
    assert all(torch.equal(trained[f"unet.{key}"], value) for key, value in source.items())
    assert sum(not torch.equal(trained[f"controlnet.{key}"], value) for key, value in branch.items()) > len(branch) / 2
    backbone = DiffusersSliceBackbone.from_pretrained(out, device="cpu")
    assert (out / "controlnet" / "config.json").is_file() and isinstance(backbone.unet, ControlledUNet)
    assert backbone.unet.config.in_channels == 4 + 7 + 2 * 5 and "`controlnet/` ControlNetModel" in \
        (out / "README.md").read_text()
    # the trained branch reads the context (two warm-up steps: small, but exactly nothing before training)
    cond = Conditioning(tokens[:1]).expand(2)
    known = Conditioning(tokens[:1], context=torch.cat([torch.randn(2, 8, 16, 16), torch.zeros(2, 2, 16, 16)], 1))
    assert (backbone.denoise(z, 500, cond) - backbone.denoise(z, 500, known.expand(2))).abs().max() > 1e-6
    # AOVA's cross-attention maps are read from the UNet's layers only, as in the source
    with capture_cross_attention(backbone.unet) as maps:
        backbone.denoise(z, 500, cond)
    with capture_cross_attention(original.unet) as source_maps:
        original.denoise(z, 500, cond)
    assert maps.layers == source_maps.layers


def test_a_denoiser_that_sees_its_own_slice_is_scored_only_where_it_generates():
    from diffugts_core.backbone.base import context_channels

    unknown = torch.zeros(3, 3, 8, 8)
    unknown[:, 1, 2:4, 2:4] = 1  # the slice's own hole (offset 0)
    unknown[:, 0] = 1  # a neighbour wholly unknown
    context = context_channels(torch.randn(3, 3, 4, 8, 8), unknown)
    generated = foundation.generated_cells(context, (-2, 0, 2))
    assert torch.equal(generated, unknown[:, 1]) and foundation.generated_cells(context, (-2, 2)) is None
    noise = torch.randn(3, 4, 8, 8)
    predicted = noise + 2 * generated[:, None] + 5 * (1 - generated[:, None])  # wrong everywhere, most outside
    assert foundation.inpainting_loss(predicted, noise, None) == pytest.approx((4 * 4 + 25 * 60) / 64)
    assert foundation.inpainting_loss(predicted, noise, generated) == pytest.approx(4)  # the holes alone
    generated[1] = 1  # a sample that sees no context: its whole slice is its hole, one sample among the others
    generated[2] = 0  # one that generates nothing: not scored
    predicted = noise + torch.tensor([2.0, 1.0, 9.0])[:, None, None, None]
    assert foundation.inpainting_loss(predicted, noise, generated) == pytest.approx((4 + 1) / 2)
    generated[:] = 0
    assert foundation.inpainting_loss(predicted.requires_grad_(), noise, generated) == 0
