"""Plausibility of an input: warnings (not errors) for what the kit can run on but probably should not.

Each check returns messages that name what was seen and what was assumed; the pipeline emits them as
:class:`~diffugts_core.io.InputWarning` and records them in the result and its JSON report.
"""

from __future__ import annotations

import warnings

import numpy as np

from .io import InputWarning
from .text import TextEncoder, load_templates
from .vocabulary import ORGAN_KEYS

CT_AIR_CEILING_HU = -500.0  # a CT in HU has air (about -1000 HU) around or inside the body; nothing below -500 is odd


def intensity_warnings(array: np.ndarray, modality: str) -> list[str]:
    """A blank volume, or intensities that do not fit the stated modality."""
    lowest, highest = float(np.min(array)), float(np.max(array))
    if lowest == highest:
        return [f"the volume is blank (every voxel is {lowest:g}); there is nothing to segment and the mask will be "
                "empty. Check the export that produced it."]
    if modality.upper() == "CT" and lowest > CT_AIR_CEILING_HU:
        return [f"no voxel is below {CT_AIR_CEILING_HU:g} HU (lowest {lowest:g}), but air is about -1000 HU in CT: "
                "the values do not look like Hounsfield units. They were used as HU as given; for MRI pass "
                "--modality MRI, for a rescaled CT apply its DICOM rescale slope and intercept first."]
    if modality.upper() == "MRI" and lowest < CT_AIR_CEILING_HU:
        return [f"values go down to {lowest:g}, as a CT in Hounsfield units does, not an MRI; the volume was "
                "normalised as MRI as asked. For a CT pass --modality CT."]
    return []


def known_organs(modality: str) -> tuple[str, ...]:
    """The organ names the kit has a prior for in ``modality``: the organs its maps are trained to find and the tumor
    categories that name one."""
    modality = modality.upper()
    return tuple(dict.fromkeys([*ORGAN_KEYS[modality], *load_templates(modality).organs]))


def organ_warnings(organ: str, modality: str, *, organ_mask_given: bool = False) -> list[str]:
    """An organ the kit has no prior for in this modality (its region then comes from the open-vocabulary map)."""
    modality = modality.upper()
    if organ_mask_given or organ in known_organs(modality):
        return []
    normal_prompt = load_templates(modality).prompts(organ, "normal")[0]
    others = [m for m in ORGAN_KEYS if m != modality and organ in known_organs(m)]
    where = (f"the kit knows {organ!r} in {', '.join(others)} only" if others else
             f"the kit has no prior for {organ!r}")
    return [f"{where} ({modality} organs: {', '.join(known_organs(modality))}); its region was taken from the "
            f"open-vocabulary map of {normal_prompt!r} alone and may be wrong. Pass --organ-mask to give the region."]


def prompt_warnings(text_encoder: TextEncoder, prompts) -> list[str]:
    """Prompts longer than the text encoder reads: what it kept."""
    messages = []
    for prompt in dict.fromkeys(prompts):
        cut = text_encoder.truncation(prompt)
        if cut is not None:
            messages.append(f"the prompt {prompt!r} is {cut[0]} tokens long; the text encoder reads only the first "
                            f"{text_encoder.max_length} ({cut[1]!r}). Shorten it.")
    return messages


def prompt_set_warnings(text_encoder: TextEncoder, prompt_set, organ: str, *, organ_mask_given: bool) -> list[str]:
    """What AOVA assumed for a run: the organ's prior, and any prompt of its prompt set cut short."""
    return (organ_warnings(organ, prompt_set.modality, organ_mask_given=organ_mask_given)
            + prompt_warnings(text_encoder, [text for texts in prompt_set.texts for text in texts]))


def model_warnings(backbone) -> list[str]:
    """A foundation model trained on PhantomBench only (what ``diffugts train-foundation`` writes, the shipped default
    among them): it knows no real anatomy, so its masks on a real scan mean little."""
    cases = getattr(getattr(backbone, "config", None), "extra", {}).get("data_cases", [])
    if not cases:
        return []
    return [f"the foundation model was trained on {len(cases)} synthetic PhantomBench volumes only and has never seen "
            "real anatomy: on a real CT or MRI its pseudo-healthy image, and so its mask, are not to be trusted. "
            "Use it to learn the method; for real scans the method needs a foundation model trained on real images "
            "(MAISI: README, 'Using MAISI')."]


def emit(messages: list[str]) -> list[str]:
    """Issue each message as an InputWarning; returns them (for the report)."""
    for message in messages:
        warnings.warn(message, InputWarning, stacklevel=3)
    return messages
