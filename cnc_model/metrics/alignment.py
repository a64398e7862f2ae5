"""CLIP alignment scores for GLoD sweeps: global (whole image vs prompt) and local (box crop vs prompt).

Pure torch + transformers, batched, no Ray: a Ray Data actor builds one :class:`CLIPAligner` and
calls it on batches. Scores are cosine similarities of CLIP's projected, L2-normalised embeddings,
in [-1, 1] (CLIPScore is ``100 * max(score, 0)``). Images are preprocessed in torch (resize the
short side with antialiased bicubic, centre crop, CLIP normalisation), so tensors and PIL images
go through the same path; crops are taken before resizing, at full resolution.
"""

from __future__ import annotations

from typing import Any, Sequence, Union

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageInput = Union[PIL.Image.Image, np.ndarray, torch.Tensor]
"""PIL image, HxWx3 uint8 array, or 3xHxW float tensor in [0, 1]."""
Box = Sequence[float]
"""x0, y0, x1, y1 in pixels of the image it crops."""


def to_tensor(image: ImageInput) -> torch.Tensor:
    """A ``(3, H, W)`` float tensor in [0, 1]."""
    if isinstance(image, PIL.Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        arr = torch.from_numpy(np.array(image))  # a writable copy
        arr = arr.float() / 255.0 if arr.dtype == torch.uint8 else arr.float()
        return arr.permute(2, 0, 1) if arr.ndim == 3 and arr.shape[-1] in (1, 3) else arr
    return image.float()


def crop(image: torch.Tensor, box: Box) -> torch.Tensor:
    """The pixels of ``image`` ``(3, H, W)`` inside ``box`` (rounded to whole pixels, at least 1x1)."""
    _, h, w = image.shape
    x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    x0, y0 = min(max(x0, 0), w - 1), min(max(y0, 0), h - 1)
    x1, y1 = max(min(x1, w), x0 + 1), max(min(y1, h), y0 + 1)
    return image[:, y0:y1, x0:x1]


class CLIPAligner:
    """Batched CLIP similarity between images (or box crops) and texts."""

    def __init__(self, model: Any, tokenizer: Any, image_size: int | None = None, batch_size: int = 32) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_size = image_size or model.config.vision_config.image_size
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, name_or_path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        **kwargs: Any) -> "CLIPAligner":
        """Load a CLIP model and tokenizer (e.g. ``openai/clip-vit-large-patch14`` or a local folder)."""
        from transformers import AutoTokenizer, CLIPModel

        model = CLIPModel.from_pretrained(name_or_path, torch_dtype=dtype).to(device)
        return cls(model, AutoTokenizer.from_pretrained(name_or_path), **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def preprocess(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """``(B, 3, S, S)`` normalised pixel batch from ``(3, H, W)`` tensors in [0, 1]."""
        size = self.image_size
        out = []
        for img in images:
            _, h, w = img.shape
            scale = size / min(h, w)
            nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
            img = F.interpolate(img[None], size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)[0]
            top, left = (nh - size) // 2, (nw - size) // 2
            out.append(img[:, top:top + size, left:left + size].clamp(0, 1))
        pixels = torch.stack(out)
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        return (pixels - mean) / std

    @torch.no_grad()
    def image_embeds(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """L2-normalised image embeddings ``(B, D)``."""
        tensors = [to_tensor(img) for img in images]
        feats = []
        for i in range(0, len(tensors), self.batch_size):
            pixels = self.preprocess(tensors[i:i + self.batch_size]).to(self.device, self.model.dtype)
            feats.append(_features(self.model.get_image_features(pixel_values=pixels)))
        return F.normalize(torch.cat(feats).float(), dim=-1)

    @torch.no_grad()
    def text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings ``(B, D)`` (texts truncated to CLIP's 77 tokens)."""
        feats = []
        for i in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[i:i + self.batch_size]), padding="max_length", truncation=True,
                                    max_length=self.tokenizer.model_max_length, return_tensors="pt")
            feats.append(_features(self.model.get_text_features(input_ids=tokens.input_ids.to(self.device))))
        return F.normalize(torch.cat(feats).float(), dim=-1)

    def global_alignment(self, images: Sequence[ImageInput], prompts: Sequence[str]) -> torch.Tensor:
        """``(B,)`` cosine similarity of image i with prompt i (repeat an image to score it against
        several global prompts)."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if not images:
            return torch.zeros(0)
        return (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)

    def local_alignment(self, images: Sequence[ImageInput], boxes: Sequence[Box], prompts: Sequence[str]) -> torch.Tensor:
        """``(K,)`` cosine similarity of the crop ``boxes[k]`` of ``images[k]`` with ``prompts[k]``."""
        if not len(images) == len(boxes) == len(prompts):
            raise ValueError(f"{len(images)} images, {len(boxes)} boxes and {len(prompts)} prompts must match")
        crops = [crop(to_tensor(img), box) for img, box in zip(images, boxes)]
        return self.global_alignment(crops, prompts)


def _features(output: Any) -> torch.Tensor:
    """transformers 4 returns the projected features, 5 an output whose pooler_output holds them."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def spec_alignment(aligner: CLIPAligner, images: Sequence[ImageInput], specs: Sequence[Any]) -> list[dict[str, list[float]]]:
    """GLoD scores of generated images against their specs, in two batched CLIP passes:
    ``{"global": [score per global prompt], "local": [score per local prompt's box crop]}`` per
    image. Boxes are in the spec's pixel frame and scale to the image's size; a local prompt with
    a mask instead of a box is scored on the mask's bounding box."""
    from cnc_model.glod.regions import load_mask

    g_images, g_prompts, l_images, l_boxes, l_prompts, counts = [], [], [], [], [], []
    for image, spec in zip(images, specs, strict=True):
        tensor = to_tensor(image)
        _, h, w = tensor.shape
        sx, sy = w / spec.width, h / spec.height
        for gp in spec.global_prompts:
            g_images.append(tensor)
            g_prompts.append(gp.text)
        for lp in spec.local_prompts:
            if lp.box is not None:
                x0, y0, x1, y1 = lp.box
                box = (x0 * sx, y0 * sy, x1 * sx, y1 * sy)
            else:
                mask = load_mask(lp.mask)
                ys, xs = torch.nonzero(mask > 0.5, as_tuple=True)
                mx, my = w / mask.shape[1], h / mask.shape[0]
                box = ((0, 0, w, h) if xs.numel() == 0 else
                       (float(xs.min()) * mx, float(ys.min()) * my, float(xs.max() + 1) * mx, float(ys.max() + 1) * my))
            l_images.append(tensor)
            l_boxes.append(box)
            l_prompts.append(lp.text)
        counts.append((len(spec.global_prompts), len(spec.local_prompts)))
    global_scores = aligner.global_alignment(g_images, g_prompts).tolist()
    local_scores = aligner.local_alignment(l_images, l_boxes, l_prompts).tolist()
    out, gi, li = [], 0, 0
    for ng, nl in counts:
        out.append({"global": global_scores[gi:gi + ng], "local": local_scores[li:li + nl]})
        gi, li = gi + ng, li + nl
    return out


def load_aligner(name_or_path: str, device: str | torch.device = "cpu", **kwargs: Any) -> CLIPAligner:
    """``"tiny"`` (seeded tiny CLIP, plumbing only) or a CLIP model id / local folder."""
    if name_or_path == "tiny":
        from cnc_model.tiny import tiny_clip_model

        model, tokenizer = tiny_clip_model()
        return CLIPAligner(model.to(device), tokenizer, **kwargs)
    return CLIPAligner.from_pretrained(name_or_path, device=device, **kwargs)
