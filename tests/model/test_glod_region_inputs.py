"""GLoD regions from every accepted input: boxes off the latent grid, masks as arrays (0..255 and
0..1), PIL images in RGB, a mix of boxes and masks, no region at all, and the debug preview of a
region. Written to kill the mutants of ``glod/regions.py`` that survived ``make mutants``
(docs/testing.md). Latent sizes are not square, so that a swapped height and width shows."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from cnc_model.glod.regions import box_mask, load_mask, mask_to_image, mask_to_latent, region_masks

# an 8 x 16 px mask, 4 x 4 px per cell of a (2, 4) latent: the object fills row 0, columns 1 and 2
PIXELS = np.zeros((8, 16), np.uint8)
PIXELS[0:4, 4:12] = 255
CELLS = torch.tensor([[0.0, 1, 1, 0], [0, 0, 0, 0]])
# the same cells after a 2-cell inward ramp: no cell is two erosions deep, so all are 1/2
CELLS_FEATHER_2 = CELLS / 2
# x0 = 0.3 of 4 cells = 1.2: cell 1 is 0.8 covered, its centre 0.3 from the edge (border sides: no ramp)
OFF_GRID_BOX = (0.3, 0.0, 1.0, 1.0)


@pytest.mark.parametrize(
    "mask",
    [PIXELS, PIXELS // 255, (PIXELS // 255).astype(np.float32), PIL.Image.fromarray(PIXELS).convert("RGB")],
    ids=["uint8 0..255", "uint8 0..1", "float 0..1", "PIL RGB"],
)
def test_masks_load_to_unit_values_whatever_their_scale(mask) -> None:
    loaded = load_mask(mask)
    assert loaded.shape == (8, 16) and loaded.dtype == torch.float32
    assert torch.equal(loaded, torch.from_numpy(PIXELS // 255).float())
    assert torch.equal(mask_to_latent(mask, (2, 4)), CELLS)


def test_box_off_the_grid_partial_cover_and_one_cell_ramp() -> None:
    assert torch.allclose(box_mask(OFF_GRID_BOX, (1, 4)), torch.tensor([[0.0, 0.8, 1, 1]]), rtol=0, atol=1e-6)
    # feather 1: the partial cell's centre is 0.3 cells inside, depth 0.3 + 1/2 = 0.8 -> 0.8 * 0.8
    assert torch.allclose(box_mask(OFF_GRID_BOX, (1, 4), feather=1), torch.tensor([[0.0, 0.64, 1, 1]]),
                          rtol=0, atol=1e-6)


def test_region_masks_stacks_boxes_and_masks_in_order_with_the_feather() -> None:
    hard = region_masks([OFF_GRID_BOX, PIXELS], (2, 4))
    assert hard.shape == (2, 1, 2, 4) and hard.dtype == torch.float32
    assert torch.equal(hard[0, 0], box_mask(OFF_GRID_BOX, (2, 4))) and torch.equal(hard[1, 0], CELLS)
    soft = region_masks([OFF_GRID_BOX, PIXELS], (2, 4), feather=2)
    assert torch.equal(soft[0, 0], box_mask(OFF_GRID_BOX, (2, 4), feather=2))
    assert torch.equal(soft[1, 0], CELLS_FEATHER_2)
    assert not torch.equal(soft[0], hard[0])  # the box's partial cell is ramped too


def test_no_region_is_an_empty_stack_of_the_latent_size() -> None:
    empty = region_masks([], (2, 4))
    assert empty.shape == (0, 1, 2, 4) and empty.dtype == torch.float32


def test_region_preview_is_the_map_in_gray_levels_upscaled_by_nearest() -> None:
    amap = torch.tensor([[0.0, 0.5, 1.0], [-0.5, 1.5, 0.25]])
    image = mask_to_image(amap, (6, 4))
    assert image.mode == "L" and image.size == (6, 4)
    want = np.array([[0, 128, 255], [0, 255, 64]], np.uint8).repeat(2, axis=0).repeat(2, axis=1)
    assert np.array_equal(np.asarray(image), want)
