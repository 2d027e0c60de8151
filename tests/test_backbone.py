"""The frozen backbone: protocol, save/load round trip, hooks that leave no trace, registry checks."""

import numpy as np
import pytest
import torch

from diffugts_core.backbone import (
    Conditioning,
    DiffusersSliceBackbone,
    FrozenBackbone,
    SliceBackboneConfig,
    capture_cross_attention,
)
from diffugts_core.backbone.attention import word_token_positions
from diffugts_core.backbone.registry import record_model, verified_model_path
from diffugts_core.training.foundation import FoundationTrainingConfig, build_models
from diffugts_core.io import InputError

TINY = FoundationTrainingConfig(shape=(32, 32, 16), vae_channels=(16, 16, 16), unet_channels=(16, 32, 32),
                                volumes_per_region=1, vae_steps=2, unet_steps=2, vae_batch=2, unet_batch=2,
                                checkpoint_every=1, bf16=False)


def tiny_backbone(context_slices=0):
    torch.manual_seed(0)
    vae, unet, _, ddim = build_models(TINY, cross_attention_dim=384)
    if context_slices:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_config({**vae.config, "in_channels": 1 + 2 * context_slices})
    return DiffusersSliceBackbone(vae, unet, ddim, SliceBackboneConfig(slice_shape=(32, 32),
                                                                       context_slices=context_slices), device="cpu")


def text_cond(batch=1, tokens=6):
    generator = torch.Generator().manual_seed(1)
    mask = torch.ones(batch, tokens, dtype=torch.long)
    mask[:, -2:] = 0  # padding
    return Conditioning(torch.randn(batch, tokens, 384, generator=generator), mask)


def test_satisfies_the_protocol_and_reports_its_geometry():
    backbone = tiny_backbone()
    assert isinstance(backbone, FrozenBackbone)
    assert backbone.spatial_dims == 2 and backbone.latent_downsample == 4 and backbone.latent_channels == 4
    assert backbone.text_conditioned
    assert not any(p.requires_grad for p in backbone.unet.parameters())  # frozen


def test_save_and_load_round_trip_gives_the_same_outputs(tmp_path):
    backbone = tiny_backbone()
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    z = backbone.encode(x)
    eps = backbone.denoise(z, 500, text_cond())
    backbone.save_pretrained(tmp_path / "model")
    loaded = DiffusersSliceBackbone.from_pretrained(tmp_path / "model", device="cpu")
    torch.testing.assert_close(loaded.encode(x), z)
    torch.testing.assert_close(loaded.decode(z), backbone.decode(z))
    torch.testing.assert_close(loaded.denoise(z, 500, text_cond()), eps)
    assert loaded.config == backbone.config


def test_encoder_features_three_stages_and_hooks_removed():
    backbone = tiny_backbone()
    features = backbone.encode_features(torch.zeros(2, 1, 32, 32))
    assert [tuple(f.shape) for f in features] == [(2, 16, 16, 16), (2, 16, 8, 8), (2, 16, 8, 8)]
    assert all(not block._forward_hooks for block in backbone.vae.encoder.down_blocks)


def test_volume_slices_round_trip_with_and_without_neighbour_channels():
    volume = np.random.default_rng(0).normal(size=(32, 32, 5)).astype(np.float32)
    plain = tiny_backbone()
    slices = plain.volume_to_slices(volume)
    assert slices.shape == (5, 1, 32, 32)
    np.testing.assert_array_equal(plain.slices_to_volume(slices), volume)
    context = tiny_backbone(context_slices=1)
    stacked = context.volume_to_slices(volume)
    assert stacked.shape == (5, 3, 32, 32)
    np.testing.assert_array_equal(stacked[2, 0].numpy(), volume[:, :, 1])  # the slice below as channel 0
    np.testing.assert_array_equal(stacked[0, 0].numpy(), volume[:, :, 0])  # edge slices repeat
    np.testing.assert_array_equal(context.slices_to_volume(stacked), volume)


def test_wrong_in_plane_shape_is_a_clear_error():
    with pytest.raises(InputError, match="axial slices of"):
        tiny_backbone().volume_to_slices(np.zeros((64, 64, 4)))


def test_text_conditioned_denoiser_needs_a_conditioning():
    backbone = tiny_backbone()
    with pytest.raises(ValueError, match="empty prompt"):
        backbone.denoise(torch.zeros(1, 4, 8, 8), 10, None)


def test_intensity_maps_invert_and_favour_soft_tissue():
    backbone = tiny_backbone()
    ct = backbone.intensity("CT", np.zeros(1))
    hu = np.array([-1000.0, -500.0, 40.0, 100.0, 1500.0])
    np.testing.assert_allclose(ct.inverse(ct.forward(hu)), hu, atol=1e-3)
    assert ct.slope_at(50) > 2.9 * (2.0 / 2000)  # three times MAISI's [-1000, 1000] -> [-1, 1] slope
    mri = backbone.intensity("MRI", np.linspace(0, 100, 1001))
    assert mri.forward(np.array([0.0]))[0] == -1.0 and mri.forward(np.array([99.5]))[0] == pytest.approx(1.0)
    with pytest.raises(InputError, match="unknown modality"):
        backbone.intensity("PET", np.zeros(1))


