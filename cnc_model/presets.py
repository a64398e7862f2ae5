"""Model presets: one name selects every model the project uses.

A preset names the Stable Diffusion weights CnC builds on, the SD inpainting weights used to make
backgrounds, the monocular depth network, the salient-object detector and the CLIP image encoder.
``"sd15"`` points at the real public weights (hub ids, or local paths on an offline machine);
``"tiny"`` means "build seeded random models from small configs in-process" (see
:mod:`cnc_model.tiny`), so tests, demos and CI run on a CPU in seconds through the same code path.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

TINY = "tiny"


@dataclass(frozen=True)
class Preset:
    """The full set of models for one configuration.

    Every field is a hub id or a local path (``from_pretrained``-able), except in the ``tiny``
    preset where each field is the marker ``"tiny"``: callers then build the model with the
    matching builder of :mod:`cnc_model.tiny` (or their own module's tiny builder).
    """

    name: str
    sd: str
    """Stable Diffusion text-to-image weights (UNet, VAE, text encoder, tokenizer, scheduler)."""
    sd_inpaint: str
    """Stable Diffusion inpainting weights (9-channel UNet) used to build background images."""
    depth: str
    """Monocular depth network (DPT / MiDaS) loadable with ``DPTForDepthEstimation``."""
    saliency: str
    """U2-Net salient-object detector: a LOCAL path to ``u2net.pth`` (not on the hub)."""
    clip_image: str
    """CLIP image encoder (``CLIPVisionModelWithProjection``) giving the exemplar embeddings."""
    resolution: int = 512
    """Training and triplet resolution in pixels."""
    eval_resolution: int = 512
    """Generation / evaluation resolution: 768 for sd15, as the official demo and the paper."""

    @property
    def is_tiny(self) -> bool:
        """Whether the models are to be built from tiny configs instead of loaded."""
        return self.name == TINY

    def replace(self, **changes: str | int) -> "Preset":
        """A copy with some fields changed (e.g. a local path instead of a hub id)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, str | int]:
        """Plain dict, for manifests and logs."""
        return dataclasses.asdict(self)


PRESETS: dict[str, Preset] = {
    "sd15": Preset(
        name="sd15",
        sd="stable-diffusion-v1-5/stable-diffusion-v1-5",
        sd_inpaint="runwayml/stable-diffusion-inpainting",
        # MiDaS DPT-Large, the network of the CnC reference (torch.hub "DPT_Large"); the released
        # checkpoints were trained on its maps. "Intel/dpt-hybrid-midas" is the lighter option.
        depth="Intel/dpt-large",
        # U2-Net weights are published as a plain .pth file; download u2net.pth and point here.
        saliency="u2net.pth",
        clip_image="openai/clip-vit-large-patch14",
        resolution=512,
        eval_resolution=768,
    ),
    TINY: Preset(
        name=TINY,
        sd=TINY,
        sd_inpaint=TINY,
        depth=TINY,
        saliency=TINY,
        clip_image=TINY,
        resolution=64,
        eval_resolution=64,
    ),
}


def get_preset(name: str) -> Preset:
    """The preset called ``name`` ("tiny" or "sd15"); ValueError naming the known ones otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}") from None
