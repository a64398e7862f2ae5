"""Regions and masks by hand: GLoD's spec -> latent regions (feather scaled from the spec's frame,
mask files), the soft-guidance mask from a user image, the mask derived from fg depth. Written to
kill the mutants that survived ``make mutants`` (docs/testing.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import torch

from cnc_model.cnc.conditioning import mask_from_depth, prepare_mask
from cnc_model.glod.prepare import composition_from_spec, spec_regions
from cnc_model.glod.spec import load_spec, parse_spec

GLOBAL = {"text": "a man is talking with a woman", "weight": 7.5}


def test_feather_is_scaled_from_the_spec_frame_to_latent_cells() -> None:
    # a 128-px frame rendered on an 8 x 8 latent: 16 px per cell, feather 32 px = 2 cells
    spec = parse_spec({"width": 128, "height": 128, "feather": 32, "global_prompts": [GLOBAL],
                       "local_prompts": [{"text": "a man", "object": "man", "box": [0, 16, 64, 128]}]})
    want = torch.zeros(1, 1, 8, 8)
    want[..., 1:, :4] = 1  # x 0..64, y 16..128 (left and bottom sides on the image border: no ramp)
    want[..., 1, :4] = 0.5  # the edge cells of the two inner sides: (0 + 1/2 + 1/2) / 2
    want[..., 1:, 3] = 0.5
    assert torch.equal(spec_regions(spec, (8, 8)), want)
    hard = torch.zeros(1, 1, 8, 8)
    hard[..., 1:, :4] = 1
    assert torch.equal(spec_regions(spec, (8, 8), feather=False), hard)
    comp = composition_from_spec(spec, (8, 8))
    assert torch.equal(comp.local_masks, want) and comp.local_weights == [5.0] and comp.global_weights == [7.5]


def test_mask_file_regions_and_the_local_step_range(tmp_path: Path) -> None:
    mask = np.zeros((64, 64), np.uint8)
    mask[8:40, 40:64] = 255  # top right, on the 8-px latent grid
    PIL.Image.fromarray(mask).save(tmp_path / "woman.png")
    (tmp_path / "spec.yaml").write_text(
        "width: 64\nheight: 64\nfeather: 16\nlocal_steps: [0.2, 0.6]\nglobal_prompts:\n  - text: a man is talking with a woman\n"
        "local_prompts:\n  - {text: a woman with red hair, object: woman, mask: woman.png, weight: 3.0}\n")
    spec = load_spec(tmp_path / "spec.yaml")
    # feather 16 px = 2 latent cells: 0.5 on the cells along the region's inner sides, none along the border
    want = torch.zeros(1, 1, 8, 8)
    want[..., 1:5, 5:] = 0.5
    want[..., 2:4, 6:] = 1
    assert torch.equal(spec_regions(spec, (8, 8)), want)
    hard = torch.zeros(1, 1, 8, 8)
    hard[..., 1:5, 5:] = 1
    assert torch.equal(spec_regions(spec, (8, 8), feather=False), hard)
    comp = composition_from_spec(spec, (8, 8))
    assert comp.local_step_range == (0.2, 0.6) and comp.local_weights == [3.0]


def test_no_local_prompt_gives_no_region() -> None:
    spec = parse_spec({"width": 64, "height": 64, "global_prompts": [GLOBAL]})
    assert spec_regions(spec, (4, 6)).shape == (0, 1, 4, 6)


def test_user_masks_of_every_channel_layout() -> None:
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[:2, :3] = 255  # white: foreground
    rgb[2:, :3] = (255, 0, 0)  # red only: the channel mean, 1/3
    want = torch.zeros(1, 1, 4, 6)
    want[..., :2, :3] = 1
    want[..., 2:, :3] = 1 / 3
    torch.testing.assert_close(prepare_mask(rgb), want, rtol=0, atol=1e-7)
    grey = (rgb[..., 0] > 0).astype(np.uint8) * 255
    assert torch.equal(prepare_mask(PIL.Image.fromarray(grey)), (want > 0).float())
    rgba = np.concatenate([np.repeat(grey[..., None], 3, -1), np.full((4, 6, 1), 255, np.uint8)], -1)
    assert torch.equal(prepare_mask(rgba), (want > 0).float())  # the first channel, not the alpha


def test_mask_from_depth_per_image_default_threshold_and_strictness() -> None:
    depth = torch.zeros(2, 3, 4, 4)
    depth[0, :, 0, 0], depth[0, :, 0, 1], depth[0, :, 0, 2] = 1.0, 0.1, 0.11  # 0.1 * peak is not above it
    depth[1, :, 3, 3], depth[1, :, 3, 2] = 0.5, 0.04  # below 0.1 * 0.5
    want = torch.zeros(2, 1, 4, 4)
    want[0, 0, 0, 0] = want[0, 0, 0, 2] = 1
    want[1, 0, 3, 3] = 1
    assert torch.equal(mask_from_depth(depth), want)
