"""The text encoder (MiniLM from its PyPI wheel, offline) and the prompt templates."""

import pytest
import torch

from diffugts_core.io import InputError
from diffugts_core.text import TextEncoder, check_prompt, load_templates, state_embeddings


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder.from_pretrained(device="cpu")


def test_token_states_and_pooled_embeddings(encoder):
    embedded = encoder.encode(["a CT scan of a healthy liver", "a photo of a dog"])
    assert embedded.tokens.shape == (2, encoder.max_length, 384)
    assert embedded.attention_mask[0].sum() < encoder.max_length  # padded, and the mask says where
    torch.testing.assert_close(embedded.pooled.norm(dim=-1), torch.ones(2))


def test_related_prompts_are_closer_than_unrelated_ones(encoder):
    pooled = encoder.encode(["a CT scan of a healthy liver", "a computed tomography image of a normal liver",
                             "a photo of a dog on a beach"]).pooled
    assert pooled[0] @ pooled[1] > pooled[0] @ pooled[2] + 0.3


def test_cache_returns_the_same_embedding(encoder):
    first = encoder.encode("a CT scan of a spleen with a lesion").pooled
    assert "a CT scan of a spleen with a lesion" in encoder._cache
    torch.testing.assert_close(encoder.encode(["x", "a CT scan of a spleen with a lesion"]).pooled[1], first[0])


def test_templates_per_modality_and_state():
    ct = load_templates("CT")
    normal, abnormal = ct.prompts("liver", "normal"), ct.prompts("liver", "abnormal")
    assert len(normal) >= 3 and len(abnormal) >= 3 and not set(normal) & set(abnormal)
    assert all("liver" in p for p in normal + abnormal)
    assert ct.prompts("hepatic_vessel", "abnormal") == abnormal  # hepatic-vessel tumors live in the liver
    assert "gallbladder" in ct.prompts("gallbladder", "normal")[0]  # open vocabulary
    assert "MRI" in load_templates("mri").prompts("brain", "abnormal")[0]
    with pytest.raises(InputError, match="no prompt templates"):
        load_templates("PET")


def test_state_embeddings_are_ensembles_that_differ(encoder):
    states = state_embeddings(encoder, "liver", "CT")
    assert states.shape == (2, 384)
    torch.testing.assert_close(states.norm(dim=-1), torch.ones(2))
    assert states[0] @ states[1] < 0.999


def test_empty_prompt_is_refused():
    with pytest.raises(InputError, match="prompt is empty"):
        check_prompt("   ")
    assert check_prompt("  a  CT of a   liver ") == "a CT of a liver"


def test_offline_hub_text_encoder_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="offline.*hf download"):
        TextEncoder.from_pretrained("microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract")
