"""Places in soft guidance: through the whole pipeline, fg exemplar tokens get attention exactly
inside an asymmetric, non-square mask and bg tokens exactly outside it, at every soft-guided
layer (UNet and local fuser) and for both CFG rows. A mirrored or transposed mask fails.

Every condition is passed explicitly (depths, exemplars, mask)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.model.conftest import random_depth
from tests.model.recorders import record_masked_attention

TEXT_TOKENS, EXEMPLAR_TOKENS = 77, 4
HEIGHT, WIDTH = 64, 128  # latent 8 x 16; the tiny UNet's cross-attention runs at 8 x 16 and 4 x 8
# foreground on a 4 x 8 grid of 16-px cells: an L in the top-left, neither mirror- nor transpose-symmetric
COARSE = torch.tensor([
    [1, 1, 1, 1, 1, 0, 0, 0],
    [1, 1, 1, 0, 0, 0, 0, 0],
    [1, 1, 1, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0, 0, 0],
], dtype=torch.float32)


def _uniform_cells(grid: torch.Tensor) -> torch.Tensor:
    """Cells whose 3x3 neighbourhood (inside the image) has one value: fixed under any resize rule."""
    padded_max = F.max_pool2d(grid[None, None], 3, stride=1, padding=1)[0, 0]
    padded_min = -F.max_pool2d(-grid[None, None], 3, stride=1, padding=1)[0, 0]
    return padded_max == padded_min


def test_exemplar_tokens_attend_exactly_inside_and_outside_the_mask(trained_like_pipe) -> None:
    pixel_mask = torch.kron(COARSE, torch.ones(16, 16))[None, None]
    expected = {  # (h, w) -> (foreground cells, cells the check covers)
        (8, 16): (torch.kron(COARSE, torch.ones(2, 2)).bool(), torch.ones(8, 16, dtype=torch.bool)),
        (4, 8): (COARSE.bool(), _uniform_cells(COARSE)),
    }
    g = torch.Generator().manual_seed(5)
    with record_masked_attention(TEXT_TOKENS + 2 * EXEMPLAR_TOKENS) as probs:
        trained_like_pipe(
            "a red cube on a table", negative_prompt="blurry", num_inference_steps=1, guidance_scale=7.0,
            height=HEIGHT, width=WIDTH, generator=torch.Generator().manual_seed(0), output_type="latent",
            fg_depth=random_depth(HEIGHT, WIDTH, 1), bg_depth=random_depth(HEIGHT, WIDTH, 2), mask=pixel_mask,
            fg_image_embeds=torch.randn(1, 32, generator=g), bg_image_embeds=torch.randn(1, 32, generator=g),
        )
    seen_sizes = set()
    for p in probs:
        size = next(s for s in expected if s[0] * s[1] == p.shape[2])
        seen_sizes.add(size)
        fg_cells, checked = (x.flatten() for x in expected[size])
        assert p.shape[0] == 2  # both CFG rows are guided
        fg_mass = p[..., TEXT_TOKENS : TEXT_TOKENS + EXEMPLAR_TOKENS].sum(-1)  # (B, heads, queries)
        bg_mass = p[..., TEXT_TOKENS + EXEMPLAR_TOKENS :].sum(-1)
        inside, outside = fg_cells & checked, ~fg_cells & checked
        assert torch.all(bg_mass[..., inside] == 0) and torch.all(fg_mass[..., inside] > 0)
        assert torch.all(fg_mass[..., outside] == 0) and torch.all(bg_mass[..., outside] > 0)
        assert torch.all(p[..., :TEXT_TOKENS].sum(-1) > 0)  # text tokens attend everywhere
    assert seen_sizes == set(expected)
    # every cross-attention layer was guided: local fuser 2 down + 1 mid, UNet 2 down + 1 mid + 3 up
    assert len(probs) == 9
