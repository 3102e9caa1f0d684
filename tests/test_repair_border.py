"""``RepairBorder`` replaces the outer rings by the ring inside them and leaves the interior bit for bit."""

from __future__ import annotations

import pytest
import torch

from eclipse_transforms import RepairBorder
from eclipse_transforms import functional as EF

from ._checks import check_transform


def test_contract():
    check_transform(
        RepairBorder(), torch.rand(3, 12, 10, generator=torch.Generator().manual_seed(0)), deterministic=True
    )


def test_a_zero_padded_class_kernel_loses_its_dark_border():
    # CUDA's signature at the edge: a 3x3 blur over zero padding darkens the outer ring of a flat image.
    flat = torch.full((1, 3, 16, 16), 0.6)
    blurred = torch.nn.functional.conv2d(flat, torch.full((3, 1, 3, 3), 1 / 9), padding=1, groups=3)
    assert blurred[..., 0, 5].max() < 0.45  # the dark ring
    assert torch.allclose(EF.repair_border(blurred), flat)


@pytest.mark.parametrize("width", [1, 2])
def test_interior_is_untouched_and_rings_copy_the_next_one(width):
    x = torch.rand(2, 3, 9, 11, generator=torch.Generator().manual_seed(1))
    out = RepairBorder(width)(x)
    inner = (..., slice(width, -width), slice(width, -width))
    assert torch.equal(out[inner], x[inner])
    assert torch.equal(out[..., 0, width:-width], x[..., width, width:-width])  # top ring = first inner row
    assert torch.equal(out[..., width:-width, -1], x[..., width:-width, -width - 1])  # right ring
    assert torch.equal(out[..., 0, 0], x[..., width, width])  # corners from the inner corner
    u8 = (x * 255).round().to(torch.uint8)
    assert torch.equal(RepairBorder(width)(u8), EF.repair_border(u8.float(), width=width).to(torch.uint8))


@pytest.mark.parametrize(("width", "error"), [(0, ValueError), (-1, ValueError), (1.5, TypeError), ("1", TypeError)])
def test_bad_width_is_named(width, error):
    with pytest.raises(error, match="width"):
        RepairBorder(width)


def test_too_small_images_are_refused():
    with pytest.raises(ValueError, match=r"width=2\) needs images larger than 4x4 pixels, got 4x6"):
        RepairBorder(2)(torch.rand(3, 4, 6))
