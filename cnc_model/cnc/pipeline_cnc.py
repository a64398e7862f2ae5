"""``CnCPipeline``: Stable Diffusion with CnC's local fuser (depth), global fuser (exemplars)
and soft guidance, as a diffusers ``DiffusionPipeline``.

>>> pipe = CnCPipeline.from_pretrained("path/to/cnc")            # or CnCPipeline.from_sd(...)
>>> image = pipe("a cat on a sofa", fg_depth=fg, bg_depth=bg,
...              fg_exemplar=cat_photo, bg_exemplar=room_photo).images[0]

Every condition is optional. By default a missing one is what the official CnC code feeds (zero
depth maps through the local fuser, the global fuser applied to zero embeddings, a U2-Net mask);
``missing_conditions="skip"`` leaves absent parts out instead (faster; without any condition that
is plain Stable Diffusion, but not what the model was trained for).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, StableDiffusionMixin
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from cnc_model.cnc.conditioning import (
    CnCConditions,
    ImageLike,
    _to_float_tensor,
    cnc_noise_prediction,
    mask_from_depth,
    prepare_depth,
    prepare_mask,
)
from cnc_model.denoise_plan import cfg_plan, glod_plan, load_glod_spec
from cnc_model.cnc.global_fuser import GlobalFuser
from cnc_model.cnc.local_fuser import LocalFuser
from cnc_model.pipeline_common import SharedPipelineMixin
from cnc_model.cnc.soft_guidance import MASK_RESIZE_RULES, SoftGuidance, install_soft_guidance

logger = logging.getLogger(__name__)

MISSING_CONDITIONS = ("zeros", "skip")
"""``zeros`` (official): the local fuser always runs (a missing depth map is zeros) and the context is
always 77 + 4 + 4 tokens (a missing exemplar is the global fuser applied to a zero embedding, not
zero because of its LayerNorms). ``skip``: absent parts are left out (faster; not what was trained)."""
MASK_SOURCES = ("saliency", "fg_depth")
"""Where the soft-guidance mask comes from when none is given: ``saliency`` (official: U2-Net of the
fg image, else of the fg exemplar) or ``fg_depth`` (the fg depth map above a threshold)."""
FG_DEPTH_MODES = ("masked_image", "image", "masked_depth")
"""How ``fg_depth_image`` becomes the fg depth map: depth of the image times its mask (official demo
default "v2"; training uses depth of I_f), depth of the raw image ("v1"), or depth times mask ("v3")."""
DEPTH_PREPROCESSING = ("official", "processor")
"""How ``*_depth_image`` reaches ``depth_estimator``: the demo's [0, 1] image at the output size, or
``depth_processor``."""
SALIENCY_DIR = "saliency"
SALIENCY_CONFIG = "saliency.json"



def _align_storage(module: torch.nn.Module, alignment: int = 64) -> None:
    """Give misaligned weights (e.g. memory-mapped safetensors slices) aligned copies.

    A tensor's address alignment can change which SIMD path a CPU kernel takes, i.e. the last
    bits of the result; aligned copies make a loaded pipeline reproduce the saved one exactly.
    """
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.numel() and tensor.data_ptr() % alignment:
                tensor.data = tensor.data.clone()


def _to_pil(images: torch.Tensor) -> PIL.Image.Image | list[PIL.Image.Image]:
    """``(B, 3, H, W)`` in [0, 1] -> 8-bit RGB PIL image(s), what image processors expect."""
    arrays = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    pils = [PIL.Image.fromarray(a) for a in arrays]
    return pils[0] if len(pils) == 1 else pils


class CnCPipeline(SharedPipelineMixin, DiffusionPipeline, StableDiffusionMixin):
    """Compose and Conquer text-to-image generation with depth and exemplar conditions.

    Components: the SD parts (``vae``, ``text_encoder``, ``tokenizer``, ``unet``, ``scheduler``),
    the CnC parts (``local_fuser``, ``global_fuser``), and optionally ``image_encoder`` +
    ``feature_extractor`` (CLIP, to embed exemplar images) and ``depth_estimator`` +
    ``depth_processor`` (a transformers depth model such as DPT, to estimate depth maps from
    images). Soft guidance runs through :class:`~cnc_model.cnc.soft_guidance.SoftGuidanceAttnProcessor`,
    installed on the UNet and the local fuser at construction.
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->local_fuser->unet->vae"
    _callback_tensor_inputs = ["latents"]
    _optional_components = [
        "local_fuser",
        "global_fuser",
        "image_encoder",
        "feature_extractor",
        "depth_estimator",
        "depth_processor",
    ]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        local_fuser: LocalFuser | None = None,
        global_fuser: GlobalFuser | None = None,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        feature_extractor: Any = None,
        depth_estimator: Any = None,
        depth_processor: Any = None,
    ) -> None:
        super().__init__()
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            local_fuser=local_fuser,
            global_fuser=global_fuser,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
            depth_estimator=depth_estimator,
            depth_processor=depth_processor,
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.saliency_model = None  # a SaliencyModel (U2-Net); see set_saliency_model
        install_soft_guidance(self.unet)
        if self.local_fuser is not None:
            install_soft_guidance(self.local_fuser)
        for module in self.components.values():
            if isinstance(module, torch.nn.Module):
                _align_storage(module)

    @classmethod
    def from_sd(
        cls,
        sd_parts: dict[str, Any],
        image_encoder: CLIPVisionModelWithProjection | None = None,
        feature_extractor: Any = None,
        with_local: bool = True,
        with_global: bool = True,
        ddim: bool = True,
        **extra: Any,
    ) -> "CnCPipeline":
        """A fresh (untrained) CnC pipeline around SD parts (e.g. ``sd_pipeline.components``):
        local fuser copied from the UNet (ControlNet style), global fuser sized for the UNet and
        the image encoder, and (``ddim=True``) a DDIM scheduler with the SD scheduler's config."""
        unet = sd_parts["unet"]
        local = LocalFuser.from_unet(unet).eval() if with_local else None
        embed_dim = image_encoder.config.projection_dim if image_encoder is not None else None
        global_ = GlobalFuser.from_unet(unet, embed_dim).to(unet.device).eval() if with_global else None
        parts = {k: sd_parts[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
        if ddim:
            parts["scheduler"] = DDIMScheduler.from_config(parts["scheduler"].config)
        return cls(**parts, local_fuser=local, global_fuser=global_, image_encoder=image_encoder,
                   feature_extractor=feature_extractor, **extra)

    # ----------------------------------------------------------------------------- saliency
    def set_saliency_model(self, saliency_model: Any) -> None:
        """Attach the salient-object model (:class:`~cnc_model.annotators.saliency.SaliencyModel`)
        that makes the soft-guidance mask from the fg image, as the official demo does with U2-Net.
        Not a diffusers component: :meth:`save_pretrained` writes it to ``saliency/``."""
        self.saliency_model = saliency_model

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        **kwargs: Any) -> None:
        """diffusers layout (see :class:`SharedPipelineMixin`), plus ``saliency/`` when a saliency
        model is attached (U2-Net weights as safetensors and its pre-processing settings)."""
        super().save_pretrained(save_directory, safe_serialization=safe_serialization, **kwargs)
        if self.saliency_model is not None:
            folder = Path(save_directory) / SALIENCY_DIR
            self.saliency_model.save_pretrained(folder)
            settings = {k: getattr(self.saliency_model, k) for k in ("input_size", "threshold", "preprocessing")}
            (folder / SALIENCY_CONFIG).write_text(json.dumps(settings, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> "CnCPipeline":
        """Load a saved pipeline; a ``saliency/`` folder beside the components is attached as
        :attr:`saliency_model`."""
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        folder = Path(pretrained_model_name_or_path) / SALIENCY_DIR
        if folder.is_dir():
            from cnc_model.annotators.saliency import SaliencyModel

            config = folder / SALIENCY_CONFIG
            settings = json.loads(config.read_text()) if config.is_file() else {}
            pipe.set_saliency_model(SaliencyModel.from_pretrained(folder, device="cpu", **settings))
        return pipe

    @torch.no_grad()
    def saliency_mask(self, image: ImageLike, height: int, width: int, device: torch.device) -> torch.Tensor:
        """Soft-guidance mask ``(B, 1, height, width)`` in [0, 1] from an RGB image: the image resized
        to the output size, then :attr:`saliency_model` (the official demo's ``GetSODMask``)."""
        if self.saliency_model is None:
            raise ValueError("the soft-guidance mask comes from a saliency model: attach one with "
                             "`pipe.set_saliency_model(SaliencyModel.from_pretrained('u2net.pth'))`, pass `mask=`, "
                             "or use mask_source='fg_depth'")
        rgb = self._rgb(image, height, width)
        mask = self.saliency_model.probabilities_tensor(rgb.to(self.saliency_model.device))
        return mask.to(device)

    @staticmethod
    def _rgb(image: ImageLike, height: int, width: int) -> torch.Tensor:
        """An image -> ``(B, 3, height, width)`` float in [0, 1] (bilinear, as ``cv2.resize``)."""
        if isinstance(image, (list, tuple)):
            return torch.cat([CnCPipeline._rgb(one, height, width) for one in image])
        rgb = _to_float_tensor(image, "image")
        rgb = rgb[:, :3] if rgb.shape[1] != 1 else rgb.expand(-1, 3, -1, -1)
        if tuple(rgb.shape[-2:]) != (height, width):
            rgb = F.interpolate(rgb, size=(height, width), mode="bilinear", align_corners=False).clamp(0, 1)
        return rgb

    # ----------------------------------------------------------------------------- encoders
    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text embeddings, as StableDiffusionPipeline computes them (no LoRA / clip-skip)."""
        if prompt_embeds is None:
            prompt_embeds = self.encode_text(prompt, device, self.tokenizer.model_max_length)
        prompt_embeds = prompt_embeds.to(dtype=self.text_encoder.dtype, device=device)
        batch = prompt_embeds.shape[0]
        prompt_embeds = prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            if negative_prompt is None:
                negative = [""] * batch
            elif isinstance(negative_prompt, str):
                negative = [negative_prompt] * batch
            else:
                negative = list(negative_prompt)
            if len(negative) != batch:
                raise ValueError(f"{len(negative)} negative prompts for {batch} prompts")
            negative_prompt_embeds = self.encode_text(negative, device, prompt_embeds.shape[1])
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.to(dtype=self.text_encoder.dtype, device=device)
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        return prompt_embeds, negative_prompt_embeds

    @torch.no_grad()
    def encode_exemplar(self, images: ImageLike | list[ImageLike], device: torch.device) -> torch.Tensor:
        """CLIP image embeddings ``(B, projection_dim)`` of exemplar images."""
        if self.image_encoder is None or self.feature_extractor is None:
            raise ValueError("exemplar images need `image_encoder` and `feature_extractor`; pass embeddings instead")
        images = images if isinstance(images, list) else [images]
        pixels = self.feature_extractor(images=images, return_tensors="pt").pixel_values
        pixels = pixels.to(device=device, dtype=self.image_encoder.dtype)
        return self.image_encoder(pixel_values=pixels).image_embeds

    @torch.no_grad()
    def estimate_depth(self, image: ImageLike, height: int, width: int, device: torch.device,
                       preprocessing: str = "official") -> torch.Tensor:
        """Depth map ``(1, 3, height, width)`` in [0, 1] (near = bright) from an RGB image.

        ``official`` (the demo's ``GetDepthMap``): the image in [0, 1] at the output size (rounded
        up to a multiple of 32 for the ViT), no mean/std, straight into ``depth_estimator``;
        ``processor``: through ``depth_processor`` (its resize and normalisation)."""
        if self.depth_estimator is None or (preprocessing != "official" and self.depth_processor is None):
            raise ValueError("depth from images needs `depth_estimator` (and `depth_processor` for "
                             "depth_preprocessing='processor'); pass depth maps instead")
        if preprocessing == "official":
            size = (-(-height // 32) * 32, -(-width // 32) * 32)
            inputs = self._rgb(image, *size)
        else:
            inputs = self.depth_processor(images=image, return_tensors="pt").pixel_values
        depth = self.depth_estimator(pixel_values=inputs.to(device=device, dtype=self.depth_estimator.dtype)).predicted_depth
        depth = depth[:, None].float()
        lo = depth.flatten(1).amin(1)[:, None, None, None]
        hi = depth.flatten(1).amax(1)[:, None, None, None]
        depth = (depth - lo) / (hi - lo).clamp_min(1e-8)
        return prepare_depth(depth.cpu(), height, width).to(device)

    # ----------------------------------------------------------------------------- conditions
    def prepare_conditions(
        self,
        height: int,
        width: int,
        device: torch.device,
        dtype: torch.dtype,
        fg_depth: ImageLike | None = None,
        bg_depth: ImageLike | None = None,
        fg_depth_image: ImageLike | None = None,
        bg_depth_image: ImageLike | None = None,
        fg_exemplar: ImageLike | None = None,
        bg_exemplar: ImageLike | None = None,
        fg_image_embeds: torch.Tensor | None = None,
        bg_image_embeds: torch.Tensor | None = None,
        mask: ImageLike | None = None,
        mask_threshold: float = 0.1,
        lambda_fg: float = 1.0,
        lambda_bg: float = 1.0,
        depth_scale: float = 1.0,
        fg_depth_scale: float = 1.0,
        bg_depth_scale: float = 1.0,
        missing_conditions: str = "zeros",
        mask_source: str = "saliency",
        fg_depth_mode: str = "masked_image",
        mask_resize: str = "official",
        depth_preprocessing: str = "official",
    ) -> CnCConditions:
        """Normalise every optional input into :class:`CnCConditions` (see :meth:`__call__`)."""
        user_mask = prepare_mask(mask).to(device, dtype) if mask is not None else None
        saliency_mask = None  # the official mask of the fg image, computed once if needed

        def fg_image_mask(image: ImageLike) -> torch.Tensor:
            nonlocal saliency_mask
            if saliency_mask is None:
                saliency_mask = self.saliency_mask(image, height, width, device).to(dtype)
            return saliency_mask

        def depth_of(image: ImageLike) -> torch.Tensor:
            return self.estimate_depth(image, height, width, device, depth_preprocessing)

        if fg_depth is None and fg_depth_image is not None:
            if fg_depth_mode == "image":
                fg_depth = depth_of(fg_depth_image)
            else:
                cut = user_mask if user_mask is not None else fg_image_mask(fg_depth_image)
                cut = F.interpolate(cut.float(), size=(height, width), mode="bilinear", align_corners=False)
                cut = cut.to(device)
                if fg_depth_mode == "masked_image":  # official demo "v2": depth of the cut-out object
                    masked = self._rgb(fg_depth_image, height, width).to(device) * cut
                    fg_depth = depth_of(masked if depth_preprocessing == "official" else _to_pil(masked))
                else:  # "v3": the depth of the whole image, cut out
                    fg_depth = depth_of(fg_depth_image) * cut
        if bg_depth is None and bg_depth_image is not None:
            bg_depth = depth_of(bg_depth_image)
        fg_d = prepare_depth(fg_depth, height, width).to(device, dtype) if fg_depth is not None else None
        bg_d = prepare_depth(bg_depth, height, width).to(device, dtype) if bg_depth is not None else None
        if (fg_d is not None or bg_d is not None) and self.local_fuser is None:
            raise ValueError("depth conditions need a `local_fuser`")
        # the demo's depth controllers scale the maps themselves, clamped to [0, 1]
        if fg_d is not None and fg_depth_scale != 1.0:
            fg_d = (fg_d * fg_depth_scale).clamp(0, 1)
        if bg_d is not None and bg_depth_scale != 1.0:
            bg_d = (bg_d * bg_depth_scale).clamp(0, 1)
        if missing_conditions == "zeros" and self.local_fuser is not None and fg_d is None and bg_d is None:
            fg_d = torch.zeros(1, 3, height, width, device=device, dtype=dtype)  # bg follows below

        if fg_image_embeds is None and fg_exemplar is not None:
            fg_image_embeds = self.encode_exemplar(fg_exemplar, device)
        if bg_image_embeds is None and bg_exemplar is not None:
            bg_image_embeds = self.encode_exemplar(bg_exemplar, device)
        given_exemplar = fg_image_embeds is not None or bg_image_embeds is not None
        if given_exemplar and self.global_fuser is None:
            raise ValueError("exemplar conditions need a `global_fuser`")
        fg_tokens = bg_tokens = None
        if self.global_fuser is not None and (given_exemplar or missing_conditions == "zeros"):
            if given_exemplar:
                reference = (fg_image_embeds if fg_image_embeds is not None else bg_image_embeds).to(device, dtype)
            else:
                reference = torch.zeros(1, self.global_fuser.config.image_embed_dim, device=device, dtype=dtype)
            fg_e = fg_image_embeds.to(device, dtype) if fg_image_embeds is not None else torch.zeros_like(reference)
            bg_e = bg_image_embeds.to(device, dtype) if bg_image_embeds is not None else torch.zeros_like(reference)
            fg_tokens, bg_tokens = self.global_fuser(fg_e, bg_e)
            fg_tokens, bg_tokens = fg_tokens * lambda_fg, bg_tokens * lambda_bg

        mask_t = user_mask
        if mask_t is None and fg_tokens is not None:
            anchor = fg_depth_image if fg_depth_image is not None else fg_exemplar
            if mask_source == "fg_depth" or (anchor is None and fg_d is not None and fg_depth is not None):
                # no fg image to run saliency on, but a given fg depth map: it is black outside the object
                mask_t = mask_from_depth(fg_d, mask_threshold) if fg_d is not None and fg_depth is not None else None
            elif anchor is not None:
                mask_t = fg_image_mask(anchor)
            elif self.saliency_model is not None:  # the official demo: U2-Net of an all-black image
                mask_t = fg_image_mask(torch.zeros(1, 3, height, width))
            elif fg_image_embeds is not None:
                raise ValueError("fg exemplar embeddings without a mask: attach a saliency model and give the fg "
                                 "image, pass `mask=`, or use mask_source='fg_depth' with a fg depth map")
        return CnCConditions(fg_d, bg_d, fg_tokens, bg_tokens, mask_t, depth_scale, mask_resize)

    # ----------------------------------------------------------------------------- denoising
    def predict_noise(
        self,
        latent_model_input: torch.Tensor,
        t: torch.Tensor,
        prompt_embeds: torch.Tensor,
        conditions: CnCConditions,
        soft_guidance: SoftGuidance | None = None,
    ) -> torch.Tensor:
        """One batched ε prediction for any number of prompts sharing the conditions."""
        return cnc_noise_prediction(
            self.unet, self.local_fuser, latent_model_input, t, prompt_embeds, conditions, soft_guidance
        )

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        *,
        fg_depth: ImageLike | None = None,
        bg_depth: ImageLike | None = None,
        fg_depth_image: ImageLike | None = None,
        bg_depth_image: ImageLike | None = None,
        fg_exemplar: ImageLike | None = None,
        bg_exemplar: ImageLike | None = None,
        fg_image_embeds: torch.Tensor | None = None,
        bg_image_embeds: torch.Tensor | None = None,
        mask: ImageLike | None = None,
        mask_threshold: float = 0.1,
        lambda_fg: float = 1.0,
        lambda_bg: float = 1.0,
        depth_scale: float = 1.0,
        fg_depth_scale: float = 1.0,
        bg_depth_scale: float = 1.0,
        missing_conditions: str = "zeros",
        mask_source: str = "saliency",
        fg_depth_mode: str = "masked_image",
        mask_resize: str = "official",
        depth_preprocessing: str = "official",
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.0,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | PipelineCallback
        | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 - diffusers' signature
        glod: Any = None,
    ) -> StableDiffusionPipelineOutput | tuple:
        """Generate images.

        Args:
            prompt / negative_prompt: text (or pass ``prompt_embeds``/``negative_prompt_embeds``).
            fg_depth, bg_depth: depth maps in [0, 1] (PIL, array or tensor), near = bright. Either
                may be left out (zeros, as in training's condition dropout); or give
                ``fg_depth_image``/``bg_depth_image`` to estimate them with ``depth_estimator``
                (the fg one as ``fg_depth_mode`` says).
            fg_exemplar, bg_exemplar: exemplar images (or ``fg_image_embeds``/``bg_image_embeds``,
                CLIP image embeddings); a missing one is a zero embedding.
            mask: soft-guidance mask, 1 = foreground. If None, ``mask_source`` says where it comes
                from: ``saliency`` (default, official) runs :attr:`saliency_model` on
                ``fg_depth_image``, else on ``fg_exemplar``, else (a fg depth map given without an
                image) uses the ``fg_depth`` rule, else on an all-black image as the demo does;
                ``fg_depth`` is ``fg_depth > mask_threshold * max(fg_depth)``, none without one
                (the exemplar tokens then attend everywhere).
            lambda_fg, lambda_bg: weights of the fg / bg exemplar tokens (the demo's global controls).
            depth_scale: multiplier of the local fuser's residuals (the reference's control scales).
            fg_depth_scale, bg_depth_scale: multipliers of the depth maps themselves, clamped to
                [0, 1] (the official demo's fg / bg depth controllers).
            missing_conditions: ``zeros`` (default, official: a missing depth map is zeros and still
                runs the local fuser, a missing exemplar is the global fuser of a zero embedding, so
                the context is always 77 + 4 + 4 tokens) or ``skip`` (absent parts are left out;
                faster, and without any condition plain SD, but not what the model was trained for).
            fg_depth_mode: ``masked_image`` (default, official demo "v2": depth of ``fg_depth_image``
                times its mask), ``image`` (depth of the raw image) or ``masked_depth`` (depth times mask).
            mask_resize: how the mask reaches each attention resolution: ``official`` (bicubic, any
                non-zero value is foreground) or ``area`` (area average >= 0.5).
            depth_preprocessing: for ``*_depth_image``: ``official`` (the image in [0, 1] at the
                output size, no normalisation, as the demo's MiDaS call) or ``processor``
                (``depth_processor``'s resize and normalisation).
            height, width: output size; default: the depth map's size rounded down to a multiple
                of 8, else the UNet's default (512 for SD 1.5).
            num_inference_steps, guidance_scale: DDIM 50 and 7 by default (the paper's sampler
                is whatever ``scheduler`` is; any diffusers scheduler can be swapped in).
            glod: instead of ``prompt``: a GLoD spec (``GLoDSpec``, dict or YAML/JSON path) whose
                global and local prompts are composed at every step (:mod:`cnc_model.glod`);
                its weights replace ``guidance_scale``; the CnC conditions apply to every prompt;
                its layout guidance is not used (a warning says so). Its boxes scale to the
                output size; its ``width``/``height``, where the file sets them, are the output
                size only when no depth map and no ``height``/``width`` are given.
            callback_on_step_end: as in diffusers: called after each step as
                ``callback(pipe, step, timestep, callback_kwargs)`` with the tensors named in
                ``callback_on_step_end_tensor_inputs`` (of :attr:`_callback_tensor_inputs`); it
                returns the kwargs, and a returned ``latents`` replaces the latents. A
                ``PipelineCallback`` / ``MultiPipelineCallbacks`` brings its own tensor inputs.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_inputs(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, glod, height, width, num_inference_steps,
            num_images_per_prompt, missing_conditions, mask_source, fg_depth_mode, mask_resize, depth_preprocessing,
            dict(lambda_fg=lambda_fg, lambda_bg=lambda_bg, depth_scale=depth_scale, fg_depth_scale=fg_depth_scale,
                 bg_depth_scale=bg_depth_scale, mask_threshold=mask_threshold),
            callback_on_step_end_tensor_inputs,
        )  # fmt: skip
        device = self._execution_device
        if glod is not None:
            spec = load_glod_spec(glod)
            if fg_depth is None and bg_depth is None:  # depth maps, when given, set the size
                height, width = spec.output_size(height, width)
        height, width = self._default_size(height, width, fg_depth, bg_depth)
        if height % 8 or width % 8:
            raise ValueError(f"height and width must be multiples of 8, got {height}x{width}")
        latent_size = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        if glod is not None:
            encode = lambda text: self.encode_text(text, device, self.tokenizer.model_max_length)  # noqa: E731
            plan = glod_plan(spec, encode, latent_size, num_images_per_prompt)
        else:
            prompt_embeds, negative_prompt_embeds = self.encode_prompt(
                prompt, device, num_images_per_prompt, guidance_scale > 1.0, negative_prompt, prompt_embeds,
                negative_prompt_embeds,
            )  # fmt: skip
            plan = cfg_plan(prompt_embeds, negative_prompt_embeds, guidance_scale)
        batch, dtype = plan.batch, plan.prompt_embeds.dtype
        conditions = self.prepare_conditions(
            height, width, device, dtype,
            fg_depth=fg_depth, bg_depth=bg_depth, fg_depth_image=fg_depth_image, bg_depth_image=bg_depth_image,
            fg_exemplar=fg_exemplar, bg_exemplar=bg_exemplar, fg_image_embeds=fg_image_embeds,
            bg_image_embeds=bg_image_embeds, mask=mask, mask_threshold=mask_threshold,
            lambda_fg=lambda_fg, lambda_bg=lambda_bg, depth_scale=depth_scale, fg_depth_scale=fg_depth_scale,
            bg_depth_scale=bg_depth_scale, missing_conditions=missing_conditions, mask_source=mask_source,
            fg_depth_mode=fg_depth_mode, mask_resize=mask_resize, depth_preprocessing=depth_preprocessing,
        ).per_image(num_images_per_prompt)  # fmt: skip
        self._check_condition_batch(conditions, batch)

        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device)
        if latents is None:
            shape = (batch, self.unet.config.in_channels, *latent_size)
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            latents = latents.to(device)
        latents = latents * self.scheduler.init_noise_sigma
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        # the mask is the same at every step: one bias per resolution (and UNet batch) per generation
        soft_guidance: dict[int, SoftGuidance | None] = {}

        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                blocks = plan.num_blocks(i, len(timesteps))
                latent_model_input = torch.cat([latents] * blocks) if blocks > 1 else latents
                latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)
                if blocks not in soft_guidance:
                    soft_guidance[blocks] = conditions.soft_guidance(latent_size, blocks * batch)
                noise_pred = self.predict_noise(latent_model_input, t, plan.embeds_for(blocks), conditions, soft_guidance[blocks])
                noise_pred = plan.compose(noise_pred, i, len(timesteps))
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
                if callback_on_step_end is not None:
                    callback_outputs = self.step_callback(callback_on_step_end, i, t,
                                                          callback_on_step_end_tensor_inputs, locals())
                    latents = callback_outputs.pop("latents", latents)
                progress_bar.update()

        image = self.decode_latents_to_images(latents, output_type, generator)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image, None)
        return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=None)

    def check_inputs(
        self,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        glod: Any,
        height: int | None,
        width: int | None,
        num_inference_steps: int,
        num_images_per_prompt: int,
        missing_conditions: str,
        mask_source: str,
        fg_depth_mode: str,
        mask_resize: str,
        depth_preprocessing: str,
        scales: dict[str, float],
        callback_on_step_end_tensor_inputs: list[str] | None,
    ) -> None:
        """Refuse inconsistent or out-of-range arguments before any work (diffusers' convention)."""
        if glod is not None:
            if any(x is not None for x in (prompt, prompt_embeds, negative_prompt, negative_prompt_embeds)):
                raise ValueError("give either `prompt` (and `negative_prompt`) or `glod`, not both")
        elif prompt is None and prompt_embeds is None:
            raise ValueError("give `prompt`, `prompt_embeds` or `glod`")
        elif prompt is not None and prompt_embeds is not None:
            raise ValueError("give `prompt` or `prompt_embeds`, not both")
        elif prompt is not None and not isinstance(prompt, (str, list)):
            raise TypeError(f"`prompt` must be a string or a list of strings, got {type(prompt).__name__}")
        if (height is not None and height % 8) or (width is not None and width % 8):
            raise ValueError(f"height and width must be multiples of 8, got {height}x{width}")
        if num_inference_steps < 1 or num_images_per_prompt < 1:
            raise ValueError("num_inference_steps and num_images_per_prompt must be at least 1")
        for name, value, allowed in (("missing_conditions", missing_conditions, MISSING_CONDITIONS),
                                     ("mask_source", mask_source, MASK_SOURCES),
                                     ("fg_depth_mode", fg_depth_mode, FG_DEPTH_MODES),
                                     ("mask_resize", mask_resize, MASK_RESIZE_RULES),
                                     ("depth_preprocessing", depth_preprocessing, DEPTH_PREPROCESSING)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        for name, value in scales.items():
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if callback_on_step_end_tensor_inputs is not None:
            unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
            if unknown:
                raise ValueError(f"callback_on_step_end_tensor_inputs must be in {self._callback_tensor_inputs}, "
                                 f"got {unknown}")

    @staticmethod
    def _check_condition_batch(conditions: CnCConditions, batch: int) -> None:
        for name in ("fg_depth", "bg_depth", "fg_tokens", "bg_tokens", "mask"):
            value = getattr(conditions, name)
            if value is not None and value.shape[0] not in (1, batch):
                raise ValueError(f"{name} has a batch of {value.shape[0]}; give 1 or one per prompt")

    def _default_size(
        self, height: int | None, width: int | None, fg_depth: ImageLike | None, bg_depth: ImageLike | None
    ) -> tuple[int, int]:
        depth = fg_depth if fg_depth is not None else bg_depth
        if depth is not None and (height is None or width is None):
            if isinstance(depth, PIL.Image.Image):
                h, w = depth.height, depth.width
            elif isinstance(depth, np.ndarray):
                h, w = depth.shape[:2] if depth.ndim in (2, 3) else depth.shape[1:3]
            else:
                h, w = depth.shape[-2:]
            height, width = height or h // 8 * 8, width or w // 8 * 8
        default = self.unet.config.sample_size * self.vae_scale_factor
        return height or default, width or default