def test_capture_restores_the_original_processors_even_after_an_error():
    backbone = tiny_backbone()
    unet = backbone.unet
    before = dict(unet.attn_processors)
    z = torch.randn(2, 4, 8, 8)
    with capture_cross_attention(unet) as maps:
        assert any(type(p).__name__ == "CapturingCrossAttnProcessor" for p in unet.attn_processors.values())
        assert all(type(p).__name__ != "CapturingCrossAttnProcessor"
                   for name, p in unet.attn_processors.items() if "attn1" in name)  # self-attention untouched
        out = backbone.denoise(z, 300, text_cond(2))
        backbone.denoise(z, 100, text_cond(2))
    assert all(unet.attn_processors[name] is processor for name, processor in before.items())
    torch.testing.assert_close(backbone.denoise(z, 300, text_cond(2)), out)  # captured run computed the same
    maps_ = maps.token_maps((32, 32))
    assert maps_.shape == (2, 6, 32, 32)
    torch.testing.assert_close(maps_.sum(1), torch.ones(2, 32, 32), atol=1e-4, rtol=0)  # softmax over tokens
    assert maps_[:, -2:].abs().max() < 1e-6  # padding tokens get no attention
    assert set(maps.calls.values()) == {2}  # two timesteps, every layer
    with pytest.raises(RuntimeError):
        with capture_cross_attention(unet):
            raise RuntimeError("boom")
    assert all(unet.attn_processors[name] is processor for name, processor in before.items())


def test_word_token_positions():
    from diffugts_core.text import TextEncoder

    tokenizer = TextEncoder.from_pretrained(device="cpu").tokenizer
    prompt = "a CT scan of the abdomen showing liver, spleen"
    ids = tokenizer(prompt)["input_ids"]
    positions = word_token_positions(tokenizer, prompt, "spleen")
    assert tokenizer.decode([ids[p] for p in positions]).strip() == "spleen"
    with pytest.raises(ValueError, match="not a word"):
        word_token_positions(tokenizer, prompt, "pancreas")


def test_registry_accepts_intact_files_and_refuses_a_tampered_one(tmp_path):
    folder = tmp_path / "models" / "tiny"
    tiny_backbone().save_pretrained(folder)
    registry_file = tmp_path / "models" / "registry.yaml"
    entry = record_model("tiny", folder, command="make-tiny", licence="Apache-2.0", description="test",
                         registry_file=registry_file)
    assert "unet/diffusion_pytorch_model.safetensors" in entry["files"]
    import yaml

    registry = yaml.safe_load(registry_file.read_text())
    assert verified_model_path("tiny", registry, root=tmp_path / "models") == folder
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(InputError, match="does not match the registry.*make-tiny"):
        verified_model_path("tiny", registry, root=tmp_path / "models")
    weights.unlink()
    with pytest.raises(InputError, match="missing file"):
        verified_model_path("tiny", registry, root=tmp_path / "models")
    with pytest.raises(InputError, match="no registered model"):
        verified_model_path("other", registry, root=tmp_path / "models")


def test_offline_hub_id_fails_fast_with_the_download_command(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="offline.*hf download someone/some-model"):
        DiffusersSliceBackbone.from_pretrained("someone/some-model")
    with pytest.raises(InputError, match="no such diffusion model folder"):
        DiffusersSliceBackbone.from_pretrained("./not/here")


def test_folder_without_model_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="not a diffusers model folder"):
        DiffusersSliceBackbone.from_pretrained(tmp_path)


def organ_aware_backbone():
    from dataclasses import replace

    from diffugts_core.vocabulary import CONDITIONING_ORGANS

    torch.manual_seed(0)
    vae, unet, _, ddim = build_models(replace(TINY, organ_conditioning=True), cross_attention_dim=384)
    return DiffusersSliceBackbone(vae, unet, ddim, SliceBackboneConfig(slice_shape=(32, 32),
                                                                       organ_channels=CONDITIONING_ORGANS), device="cpu")


def test_an_organ_aware_denoiser_reads_the_organ_map_and_an_absent_map_is_an_empty_one():
    from dataclasses import replace

    backbone = organ_aware_backbone()
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    organs = torch.zeros(2, len(backbone.organ_channels), 8, 8)
    organs[:, 0, 2:6, 2:6] = 1.0
    with_map = backbone.denoise(z, 500, replace(text_cond(), organs=organs))
    without = backbone.denoise(z, 500, text_cond())
    assert not torch.allclose(with_map, without)
    torch.testing.assert_close(without, backbone.denoise(z, 500, replace(text_cond(), organs=organs * 0)))
    with pytest.raises(ValueError, match="7 organ channels"):
        backbone.denoise(z, 500, replace(text_cond(), organs=organs[:, :3]))


def test_a_model_trained_on_phantoms_says_so_and_another_does_not():
    from diffugts_core.backbone import load_backbone
    from diffugts_core.plausibility import model_warnings

    shipped = model_warnings(load_backbone("default", device="cpu"))
    assert len(shipped) == 1 and "36 synthetic PhantomBench volumes" in shipped[0] and "real anatomy" in shipped[0]
    assert model_warnings(tiny_backbone()) == []  # no training record: not known to be a phantom model
