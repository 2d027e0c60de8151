"""AOVA + region heads: zero-shot data discipline, learning on a tiny phantom set, open vocabulary."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from diffugts_core import heads as heads_module
from diffugts_core.data import phantoms
from diffugts_core import vocabulary
from diffugts_core.backbone import load_backbone
from diffugts_core.aova import LESION_ORGANS, AOVAHead, build_prompt_set, prompt_targets
from diffugts_core.aova import run_aova
from diffugts_core.experiments.aova import evaluate_heads, feature_probe, training_fit
from diffugts_core.data.splits import SETTINGS, setting_categories, split_cases
from diffugts_core.heads import HeadsConfig, TrainedHeads
from diffugts_core.training.heads import SliceBank, train_heads
from diffugts_core.text import TextEncoder
from diffugts_core.training import heads as training_heads
from diffugts_core.training import recipes

from .test_backbone import tiny_backbone

SHAPE = (32, 32, 16)  # data-discipline tests need no model
TINY_HEADS = HeadsConfig(setting="seen-unseen", train_per_category=1, healthy_per_region=1,
                         validation_per_category=1, test_per_category=1, steps=200, batch=8, lr=3e-3)


@pytest.fixture(scope="module")
def text_encoder():
    return TextEncoder.from_pretrained(device="cpu")


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(device="cpu")  # learning tests need real features: the shipped foundation model


@pytest.fixture(scope="module")
def trained(backbone, text_encoder):
    return train_heads(backbone, text_encoder, TINY_HEADS, progress=False)


def test_settings_split_categories_as_the_protocol_says():
    assert setting_categories("seen-unseen") == (("liver", "kidney", "pancreas"), ("lung", "colon", "hepatic_vessel"))
    assert setting_categories("loo-colon")[1] == ("colon",) and "colon" not in setting_categories("loo-colon")[0]
    assert setting_categories("ct-mri") == (vocabulary.CT_CATEGORIES, ("brain",))
    assert len(SETTINGS) == 8


@pytest.mark.parametrize("setting", SETTINGS)
def test_held_out_categories_never_reach_training_or_validation(setting):
    seen, unseen = setting_categories(setting)
    config = replace(TINY_HEADS, setting=setting, train_per_category=1, validation_per_category=1)
    for split in ("train", "refine", "validation"):
        categories = {case.category for case in split_cases(setting, split, config, SHAPE)}
        assert not categories & set(unseen), (setting, split)
        assert categories - {"healthy"} == set(seen)
        assert "healthy" in categories  # normal anatomy is part of training
    assert {c.category for c in split_cases(setting, "test", config, SHAPE)} - {"healthy"} == set(unseen)
    upper_bound = list(split_cases(setting, "test", config, SHAPE, test_role="seen"))
    assert {c.category for c in upper_bound} - {"healthy"} == set(seen)
    training = list(split_cases(setting, "train", config, SHAPE))  # the upper bound scores new cases of seen types
    assert not any(np.array_equal(a.image, b.image) for a in upper_bound for b in training)


def test_a_leak_in_the_data_loader_is_caught(monkeypatch, text_encoder):
    real = training_heads.split_cases

    def leaky(setting, split, config, shape):
        yield from real(setting, split, config, shape)
        yield phantoms.generate_case("lung", 0, 1, shape)  # unseen in seen-unseen

    monkeypatch.setattr(training_heads, "split_cases", leaky)
    with pytest.raises(RuntimeError, match="not seen in seen-unseen but reached its training set"):
        train_heads(tiny_backbone(), text_encoder, replace(TINY_HEADS, steps=1), progress=False, shape=SHAPE)


def test_a_prompt_outside_the_set_is_never_a_target(text_encoder):
    prompts = build_prompt_set(text_encoder, "CT", ["liver"])
    organs = np.full((4, 4), vocabulary.ORGAN_LABELS["lung_right"])
    tumor = np.zeros((4, 4), bool)
    tumor[1, 1] = True
    with pytest.raises(ValueError, match="held out"):
        prompt_targets(organs, {"lung": tumor}, prompts)
    target = prompt_targets(organs, {}, prompts)
    assert set(np.unique(target)) == {prompts.index("lung:normal")}


def test_synthetic_anomalies_come_from_no_category():
    case = phantoms.generate_case("healthy", 0, 5, SHAPE, region="thorax")
    image, mask, organ = training_heads.insert_synthetic_anomaly(case.image, case.organs, "CT", case.spacing,
                                                                 np.random.default_rng(0))
    assert mask.any() and organ in ("liver", "spleen", "kidney", "pancreas", "lung", "colon")
    assert np.array_equal(image[~mask], case.image[~mask])
    from diffugts_core.vocabulary import ORGAN_KEYS

    organ_voxels = np.isin(case.organs, [vocabulary.ORGAN_LABELS[n] for n in ORGAN_KEYS["CT"][organ]])
    assert mask[~organ_voxels].sum() == 0  # inside its organ only
    assert abs(image[mask].mean() - np.median(case.image[organ_voxels])) > 15  # not the organ's own intensity


def test_trained_head_raises_s_inside_tumors(trained, backbone, text_encoder):
    ratios, before = [], []
    untrained = TrainedHeads(AOVAHead(trained.aova.stage_channels, 384), trained.region, trained.setting,
                             trained.seen, trained.thresholds, trained.config)
    for index in (0, 1):  # a seen category, validation seed: not training cases
        category = "liver"
        case = phantoms.generate_case(category, index, 2001)
        tumor = case.tumor.astype(bool)
        outside = case.organ_mask() & ~tumor
        for heads, out in ((trained, ratios), (untrained, before)):
            anomaly = run_aova(heads, backbone, text_encoder, case.image, "CT", category).anomaly
            out.append(anomaly[tumor].mean() / anomaly[outside].mean())
    assert min(ratios) > 3, ratios
    assert all(r > 2 * b for r, b in zip(ratios, before)), (ratios, before)


def test_changing_the_prompt_changes_the_map(trained, backbone, text_encoder):
    case = phantoms.generate_case("liver", 0, 2001)
    default = run_aova(trained, backbone, text_encoder, case.image, "CT", "spleen")
    custom = run_aova(trained, backbone, text_encoder, case.image, "CT", "spleen",
                      prompt="a CT scan of a spleen with a large necrotic metastasis")
    assert "spleen:abnormal" in default.prompt_set.names  # an organ never seen abnormal gets its prompt at run time
    assert np.abs(default.anomaly - custom.anomaly).max() > 1e-3


def test_an_organ_never_trained_gets_normal_and_abnormal_prompts_from_the_templates(trained, backbone, text_encoder):
    case = phantoms.generate_case("healthy", 0, 2001, region="abdomen")
    result = run_aova(trained, backbone, text_encoder, case.image, "CT", "stomach")
    names = result.prompt_set.names
    assert "stomach:normal" in names and "stomach:abnormal" in names
    assert result.prompt_set.texts[names.index("stomach:normal")][0] == "a CT scan of a healthy stomach"
    assert result.organ_probability.shape == case.image.shape


def test_the_shipped_heads_are_registered_and_zero_shot_for_the_unseen_categories():
    from diffugts_core.backbone.registry import load_registry
    from diffugts_core.heads import DEFAULT_HEADS, heads_folder, load_heads

    folder = heads_folder("default")  # sha256 of every file checked against the registry
    entry = load_registry()[DEFAULT_HEADS]
    assert "diffugts train-heads --setting seen-unseen" in entry["command"]
    shipped = load_heads()
    assert shipped.setting == "seen-unseen" and shipped.seen == ("liver", "kidney", "pancreas")
    assert not {"lung", "colon", "hepatic_vessel", "brain"} & set(shipped.seen)
    assert "validation split" in shipped.thresholds.provenance
    assert (folder / "heads.safetensors").stat().st_size < 2_000_000


def test_save_load_round_trip(trained, backbone, tmp_path, text_encoder):
    trained.save(tmp_path / "heads")
    loaded = TrainedHeads.load(tmp_path / "heads")
    assert loaded.seen == trained.seen and loaded.thresholds == trained.thresholds
    case = phantoms.generate_case("kidney", 0, 2001)
    a = run_aova(trained, backbone, text_encoder, case.image, "CT", "kidney").anomaly
    b = run_aova(loaded, backbone, text_encoder, case.image, "CT", "kidney").anomaly
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert "validation split" in loaded.thresholds.provenance


def test_training_fit_reports_the_lesions_the_heads_were_trained_on(trained, backbone, text_encoder):
    rows = training_fit(trained, backbone, text_encoder)
    real = {r["organ"] for r in rows if r["kind"] == "real"}
    assert real == {"liver", "kidney", "pancreas"}  # the seen categories' organs, nothing unseen
    for row in rows:
        assert row["slices"] > 0 and len(row["s_stages"]) == 3
        # S is the mean of the upsampled stage maps, so its mean inside a lesion is the mean of the stages' means
        assert row["s"] == pytest.approx(np.mean(row["s_stages"]), abs=1e-5)
        assert 0 <= row["s"] <= 1
    assert {r["organ"] for r in rows if r["kind"] == "synthetic"} - {"brain"}  # synthetic anomalies in CT organs too


def test_evaluation_reports_every_unseen_category(trained, backbone, text_encoder):
    rows = evaluate_heads(trained, backbone, text_encoder)
    assert [(r["category"], r["role"]) for r in rows] == [("lung", "unseen"), ("colon", "unseen"),
                                                          ("hepatic_vessel", "unseen")]
    for row in rows:
        assert 0 <= row["dsc"] <= 1 and 0 <= row["nsd"] <= 1 and 0 <= row["auroc"] <= 1
        assert row["s_in_out_ratio"] == pytest.approx(row["s_in"] / max(row["s_out"], 1e-6))
        assert 0 <= row["cases_s_higher_inside"] <= row["cases"]
    # what the values must show, not only their ranges: heads trained on liver tumors light up inside a hepatic-vessel
    # tumor (an unseen category in the liver); measured S in/out 16.8 with these tiny heads
    vessel = rows[2]
    assert vessel["s_in"] > 3 * vessel["s_out"] and vessel["cases_s_higher_inside"] == vessel["cases"], vessel


def test_upper_bound_reports_the_seen_categories(trained, backbone, text_encoder):
    rows = evaluate_heads(trained, backbone, text_encoder, role="seen")
    assert [(r["category"], r["role"]) for r in rows] == [("liver", "seen"), ("kidney", "seen"), ("pancreas", "seen")]
    liver = rows[0]
    assert liver["s_in"] > 2 * liver["s_out"], liver  # what the heads were trained on, on a new case


def _probe_bank(sign_in_scored_cases: float, signal: float = 2.0) -> SliceBank:
    """4 liver cases x 2 slices; stage-1 channel 0 is +signal on the lesion in cases a and c (the probe fits on
    every other case) and sign_in_scored_cases * signal on the lesion in b and d; all else is noise."""
    generator = torch.Generator().manual_seed(0)
    organs = torch.zeros(8, 16, 16, dtype=torch.int16)
    organs[:, 2:14, 2:14] = vocabulary.ORGAN_LABELS["liver"]
    lesions = torch.zeros(8, 16, 16, dtype=torch.int8)
    lesions[:, 4:10, 6:12] = 1 + LESION_ORGANS.index("liver")
    cases = [c for c in "abcd" for _ in range(2)]
    features = [0.3 * torch.randn(8, c, s, s, generator=generator) for c, s in ((4, 8), (4, 4), (4, 4))]
    for index, case in enumerate(cases):
        sign = 1.0 if case in "ac" else sign_in_scored_cases
        features[0][index, 0] += sign * signal * (lesions[index, ::2, ::2] > 0).float()
    return SliceBank(features, organs, lesions, ["liver"] * 8, ["CT"] * 8, cases)


def test_feature_probe_scores_on_cases_it_was_not_fitted_on():
    consistent, = feature_probe(_probe_bank(+1.0))
    assert (consistent["organ"], consistent["kind"], consistent["cases"]) == ("liver", "real", 4)
    assert consistent["auroc"] > 0.95 and consistent["auroc_organ_relative"] > 0.95
    flipped, = feature_probe(_probe_bank(-1.0))  # what the fitted cases teach is wrong on the scored ones
    assert flipped["auroc"] < 0.05
    noise, = feature_probe(_probe_bank(+1.0, signal=0.0))
    assert 0.3 < noise["auroc"] < 0.7


def test_train_or_reuse_heads_reuses_a_match_and_retrains_with_the_residual_heads_dropped(tmp_path, monkeypatch):
    trained = []

    class Saved:
        def __init__(self, config):
            self.config = config

        def save(self, folder):
            (folder / "heads.json").write_text(str(self.config.seed))

    def train(backbone, text_encoder, config, progress=True):
        trained.append(config.seed)
        return Saved(config)

    monkeypatch.setattr(recipes, "train_heads", train)
    monkeypatch.setattr(recipes, "cached_heads", lambda folder, config: Saved(config) if (
        folder / "heads.json").is_file() and (folder / "heads.json").read_text() == str(config.seed) else None)
    for name in ("residual.json", "residual.safetensors", "residual_MRI.json", "residual_MRI.safetensors", "notes.md"):
        (tmp_path / name).write_text("x")
    config = heads_module.HeadsConfig(seed=1)
    assert recipes.train_or_reuse_heads(tmp_path, config, None, None).config == config
    assert trained == [1] and sorted(p.name for p in tmp_path.iterdir()) == ["heads.json", "notes.md"]
    (tmp_path / "residual.json").write_text("x")  # a residual head trained on these heads stays
    recipes.train_or_reuse_heads(tmp_path, config, None, None)
    assert trained == [1] and (tmp_path / "residual.json").is_file()
    recipes.train_or_reuse_heads(tmp_path, replace(config, seed=2), None, None)
    assert trained == [1, 2] and not (tmp_path / "residual.json").exists()


def test_conditioning_organs_come_from_the_maps_and_a_given_mask_replaces_the_organs_own():
    from types import SimpleNamespace

    from diffugts_core.aova import AOVAResult, PromptSet, conditioning_organs

    names = ("background", "liver:normal", "kidney:normal", "kidney:abnormal")
    prompt_set = PromptSet("CT", names, ((),) * 4, torch.eye(4))
    maps = torch.zeros(1, 4, 4, 4)  # (slices, prompts, X, Y)
    maps[0, 0] = 1.0
    maps[0, :, 0, :] = torch.tensor([0.0, 1.0, 0.0, 0.0])[:, None]  # row 0: liver
    maps[0, :, 1, :] = torch.tensor([0.1, 0.0, 0.4, 0.5])[:, None]  # row 1: kidney (normal + abnormal mass 0.9)
    maps[0, :, 2, :] = torch.tensor([0.6, 0.3, 0.1, 0.0])[:, None]  # row 2: no organ reaches 0.5
    body = np.ones((4, 4, 1), bool)
    body[0, 0, 0] = False
    aova = AOVAResult(prompt_set, SimpleNamespace(maps=maps), np.zeros((4, 4, 1)), np.zeros((4, 4, 1)), body)
    organs = ("liver", "spleen", "kidney", "brain")
    index = conditioning_organs(aova, organs, threshold=0.5)
    assert index[..., 0].tolist() == [[0, 1, 1, 1], [3, 3, 3, 3], [0, 0, 0, 0], [0, 0, 0, 0]]
    user = np.zeros((4, 4, 1), bool)
    user[3, 3, 0] = True
    index = conditioning_organs(aova, organs, threshold=0.5, organ="kidney", organ_mask=user)
    assert index[..., 0].tolist() == [[0, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 3]]


def test_heads_record_the_foundation_model_they_were_trained_on(trained, backbone, tmp_path):
    from diffugts_core.backbone.registry import foundation_sha256

    assert set(trained.foundation_sha256) == {"unet", "vae"}
    assert trained.foundation_sha256 == foundation_sha256(backbone)
    trained.save(tmp_path / "heads")
    assert TrainedHeads.load(tmp_path / "heads").foundation_sha256 == trained.foundation_sha256


def test_heads_of_another_encoder_are_refused_and_residual_heads_of_another_denoiser_warned(backbone, tmp_path):
    import json
    import shutil
    import warnings

    from diffugts_core.backbone.registry import foundation_sha256
    from diffugts_core.io import InputError
    from diffugts_core.pipeline import DiffuGTSPipeline, check_trained_on
    from diffugts_core.residual import TrainedResidualHead

    folder = tmp_path / "heads"
    shutil.copytree(heads_module.heads_folder("default"), folder)
    actual = foundation_sha256(backbone)

    def record(name, **parts):
        meta = json.loads((folder / name).read_text())
        meta["foundation_sha256"] = {**actual, **parts}
        (folder / name).write_text(json.dumps(meta))

    record("heads.json", vae="0" * 64)
    with pytest.raises(InputError, match="trained on another foundation model.*train-heads --model default"):
        DiffuGTSPipeline.from_pretrained(folder, device="cpu")
    record("heads.json")
    record("residual.json", unet="0" * 64)
    heads, residual = TrainedHeads.load(folder), TrainedResidualHead.load(folder)
    with pytest.warns(UserWarning, match="residual were trained on the pseudo-healthy images of another version"):
        check_trained_on(backbone, "default", folder, heads, [residual])
    record("residual.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_trained_on(backbone, "default", folder, heads, [TrainedResidualHead.load(folder)])


def test_the_model_record_hashes_the_components_not_a_training_runs_checkpoints(tmp_path):
    import shutil
    from types import SimpleNamespace

    from diffugts_core.backbone.registry import foundation_sha256, verified_model_path

    folder = tmp_path / "model"
    shutil.copytree(verified_model_path(), folder)
    before = foundation_sha256(SimpleNamespace(source=folder))
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "unet.safetensors").write_bytes(b"a training run's state, rewritten at every checkpoint")
    assert foundation_sha256(SimpleNamespace(source=folder)) == before and set(before) == {"unet", "vae"}
