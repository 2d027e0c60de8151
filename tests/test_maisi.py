"""The MAISI backbone on tiny random-weight bundles in MAISI's own layout: protocol and shapes, hooks that leave no
trace, the checkpoint round trip against MAISI's own way of loading, the rflow velocity -> noise conversion against
an oracle, and one-line errors for broken bundles."""

import argparse
import json
import shutil

import numpy as np
import pytest
import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import MaisiConvolution, MaisiGroupNorm3D, MaisiResBlock
from monai.bundle import ConfigParser
from monai.networks.schedulers import RFlowScheduler

from diffugts_core.backbone import Conditioning, FrozenBackbone, load_backbone
from diffugts_core.backbone.maisi import (
    MaisiBackbone,
    MaisiConditioning,
    noise_from_velocity,
    usable_splits,
    write_tiny_bundle,
)
from diffugts_core.io import InputError, InputWarning

GRID = 32
VARIANTS = ("rflow", "ddpm")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("maisi")
    return {variant: write_tiny_bundle(root / variant, variant) for variant in VARIANTS}


@pytest.fixture(scope="module")
def backbones(bundles):
    return {variant: MaisiBackbone.from_bundle(folder, device="cpu") for variant, folder in bundles.items()}


def volume(seed=0):
    return torch.rand(1, 1, GRID, GRID, GRID, generator=torch.Generator().manual_seed(seed))


