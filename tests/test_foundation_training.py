"""Training the foundation model: healthy data only, a loadable result, resumable; the shipped model."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from diffugts_core.data import phantoms
from diffugts_core import vocabulary
from diffugts_core.backbone import DEFAULT_MODEL, DiffusersSliceBackbone, SliceBackboneConfig
from diffugts_core.backbone.registry import load_registry, models_root, verified_model_path
from diffugts_core.training.foundation import (caption, healthy_training_slices, native_bf16, random_crops,
                                             train_foundation)

from .test_backbone import TINY


def test_training_data_are_healthy_slices_with_organ_captions():
    images, captions, case_ids = healthy_training_slices(TINY, SliceBackboneConfig(slice_shape=(32, 32)), False)
    assert case_ids == ["healthy_abdomen_000", "healthy_thorax_000", "healthy_brain_000"]
    assert images.shape[1:] == (1, 32, 32) and len(images) == len(captions)
    assert float(images.min()) >= -1 and float(images.max()) <= 1
    assert any(c.startswith("a CT scan of the abdomen showing") for c in captions)
    assert any(c.startswith("an MRI scan of the brain showing") for c in captions)


def test_a_case_with_a_tumor_never_reaches_the_training_set(monkeypatch):
    real = phantoms.generate_case

    def leaky(category, index, seed, shape, region=None):
        return real("liver", index, seed, shape)  # pretends to be healthy, carries a tumor

    monkeypatch.setattr(phantoms, "generate_case", leaky)
    with pytest.raises(RuntimeError, match="must never see a tumor"):
        healthy_training_slices(TINY, SliceBackboneConfig(slice_shape=(32, 32)), False)


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
    out = train_foundation(tmp_path / "m", TINY, progress=False, command="test")
    backbone = DiffusersSliceBackbone.from_pretrained(out, device="cpu")
    assert backbone.scaling_factor != 1.0  # set from the latents' spread
    assert backbone.config.extra["data_cases"][0].startswith("healthy_")
    assert "healthy" in (out / "README.md").read_text()
    # bf16 left to the machine: used only where the CPU computes it natively, and the card says which
    assert backbone.config.extra["training"]["bf16"] is native_bf16()
    assert f"bf16 autocast: {native_bf16()}." in (out / "README.md").read_text()
    state = json.loads((out / "checkpoints" / "state.json").read_text())
    assert state["vae_step"] == 2 and state["unet_step"] == 2
    longer = replace(TINY, unet_steps=3, crop_fraction=1.0, crop_min=4)  # fine-tuned on crops from step 2
    train_foundation(tmp_path / "m", longer, resume=True, progress=False)
    state = json.loads((out / "checkpoints" / "state.json").read_text())
    assert state["unet_step"] == 3 and state["vae_step"] == 2  # the VAE was not trained again
    assert state["crops_from_step"] == 2 and "from step 2, 100% of batches random latent crops" in \
        (out / "README.md").read_text()


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
