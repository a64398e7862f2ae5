"""GLoD (Global-Local Diffusion): compose global and local prompts' noise predictions.

- :mod:`~cnc_model.glod.spec`: the prompt-spec file format and its validation.
- :mod:`~cnc_model.glod.composition`: ε̂ from one batched UNet output (used by GLoD and CnC pipelines).
- :mod:`~cnc_model.glod.regions`: boxes and masks as soft regions at latent resolution.
- :mod:`~cnc_model.glod.layout_guidance`: backward guidance on cross-attention maps.
- :mod:`~cnc_model.glod.token_match`: token positions of an object's words.
- :mod:`~cnc_model.glod.prepare`: a spec -> regions, composition and layout objects.
"""

from cnc_model.glod.composition import GLoDComposition, compose_noise, stack_prompt_embeds
from cnc_model.glod.prepare import composition_from_spec, layout_objects, spec_regions, spec_texts
from cnc_model.glod.spec import GLoDSpec, GlobalPrompt, LayoutGuidance, LocalPrompt, SpecError, load_spec, parse_spec

__all__ = [
    "GLoDComposition",
    "GLoDSpec",
    "GlobalPrompt",
    "LayoutGuidance",
    "LocalPrompt",
    "SpecError",
    "compose_noise",
    "composition_from_spec",
    "layout_objects",
    "load_spec",
    "parse_spec",
    "spec_regions",
    "spec_texts",
    "stack_prompt_embeds",
]
