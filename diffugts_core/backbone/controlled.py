"""A frozen text-conditioned UNet steered by a ControlNet branch that reads extra input channels.

MAISI conditions its frozen generator on organ masks through a ControlNet; here the branch reads the
through-plane context of inpainting (the neighbouring slices' known latents and unknown masks). The branch
is diffusers' ``ControlNetModel`` made from the UNet (a copy of its encoder, zero-initialised outputs), so
at the start the pair predicts exactly what the UNet alone does, and training the branch cannot disturb
what the UNet has learned. ``ControlledUNet`` takes every input channel in one tensor, as a UNet with the
extra channels would, so the training loop and the backbone call it as they call a plain UNet.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch


class ControlledUNet(torch.nn.Module):
    """``unet`` (frozen) plus ``controlnet``: the first ``unet.config.in_channels`` input channels go to both, the
    rest are the ControlNet's conditioning. Cross-attention capture (``attn_processors``) sees the UNet's layers only,
    so AOVA's maps are read where they always were."""

    def __init__(self, unet, controlnet):
        super().__init__()
        expected = unet.config.in_channels
        if controlnet.config.in_channels != expected:
            raise ValueError(f"the ControlNet takes {controlnet.config.in_channels} sample channels, the UNet "
                             f"{expected}; make it with ControlledUNet.from_unet")
        self.unet, self.controlnet = unet.requires_grad_(False), controlnet
        config = dict(unet.config)
        config["in_channels"] = expected + controlnet.config.conditioning_channels
        self.config = SimpleNamespace(**config)

    @classmethod
    def from_unet(cls, unet, conditioning_channels: int) -> "ControlledUNet":
        """A branch copied from ``unet``'s encoder that reads ``conditioning_channels`` channels on the latent grid (one
        embedding layer of 16 channels, no down-sampling: the conditioning is already at the UNet's resolution)."""
        return cls(unet, _branch(unet, conditioning_channels))

    def reset_branch(self) -> None:
        """Make the branch again from the UNet's present weights (after other weights were loaded into the UNet)."""
        self.controlnet.load_state_dict(_branch(self.unet, self.controlnet.config.conditioning_channels).state_dict())

    @classmethod
    def from_pretrained(cls, source: str | Path, unet) -> "ControlledUNet":
        from diffusers import ControlNetModel

        return cls(unet, ControlNetModel.from_pretrained(source, subfolder="controlnet", low_cpu_mem_usage=False))

    def save_pretrained(self, folder: str | Path) -> None:
        """``unet/`` and ``controlnet/`` under ``folder`` (the model folder, not the UNet's subfolder)."""
        self.unet.save_pretrained(Path(folder) / "unet")
        self.controlnet.save_pretrained(Path(folder) / "controlnet")

    @property
    def attn_processors(self):
        return self.unet.attn_processors

    def set_attn_processor(self, processors) -> None:
        self.unet.set_attn_processor(processors)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: torch.Tensor | None = None):
        split = self.unet.config.in_channels
        # (diffusers' ControlNet takes no mask for the text tokens: the branch attends to the padding too)
        down, middle = self.controlnet(sample[:, :split], timestep, encoder_hidden_states,
                                       controlnet_cond=sample[:, split:], return_dict=False)
        return self.unet(sample[:, :split], timestep, encoder_hidden_states=encoder_hidden_states,
                         encoder_attention_mask=encoder_attention_mask, down_block_additional_residuals=down,
                         mid_block_additional_residual=middle)


def _branch(unet, conditioning_channels: int):
    from diffusers import ControlNetModel

    return ControlNetModel.from_unet(unet, conditioning_channels=conditioning_channels,
                                     conditioning_embedding_out_channels=(16,))
