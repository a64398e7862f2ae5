"""``GLoDPipeline``: Stable Diffusion with GLoD's global and local prompt layers.

>>> pipe = GLoDPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
>>> image = pipe(load_spec("examples/glod_spec.yaml"), generator=torch.Generator().manual_seed(0)).images[0]

Every step runs the unconditional, each global and each local prompt in ONE batched UNet call and
composes them (:func:`cnc_model.glod.composition.compose_noise`); optional layout guidance nudges
the latent in the first steps. With a single global prompt and no local prompt it is plain
classifier-free guidance, identical to ``StableDiffusionPipeline``.
"""

from __future__ import annotations

import math
import os
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, StableDiffusionMixin
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

from cnc_model.denoise_plan import cfg_plan, composition_plan
from cnc_model.glod.composition import stack_prompt_embeds
from cnc_model.glod.layout_guidance import AttentionStore, attention_store, layout_guidance_step, object_maps
from cnc_model.glod.prepare import composition_from_spec, layout_objects, spec_texts
from cnc_model.glod.spec import GLoDSpec, load_spec, parse_spec
from cnc_model.pipeline_common import SharedPipelineMixin



@dataclass
class GLoDPipelineOutput(BaseOutput):
    """Images plus, with ``return_debug=True``, what GLoD did.

    ``local_masks``: ``(L, 1, h, w)`` regions at latent resolution. ``attention_maps``: per local
    prompt, its object tokens' cross-attention map in the global prompt, ``(N, h, w)``, averaged over
    layers and steps and scaled to [0, 1]. ``layout_losses``: the layout loss at each guided step.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    nsfw_content_detected: list[bool] | None = None
    local_masks: torch.Tensor | None = None
    attention_maps: list[torch.Tensor] | None = None
    layout_losses: list[float] | None = None


class GLoDPipeline(SharedPipelineMixin, DiffusionPipeline, StableDiffusionMixin):
    """Global-Local Diffusion on Stable Diffusion parts (training-free)."""

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
    ) -> None:
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if getattr(self, "vae", None) else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> "GLoDPipeline":
        """Load a saved GLoD pipeline, or the SD parts of any Stable Diffusion 1.x folder / hub id
        (its safety checker and feature extractor are not loaded). No code from the folder runs:
        see :meth:`SharedPipelineMixin.from_pretrained`."""
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                # safetensors' memory-mapped tensors can take another SIMD path than aligned copies
                for param in list(module.parameters()) + list(module.buffers()):
                    param.data = param.data.clone()
        return pipe

    # ----------------------------------------------------------------------------- generation
    @torch.no_grad()
    def __call__(
        self,
        spec: GLoDSpec | Mapping[str, Any] | str | os.PathLike | None = None,
        *,
        prompt: str | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        return_debug: bool = False,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | PipelineCallback
        | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 - diffusers' signature
    ) -> GLoDPipelineOutput | tuple:
        """Generate images from a GLoD spec.

        Args:
            spec: a :class:`GLoDSpec`, its dict form, or the path of a YAML/JSON spec file. Without
                one, ``prompt`` + ``guidance_scale`` (default 7.5) (+ ``negative_prompt``) make a
                one-global spec; as in diffusers, ``guidance_scale <= 1`` then runs the text row
                alone (no unconditional row). A spec's global weights are its guidance scales, so
                ``guidance_scale`` cannot be given with one.
            height, width: output size; default: the spec's ``width``/``height`` where the spec
                sets them, else the UNet's default. Boxes scale with the output size.
            num_images_per_prompt: N images generated together (N rows per prompt block).
            return_debug: also return the regions, the object tokens' attention maps and the
                layout losses (records attention maps during every step; costs time).
            callback_on_step_end: as in diffusers: ``callback(pipe, step, timestep, callback_kwargs)``
                after each step with the tensors named in ``callback_on_step_end_tensor_inputs``;
                it returns the kwargs, and a returned ``latents`` replaces the latents.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_inputs(spec, prompt, guidance_scale, height, width, num_inference_steps, num_images_per_prompt,
                          callback_on_step_end_tensor_inputs)
        device = self._execution_device
        default_size = self.unet.config.sample_size * self.vae_scale_factor
        text_only = False  # diffusers' guidance_scale <= 1: the text row alone, no unconditional row
        if spec is None:
            guidance_scale = 7.5 if guidance_scale is None else guidance_scale
            text_only = guidance_scale <= 1.0
            spec = GLoDSpec.single(prompt, guidance_scale, negative_prompt or "", default_size, default_size)
            height, width = height or default_size, width or default_size
        else:
            spec = load_spec(spec) if isinstance(spec, (str, os.PathLike)) else parse_spec(spec)
            height, width = spec.output_size(height, width)
            height, width = height or default_size, width or default_size
            if negative_prompt is not None:
                spec = spec.model_copy(update={"negative_prompt": negative_prompt})
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(f"height and width must be multiples of {self.vae_scale_factor}, got {height}x{width}")
        n = num_images_per_prompt
        num_globals = len(spec.global_prompts)
        latent_size = (height // self.vae_scale_factor, width // self.vae_scale_factor)

        prompt_embeds = self.encode_text(spec_texts(spec), device)
        uncond = self.encode_text([spec.negative_prompt], device, prompt_embeds.shape[1])
        dtype = self.text_encoder.dtype
        prompt_embeds, uncond = prompt_embeds.to(dtype), uncond.to(dtype)
        embeds = stack_prompt_embeds(uncond, list(prompt_embeds[:num_globals, None]),
                                     list(prompt_embeds[num_globals:, None]), n)
        composition = composition_from_spec(spec, latent_size)
        composition.local_masks = composition.local_masks.to(device, dtype)
        plan = cfg_plan(embeds[n:], None, guidance_scale) if text_only else composition_plan(composition, embeds, n)

        timesteps, _ = retrieve_timesteps(self.scheduler, num_inference_steps, device)
        num_steps = len(timesteps)  # may differ from the request (PNDM's PLMS warm-up adds one)
        shape = (n, self.unet.config.in_channels, *latent_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            latents = latents.to(device)
        latents = latents * self.scheduler.init_noise_sigma
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        layout = spec.layout_guidance
        guide = layout.enabled and bool(spec.local_prompts)
        objects = layout_objects(spec, self.tokenizer, latent_size, n) if (guide or return_debug) else []
        global_rows = slice(n, n * (1 + num_globals))
        debug_maps = [torch.zeros(n, *latent_size, device=device) for _ in objects] if return_debug else None
        losses: list[float] = []
        last_loss = math.inf  # the reference carries the layout loss from step to step

        with ExitStack() as stack:
            store = None
            if guide or (return_debug and objects):
                store = stack.enter_context(attention_store(self.unet, AttentionStore(), layout.layers))
            with self.progress_bar(total=num_steps) as progress_bar:
                for i, t in enumerate(timesteps):
                    if guide and i < layout.steps:
                        store.rows, store.detach = None, False
                        latents, last_loss = layout_guidance_step(
                            self.unet, self.scheduler, latents, t, embeds[global_rows], store, objects,
                            layout.strength, layout.iterations, layout.loss_threshold, last_loss,
                        )
                        losses.append(last_loss)
                    if store is not None and not return_debug and not (guide and i + 1 < layout.steps):
                        stack.close()  # guidance done: put the original processors back
                        store = None
                    blocks = plan.num_blocks(i, num_steps)
                    latent_model_input = self.scheduler.scale_model_input(torch.cat([latents] * blocks), t)
                    record = store is not None and return_debug  # else a pass-through on this call
                    if record:
                        store.rows, store.detach = global_rows, True
                        store.reset()
                        store.recording = True
                    noise_pred = self.unet(latent_model_input, t, encoder_hidden_states=plan.embeds_for(blocks),
                                           return_dict=False)[0]
                    if record:
                        store.recording = False
                        self._accumulate_maps(debug_maps, store, objects, latent_size)
                    noise_pred = plan.compose(noise_pred, i, num_steps)
                    latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
                    if callback_on_step_end is not None:
                        callback_outputs = self.step_callback(callback_on_step_end, i, t,
                                                              callback_on_step_end_tensor_inputs, locals())
                        latents = callback_outputs.pop("latents", latents)
                    progress_bar.update()

        image = self.decode_latents_to_images(latents, output_type, generator)
        self.maybe_free_model_hooks()
        if debug_maps is not None:
            debug_maps = [m / m.flatten(1).amax(1).clamp_min(1e-12)[:, None, None] for m in debug_maps]
        if not return_dict:
            return (image, None)
        return GLoDPipelineOutput(
            images=image,
            local_masks=composition.local_masks if return_debug else None,
            attention_maps=debug_maps,
            layout_losses=losses if return_debug else None,
        )

    def check_inputs(
        self,
        spec: Any,
        prompt: str | None,
        guidance_scale: float | None,
        height: int | None,
        width: int | None,
        num_inference_steps: int,
        num_images_per_prompt: int,
        callback_on_step_end_tensor_inputs: list[str] | None,
    ) -> None:
        """Refuse inconsistent or out-of-range arguments before any work (diffusers' convention)."""
        if spec is None:
            if prompt is None:
                raise ValueError("give a `spec` or a `prompt`")
            if not isinstance(prompt, str):
                raise TypeError(f"GLoDPipeline takes one `prompt` string (use num_images_per_prompt for several "
                                f"images), got {type(prompt).__name__}")
        else:
            if prompt is not None:
                raise ValueError("give either a `spec` or a `prompt`, not both")
            if guidance_scale is not None:
                raise ValueError("a spec's global weights are its guidance scales: set them in the spec, "
                                 "not with `guidance_scale`")
        for name, value in (("height", height), ("width", width)):
            if value is not None and value % self.vae_scale_factor:
                raise ValueError(f"height and width must be multiples of {self.vae_scale_factor}, got {height}x{width}")
        if num_inference_steps < 1 or num_images_per_prompt < 1:
            raise ValueError("num_inference_steps and num_images_per_prompt must be at least 1")
        if callback_on_step_end_tensor_inputs is not None:
            unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
            if unknown:
                raise ValueError(f"callback_on_step_end_tensor_inputs must be in {self._callback_tensor_inputs}, "
                                 f"got {unknown}")

    @staticmethod
    def _accumulate_maps(acc: list[torch.Tensor] | None, store: AttentionStore, objects: list, latent_size: tuple[int, int]) -> None:
        """Add each object's layer-averaged attention map (resized to the latent) to ``acc``."""
        if acc is None:
            return
        for total, obj in zip(acc, objects):
            maps = [F.interpolate(m[:, None].float(), size=latent_size, mode="bilinear", align_corners=False)[:, 0]
                    for m in object_maps(store.maps, obj, latent_size)]
            total += torch.stack(maps).mean(0)
        store.reset()