def latents(seed=1):
    return torch.randn(1, 4, GRID // 4, GRID // 4, GRID // 4, generator=torch.Generator().manual_seed(seed))


def bundle_copy(bundles, tmp_path):
    return shutil.copytree(bundles["rflow"], tmp_path / "bundle")


@pytest.mark.parametrize("variant", VARIANTS)
def test_satisfies_the_protocol_in_3d_with_maisis_geometry(backbones, variant):
    backbone = backbones[variant]
    assert isinstance(backbone, FrozenBackbone)
    assert backbone.variant == variant and backbone.spatial_dims == 3 and not backbone.text_conditioned
    assert (backbone.latent_channels, backbone.latent_downsample, backbone.denoiser_multiple) == (4, 4, 8)
    assert backbone.size_multiple == 32 and backbone.organ_channels == ()
    assert not any(p.requires_grad for p in [*backbone.autoencoder.parameters(), *backbone.unet.parameters()])
    # the bundle asks for flash attention and float16 group norms, which need CUDA: off on the CPU
    assert not any(m.norm_float16 for m in backbone.autoencoder.modules() if isinstance(m, MaisiGroupNorm3D))
    assert not any(getattr(m, "use_flash_attention", False) for m in backbone.unet.modules())


def test_shapes_of_every_model_call(backbones):
    backbone = backbones["rflow"]
    x = volume()
    z = backbone.encode(x)
    assert z.shape == (1, 4, 8, 8, 8)
    assert backbone.decode(z).shape == x.shape
    assert [f.shape for f in backbone.encode_features(x)] == [(1, 8, 32, 32, 32), (1, 16, 16, 16, 16), (1, 16, 8, 8, 8)]
    sampled = backbone.encode(x, sample=True, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == z.shape and not torch.equal(sampled, z)
    for variant in VARIANTS:
        eps = backbones[variant].denoise(torch.cat([z, z]), 500, None)
        assert eps.shape == (2, 4, 8, 8, 8) and torch.isfinite(eps).all() and eps.abs().mean() > 0


def test_text_tokens_are_ignored_and_the_case_conditions_the_denoiser(backbones):
    backbone, z = backbones["rflow"], latents()
    text = Conditioning(torch.randn(1, 6, 384), torch.ones(1, 6, dtype=torch.long))
    torch.testing.assert_close(backbone.denoise(z, 300, text), backbone.denoise(z, 300, None))
    finer = MaisiConditioning(spacing_mm=(0.8, 0.8, 1.0))
    assert not torch.allclose(backbone.denoise(z, 300, finer), backbone.denoise(z, 300, None))
    with pytest.raises(InputError, match="modalities"):
        MaisiConditioning(modality="PET")


def test_encoder_stages_are_found_by_type_and_their_hooks_removed(backbones):
    backbone = backbones["rflow"]
    stages = backbone.encoder_stages()
    assert len(stages) == 3 and all(isinstance(stage, MaisiResBlock) for stage in stages)
    x = volume()
    features = backbone.encode_features(x)
    assert all(not m._forward_hooks for m in backbone.autoencoder.modules())
    expected, h = [], x  # the same blocks run one by one
    with torch.no_grad():
        for block in backbone.autoencoder.encoder.blocks:
            h = block(h)
            if any(block is stage for stage in stages):
                expected.append(h)
    for feature, reference in zip(features, expected):
        torch.testing.assert_close(feature, reference)


def test_bundle_files_are_in_maisis_layout_and_formats(bundles):
    folder = bundles["rflow"]
    environment = json.loads((folder / "configs" / "environment_rflow-ct.json").read_text())
    assert environment == {"trained_autoencoder_path": "models/autoencoder_v1.pt",
                           "trained_diffusion_path": "models/diff_unet_3d_rflow-ct.pt"}
    vae = torch.load(folder / environment["trained_autoencoder_path"], weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in vae.values())  # a plain state dict
    checkpoint = torch.load(folder / environment["trained_diffusion_path"], weights_only=True)
    assert isinstance(checkpoint["scale_factor"], torch.Tensor) and "unet_state_dict" in checkpoint
    config = json.loads((folder / "configs" / "config_network_rflow.json").read_text())
    assert config["autoencoder_def"]["num_channels"] == [8, 16, 16] and config["autoencoder_def"]["num_splits"] == 1


def maisi_way(folder, variant, definition):
    """A network built and loaded as MAISI's scripts do: ConfigParser over the network config, torch.load, then
    load_state_dict (CUDA-only flags off, as on any CPU)."""
    parser = ConfigParser(json.loads((folder / "configs" / f"config_network_{variant}.json").read_text()))
    parser["autoencoder_def#norm_float16"] = False
    parser["diffusion_unet_def#use_flash_attention"] = False
    network = parser.get_parsed_content(definition, instantiate=True).eval()
    if definition == "autoencoder_def":
        network.load_state_dict(torch.load(folder / "models/autoencoder_v1.pt", weights_only=True))
        return network, None
    checkpoint = torch.load(folder / f"models/diff_unet_3d_{variant}-ct.pt", weights_only=True)
    network.load_state_dict(checkpoint["unet_state_dict"])
    return network, float(checkpoint["scale_factor"])


def test_vae_round_trip_matches_maisis_own_loading(bundles, backbones):
    backbone, x, z = backbones["rflow"], volume(), latents()
    vae, _ = maisi_way(bundles["rflow"], "rflow", "autoencoder_def")
    with torch.no_grad():
        mean, _ = vae.encode(x)
        image = vae.decode_stage_2_outputs(z / backbone.scaling_factor)
    torch.testing.assert_close(backbone.encode(x), mean * backbone.scaling_factor)
    torch.testing.assert_close(backbone.decode(z), image)


@pytest.mark.parametrize("variant", VARIANTS)
def test_unet_round_trip_matches_maisis_own_loading(bundles, backbones, variant):
    """The scale factor and the noise prediction, with MAISI's conditioning inputs written out by hand."""
    backbone, z, t = backbones[variant], latents(), 250.0
    unet, scale = maisi_way(bundles[variant], variant, "diffusion_unet_def")
    assert backbone.scaling_factor == pytest.approx(scale)
    case = MaisiConditioning(spacing_mm=(1.0, 1.2, 2.5), modality="CT", body_region=("chest", "abdomen"))
    inputs = {"spacing_tensor": torch.tensor([[100.0, 120.0, 250.0]])}
    if variant == "rflow":
        inputs["class_labels"] = torch.tensor([1])
    else:
        inputs["top_region_index_tensor"] = torch.tensor([[0.0, 100.0, 0.0, 0.0]])
        inputs["bottom_region_index_tensor"] = torch.tensor([[0.0, 0.0, 100.0, 0.0]])
    with torch.no_grad():
        prediction = unet(z, torch.tensor([t]), **inputs)
    expected_noise = z - (1 - t / 1000) * prediction if variant == "rflow" else prediction
    torch.testing.assert_close(backbone.denoise(z, t, case), expected_noise)


def test_rflow_velocity_to_noise_against_known_noise():
    generator = torch.Generator().manual_seed(3)
    z0, noise = torch.randn(3, 4, 8, 8, 8, generator=generator), torch.randn(3, 4, 8, 8, 8, generator=generator)
    t = torch.tensor([50.0, 500.0, 950.0])
    z_t = RFlowScheduler(num_train_timesteps=1000).add_noise(z0, noise, t)
    torch.testing.assert_close(noise_from_velocity(z_t, z0 - noise, t, 1000), noise)


class OracleUNet(torch.nn.Module):
    """Answers with a fixed prediction and keeps what the backbone passed it."""

    def __init__(self, prediction, *, body_region: bool, modality: bool):
        super().__init__()
        self.prediction, self.received = prediction, {}
        self.block_out_channels = (8, 16, 16, 16)  # three halvings, as the tiny UNet
        self.include_top_region_index_input = body_region
        self.num_class_embeds = 128 if modality else None

    def forward(self, x, timesteps, **conditions):
        self.received = {"timesteps": timesteps, **conditions}
        return self.prediction


def test_denoise_turns_the_true_velocity_into_the_true_noise(backbones, monkeypatch):
    backbone = backbones["rflow"]
    generator = torch.Generator().manual_seed(4)
    z0, noise = torch.randn(2, 4, 8, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, 8, generator=generator)
    t = torch.tensor([200.0, 700.0])
    z_t = backbone.scheduler.add_noise(z0, noise, t)
    oracle = OracleUNet(z0 - noise, body_region=False, modality=True)
    monkeypatch.setattr(backbone, "unet", oracle)
    eps = backbone.denoise(z_t, t, MaisiConditioning(spacing_mm=(0.7, 0.7, 3.0), modality="MRI"))
    torch.testing.assert_close(eps, noise)
    torch.testing.assert_close(oracle.received["timesteps"], t)
    torch.testing.assert_close(oracle.received["spacing_tensor"], torch.tensor([[70.0, 70.0, 300.0]] * 2))
    assert oracle.received["class_labels"].tolist() == [8, 8]  # MAISI's class of MRI


def test_ddpm_denoiser_predicts_the_noise_itself_from_the_body_region(backbones, monkeypatch):
    backbone, z = backbones["ddpm"], latents()
    oracle = OracleUNet(torch.full(z.shape, 0.25), body_region=True, modality=False)
    monkeypatch.setattr(backbone, "unet", oracle)
    eps = backbone.denoise(z, 10, MaisiConditioning(body_region=("head", "pelvis")))
    torch.testing.assert_close(eps, torch.full(z.shape, 0.25))
    assert oracle.received["top_region_index_tensor"].tolist() == [[100.0, 0.0, 0.0, 0.0]]
    assert oracle.received["bottom_region_index_tensor"].tolist() == [[0.0, 0.0, 0.0, 100.0]]
    assert "class_labels" not in oracle.received


def test_intensity_ct_window_clipped_and_mri_percentiles_unclipped(backbones):
    backbone = backbones["rflow"]
    ct = backbone.intensity("CT", np.zeros(3))
    np.testing.assert_allclose(ct.forward(np.array([-3000.0, -1000.0, 0.0, 1000.0, 3000.0])), [0, 0, 0.5, 1, 1])
    mri = np.random.default_rng(0).gamma(2.0, 100.0, size=(16, 16, 8)).astype(np.float32)
    mapped = backbone.intensity("MRI", mri).forward(mri)
    lower, upper = np.percentile(mri, [0, 99.5])
    np.testing.assert_allclose(mapped, (mri - lower) / (upper - lower), rtol=1e-5, atol=1e-5)
    assert mapped.max() > 1.0  # MAISI does not clip above the 99.5th percentile
    np.testing.assert_allclose(backbone.intensity("MRI", mri).inverse(mapped), mri, rtol=1e-4)
    with pytest.raises(InputError, match="unknown modality"):
        backbone.intensity("PET", mri)


def test_volumes_pad_to_multiples_of_32_and_crop_back(backbones):
    backbone = backbones["rflow"]
    image = np.random.default_rng(1).random((33, 40, 20)).astype(np.float32)
    batch = backbone.volume_to_batch(image)
    assert batch.shape == (1, 1, 64, 64, 32)
    assert batch[..., 33:, :, :].abs().sum() == 0 and batch[..., 40:, :].abs().sum() == 0
    np.testing.assert_array_equal(backbone.batch_to_volume(batch, image.shape), image)
    with pytest.raises(ValueError, match="multiples of 4.*volume_to_batch"):
        backbone.encode(torch.zeros(1, 1, 30, 32, 32))


def test_split_count_is_lowered_for_small_grids_and_restored(bundles, backbones, tmp_path):
    assert [usable_splits(8, 4), usable_splits(16, 4), usable_splits(12, 8), usable_splits(8, 1)] == [2, 4, 4, 1]
    split = MaisiBackbone.from_bundle(write_tiny_bundle(tmp_path / "split", num_splits=4), device="cpu")
    x, z = volume(), latents()
    torch.testing.assert_close(split.encode(x), backbones["rflow"].encode(x))
    torch.testing.assert_close(split.decode(z), backbones["rflow"].decode(z))
    assert {m.num_splits for m in split.autoencoder.modules() if isinstance(m, MaisiConvolution)} == {4}


def test_load_backbone_reads_a_bundle_folder_and_the_model_zoo_layout(bundles, tmp_path):
    assert isinstance(load_backbone(bundles["ddpm"], device="cpu"), MaisiBackbone)
    # the MONAI model-zoo bundle: one configs/inference.json, weight paths as expressions over its models folder
    zoo = bundle_copy(bundles, tmp_path)
    config = json.loads((zoo / "configs" / "config_network_rflow.json").read_text())
    config["noise_scheduler"]["_target_"] = "scripts.rectified_flow.RFlowScheduler"
    config |= {"bundle_root": ".", "model_dir": "$@bundle_root + '/models'",
               "trained_autoencoder_path": "$@model_dir + '/autoencoder_v1.pt'",
               "trained_diffusion_path": "$@model_dir + '/diff_unet_3d_rflow-ct.pt'"}
    for name in ("config_network_rflow.json", "environment_rflow-ct.json"):
        (zoo / "configs" / name).unlink()
    (zoo / "configs" / "inference.json").write_text(json.dumps(config))
    backbone = MaisiBackbone.from_bundle(zoo, device="cpu")
    assert backbone.variant == "rflow" and backbone.files.config.name == "inference.json"


@pytest.mark.parametrize("missing, named", [
    ("models/autoencoder_v1.pt", "autoencoder_v1.pt: missing"),
    ("models/diff_unet_3d_rflow-ct.pt", "diff_unet_3d_rflow-ct.pt: missing"),
    ("configs/environment_rflow-ct.json", "environment_rflow-ct.json: missing"),
    ("configs/config_network_rflow.json", "no MAISI network config.*configs/config_network_rflow.json"),
])
def test_a_missing_file_is_one_line_naming_it(bundles, tmp_path, missing, named):
    folder = bundle_copy(bundles, tmp_path)
    (folder / missing).unlink()
    with pytest.raises(InputError, match=named) as error:
        MaisiBackbone.from_bundle(folder, device="cpu")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("network, change, named", [
    ("autoencoder_def", {"num_channels": [8, 16, 32]}, "autoencoder_v1.pt: these weights do not fit.*another shape"),
    ("diffusion_unet_def", {"include_fc": False}, "diff_unet_3d_rflow-ct.pt: these weights do not fit.*unexpected"),
])
def test_a_config_that_does_not_match_its_weights_is_one_line(bundles, tmp_path, network, change, named):
    folder = bundle_copy(bundles, tmp_path)
    config_file = folder / "configs" / "config_network_rflow.json"
    config = json.loads(config_file.read_text())
    config[network] |= change
    config_file.write_text(json.dumps(config))
    with pytest.raises(InputError, match=named) as error:
        MaisiBackbone.from_bundle(folder, device="cpu")
    assert "config_network_rflow.json" in str(error.value) and "\n" not in str(error.value)


def test_weight_files_beyond_plain_tensors_load_after_a_warning_and_broken_ones_are_refused(bundles, tmp_path):
    folder = bundle_copy(bundles, tmp_path)
    unet_file = folder / "models" / "diff_unet_3d_rflow-ct.pt"
    checkpoint = torch.load(unet_file, weights_only=True)
    torch.save({**checkpoint, "args": argparse.Namespace(lr=1e-4)}, unet_file)  # a training script's arguments
    with pytest.warns(InputWarning, match="diff_unet_3d_rflow-ct.pt: holds more than tensors"):
        MaisiBackbone.from_bundle(folder, device="cpu")
    torch.save({"scale_factor": checkpoint["scale_factor"]}, unet_file)
    with pytest.raises(InputError, match="not a MAISI diffusion checkpoint .no unet_state_dict"):
        MaisiBackbone.from_bundle(folder, device="cpu")
    unet_file.write_bytes(unet_file.read_bytes()[:100])
    with pytest.raises(InputError, match="diff_unet_3d_rflow-ct.pt: not a readable PyTorch file"):
        MaisiBackbone.from_bundle(folder, device="cpu")
