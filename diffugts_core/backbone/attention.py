"""Cross-attention capture (DAAM / OVAM style), scoped by a context manager.

``with capture_cross_attention(unet) as maps:`` swaps a capturing attention processor onto the
UNet's cross-attention layers only (``attn2``), runs whatever the caller runs, and restores the
original processors on exit, so the model is exactly as before. ``maps.token_maps(...)`` returns
per-token maps averaged over heads, layers and calls (timesteps), upsampled to one size.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F


class CapturingCrossAttnProcessor:
    """Computes attention as diffusers' ``AttnProcessor`` does and keeps the attention probabilities."""

    def __init__(self, name: str, store: "CrossAttentionMaps"):
        self.name = name
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, sequence_length, _ = encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, attention_mask)  # (batch * heads, pixels, tokens)
        self.store.add(self.name, probs.view(batch, attn.heads, *probs.shape[1:]).mean(1))
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class CrossAttentionMaps:
    """Accumulated cross-attention: per layer, the sum over calls of (batch, pixels, tokens) maps."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = {}

    def add(self, name: str, probs: torch.Tensor) -> None:
        probs = probs.detach().float()
        self.sums[name] = self.sums[name] + probs if name in self.sums else probs
        self.calls[name] = self.calls.get(name, 0) + 1

    @property
    def layers(self) -> list[str]:
        return list(self.sums)

    def token_maps(self, size: tuple[int, int], layers: list[str] | None = None) -> torch.Tensor:
        """(batch, tokens, *size): mean over layers and calls, each layer bilinearly upsampled to ``size``."""
        layers = layers or self.layers
        if not layers:
            raise RuntimeError("no cross-attention was captured; run the UNet inside the context")
        maps = []
        for name in layers:
            mean = self.sums[name] / self.calls[name]  # (batch, pixels, tokens)
            side = int(round(mean.shape[1] ** 0.5))
            grid = mean.transpose(1, 2).reshape(mean.shape[0], mean.shape[2], side, side)
            maps.append(F.interpolate(grid, size=size, mode="bilinear", align_corners=False))
        return torch.stack(maps).mean(0)


@contextmanager
def capture_cross_attention(unet):
    """Install capturing processors on the cross-attention layers; restore the originals on exit."""
    originals = dict(unet.attn_processors)
    store = CrossAttentionMaps()
    swapped = {name: (CapturingCrossAttnProcessor(name, store) if name.endswith("attn2.processor") else processor)
               for name, processor in originals.items()}
    if swapped == originals:
        raise ValueError("this UNet has no cross-attention layers (attn2); it is not text-conditioned")
    unet.set_attn_processor(swapped)
    try:
        yield store
    finally:
        unet.set_attn_processor(originals)


def word_token_positions(tokenizer, prompt: str, word: str) -> list[int]:
    """Token positions of ``word`` in the tokenised prompt (all its word pieces), for ``token_maps``."""
    ids = tokenizer(prompt)["input_ids"]
    pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
    for start in range(len(ids) - len(pieces) + 1):
        if ids[start:start + len(pieces)] == pieces:
            return list(range(start, start + len(pieces)))
    raise ValueError(f"{word!r} is not a word of the prompt {prompt!r}")


@torch.no_grad()
def word_maps(backbone, text_encoder, x: torch.Tensor, prompt: str, words: list[str], *,
              timesteps=(200, 400, 600), seed: int = 0) -> dict[str, torch.Tensor]:
    """Cross-attention maps of prompt words on image slices x (N, C, H, W): {word: (N, H, W)}.

    The slices are encoded, noised to each timestep and denoised once with the prompt while the
    cross-attention is captured; maps are averaged over layers and timesteps.
    """
    embedded = text_encoder.encode(prompt)
    positions = {word: word_token_positions(text_encoder.tokenizer, prompt, word) for word in words}
    z0 = backbone.encode(x)
    generator = torch.Generator().manual_seed(seed)
    from .base import Conditioning

    cond = Conditioning(embedded.tokens, embedded.attention_mask).expand(len(z0))
    with capture_cross_attention(backbone.unet) as maps:
        for t in timesteps:
            noise = torch.randn(z0.shape, generator=generator).to(z0.device)
            z_t = backbone.scheduler.add_noise(z0, noise, torch.full((len(z0),), int(t)))
            backbone.denoise(z_t, int(t), cond)
    tokens = maps.token_maps(tuple(x.shape[-2:]))
    return {word: tokens[:, index].sum(1).cpu() for word, index in positions.items()}
