"""Layout (backward) guidance: pull each object's cross-attention mass into its region.

Following training-free layout control (Chen et al. 2023, ``silent-chen/layout-guidance``
``compute_ca_loss``), for object ``o`` with token positions ``T_o`` and region ``R_o`` the energy of
one cross-attention layer with heads ``h`` (softmax over tokens) is

    E_o = mean over t∈T_o of  mean over h of (1 − Σ_{p∈R_o} A_h[p, t] / Σ_p A_h[p, t])²

(per token and per head, then averaged), averaged over the chosen layers and the objects; the
latent is nudged by ``x_t ← x_t − strength · σ_t² · ∇_{x_t} E`` with ``σ_t² = (1 − ᾱ_t) / ᾱ_t``
(the reference's update with its ``loss_scale`` as ``strength``; 30 there), up to ``iterations``
times while the loss is above a threshold. The maps come from :class:`AttentionStore`,
whose processor computes them only while the store is recording and always takes the layer's
output from the processor it replaced; it is only installed when guidance (or debugging) is on:
off costs nothing.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F


class AttentionStore:
    """Collects cross-attention probabilities ``(rows, heads, q, k)`` of the layers it is installed on.

    ``rows`` limits recording to some batch rows (e.g. the global prompts' block); ``detach``
    drops the graph (for debugging pictures) instead of keeping it (for the guidance loss).
    """

    def __init__(self, rows: slice | None = None, detach: bool = False) -> None:
        self.rows = rows
        self.detach = detach
        self.recording = False
        self.maps: list[torch.Tensor] = []

    def reset(self) -> None:
        self.maps = []

    def record(self, probs: torch.Tensor, batch: int) -> None:
        """Keep ``probs`` ``(batch * heads, q, k)`` as ``(rows, heads, q, k)`` (the loss is per head)."""
        maps = probs.reshape(batch, -1, *probs.shape[1:])
        if self.rows is not None:
            maps = maps[self.rows]
        self.maps.append(maps.detach() if self.detach else maps)

    @contextmanager
    def recording_on(self) -> Iterator["AttentionStore"]:
        """Record (after a reset) for the duration of the block."""
        self.reset()
        self.recording = True
        try:
            yield self
        finally:
            self.recording = False


class StoreCrossAttnProcessor:
    """Watches a cross-attention layer for an :class:`AttentionStore`: while the store records, it
    also computes the layer's attention probabilities and hands them to the store; the layer's
    output always comes from the processor it replaced, so recording (for guidance or debug
    pictures) never changes an image, bit for bit."""

    def __init__(self, store: AttentionStore, fallback: Any) -> None:
        self.store = store
        self.fallback = fallback

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if self.store.recording and encoder_hidden_states is not None:
            probs = self.attention_probs(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
            self.store.record(probs, encoder_hidden_states.shape[0])
        return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)

    @staticmethod
    def attention_probs(
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``softmax(QK^T / sqrt(d))`` of the layer, ``(batch * heads, queries, tokens)``, with the
        same input normalisations as diffusers' attention processors (and differentiable)."""
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        if hidden_states.ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, key_len, _ = encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, key_len, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        return attn.get_attention_scores(query, key, attention_mask)


def cross_attention_layers(unet: torch.nn.Module, parts: Sequence[str] = ("mid", "first_up")) -> list[str]:
    """Processor names of the UNet's cross-attention layers (``attn2``) in the given parts;
    ``first_up`` is the first up block that has any (SD 1.5: ``up_blocks.1``, 16² maps)."""
    cross = [name for name in unet.attn_processors if ".attn2." in name]
    prefixes = [{"down": "down_blocks.", "mid": "mid_block.", "up": "up_blocks."}[p] for p in parts if p != "first_up"]
    if "first_up" in parts:
        ups = sorted({int(name.split(".")[1]) for name in cross if name.startswith("up_blocks.")})
        prefixes += [f"up_blocks.{ups[0]}."] if ups else []
    return [name for name in cross if name.startswith(tuple(prefixes))]


@contextmanager
def attention_store(
    unet: Any, store: AttentionStore, parts: Sequence[str] = ("mid", "first_up")
) -> Iterator[AttentionStore]:
    """Install ``store`` on the cross-attention layers of ``parts`` for the block, then put the
    original processors back (whatever they were: SDPA, CnC soft guidance, ...)."""
    original = dict(unet.attn_processors)
    names = cross_attention_layers(unet, parts) or cross_attention_layers(unet, ("down", "mid", "up"))
    if not names:
        raise ValueError("the UNet has no cross-attention layers to guide")
    replaced = {name: (StoreCrossAttnProcessor(store, proc) if name in names else proc)
                for name, proc in original.items()}
    unet.set_attn_processor(replaced)
    try:
        yield store
    finally:
        unet.set_attn_processor(original)


@dataclass
class LayoutObject:
    """One object to place: its rows in the recorded batch, its token positions, its region."""

    rows: slice
    tokens: list[int]
    region: torch.Tensor
    """``(h, w)`` region at latent resolution (hard or soft), resized to each map's resolution."""


def map_size(num_queries: int, latent_size: tuple[int, int]) -> tuple[int, int]:
    """Spatial size of a cross-attention map with ``num_queries`` pixels for a latent of ``latent_size``."""
    h, w = latent_size
    factor = math.sqrt(h * w / num_queries)
    size = (round(h / factor), round(w / factor))
    if size[0] * size[1] != num_queries:
        raise ValueError(f"cannot place {num_queries} queries on a {h}x{w} latent")
    return size


def object_maps(maps: Sequence[torch.Tensor], obj: LayoutObject, latent_size: tuple[int, int]) -> list[torch.Tensor]:
    """The object's attention maps averaged over heads and tokens (for pictures), one
    ``(rows, h_l, w_l)`` per recorded layer."""
    out = []
    for layer in maps:
        hh, ww = map_size(layer.shape[-2], latent_size)
        out.append(layer[obj.rows][..., obj.tokens].mean(dim=(1, -1)).reshape(-1, hh, ww))
    return out


def layout_loss(maps: Sequence[torch.Tensor], objects: Sequence[LayoutObject], latent_size: tuple[int, int]) -> torch.Tensor:
    """The reference's ``compute_ca_loss``: per layer and object, the mean over the object's tokens
    of the mean over heads of ``(1 − mass inside the region / total mass)²``; then the mean over
    layers and objects. Summed over the images (not averaged as there), so each image's gradient
    is the same whether it is generated alone or in a batch."""
    losses = []
    for obj in objects:
        for layer in maps:
            hh, ww = map_size(layer.shape[-2], latent_size)
            amap = layer[obj.rows][..., obj.tokens]  # (rows, heads, q, tokens)
            region = F.adaptive_avg_pool2d(obj.region[None, None].to(amap), (hh, ww)).flatten()
            inside = (amap * region[:, None]).sum(-2)
            total = amap.sum(-2).clamp_min(1e-12)
            per_head_token = (1 - inside / total) ** 2  # (rows, heads, tokens)
            losses.append(per_head_token.mean(dim=(1, 2)).sum())
    return torch.stack(losses).mean()


def layout_guidance_step(
    unet: Any,
    scheduler: Any,
    latents: torch.Tensor,
    t: torch.Tensor,
    embeds: torch.Tensor,
    store: AttentionStore,
    objects: Sequence[LayoutObject],
    strength: float,
    iterations: int = 1,
    loss_threshold: float = 0.0,
    last_loss: float = math.inf,
) -> tuple[torch.Tensor, float]:
    """Nudge ``latents`` (N images) by the layout loss gradient, at most ``iterations`` times and
    only while the last loss per image is above ``loss_threshold`` (``last_loss`` carries the
    previous step's, as the reference's loop does); returns (new latents, last loss per image).

    ``embeds`` holds the prompts whose attention maps are read (blocks of N rows, the objects'
    ``rows`` index into it); ``store`` must be installed (see :func:`attention_store`).
    """
    blocks = embeds.shape[0] // latents.shape[0]
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is not None:
        alpha = float(alphas[int(t)])
        scale = strength * (1.0 - alpha) / alpha
    else:
        scale = strength
    latent_size = tuple(latents.shape[-2:])
    loss_value = last_loss
    for _ in range(iterations):
        if not loss_value > loss_threshold:
            break
        with torch.enable_grad():
            x = latents.detach().requires_grad_(True)
            x_in = scheduler.scale_model_input(torch.cat([x] * blocks), t)
            with store.recording_on():
                unet(x_in, t, encoder_hidden_states=embeds, return_dict=False)
            loss = layout_loss(store.maps, objects, latent_size)
            grad = torch.autograd.grad(loss, x)[0]
        store.reset()
        loss_value = float(loss.detach()) / latents.shape[0]
        latents = (latents - scale * grad).detach()
    return latents, loss_value
