"""Roles in the local fuser: fg depth acts through the fg stream only, bg depth through the bg
stream only, through the whole pipeline (a swap anywhere between the arguments and the streams fails).

Every condition is passed explicitly (both depths, both exemplars, the mask), so these tests do not
depend on what the pipeline does with a missing one."""

from __future__ import annotations

import pytest
import torch

from cnc_model.cnc.local_fuser import STREAM_CHANNELS, LocalFuser
from cnc_model.tiny import tiny_sd_components
from tests.model.conftest import make_cnc_pipeline, random_depth

HEIGHT, WIDTH = 64, 96


def _zero(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()


def _conditions(fg_depth: torch.Tensor, bg_depth: torch.Tensor) -> dict:
    mask = torch.zeros(1, 1, HEIGHT, WIDTH)
    mask[..., : HEIGHT // 2, : WIDTH // 3] = 1
    g = torch.Generator().manual_seed(11)
    return dict(fg_depth=fg_depth, bg_depth=bg_depth, mask=mask,
                fg_image_embeds=torch.randn(1, 32, generator=g), bg_image_embeds=torch.randn(1, 32, generator=g))


def _latents(pipe, **conditions) -> torch.Tensor:
    return pipe("a red cube on a table", negative_prompt="blurry", num_inference_steps=2, guidance_scale=7.0,
                height=HEIGHT, width=WIDTH, generator=torch.Generator().manual_seed(0), output_type="latent",
                **conditions).images


@pytest.mark.parametrize("live", ["fg", "bg"])
def test_each_depth_map_acts_through_its_own_stream_only(live: str) -> None:
    dead = "bg" if live == "fg" else "fg"
    pipe = make_cnc_pipeline(randomize_zero_convs=True)
    _zero(getattr(pipe.local_fuser.depth_encoder, f"{dead}_stream"))
    a, b, c = random_depth(HEIGHT, WIDTH, 1), random_depth(HEIGHT, WIDTH, 2), random_depth(HEIGHT, WIDTH, 3)
    base = _latents(pipe, **_conditions(**{f"{live}_depth": a, f"{dead}_depth": b}))
    # the dead stream's depth map changes nothing, bit for bit ...
    assert torch.equal(_latents(pipe, **_conditions(**{f"{live}_depth": a, f"{dead}_depth": c})), base)
    # ... while the live stream's one does
    assert (_latents(pipe, **_conditions(**{f"{live}_depth": c, f"{dead}_depth": b})) - base).abs().max() > 1e-4


@pytest.mark.parametrize("live", ["fg", "bg"])
def test_fg_features_come_first_in_the_concatenation(live: str) -> None:
    """The official layout: the first extractor sees ``cat([fg_features, bg_features])`` (converted
    checkpoints rely on it). Cut the extractor's input channels of one half: only the other
    stream's depth map still reaches the features."""
    torch.manual_seed(0)
    enc = LocalFuser.from_unet(tiny_sd_components(0)["unet"]).eval().depth_encoder
    half = STREAM_CHANNELS[-1]
    with torch.no_grad():
        enc.extractors[0][0].weight[:, slice(half, None) if live == "fg" else slice(0, half)] = 0

    def first_level(fg: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
        captured = []
        handle = enc.extractors[0].register_forward_hook(lambda module, args, out: captured.append(out))
        with torch.no_grad():
            enc(fg, bg)
        handle.remove()
        return captured[0]

    a, b, c = (random_depth(HEIGHT, WIDTH, s) for s in (1, 2, 3))
    base = first_level(a, b)
    changed_fg, changed_bg = first_level(c, b), first_level(a, c)
    changed_live, changed_dead = (changed_fg, changed_bg) if live == "fg" else (changed_bg, changed_fg)
    assert torch.equal(changed_dead, base)
    assert (changed_live - base).abs().max() > 1e-4
