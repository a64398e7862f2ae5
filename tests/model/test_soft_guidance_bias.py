"""The soft-guidance bias by hand, where the role tests do not look: the ``area`` resize rule at
its 1/2 threshold, 3-D masks, one cached bias object per resolution, the requested device and
dtype (on the ``meta`` device, so no GPU is needed to see a bias left on the CPU), and the error
texts. Written to kill the mutants of ``soft_guidance.py`` that survived ``make mutants``
(docs/testing.md)."""

from __future__ import annotations

import pytest
import torch

from cnc_model.cnc.soft_guidance import SoftGuidance

CPU = torch.device("cpu")


def test_area_rule_counts_a_cell_half_covered_as_foreground() -> None:
    # a 4 x 4 mask read at 2 x 2: cells covered 3/4 (its top left pixel off), 1/2, 1/4 and 0
    mask = torch.tensor([[0.0, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])[None, None]
    area = SoftGuidance(mask, (4, 4), mask_resize="area").resized_mask((2, 2))
    assert area.tolist() == [[True, True, False, False]]  # not nearest (which reads 0 at the top left)


def test_a_3d_mask_is_the_same_as_its_4d_form() -> None:
    mask = torch.zeros(2, 4, 6)
    mask[0, :2] = 1
    mask[1, :, 3:] = 1
    as_3d = SoftGuidance(mask, (4, 6)).bias(24, 85, torch.float32, CPU)
    assert torch.equal(as_3d, SoftGuidance(mask[:, None], (4, 6)).bias(24, 85, torch.float32, CPU))
    assert as_3d.shape == (2, 1, 24, 85)


def test_the_bias_is_built_once_per_resolution_and_reused() -> None:
    guidance = SoftGuidance(torch.ones(1, 1, 8, 8), (8, 8))
    first = guidance.bias(64, 85, torch.float32, CPU)
    assert guidance.bias(64, 85, torch.float32, CPU) is first  # the same tensor, not a rebuild
    assert guidance.bias(16, 85, torch.float32, CPU) is not first and guidance.num_builds == 2


def test_the_bias_lives_on_the_requested_device_with_the_requested_dtype() -> None:
    bias = SoftGuidance(torch.ones(1, 1, 4, 4), (4, 4)).bias(16, 85, torch.float16, torch.device("meta"))
    assert bias.device.type == "meta" and bias.dtype == torch.float16 and bias.shape == (1, 1, 16, 85)


def test_errors_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match=r"^mask_resize must be one of \('official', 'area'\), got 'nearest'$"):
        SoftGuidance(torch.ones(1, 1, 4, 4), (4, 4), mask_resize="nearest")
    with pytest.raises(ValueError, match=r"^mask must be \(B, 1, H, W\) or \(B, H, W\), got \(1, 2, 4, 4\)$"):
        SoftGuidance(torch.ones(1, 2, 4, 4), (4, 4))  # two channels: not a mask
    guidance = SoftGuidance(torch.ones(1, 1, 4, 4), (4, 4))
    with pytest.raises(ValueError, match=r"^query length 15 matches no resolution of the latent "):
        guidance.bias(15, 85, torch.float32, CPU)
    with pytest.raises(ValueError, match=r"^context of 7 tokens is shorter than the exemplar tokens$"):
        guidance.bias(16, 7, torch.float32, CPU)
